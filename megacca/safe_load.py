"""Loading engine checkpoints without running code from them.

A checkpoint is data: resuming from one, or loading its weights, must not execute anything it contains. Two
formats need care, because the libraries that write them read them back with pickle:

- DeepSpeed's `.pt` files (`safe_torch_load`): `torch.load(weights_only=True)`, which rebuilds only tensors,
  containers and primitive values, plus exactly the three DeepSpeed classes its ZeRO 0-3 files hold.
- megatron distributed checkpoints (torch DCP, `restricted_pickle`): the `.metadata` file is a plain pickle,
  read here by an unpickler that resolves exactly the DCP metadata classes (no functions that load, no whole
  modules); the objects DCP stores as bytes inside the `.distcp` files and megatron's `common.pt` go through
  `torch.load(weights_only=True)` with nothing added (not even the classes megatron-core registers
  process-wide), although DCP itself asks for `weights_only=False`.

The allow-lists are what real megacca checkpoints hold (megatron engine: DDP / DistributedOptimizer, tp=2,
pp=2, fp32 / bf16; DeepSpeed: ZeRO 0-3, tp=2, fp32 / bf16), found by recording every global their pickles
name (tests/test_safe_load.py keeps them equal). A file naming anything else fails with
`UnsafeCheckpointError` naming the global, before anything is called.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import re
import types

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names a global that loading it would call, or a shard file outside its directory."""


# torch DCP and megatron catch exceptions while loading and re-raise them as strings inside their own (and, on
# the other ranks, as a generic failure). A refusal is recorded here so `restricted_pickle` can raise it as
# itself: the error then names the file and the global instead of ending a page of wrapped tracebacks.
_refusals: list[UnsafeCheckpointError] = []


def _refuse(message: str) -> UnsafeCheckpointError:
    err = UnsafeCheckpointError(message)
    _refusals.append(err)
    return err


def _name_of(f) -> str:
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
    return f" {os.fspath(name)}" if isinstance(name, (str, os.PathLike)) else ""


# ---- torch.load(weights_only=True) ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _deepspeed_globals() -> tuple:
    """What DeepSpeed's ZeRO-1/2/3 optimizer files pickle beyond tensors and containers: the loss scaler (the
    static one: megacca trains fp32 or bf16, never with fp16's dynamic scaler), the ZeRO stage enum and the
    fragment addresses of ZeRO-1/2. Classes only, rebuilt from their saved attributes (no method of theirs
    runs); ZeRO-0 files need none of them."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, ZeroStageEnum, fragment_address


@contextlib.contextmanager
def only_safe_globals(allowed=()):
    """`weights_only` admits torch's own safe set, every class registered process-wide and `allowed`. Imports
    register ~30 for their own files (megatron-core: argparse.Namespace, numpy's array reconstructor, its
    config dataclasses; torch.distributed: DTensor, device meshes; ...), none of which megacca's checkpoints
    hold: inside, only torch's set and `allowed` count."""
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(list(allowed))
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)


def _weights_only_load(load, f, map_location, allowed: tuple, **kwargs):
    with only_safe_globals(allowed):
        try:
            return load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            # torch's message is paragraphs of advice to pass weights_only=False, which is exactly the code
            # execution this module exists to prevent; say which global the file names instead.
            named = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
            what = (f"it names {named.group(1) or named.group(2)}, which is not on the allow-list" if named
                    else str(e).rsplit("WeightsUnpickler error:", 1)[-1].strip()[:300])
            raise _refuse(f"refusing to load checkpoint file{_name_of(f)}: {what}") from None


def safe_torch_load(path, map_location="cpu"):
    """`torch.load` for DeepSpeed's checkpoint files: tensors, containers and `_deepspeed_globals()` only."""
    return _weights_only_load(torch.load, path, map_location, _deepspeed_globals())


