"""Atomic, resumable checkpoints under `<run_dir>/checkpoints/`.

Layout:
    checkpoints/step_00000100/      one complete checkpoint
        engine/                     the engine's own files (DeepSpeed ZeRO partitions, or a megatron
                                    distributed checkpoint), every rank writes its part
        model/                      (DeepSpeed engine) the weights alone as a megatron distributed checkpoint;
                                    the megatron engine's engine/ already is one (see "model weights" below)
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
import queue
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megacca import faults
from megacca.distributed.init import is_rank0
from megacca.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then `path` itself: what a rename into place must follow."""
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
        if is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over by a crash during an earlier save of this step
            tmp.mkdir()
        _barrier()
        engine.save(tmp)
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
            fsync_tree(tmp)
            faults.maybe_kill("in_save", step)
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
        engine.load(path)
        r = _rank()
        rank_json = path / f"rank_{r:05d}.json"
        if not rank_json.is_file():
            raise FileNotFoundError(f"{rank_json} is missing: was {path} saved with a different world size "
                                    f"({trainer_state.get('world_size')} ranks)?")
        per_rank = json.loads(rank_json.read_text())
        set_rng_state(load_file(str(path / f"rank_{r:05d}.safetensors")), per_rank["rng"])
        return trainer_state, per_rank["data"]


# ---- model weights, independent of the engine and layout that wrote them ----------------------------------
# Every megacca checkpoint holds its model weights as a megatron distributed checkpoint (torch_dist): the
# megatron engine's `engine/` directory (model and optimizer together), or the DeepSpeed engine's `model/`
# (written beside DeepSpeed's own files, ZeRO-3 parameters gathered first). Its tensors carry global shapes
# and offsets, so one reader serves every tp / pp / ZeRO layout. Its keys do not depend on the attention
# backend either: megatron's local layer spec stores its norms under the Transformer Engine names
# (`sharded_state_dict_keys_map`), so a TE model and a local-spec model write and read the same keys. Full
# (single-process) state dicts use the canonical naming of `megacca.convert.canonical`, on the way out
# (`read_full_state_dict`) and on the way in (`load_full_state_dict`, which takes TE names too).


class CheckpointNotFound(FileNotFoundError):
    """A path that is neither a megacca run directory nor one of its checkpoints."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (→ its latest checkpoint) or one checkpoint directory → the checkpoint directory."""
    p = Path(path)
    if (p / "trainer.json").is_file():
        return p
    latest = CheckpointManager(p).latest() if (p / "checkpoints").is_dir() else None
    if latest is None:
        raise CheckpointNotFound(f"{p}: not a megacca checkpoint (no trainer.json) nor a run directory with "
                                 f"checkpoints/latest")
    return latest


def read_trainer_state(ckpt: str | Path) -> dict:
    """`trainer.json` of a checkpoint (step, resolved config, vocabulary manifest)."""
    return json.loads((resolve_checkpoint(ckpt) / "trainer.json").read_text())


def model_weights_dir(ckpt: str | Path) -> Path:
    """Where a checkpoint's weights are; `ckpt` may also be a bare distributed checkpoint directory."""
    if (Path(ckpt) / ".metadata").is_file():
        return Path(ckpt)
    ckpt = resolve_checkpoint(ckpt)
    for sub in ("model", "engine"):
        if (ckpt / sub / ".metadata").is_file():
            return ckpt / sub
    raise CheckpointNotFound(f"{ckpt}: holds no model weights in megatron's distributed format "
                             f"(model/ or engine/ with a .metadata file)")


def save_dist_checkpoint(sharded_state: dict, ckpt_dir: str | Path) -> None:
    """Synchronous megatron distributed checkpoint save into a new directory (every rank calls)."""
    ckpt_dir = Path(ckpt_dir)
    if is_rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    # megatron's torch_dist writer collects results through a multiprocessing Manager queue, whose server
    # process outlives a SIGKILLed trainer (keeping its stdout open, so launchers and pipes never see EOF).
    # Our saves are synchronous: the writer runs in this process, and a plain in-process queue suffices.
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state, str(ckpt_dir))


def save_model_weights(model, out_dir: Path) -> None:
    """Write this rank's part of `model` as a model-only distributed checkpoint (every rank calls)."""
    save_dist_checkpoint({"model": model.sharded_state_dict()}, out_dir)


def load_model_weights(model, ckpt: str | Path) -> None:
    """Load only the model weights of a megacca checkpoint (either engine, any layout) into this rank's part
    of `model`, at this process's tp / pp layout (every rank calls; parallel state initialised)."""
    from megatron.core import dist_checkpointing

    from megacca.safe_load import restricted_pickle

    with restricted_pickle():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(model_weights_dir(ckpt)))
    model.load_state_dict(state["model"])


def read_full_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The whole model of any megacca checkpoint as one single-process state dict in the canonical naming
    (`megacca.convert.canonical`: the tp=1, pp=1 local-spec model's `state_dict()` names without `_extra_state`,
    `decoder.layers.N.input_layernorm.weight`, ...), whichever attention backend wrote it. Needs no process
    group; reads only the model's tensors (not the optimizer's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megacca.convert.canonical import from_stored
    from megacca.safe_load import restricted_pickle

    src = model_weights_dir(ckpt)
    with restricted_pickle():
        reader = dcp.FileSystemReader(str(src))
        meta = reader.read_metadata()
        # Whole (unsharded) tensors of the model's keys; DCP fills them from every rank's shard files.
        flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")}
        with warnings.catch_warnings():  # a single-process read is the point here, not a fallback
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=reader, no_dist=True)
    return from_stored(flat)


def load_full_state_dict(model, state_dict: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """Load a full state dict (canonical names, or a Transformer Engine model's) into a tp=1, pp=1 model of
    either layer spec, strictly; a missing, unexpected or misshapen key is a ConversionError naming it and both
    shapes."""
    from megacca.convert.canonical import load_canonical

    load_canonical(model, state_dict, where)


# The model fields a checkpoint's weights must agree with (vocab_size: the unpadded unified vocabulary).
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "rope", "image_grid", "layout")


def check_init_from(cfg) -> None:
    """Before any rank starts: `train.init_from` names a checkpoint whose model shape and vocabulary manifest
    are this config's. ConfigError naming both sides otherwise."""
    from megacca.config import ConfigError
    from megacca.tokenizer.vocab import VocabMismatchError, check_checkpoint

    if not cfg.train.init_from:
        return
    try:
        ckpt = resolve_checkpoint(cfg.train.init_from)
        model_weights_dir(ckpt)
    except CheckpointNotFound as e:
        raise ConfigError("train.init_from", str(e)) from None
    saved = read_trainer_state(ckpt)
    theirs = saved.get("config", {}).get("model", {})
    for k in _SHAPE_KEYS:
        if k in theirs and theirs[k] != getattr(cfg.model, k):
            raise ConfigError("train.init_from", f"{ckpt} has model.{k}={theirs[k]!r} but this config has "
                                                 f"model.{k}={getattr(cfg.model, k)!r}")
    try:
        check_checkpoint(saved.get("vocab"), cfg.data.vocab, str(ckpt))
    except (VocabMismatchError, ValueError, FileNotFoundError) as e:
        raise ConfigError("train.init_from", f"vocabulary differs: {e}") from None
