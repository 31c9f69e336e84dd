"""DeepSpeed engine: ZeRO 0-3, fp32/bf16, gradient accumulation and clipping, warmup+cosine LR.

Tensor parallelism comes from the megatron-core layers inside the model; DeepSpeed learns the groups through
`MegatronMpu`, an adapter over megatron-core's `parallel_state` (DeepSpeed asks for `get_model_parallel_*`,
which parallel_state does not have under that name). Pipelines are the megatron engine's job (pp must be 1).
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state

from megacca.config import Config
from megacca.checkpoint import load_model_weights, save_model_weights
from megacca.distributed.engine import (StepLoss, StepResult, add_sums, batch_to, device, global_units,
                                        reduce_sums)
from megacca.model.gpt import summed_logprobs
from megacca.optim import lr_at, param_groups
from megacca.safe_load import safe_torch_load


class MegatronMpu:
    """The `mpu` object DeepSpeed expects, answered from megatron-core's parallel_state."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def we_clip(cfg: Config) -> bool:
    """ZeRO-0 fp32: DeepSpeed does not report the grad norm, so we clip (and keep the norm) ourselves."""
    return cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"


def ds_config(cfg: Config) -> dict:
    tr = cfg.train
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum(),
        "train_batch_size": cfg.global_batch(),
        "gradient_clipping": 0.0 if we_clip(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": tr.precision == "bf16"},
        # A plain torch AdamW needs no JIT-compiled kernel; DeepSpeed calls it "untested" but wraps it fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's monitors stay off: they plot against samples (`Train/Samples/lr`), a second x-axis and
        # a second writer. megacca's MetricsLogger writes every scalar, the LR included, once per step.
        "tensorboard": {"enabled": False},
    }


class DeepSpeedEngine:
    """`build_model(cfg)` builds this rank's model, `loss` is the stage's `StepLoss`; `init_from` (a checkpoint)
    gives the starting weights; `reference_from` (a checkpoint) builds a frozen reference model for losses that
    compare against one (the stage passes None when the reference log-probs come precomputed)."""

    def __init__(self, cfg: Config, build_model, loss: StepLoss, init_from: Path | None = None,
                 reference_from: Path | None = None):
        self.cfg, self.loss = cfg, loss
        model = build_model(cfg)
        if init_from is not None:  # before deepspeed.initialize partitions (ZeRO-3) or copies the weights
            load_model_weights(model, init_from)
        opt = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr,
                                      betas=(opt.beta1, opt.beta2), eps=opt.eps)
        # The LR is a pure function of the step (set before each step), so a resumed run, even one with a new
        # max_steps, follows the schedule without any scheduler state to restore.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg), mpu=MegatronMpu())
        self.model = self.engine.module
        self._device = device()
        self._we_clip = we_clip(cfg)
        self.reference = None if reference_from is None else self._build_reference(build_model, reference_from)

    def _build_reference(self, build_model, ckpt: Path):
        """The frozen reference: same builder, same layout, weights from `ckpt`, no grads, no optimizer. Under
        ZeRO-3 it is partitioned like the policy (a DeepSpeed engine without an optimizer, as TRL does)."""
        ref = build_model(self.cfg)
        load_model_weights(ref, ckpt)
        ref.requires_grad_(False)
        ref.eval()
        if self.cfg.parallel.zero_stage == 3:
            conf = {"train_micro_batch_size_per_gpu": self.cfg.train.micro_batch_size,
                    "zero_optimization": {"stage": 3}, "bf16": {"enabled": self.cfg.train.precision == "bf16"},
                    "steps_per_print": 10**9, "tensorboard": {"enabled": False}}
            ref, *_ = deepspeed.initialize(model=ref, config=conf, mpu=MegatronMpu())
            ref.eval()
            return ref
        return ref.to(self._device)

    @torch.no_grad()
    def reference_logps(self, mb: dict) -> torch.Tensor:
        """Summed log-probs of the frozen reference for each row of a micro-batch (already on the device)."""
        return summed_logprobs(self.reference(mb["tokens"], None, None, labels=mb["labels"]), mb["loss_mask"])

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        n_units = float(global_units(micro_batches, self.loss))
        accum = len(micro_batches)
        scale = parallel_state.get_data_parallel_world_size() * accum  # undo DeepSpeed's dp and gas averaging
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict = {}
        for mb in micro_batches:
            mb = batch_to(mb, self._device)
            if self.reference is not None:
                mb["ref_logps"] = self.reference_logps(mb)
            nll = self.engine(mb["tokens"], None, None, labels=mb["labels"])
            loss_sum, metric_sums = self.loss(mb, nll)
            add_sums(sums, loss_sum, metric_sums)
            self.engine.backward(loss_sum * (scale / n_units))
            if self.engine.is_gradient_accumulation_boundary() and self._we_clip:
                # DeepSpeed records the norm only for its own (ZeRO / mixed-precision) optimizers; here the
                # grads are whole and already all-reduced, so we clip (tp-aware) and keep the pre-clip norm,
                # and DeepSpeed's own clipping is off (one norm pass instead of two).
                norm = float(clip_grad_norm_(list(self.model.parameters()), self.cfg.optim.grad_clip or float("inf"),
                                             mpu=MegatronMpu()))
            self.engine.step()
        if not self._we_clip:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        totals = reduce_sums(sums, self.loss)
        loss = totals.pop("loss") / n_units
        return StepResult(loss=loss, grad_norm=norm, lr=lr, tokens=int(n_units),
                          metrics={k: v / n_units for k, v in totals.items()})

    def save(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir / "engine"), tag="deepspeed", save_latest=False)
        # The weights once more in megatron's distributed format (megacca.checkpoint), which any tp / pp / ZeRO
        # layout and either engine can read: what `train.init_from`, the reference model and the tools load.
        params = list(self.model.parameters()) if self.cfg.parallel.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
            save_model_weights(self.model, ckpt_dir / "model")

    def load(self, ckpt_dir: Path) -> None:
        # DeepSpeed's torch checkpoint engine unpickles with weights_only=False; load through our allow-list.
        ce = self.engine.checkpoint_engine
        ce.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)
        path, _ = self.engine.load_checkpoint(str(ckpt_dir / "engine"), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt_dir}")
