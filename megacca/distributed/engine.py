"""The small interface both training engines implement, and the loss normalisation they share.

A step takes this rank's micro-batches of one global batch. The loss is the mean NLL over every loss token of
the *global* batch (all micro-batches of all data-parallel ranks), so the gradient does not depend on how the
batch is split into micro-batches, data-parallel ranks or ZeRO partitions; that is what makes dp=2 match dp=1
and lets a resumed run repeat an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class StepResult:
    loss: float
    """Global token-mean NLL of the batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate used by this step."""
    tokens: int
    """Loss tokens in the global batch."""


class Engine(Protocol):
    model: torch.nn.Module

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult: ...

    def save(self, ckpt_dir: Path) -> None:
        """Write this rank's part of the model and optimizer state into `ckpt_dir` (every rank calls)."""

    def load(self, ckpt_dir: Path) -> None: ...


def global_loss_tokens(micro_batches: list[dict]) -> torch.Tensor:
    """Number of loss tokens over the whole global batch (all-reduced over data-parallel ranks)."""
    n = torch.tensor(sum(float(mb["loss_mask"].sum()) for mb in micro_batches), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
    return n.clamp(min=1.0)


def reduce_loss_sum(local_sum: torch.Tensor, only_last_stage: bool = False) -> float:
    """Sum a per-rank loss sum over data-parallel ranks (and, for pipelines, bring it to every rank)."""
    t = local_sum.detach().double().reshape(1).clone()
    if not dist.is_initialized():
        return float(t)
    if only_last_stage:
        # Only the last pipeline stage holds losses; each of its tp ranks holds the same value.
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            t.zero_()
        dist.all_reduce(t)
        return float(t) / parallel_state.get_tensor_model_parallel_world_size()
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t)


def batch_to(mb: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
