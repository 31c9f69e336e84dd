"""DeepSpeed engine: ZeRO 0-3, fp32/bf16, gradient accumulation and clipping, warmup+cosine LR.

Tensor parallelism comes from the megatron-core layers inside the model; DeepSpeed learns the groups through
`MegatronMpu`, an adapter over megatron-core's `parallel_state` (DeepSpeed asks for `get_model_parallel_*`,
which parallel_state does not have under that name). Pipelines are the megatron engine's job (pp must be 1).
"""
from __future__ import annotations

import logging
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state

from megacca.config import Config
from megacca.distributed.engine import StepResult, batch_to, device, global_loss_tokens, reduce_loss_sum
from megacca.model.gpt import build_model
from megacca.optim import lr_at, param_groups
from megacca.safe_load import safe_torch_load

log = logging.getLogger(__name__)


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
        "tensorboard": {"enabled": tr.tensorboard and _is_rank0(), "output_path": str(tr.run_dir),
                        "job_name": "tensorboard"},
    }


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class DeepSpeedEngine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        model = build_model(cfg)
        opt = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr,
                                      betas=(opt.beta1, opt.beta2), eps=opt.eps)
        # The LR is a pure function of the step (set before each step), so a resumed run, even one with a new
        # max_steps, follows the schedule without any scheduler state to restore.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg), mpu=MegatronMpu())
        self.model = self.engine.module
        self.monitor = self.engine.monitor if self.engine.monitor.enabled else None
        self._device = device()
        self._we_clip = we_clip(cfg)

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        n_tokens = global_loss_tokens(micro_batches)
        accum = len(micro_batches)
        scale = parallel_state.get_data_parallel_world_size() * accum  # undo DeepSpeed's dp and gas averaging
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            mb = batch_to(mb, self._device)
            nll = self.engine(mb["tokens"], None, None, labels=mb["labels"])
            loss_sum = (nll.float() * mb["loss_mask"]).sum()
            local += loss_sum.detach().double().cpu()
            self.engine.backward(loss_sum * (scale / n_tokens.item()))
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
        return StepResult(loss=reduce_loss_sum(local) / n_tokens.item(), grad_norm=norm, lr=lr,
                          tokens=int(n_tokens.item()))

    def save(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        # DeepSpeed's torch checkpoint engine unpickles with weights_only=False; load through our allow-list.
        ce = self.engine.checkpoint_engine
        ce.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt_dir}")

    def write_scalars(self, step: int, scalars: dict) -> bool:
        """Send scalars through DeepSpeed's monitors; False when they are disabled."""
        if self.monitor is None:
            return False
        self.monitor.write_events([(f"train/{k}", float(v), step) for k, v in scalars.items()])
        return True
