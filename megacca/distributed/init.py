"""Process-group and megatron-core parallel-state set-up from whatever started the process.

Launchers: the deepspeed launcher and torchrun set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*; a bare `python`
or `megacca` process sets nothing and becomes a world of one on a free local port.
"""
from __future__ import annotations

import logging
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from megacca import cpu_compat

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Fill the rank variables for a single process started without a launcher."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = "auto",
                     use_deepspeed: bool = False) -> None:
    """torch.distributed + megatron-core parallel state (TP/PP/DP) + per-rank seeding."""
    ensure_env()
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # Without the deepspeed launcher's core binding, N ranks would each use every core and thrash.
        local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    cpu_compat.install()
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed
            import deepspeed.ops

            # The shared-memory comm op is only used for inference and JIT-compiles for ~1 min on first use.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend=backend)
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    log.info("rank %d/%d: tp=%d pp=%d dp=%d backend=%s", dist.get_rank(), dist.get_world_size(), tp, pp,
             parallel_state.get_data_parallel_world_size(), backend)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Barrier, then destroy: exiting with live gloo groups aborts the process about half the time."""
    if dist.is_initialized():
        dist.barrier()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class RankStopped(Exception):
    """Another rank stopped on an error it reported; this rank leaves too, without a message of its own."""


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank calls it at the same point)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_rank0() -> bool:
    """Rank 0 of the process group; before it exists, what the launcher's RANK says (none: a world of one)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
