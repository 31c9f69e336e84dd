"""AdamW parameter groups and the learning-rate schedule shared by both engines."""
from __future__ import annotations

import math

import torch

from megacca.config import OptimConfig


def lr_at(step: int, opt: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `lr`, then cosine to `min_lr` (or constant)."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.decay == "constant":
        return opt.lr
    span = max(1, max_steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms (and any bias) are 1-D and excluded, as in Megatron-LM and LlamaGen."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
