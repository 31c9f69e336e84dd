"""`megacca bench train`: tokens/s of megacca training steps next to a plain-PyTorch loop of the same model.

For each preset, in one process, alternating so that machine noise hits both alike: the DeepSpeed engine
(tp=1; ZeRO-0 in fp32, ZeRO-1 in bf16) over the megatron-core model, and `megacca.bench.reference` (same
shapes, same loss, AdamW, clipping). Prints per-preset tokens/s, step time and the ratio; on a GPU also
TFLOP/s and MFU. The last line is the step-time ratio megacca/reference of the largest preset measured.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megacca.config import load_config
from megacca.data.synthetic import SyntheticSource
from megacca.model.flops import peak_tflops, train_flops_per_token

SHAPES = {  # micro-batch and sequence length per preset for the benchmark
    "debug": dict(mb=8, seq=128),
    "small": dict(mb=4, seq=256),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step_fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        step_fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def build_trainers(preset: str, precision: str):
    """(cfg, megacca engine, reference trainer, 4 batches): what `bench_preset` times, built once (a test checks
    that both compute the same step on the same batch)."""
    from megacca.bench.reference import ReferenceTrainer
    from megacca.stages.pretrain import NextTokenLoss
    from megacca.trainer import build_engine
    from megacca.distributed.engine import batch_to, device

    shape = SHAPES.get(preset, dict(mb=4, seq=256))
    cfg = load_config(None, [f"model.preset={preset}", f"train.micro_batch_size={shape['mb']}",
                             f"model.seq_length={shape['seq']}", f"train.precision={precision}",
                             # bf16 needs fp32 master weights, which DeepSpeed keeps from ZeRO-1 on
                             f"parallel.zero_stage={1 if precision == 'bf16' else 0}",
                             "train.tensorboard=false", "train.run_dir=/tmp/megacca-bench"])
    dev = device()
    data = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, shape["mb"], 0, 1, seed=0)
    batches = [batch_to(next(data), dev) for _ in range(4)]
    engine = build_engine(cfg, NextTokenLoss())
    ref = ReferenceTrainer(cfg)
    if torch.cuda.is_available():
        ref.model.to(dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return cfg, engine, ref, batches


def bench_preset(preset: str, steps: int, warmup: int, precision: str, rounds: int) -> dict:
    cfg, engine, ref, batches = build_trainers(preset, precision)
    i = {"n": 0}

    def ours():
        engine.train_step([batches[i["n"] % 4]], step=i["n"])
        i["n"] += 1

    def theirs():
        ref.train_step([batches[i["n"] % 4]])
        i["n"] += 1

    t_ours, t_ref = [], []
    for r in range(rounds):  # interleave rounds: both see the same background load
        t_ours += _time(ours, steps, warmup if r == 0 else 1)
        t_ref += _time(theirs, steps, warmup if r == 0 else 1)
    tokens = batches[0]["tokens"].numel()  # what one step of either trainer processes
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    out = dict(preset=preset, params=sum(p.numel() for p in engine.model.parameters()), tokens=tokens,
               ours_ms=1000 * m_ours, ref_ms=1000 * m_ref, ours_tps=tokens / m_ours, ref_tps=tokens / m_ref,
               ratio=m_ours / m_ref)
    peak = peak_tflops()
    if peak:
        tflops = train_flops_per_token(cfg) * tokens / m_ours / 1e12
        out.update(tflops=tflops, mfu=tflops / peak)
    return out


def consumption_rate(preset: str, steps: int = 5) -> float:
    """Tokens/s that a megacca training step of `preset` consumes (used by `megacca bench data`)."""
    return bench_preset(preset, steps, warmup=2, precision="fp32", rounds=1)["ours_tps"]


def bench_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes (bench train, bench align)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"examples:\n  {prog}\n  {prog} --presets debug --steps 5 --rounds 1\n")
    ap.add_argument("--presets", default="debug,small",
                    help="comma-separated model presets (megacca/model/presets.py; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"],
                    help="default: bf16 on a GPU, fp32 on CPU")
    return ap


def run_presets(args, bench_one, line) -> list[dict]:
    """One process (1 rank): `bench_one(preset, args)` per preset, printing `line(result)` after each."""
    from megacca.distributed.init import init_distributed, shutdown

    init_distributed(1, 1, seed=0, use_deepspeed=True)
    results = []
    try:
        for preset in args.presets.split(","):
            results.append(bench_one(preset, args))
            print(line(results[-1]), flush=True)
    finally:
        shutdown()
    return results


def main(argv=None) -> int:
    args = bench_parser("megacca bench train", __doc__).parse_args(argv)

    def line(r: dict) -> str:
        extra = f" | {r['tflops']:.1f} TFLOP/s | MFU {100 * r['mfu']:.1f}%" if "tflops" in r else ""
        return (f"{r['preset']:>6} ({r['params'] / 1e6:.1f}M params, {r['tokens']} tokens/step): "
                f"megacca {r['ours_tps']:,.0f} tok/s ({r['ours_ms']:.1f} ms) | "
                f"reference {r['ref_tps']:,.0f} tok/s ({r['ref_ms']:.1f} ms) | ratio {r['ratio']:.3f}{extra}")

    results = run_presets(args, lambda preset, a: bench_preset(preset, a.steps, a.warmup, a.precision, a.rounds),
                          line)
    print(f"step-time ratio megacca/reference: {results[-1]['ratio']:.3f}")
    return 0
