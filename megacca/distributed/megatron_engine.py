"""megatron-core engine: DDP + (Distributed)Optimizer + pipeline schedules + distributed checkpointing.

`parallel.zero_stage=1` selects megatron's DistributedOptimizer (optimizer state sharded over data-parallel
ranks, ZeRO-1 style); 0 keeps a full optimizer per rank. Pipelines (pp>1) run megatron's 1F1B schedule; every
stage reads the same micro-batches (stages other than the first and last only use the token ids, for 2D rotary).
Checkpoints are megatron distributed checkpoints (torch_dist), so a model saved at one tp/pp layout loads at
another (`load_model_weights`).
"""
from __future__ import annotations

import logging
import queue
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megacca.config import Config
from megacca.distributed.engine import StepResult, batch_to, device, global_loss_tokens, reduce_loss_sum
from megacca.model.gpt import build_model
from megacca.optim import lr_at
from megacca.safe_load import restricted_pickle

log = logging.getLogger(__name__)
# dp_reshardable: each rank saves its own optimizer-state shards (no gather), loadable at another dp size.
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronEngine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        model = build_model(cfg)
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

    # -- training ---------------------------------------------------------------------------------------
    def _forward_step(self, scale: float, data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], None, None, labels=mb["labels"])

        def loss_func(nll):
            loss_sum = (nll.float() * mb["loss_mask"]).sum()
            return loss_sum * scale, {"loss_sum": loss_sum.detach()}

        return out, loss_func

    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, float]:
        """Gradients of the global-batch token-mean loss into the DDP grad buffers (`param.main_grad`).
        Returns (loss, loss tokens)."""
        cfg = self.cfg
        n_tokens = global_loss_tokens(micro_batches).item()
        num_mb = len(micro_batches)
        # The schedule divides each micro-batch loss by num_mb and DDP averages over dp; undo both so the
        # gradient is that of (sum of all loss-token NLLs) / (loss tokens in the global batch).
        scale = parallel_state.get_data_parallel_world_size() * num_mb / n_tokens
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, scale),
            data_iterator=iter([batch_to(mb, self._device) for mb in micro_batches]),
            model=[self.ddp], num_microbatches=num_mb, seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
        local = sum((d["loss_sum"].double() for d in losses), torch.zeros((), dtype=torch.float64))
        return reduce_loss_sum(local, only_last_stage=True) / n_tokens, n_tokens

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, n_tokens = self.forward_backward(micro_batches)
        _, grad_norm, _ = self.optimizer.step()
        return StepResult(loss=loss, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          lr=lr, tokens=int(n_tokens))

    # -- checkpoints ------------------------------------------------------------------------------------
    def _sharded(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META)}

    def save(self, ckpt_dir: Path) -> None:
        save_dist_checkpoint(self._sharded(is_loading=False), ckpt_dir)

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
            state = dist_checkpointing.load(self._sharded(is_loading=True), str(ckpt_dir))
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

def save_dist_checkpoint(sharded_state: dict, ckpt_dir: str | Path) -> None:
    """Synchronous megatron distributed checkpoint save into a new directory (every rank calls)."""
    ckpt_dir = Path(ckpt_dir)
    if torch.distributed.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    # megatron's torch_dist writer collects results through a multiprocessing Manager queue, whose server
    # process outlives a SIGKILLed trainer (keeping its stdout open, so launchers and pipes never see EOF).
    # Our saves are synchronous: the writer runs in this process, and a plain in-process queue suffices.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state, str(ckpt_dir))


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Load only the model from a megatron distributed checkpoint, at this process's tp/pp layout."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "engine").is_dir():  # a megacca checkpoint directory
        ckpt_dir = ckpt_dir / "engine"
    with restricted_pickle():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(state["model"])
