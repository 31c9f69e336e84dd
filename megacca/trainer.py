"""The training loop shared by the stages: engine + data source + checkpoints + metrics.

One optimizer step = `grad_accum` micro-batches per data-parallel rank. Step numbers are 1-based counts of
finished optimizer steps; the checkpoint `step_k` holds the state after step k, and a resumed run continues
with step k+1 on the micro-batch that would have come next.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megacca import faults
from megacca.checkpoint import CheckpointManager
from megacca.config import Config, save_config, to_dict
from megacca.data.packing import BadSample
from megacca.distributed.init import RankStopped, any_rank, init_distributed, is_rank0, shutdown
from megacca.metrics import MetricsLogger
from megacca.model.flops import param_count, peak_tflops, train_flops_per_token
from megacca.model.gpt import describe
from megacca.tokenizer.vocab import check_checkpoint, load_manifest

log = logging.getLogger("megacca.train")


def build_engine(cfg: Config, loss, init_from: Path | None = None, reference_from: Path | None = None):
    """The configured engine over megacca's model builder and the stage's loss (megacca.distributed.engine)."""
    from megacca.model.gpt import build_model

    if cfg.parallel.engine == "deepspeed":
        from megacca.distributed.deepspeed_engine import DeepSpeedEngine as engine_cls
    else:
        from megacca.distributed.megatron_engine import MegatronEngine as engine_cls
    return engine_cls(cfg, build_model, loss, init_from=init_from, reference_from=reference_from)


def _next_micro_batches(data, n: int) -> list[dict]:
    """The step's micro-batches. A bad input (``data.on_error=raise``) stops every rank at the same point: a
    rank that simply raised would leave the others blocked in the step's collectives, to fail there with a
    connection error and a traceback of their own. The rank that read it raises it (the CLI prints one line);
    the others raise `RankStopped`."""
    try:
        batches, bad = [next(data) for _ in range(n)], None
    except BadSample as e:
        batches, bad = [], e
    if any_rank(bad is not None):
        raise bad or RankStopped()
    return batches


class Trainer:
    """A stage = a data source builder + a loss (`StepLoss`) + optionally the checkpoint it starts from
    (`init_from`, weights only; ignored once the run has its own checkpoint) and the one its frozen reference
    model loads (`reference_from`; None when the loss needs no reference model)."""

    def __init__(self, cfg: Config, build_data, loss, init_from: Path | None = None,
                 reference_from: Path | None = None):
        self.cfg = cfg
        self.build_data = build_data  # (cfg, dp_rank, dp_size) -> data source (docs/data-format.md)
        self.loss, self.init_from, self.reference_from = loss, init_from, reference_from

    def fit(self) -> list[dict]:
        cfg = self.cfg
        par = cfg.parallel
        init_distributed(par.tp, par.pp, cfg.train.seed, par.backend, use_deepspeed=par.engine == "deepspeed")
        history = self._fit()
        # Not on an error: another rank may be inside a collective that shutdown's barrier would wait on forever.
        shutdown()
        return history

    def _fit(self) -> list[dict]:
        cfg, tr = self.cfg, self.cfg.train
        run_dir = Path(tr.run_dir)
        vocab = load_manifest(cfg.data.vocab) if cfg.data.vocab is not None else None  # saved with checkpoints
        ckpts = CheckpointManager(run_dir, tr.keep_last)
        latest = ckpts.latest() if tr.resume else None
        if latest is not None:  # before building or writing anything: is this checkpoint ours to continue?
            saved = json.loads((latest / "trainer.json").read_text())
            check_checkpoint(saved.get("vocab"), cfg.data.vocab, str(latest))
            if saved["step"] >= tr.max_steps:
                if is_rank0():
                    of = f"of {tr.max_steps}" if saved["step"] == tr.max_steps else f"> train.max_steps={tr.max_steps}"
                    print(f"megacca: run {run_dir} is complete (step {saved['step']} {of}); raise train.max_steps "
                          f"to continue or set train.run_dir", file=sys.stderr, flush=True)
                return []
        if is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()
        if latest is None and self.init_from is not None:
            log.info("starting from the weights of %s", self.init_from)
        engine = build_engine(cfg, self.loss, init_from=self.init_from if latest is None else None,
                              reference_from=self.reference_from)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        data = self.build_data(cfg, dp_rank, dp_size)
        step = 0
        if latest is not None:
            state, data_state = ckpts.load(latest, engine)
            data.load_state_dict(data_state)
            step = state["step"]
            log.info("resumed from %s at step %d", latest, step)
        metrics = MetricsLogger(run_dir, is_rank0(), tr.tensorboard, tr.log_every, tr.max_steps, tr.progress_bar,
                                start_step=step)
        # A sample is one sequence when pretraining and a pair of sequences when aligning.
        accum = cfg.grad_accum()
        world_tokens = cfg.global_batch() * self.loss.sequences_per_sample * cfg.model.seq_length
        log.info("model %s | %.2fM parameters | global batch %d x %d tokens (%d micro-batches per rank)",
                 describe(cfg), param_count(cfg) / 1e6, cfg.global_batch(), cfg.model.seq_length, accum)
        flops_per_token, peak = train_flops_per_token(cfg), peak_tflops()
        n_dev = dist.get_world_size() if dist.is_initialized() else 1
        history = []
        try:
            while step < tr.max_steps:
                t0 = time.perf_counter()
                micro_batches = _next_micro_batches(data, accum)
                res = engine.train_step(micro_batches, step)
                dt = time.perf_counter() - t0
                step += 1
                scalars = {"loss": res.loss, **res.metrics, "lr": res.lr, "grad_norm": res.grad_norm,
                           "tokens_per_s": world_tokens / dt, "step_time": dt, self.loss.unit: res.tokens}
                if peak is not None:
                    tflops = flops_per_token * world_tokens / dt / n_dev / 1e12
                    scalars.update(tflops=tflops, mfu=tflops / peak)
                errors = data.error_counts()
                if errors:
                    scalars["skipped_samples"] = sum(errors.values())
                metrics.log_step(step, scalars)
                history.append({"step": step, **scalars})
                faults.maybe_kill("after_step", step)
                if step == tr.max_steps or (tr.save_every and step % tr.save_every == 0):
                    trainer_state = {"step": step, "config": to_dict(cfg), "vocab": vocab,
                                     "world_size": n_dev, "tokens_seen": step * world_tokens}
                    ckpts.save(step, engine, trainer_state, data.state_dict())
        finally:
            metrics.close()
            data.close()
        errors = data.error_counts()
        if errors and is_rank0():
            log.warning("skipped bad samples on rank 0: %s", errors)
        return history
