"""The training loop shared by the stages: engine + data source + checkpoints + metrics.

One optimizer step = `grad_accum` micro-batches per data-parallel rank. Step numbers are 1-based counts of
finished optimizer steps; the checkpoint `step_k` holds the state after step k, and a resumed run continues
with step k+1 on the micro-batch that would have come next.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megacca.checkpoint import CheckpointManager
from megacca.config import Config, save_config, to_dict
from megacca.distributed.init import init_distributed, is_rank0, shutdown
from megacca.metrics import MetricsLogger
from megacca.model.flops import param_count, peak_tflops, train_flops_per_token
from megacca.model.gpt import describe

log = logging.getLogger("megacca.train")


def build_engine(cfg: Config):
    if cfg.parallel.engine == "deepspeed":
        from megacca.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg)
    from megacca.distributed.megatron_engine import MegatronEngine

    return MegatronEngine(cfg)


def vocab_manifest(cfg: Config) -> dict | None:
    if cfg.data.vocab is None:
        return None
    import json

    return json.loads(Path(cfg.data.vocab).read_text())


def check_vocab(saved: dict | None, cfg: Config, ckpt: Path) -> None:
    """A checkpoint trained on one vocabulary must not silently continue on another."""
    from megacca.tokenizer.vocab import UnifiedVocab, VocabMismatchError

    if saved is None and cfg.data.vocab is None:
        return
    if saved is None or cfg.data.vocab is None:
        raise VocabMismatchError(f"{ckpt}: checkpoint vocabulary is {'absent' if saved is None else 'set'} but "
                                 f"data.vocab is {cfg.data.vocab or 'not set'}")
    # The checkpoint's manifest is the reference; the message names the configured one that differs.
    UnifiedVocab(saved, source=str(ckpt)).check_compatible(vocab_manifest(cfg), where=f"{cfg.data.vocab} vs checkpoint {ckpt}")


class Trainer:
    def __init__(self, cfg: Config, build_data):
        self.cfg = cfg
        self.build_data = build_data  # (cfg, dp_rank, dp_size) -> data source (docs/data-format.md)

    def fit(self) -> list[dict]:
        cfg = self.cfg
        par = cfg.parallel
        init_distributed(par.tp, par.pp, cfg.train.seed, par.backend, use_deepspeed=par.engine == "deepspeed")
        try:
            return self._fit()
        finally:
            shutdown()

    def _fit(self) -> list[dict]:
        cfg, tr = self.cfg, self.cfg.train
        run_dir = Path(tr.run_dir)
        if is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()
        ckpts = CheckpointManager(run_dir, tr.keep_last)
        latest = ckpts.latest() if tr.resume else None
        if latest is not None:  # before building anything: is this checkpoint ours to continue?
            check_vocab(json.loads((latest / "trainer.json").read_text()).get("vocab"), cfg, latest)
        engine = build_engine(cfg)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        data = self.build_data(cfg, dp_rank, dp_size)
        step = 0
        if latest is not None:
            state, data_state = ckpts.load(latest, engine)
            data.load_state_dict(data_state)
            step = state["step"]
            log.info("resumed from %s at step %d", latest, step)
        sink = getattr(engine, "write_scalars", None) if tr.tensorboard else None
        metrics = MetricsLogger(run_dir, is_rank0(), tr.tensorboard, tr.log_every, tr.max_steps, tr.progress_bar,
                                scalar_sink=sink, start_step=step)
        accum, world_tokens = cfg.grad_accum(), cfg.global_batch() * cfg.model.seq_length
        log.info("model %s | %.2fM parameters | global batch %d x %d tokens (%d micro-batches per rank)",
                 describe(cfg), param_count(cfg) / 1e6, cfg.global_batch(), cfg.model.seq_length, accum)
        flops_per_token, peak = train_flops_per_token(cfg), peak_tflops()
        n_dev = dist.get_world_size() if dist.is_initialized() else 1
        history = []
        kill_after = os.environ.get("MEGACCA_TEST_KILL_AFTER_STEP")  # test hook: SIGKILL after that step
        try:
            while step < tr.max_steps:
                t0 = time.perf_counter()
                micro_batches = [next(data) for _ in range(accum)]
                res = engine.train_step(micro_batches, step)
                dt = time.perf_counter() - t0
                step += 1
                scalars = {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                           "tokens_per_s": world_tokens / dt, "step_time": dt, "loss_tokens": res.tokens}
                if peak is not None:
                    tflops = flops_per_token * world_tokens / dt / n_dev / 1e12
                    scalars.update(tflops=tflops, mfu=tflops / peak)
                errors = data.error_counts()
                if errors:
                    scalars["skipped_samples"] = sum(errors.values())
                metrics.log_step(step, scalars)
                history.append({"step": step, **scalars})
                if kill_after is not None and step == int(kill_after):
                    os.kill(os.getpid(), 9)
                if step == tr.max_steps or (tr.save_every and step % tr.save_every == 0):
                    trainer_state = {"step": step, "config": to_dict(cfg), "vocab": vocab_manifest(cfg),
                                     "world_size": n_dev, "tokens_seen": step * world_tokens}
                    ckpts.save(step, engine, trainer_state, data.state_dict())
        finally:
            metrics.close()
            data.close()
        errors = data.error_counts()
        if errors and is_rank0():
            log.warning("skipped bad samples on rank 0: %s", errors)
        return history
