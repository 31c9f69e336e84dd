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
