"""The small interface both training engines implement, the loss seam, and the normalisation they share.

An engine takes a model builder and a `StepLoss` from the stage; it owns neither (torchtitan's TrainSpec /
build_loss_fn split). The model always returns per-token NLL of `labels`; the stage's loss turns one
micro-batch's NLL into a *sum* over its units (loss tokens for pretraining, pairs for CCA / DPO), and the engine
divides by the number of units in the *global* batch (all micro-batches of all data-parallel ranks). So the
gradient does not depend on how the batch is split into micro-batches, data-parallel ranks or ZeRO partitions;
that is what makes dp=2 match dp=1 and lets a resumed run repeat an uninterrupted one.

A loss that compares the policy with a frozen reference (`StepLoss.reference = True`) finds the reference's
summed log-probs in `mb["ref_logps"]`: read from precomputed pair shards, or filled in by the engine from its
reference model just before the policy's forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class StepResult:
    loss: float
    """Global mean of the stage's loss over the batch's units (token-mean NLL when pretraining)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate used by this step."""
    tokens: int
    """Units in the global batch (loss tokens when pretraining, pairs when aligning)."""
    metrics: dict = field(default_factory=dict)
    """The loss's own metrics, global means over the units (`rewards/margins`, ...)."""


class StepLoss(Protocol):
    """What a stage hands an engine: the loss of one micro-batch, from the model's per-token NLL."""

    reference: bool
    """True when the loss needs `mb["ref_logps"]` (the frozen reference's summed log-probs per row)."""
    metric_names: tuple
    """The metric keys `__call__` returns (every rank reduces the same keys, pipeline stages included)."""
    unit: str
    """What a unit is, as logged with its count per step: `loss_tokens`, `pairs`."""
    sequences_per_sample: int
    """Rows of a micro-batch per sample of `train.micro_batch_size`: 1, or 2 for pairs."""

    def units(self, mb: dict) -> float:
        """This micro-batch's count towards the global normaliser (loss tokens; pairs)."""

    def __call__(self, mb: dict, nll: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(sum of the loss over this micro-batch's units, {metric: sum over its units}); `nll` is [rows, S]."""


class Engine(Protocol):
    model: torch.nn.Module

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult: ...

    def save(self, ckpt_dir: Path) -> None:
        """Write this rank's part of the model and optimizer state under the checkpoint directory `ckpt_dir`
        (every rank calls): `engine/`, plus `model/` unless `engine/` is already a model-weights checkpoint
        that `megacca.checkpoint.load_model_weights` reads."""

    def load(self, ckpt_dir: Path) -> None: ...


def global_units(micro_batches: list[dict], loss: StepLoss) -> torch.Tensor:
    """Units of the whole global batch (all-reduced over data-parallel ranks)."""
    n = torch.tensor(sum(float(loss.units(mb)) for mb in micro_batches), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
    return n.clamp(min=1.0)


def reduce_sums(local: dict[str, torch.Tensor], loss: StepLoss, only_last_stage: bool = False) -> dict[str, float]:
    """Sum per-rank sums (`loss` and the loss's metrics) over data-parallel ranks (and, for pipelines, bring
    them to every rank): one all-reduce for all of them. Keys a rank lacks (pipeline stages before the last)
    count as 0."""
    keys = ["loss", *loss.metric_names]
    zero = torch.zeros((), dtype=torch.float64)
    t = torch.stack([local.get(k, zero).detach().double().reshape(()) for k in keys])
    if dist.is_initialized():
        if only_last_stage:
            # Only the last pipeline stage holds losses; each of its tp ranks holds the same value.
            if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                t.zero_()
            dist.all_reduce(t)
            t /= parallel_state.get_tensor_model_parallel_world_size()
        else:
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return {k: float(v) for k, v in zip(keys, t)}


def add_sums(acc: dict[str, torch.Tensor], loss_sum: torch.Tensor, metric_sums: dict) -> None:
    """Accumulate one micro-batch's loss and metric sums (detached, float64) into `acc`."""
    for k, v in (("loss", loss_sum), *metric_sums.items()):
        v = v.detach().double().reshape(()).cpu()
        acc[k] = acc[k] + v if k in acc else v


def batch_to(mb: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

