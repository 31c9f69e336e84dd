"""Run megatron-core 0.16.1 on a CPU-only machine (gloo). Inert when CUDA is available.

megatron-core assumes CUDA in places that matter even for tiny CPU runs: `torch.cuda.current_device()` as a
device argument, ~70 literal `device="cuda"` / `.cuda()` sites (causal masks, pipeline p2p buffers, DDP
buckets, optimizer state, dist-checkpoint metadata), `t.type() == 'torch.cuda.FloatTensor'` checks in the
optimizer, and an RNG tracker built on the CUDA generator. Every patch lives here, each with its reason, and
`install()` does nothing when `torch.cuda.is_available()`. Measured cost: docs/decisions.md (CPU compatibility mode).
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_INSTALLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device index means "that CUDA device" to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while it is active.

    Why a mode and not source patches: the CUDA placements are spread over dozens of megatron-core modules
    (pipeline schedules, DDP, optimizer, dist checkpointing); one interception point is smaller and survives
    megatron-core upgrades better than patching each call site.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]  # `.cuda()` on CPU tensors: keep them where they are
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizer (megatron/core/optimizer/optimizer.py) accepts only 'torch.cuda.*Tensor' params.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def install() -> bool:
    """Apply the CPU patches once; returns True when they are active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    # `device=torch.cuda.current_device()` is used to place new tensors; "cpu" is a valid device there.
    torch.cuda.current_device = lambda: "cpu"
    # Timers and the pipeline schedule call it; there is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    # The RNG tracker (needed even with dropout 0: attention forks it) seeds and swaps the CUDA generator;
    # point it at the CPU generator so forks and restores keep working.
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Memory queries used by logging utilities.
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _INSTALLED = True
    log.info("CUDA not available: megatron-core CPU compatibility layer installed (megacca.cpu_compat)")
    return True