@contextlib.contextmanager
def _torch_load_weights_only():
    """Inside: every `torch.load` is `weights_only=True` with torch's own safe set only, whatever its caller
    passed (DCP loads its byte items with weights_only=False; megatron loads `common.pt` with torch's default,
    which torch < 2.6 and the TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD variable make a full unpickle)."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if pickle_module is not None:  # its own Unpickler would bypass weights_only
            raise _refuse(f"refusing to load checkpoint file{_name_of(f)} with the pickle module {pickle_module!r}")
        return _weights_only_load(original, f, map_location, (), mmap=mmap, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ---- torch DCP's `.metadata`: a plain pickle -------------------------------------------------------------------
_DCP = "torch.distributed.checkpoint"
# The globals a DCP `.metadata` of megacca's checkpoints names: DCP's dataclasses and enums, torch.Size, and the
# function that maps a layout's name ("torch.strided") to the layout. Unpickling calls each with data from
# the file: constructors that store their arguments, and a dictionary lookup.
_METADATA_GLOBALS = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
})
# dtypes are values, not callables: any of torch's (a checkpoint may hold int64, fp16, fp8, ... tensors).
_DTYPES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str = ""):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise _refuse(f"refusing to unpickle {module}.{name} from the checkpoint metadata{self.where} "
                      f"(not a torch DCP metadata class)")


def _check_metadata(metadata, where: str = ""):
    """The shard files a metadata names must lie in its checkpoint directory: DCP joins the checkpoint path
    with them, so an absolute or `..` path would read any file on the machine into the model. DCP names them
    `__<rank>_<n>.distcp`; a plain file name is all that is allowed."""
    for info in getattr(metadata, "storage_data", {}).values():
        rel = getattr(info, "relative_path", None)
        if not (isinstance(rel, str) and re.fullmatch(r"[\w.\-]+", rel) and rel not in (".", "..")):
            raise _refuse(f"refusing the checkpoint metadata{where}: it names the shard file {rel!r}, which is "
                          f"not a file name inside the checkpoint directory")
    return metadata


def restricted_load(file):
    """Unpickle a DCP `.metadata` (an open binary file) through the allow-list."""
    where = _name_of(file)
    return _check_metadata(_MetadataUnpickler(file, where).load(), where)


def restricted_loads(data: bytes):
    """Unpickle DCP `.metadata` bytes through the allow-list."""
    return restricted_load(io.BytesIO(data))


# What torch.distributed.checkpoint.filesystem sees as `pickle` inside `restricted_pickle` (it reads
# `.metadata` with pickle.load and writes it with pickle.dump).
_PICKLE_SHIM = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_PICKLE_SHIM.load = lambda file, *args, **kwargs: restricted_load(file)
_PICKLE_SHIM.loads = lambda data, *args, **kwargs: restricted_loads(data)


@contextlib.contextmanager
def restricted_pickle():
    """Around megatron `dist_checkpointing.load` and torch DCP loads: `.metadata` through the allow-list,
    every `torch.load` (DCP's byte items, megatron's common.pt) with weights_only=True. A refusal anywhere
    inside is raised as the `UnsafeCheckpointError` itself, however the libraries wrapped it. Nests."""
    import torch.distributed.checkpoint.filesystem as fs

    if fs.pickle is _PICKLE_SHIM:  # already inside
        yield
        return
    if fs.pickle is not pickle:  # a torch that reads it another way would bypass the allow-list unseen
        raise RuntimeError("torch.distributed.checkpoint.filesystem no longer reads .metadata with the pickle "
                           "module; megacca.safe_load must be updated for this torch")
    _refusals.clear()
    fs.pickle = _PICKLE_SHIM
    try:
        with _torch_load_weights_only():
            yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not _refusals or isinstance(e, (UnsafeCheckpointError, KeyboardInterrupt, SystemExit)):
            raise
        raise _refusals[0] from None
    finally:
        fs.pickle = pickle
        _refusals.clear()
