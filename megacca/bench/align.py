"""`megacca bench align`: the cost of a CCA step next to a pretraining step over the same sequences.

In one process, alternating rounds so that machine noise hits all alike, over the same B pairs (2B sequences):
- CCA with the reference model run on the fly (`align.reference: model`): the policy's forward and backward
  plus a no-grad forward of the frozen reference;
- CCA with a precomputed reference (`align.reference: precomputed`): the reference log-probs come with the
  batch, so only the policy runs;
- a pretraining step (next-token loss) over the same 2B sequences.
The reference implementation (thu-ml/CCA) pays four forward passes per update (policy and reference, each on
positives and negatives separately); megacca runs positives and negatives as one batch of 2B rows. The last
line is `cca step / pretrain step (precomputed reference): R` (target R <= 1.10).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from megacca.bench.train import SHAPES, _time, bench_parser, run_presets
from megacca.config import load_config


def _pairs(cfg, pairs: int, n: int) -> list[dict]:
    """n micro-batches of `pairs` pairs: synthetic image-token rows and their rows with another condition."""
    from megacca.data.synthetic import SyntheticSource

    src = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, pairs, 0, 1, seed=0)
    out = []
    for _ in range(n):
        mb = next(src)
        neg = mb["tokens"].clone()
        neg[:, 1:4] = mb["tokens"].roll(1, dims=0)[:, 1:4]
        out.append({"tokens": torch.cat([mb["tokens"], neg]), "labels": torch.cat([mb["labels"], mb["labels"]]),
                    "loss_mask": torch.cat([mb["loss_mask"], mb["loss_mask"]]),
                    "pos_like": torch.zeros(pairs, dtype=torch.bool)})
    return out


def bench(preset: str, steps: int, warmup: int, rounds: int, precision: str) -> dict:
    from megacca.checkpoint import save_model_weights
    from megacca.distributed.engine import batch_to, device
    from megacca.model.gpt import build_model
    from megacca.stages.align import CCALoss
    from megacca.stages.pretrain import NextTokenLoss
    from megacca.trainer import build_engine

    shape = SHAPES.get(preset, dict(mb=4, seq=256))
    pairs = max(1, shape["mb"] // 2)  # 2B sequences per step = the train benchmark's micro-batch
    common = [f"model.preset={preset}", f"model.seq_length={shape['seq']}", f"train.micro_batch_size={pairs}",
              f"train.precision={precision}", f"parallel.zero_stage={1 if precision == 'bf16' else 0}",
              "optim.warmup_steps=0", "train.tensorboard=false"]
    cfg = load_config(None, common + ["stage=cca", "align.lam=1000", "align.beta=0.02"], check=False)
    pre_cfg = load_config(None, common + [f"train.micro_batch_size={2 * pairs}"])
    dev = device()
    batches = [batch_to(mb, dev) for mb in _pairs(cfg, pairs, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "init"
        save_model_weights(build_model(cfg), ckpt)
        on_the_fly = build_engine(cfg, CCALoss(cfg.align), init_from=ckpt, reference_from=ckpt)
        precomputed = build_engine(cfg, CCALoss(cfg.align), init_from=ckpt)
        pretrain = build_engine(pre_cfg, NextTokenLoss(), init_from=ckpt)
        for mb in batches:
            mb["ref_logps"] = on_the_fly.reference_logps(mb)
        fresh = [{k: v for k, v in mb.items() if k != "ref_logps"} for mb in batches]
        plain = [{k: mb[k] for k in ("tokens", "labels", "loss_mask")} for mb in batches]
        i = {"n": 0}

        def step(engine, mbs):
            def run():
                engine.train_step([dict(mbs[i["n"] % 4])], step=i["n"])
                i["n"] += 1
            return run

        runs = {"cca_model": step(on_the_fly, fresh), "cca_precomputed": step(precomputed, batches),
                "pretrain": step(pretrain, plain)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds):
            for k, fn in runs.items():
                times[k] += _time(fn, steps, warmup if r == 0 else 1)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return dict(preset=preset, sequences=2 * pairs, seq=shape["seq"], **ms,
                ratio_model=ms["cca_model"] / ms["pretrain"], ratio_pre=ms["cca_precomputed"] / ms["pretrain"])


def main(argv=None) -> int:
    args = bench_parser("megacca bench align", __doc__).parse_args(argv)

    def line(r: dict) -> str:
        return (f"{r['preset']:>6} ({r['sequences']} x {r['seq']} tokens/step): pretrain {r['pretrain']:.1f} ms | "
                f"CCA, reference model {r['cca_model']:.1f} ms (x{r['ratio_model']:.3f}) | "
                f"CCA, precomputed reference {r['cca_precomputed']:.1f} ms (x{r['ratio_pre']:.3f})")

    results = run_presets(args, lambda preset, a: bench(preset, a.steps, a.warmup, a.rounds, a.precision), line)
    print(f"cca step / pretrain step (reference model): {results[-1]['ratio_model']:.3f}")
    print(f"cca step / pretrain step (precomputed reference): {results[-1]['ratio_pre']:.3f}")
    return 0
