"""megatron-core engine: DDP + (Distributed)Optimizer + pipeline schedules + distributed checkpointing.

`parallel.zero_stage=1` selects megatron's DistributedOptimizer (optimizer state sharded over data-parallel
ranks, ZeRO-1 style); 0 keeps a full optimizer per rank. Pipelines (pp>1) run megatron's 1F1B schedule; every
stage reads the same micro-batches (stages other than the first and last only use the token ids, for 2D rotary).
Checkpoints are megatron distributed checkpoints (torch_dist), so a model saved at one tp/pp layout loads at
another (`megacca.checkpoint.load_model_weights`).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megacca.config import Config
from megacca.checkpoint import load_model_weights, save_dist_checkpoint
from megacca.distributed.engine import (StepLoss, StepResult, add_sums, batch_to, device, global_units,
                                        reduce_sums)
from megacca.model.gpt import summed_logprobs
from megacca.optim import lr_at
from megacca.safe_load import restricted_pickle

# dp_reshardable: each rank saves its own optimizer-state shards (no gather), loadable at another dp size.
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronEngine:
    """`build_model(cfg)` builds this rank's model (one pipeline stage), `loss` is the stage's `StepLoss`;
    `init_from` gives the starting weights; `reference_from` builds a frozen reference model (no DDP, no
    optimizer; under pp it runs through a forward-only pipeline pass)."""

    def __init__(self, cfg: Config, build_model, loss: StepLoss, init_from: Path | None = None,
                 reference_from: Path | None = None):
        self.cfg, self.loss = cfg, loss
        model = build_model(cfg)
        if init_from is not None:
            load_model_weights(model, init_from)
        if torch.cuda.is_available():
            # torch norms (and rotary buffers) are built on CPU; DDP buckets must see every param on the GPU.
            model.cuda(torch.cuda.current_device())
        tcfg = model.config
        self.ddp = DistributedDataParallel(
            config=tcfg,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=cfg.parallel.zero_stage == 1),
            module=model)
        # The schedule calls this after the last backward: dp all-reduce, plus the tp all-reduce of
        # sequence-parallel norm grads and pipeline embedding sync.
        tcfg.finalize_model_grads_func = finalize_model_grads
        opt = cfg.optim
        bf16 = cfg.train.precision == "bf16"
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                            adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_eps=opt.eps,
                            clip_grad=opt.grad_clip, bf16=bf16, params_dtype=tcfg.params_dtype,
                            use_distributed_optimizer=cfg.parallel.zero_stage == 1),
            [self.ddp])
        self.model = model
        self._device = device()
        self.reference = None
        if reference_from is not None:
            ref = build_model(cfg)
            load_model_weights(ref, reference_from)
            ref.requires_grad_(False)
            self.reference = ref.eval().to(self._device)

    # -- training ---------------------------------------------------------------------------------------
    def _schedule(self, model, micro_batches: list[dict], forward_step, forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=self.cfg.model.seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only)

    @torch.no_grad()
    def _fill_reference_logps(self, micro_batches: list[dict]) -> None:
        """`mb["ref_logps"]` on the last pipeline stage (where the loss runs), by a forward-only pass."""

        def ref_step(data_iterator, model):
            mb = next(data_iterator)
            out = model(mb["tokens"], None, None, labels=mb["labels"])

            def keep(nll):
                mb["ref_logps"] = summed_logprobs(nll, mb["loss_mask"])
                return nll.new_zeros(()), {}

            return out, keep

        self._schedule(self.reference, micro_batches, ref_step, forward_only=True)

    def _forward_step(self, scale: float, data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], None, None, labels=mb["labels"])

        def loss_func(nll):
            loss_sum, metric_sums = self.loss(mb, nll)
            return loss_sum * scale, {"loss": loss_sum.detach(), **{k: v.detach() for k, v in metric_sums.items()}}

        return out, loss_func

    def forward_backward(self, micro_batches: list[dict]) -> tuple[dict, float]:
        """Gradients of the global-batch loss (sum over units / units in the global batch) into the DDP grad
        buffers (`param.main_grad`). Returns ({"loss": ..., metric: ...} as global means, units)."""
        n_units = float(global_units(micro_batches, self.loss))
        num_mb = len(micro_batches)
        # The schedule divides each micro-batch loss by num_mb and DDP averages over dp; undo both so the
        # gradient is that of (sum of the loss over the global batch's units) / (its number of units).
        scale = parallel_state.get_data_parallel_world_size() * num_mb / n_units
        micro_batches = [batch_to(mb, self._device) for mb in micro_batches]
        if self.reference is not None:
            self._fill_reference_logps(micro_batches)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._schedule(self.ddp, micro_batches, partial(self._forward_step, scale), forward_only=False)
        sums: dict = {}
        for d in outputs:
            add_sums(sums, d["loss"], {k: v for k, v in d.items() if k != "loss"})
        totals = reduce_sums(sums, self.loss, only_last_stage=True)
        return {k: v / n_units for k, v in totals.items()}, n_units

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # megatron's groups mark norms wd_mult=0, but only its LR scheduler (unused here) applies the
            # multiplier; without this, AdamW would decay the norms too (the DeepSpeed engine does not).
            group["weight_decay"] = self.cfg.optim.weight_decay * group.get("wd_mult", 1.0)
        means, n_units = self.forward_backward(micro_batches)
        _, grad_norm, _ = self.optimizer.step()
        loss = means.pop("loss")
        return StepResult(loss=loss, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          lr=lr, tokens=int(n_units), metrics=means)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _sharded(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META)}

    def save(self, ckpt_dir: Path) -> None:
        save_dist_checkpoint(self._sharded(is_loading=False), ckpt_dir / "engine")

    def load(self, ckpt_dir: Path) -> None:
        if self.cfg.parallel.zero_stage == 1:
            # Without apex/TE, DistributedOptimizer can only describe (and so load into) Adam state that
            # exists: take one step on zero grads at lr 0 (moments stay 0, weights unchanged), which the load
            # then overwrites, step count included.
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                lrs = [g["lr"] for g in opt.optimizer.param_groups]
                for g in opt.optimizer.param_groups:
                    g["lr"] = 0.0
                opt._init_optimizer_states_with_dummy_values()
                for g, lr in zip(opt.optimizer.param_groups, lrs):
                    g["lr"] = lr
        with restricted_pickle():
            state = dist_checkpointing.load(self._sharded(is_loading=True), str(ckpt_dir / "engine"))
        self.model.load_state_dict(state["model"])
        with torch.no_grad():  # the fp32 main-param shards are leaf tensors that require grad
            self.optimizer.load_state_dict(state["optimizer"])
        if self.cfg.parallel.zero_stage == 1:
            # Without apex/TE, the DistributedOptimizer load leaves Adam's `step` at the dummy step's 1 (and
            # would share one tensor between params, which torch Adam increments in place once per param).
            # The saved step count is in the param groups; give each param state its own copy of it.
            opt_states = state["optimizer"]
            opt_states = [opt_states] if "optimizer" in opt_states else list(opt_states.values())
            inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            for opt, saved in zip(inner, opt_states):
                (step,) = {g["step"] for g in saved["optimizer"]["param_groups"]}
                for st in opt.optimizer.state.values():
                    st["step"] = torch.tensor(float(step))
