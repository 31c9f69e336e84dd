"""Per-step metrics: one log line on rank 0, `metrics.jsonl`, TensorBoard, and an optional progress bar."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLogger:
    """Rank 0 writes; other ranks construct it with `enabled=False` and every call is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log_every: int, max_steps: int,
                 progress_bar: str = "auto", start_step: int = 0):
        self.enabled, self.log_every = enabled, log_every
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(path, start_step)  # a resumed run re-logs the steps after its checkpoint
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # The only TensorBoard writer of a run (DeepSpeed's monitor is off), so every scalar is one curve
            # over the step. A resumed run re-logs the steps after its checkpoint: purge_step writes a
            # SessionLog START at start_step + 1, and TensorBoard then drops the earlier session's events from
            # that step on (the same cut `_truncate_after` makes in metrics.jsonl; a fresh run purges them all).
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress_bar == "on" or (progress_bar == "auto" and sys.stdout.isatty()):
            from tqdm import tqdm

            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
            # log records (checkpoint saves) go above the bar instead of through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def log_step(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
            # Every step, like metrics.jsonl: the steps up to a checkpoint must be on disk if the run is killed
            # before the next one (a resume re-logs only what comes after the checkpoint).
            self.tb.flush()
        if step % self.log_every == 0:
            line = format_line(step, scalars)
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.bar:
            self._redirect.__exit__(None, None, None)
            self.bar.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def format_line(step: int, s: dict) -> str:
    """Fixed fields, always in this order (alignment stages add their reward fields after the loss; GPU adds
    tflops and mfu)."""
    parts = [f"step {step:6d}", f"loss {s['loss']:.4f}"]
    if "rewards/margins" in s:  # alignment stages (CCA, DPO): the reward margin and accuracy, CCA's pos-like share
        parts += [f"margin {s['rewards/margins']:.4f}", f"reward_acc {s['rewards/accuracies']:.3f}"]
        if "pos_like_frac" in s:
            parts.append(f"pos_like {s['pos_like_frac']:.3f}")
    parts += [f"lr {s['lr']:.3e}", f"grad_norm {s['grad_norm']:.3f}", f"tokens/s {s['tokens_per_s']:,.0f}",
              f"step_ms {1000 * s['step_time']:.1f}"]
    if "tflops" in s:
        parts += [f"tflops {s['tflops']:.1f}", f"mfu {100 * s['mfu']:.1f}%"]
    if s.get("skipped_samples"):
        parts.append(f"skipped {s['skipped_samples']}")
    return " | ".join(parts)
