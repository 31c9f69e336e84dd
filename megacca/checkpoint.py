"""Atomic, resumable checkpoints under `<run_dir>/checkpoints/`.

Layout:
    checkpoints/step_00000100/      one complete checkpoint
        engine/                     the engine's own files (DeepSpeed ZeRO partitions, or a megatron
                                    distributed checkpoint), every rank writes its part
        trainer.json                step, consumed tokens, resolved config, vocabulary manifest
        vocab.json                  the unified vocabulary manifest (when the run has one)
        rank_00000.json             per-rank data-loader position and Python/numpy RNG state
        rank_00000.safetensors      per-rank torch RNG states (CPU, CUDA, megatron's tracker)
    checkpoints/latest              the name of the newest complete checkpoint, written last

A save goes to `checkpoints/.tmp-step_...`, all ranks finish (barrier, fsync), then rank 0 renames the
directory and only then replaces `latest` (write-to-temp + os.replace). A crash at any point leaves either the
previous `latest` or the new one, never a partial checkpoint that resume would read. Loading never unpickles:
JSON, safetensors, and `torch.load(weights_only=True)` inside the engines.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megacca.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict]:
    """(tensors, json-able) RNG state of this rank."""
    from megatron.core import tensor_parallel

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = st
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker.")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- locating ---------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"{pointer} names {name!r}, but {path}/trainer.json is missing")
        return path

    # -- saving -----------------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict, data_state: dict) -> Path:
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over by a crash during an earlier save of this step
            tmp.mkdir()
        _barrier()
        engine.save(tmp / "engine")
        tensors, meta = rng_state()
        r = _rank()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rank_{r:05d}.safetensors"))
        atomic_write_json(tmp / f"rank_{r:05d}.json", {"data": data_state, "rng": meta})
        if r == 0:
            atomic_write_json(tmp / "trainer.json", trainer_state)
            if trainer_state.get("vocab") is not None:  # the tokenizer contract travels with the weights
                atomic_write_json(tmp / "vocab.json", trainer_state["vocab"])
        _barrier()
        if r == 0:
            _fsync_tree(tmp)
            if os.environ.get("MEGACCA_TEST_KILL_IN_SAVE") == str(step):  # test hook: die before publishing
                os.kill(os.getpid(), 9)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune(keep=final)
        _barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, path: Path, engine) -> tuple[dict, dict]:
        """Restore engine, RNG; return (trainer_state, this rank's data state)."""
        trainer_state = json.loads((path / "trainer.json").read_text())
        engine.load(path / "engine")
        r = _rank()
        rank_json = path / f"rank_{r:05d}.json"
        if not rank_json.is_file():
            raise FileNotFoundError(f"{rank_json} is missing: was {path} saved with a different world size "
                                    f"({trainer_state.get('world_size')} ranks)?")
        per_rank = json.loads(rank_json.read_text())
        set_rng_state(load_file(str(path / f"rank_{r:05d}.safetensors")), per_rank["rng"])
        return trainer_state, per_rank["data"]
