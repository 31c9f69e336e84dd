"""Loading `.pt` files without unpickling arbitrary objects.

Engines write some state with `torch.save` (DeepSpeed's optimizer partitions, megatron's common state).
We read every such file with `torch.load(weights_only=True)`, which only rebuilds tensors, containers and
primitive values, plus an explicit allow-list of plain-data classes those engines put in their files. A file
needing anything else fails with an error naming the class instead of running its code.
"""
from __future__ import annotations

import argparse
import collections
import functools

import torch


@functools.lru_cache(maxsize=1)
def _allowed() -> list:
    allowed: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set, frozenset]
    try:  # DeepSpeed's optimizer states record the loss-scaler object and a few enums.
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path, map_location="cpu"):
    with torch.serialization.safe_globals(_allowed()):
        return torch.load(path, map_location=map_location, weights_only=True)


# ---- restricted unpickling for torch.distributed.checkpoint's `.metadata` file -------------------------------
# torch DCP (the torch_dist format of megatron distributed checkpoints) stores its metadata with plain pickle.
# We read it with an Unpickler that only resolves classes from the modules below (metadata dataclasses, torch
# sizes/dtypes, containers); anything else, such as os.system, is refused.
import contextlib  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import types  # noqa: E402

_PICKLE_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.", "collections")
_PICKLE_NAMES = {("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
                 ("torch", "int64"), ("torch", "int32"), ("torch", "uint8"), ("torch", "bool"),
                 ("torch", "float64"), ("torch", "int8"), ("torch", "int16"), ("torch", "device"),
                 ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                 ("torch.serialization", "_get_layout"), ("torch", "strided"), ("enum", "Enum")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith(_PICKLE_MODULES) or (module, name) in _PICKLE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not on megacca's allow-list)")


def restricted_loads(data: bytes):
    return _RestrictedUnpickler(io.BytesIO(data)).load()


@contextlib.contextmanager
def restricted_pickle():
    """Make torch DCP's filesystem reader unpickle its metadata through the allow-list."""
    import torch.distributed.checkpoint.filesystem as fs

    shim = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    shim.load = lambda f, *a, **k: _RestrictedUnpickler(f).load()
    shim.loads = lambda b, *a, **k: restricted_loads(b)
    original = fs.pickle
    fs.pickle = shim
    try:
        yield
    finally:
        fs.pickle = original
