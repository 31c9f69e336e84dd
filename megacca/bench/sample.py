"""`megacca bench sample`: what guidance costs at sampling time, and what the KV cache saves.

For each preset, in one process: a model of that preset with **random weights** (a forward's cost does not
depend on the weights' values; sampling draws every image to its last code whatever the weights are), a
class-conditional vocabulary (10 classes, the rest of the preset's vocabulary image codes, an 8x8 code grid,
2D rotary), and N prompts `<bos> <class_k> <boi>`. Each prompt gets 64 codes and `<eoi>`; tokens/s counts
those generated ids per second of `megacca.generation.generate`.

  - guidance-free vs CFG, the same N images: guidance-free runs a batch of N rows; CFG (scale 3) runs 2N
    rows, the conditional and the `<null>` prompts, and combines their logits. Both use the KV cache.
  - KV cache vs recomputation, the same M images (M < N: recomputing a whole prefix at every step costs
    quadratically): the cache feeds one new token per row per step; recomputation runs the whole sequence.

The batch sizes are chosen so that one forward's cost grows with its rows on a CPU (at a few rows a step is
dominated by fixed per-step overhead, and doubling the batch would look free); they are printed with the
figures. Kinds alternate within each round, so machine noise hits all alike: tokens/s are medians over rounds,
and each ratio is the median of the rounds' own ratios (a comparison of runs seconds apart, which a machine
whose load drifts disturbs least). The last line is the guidance-free/CFG tokens-per-second ratio of the
last preset measured (the paper's claim: guidance-free sampling halves the cost, a ratio of 2).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

GRID = 8  # codes per image side
SHAPES = {  # images per comparison: (guidance-free vs CFG, cache vs recomputation)
    "debug": dict(images=1024, recompute_images=32),
    "small": dict(images=128, recompute_images=2),
}
CFG_SCALE = 3.0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_sampler_model(preset: str, precision: str):
    """(model, vocab) for `preset`: random weights, 10 classes and the rest of the preset's vocabulary as
    image codes on a GRID x GRID grid (parallel state must exist: `run_presets` makes a world of one)."""
    from megacca.config import load_config
    from megacca.model.gpt import build_model
    from megacca.tokenizer.vocab import NUM_SPECIALS, UnifiedVocab

    cfg = load_config(None, [f"model.preset={preset}", "model.rope=2d", f"model.image_grid={GRID}",
                             f"train.precision={precision}", "train.run_dir=/tmp/megacca-bench"])
    classes = [str(k) for k in range(10)]
    vocab = UnifiedVocab.build(None, cfg.model.vocab_size - NUM_SPECIALS - len(classes), (GRID, GRID), classes)
    torch.manual_seed(0)
    model = build_model(cfg)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), vocab


def _prompts(vocab, n: int) -> list[list[int]]:
    return [[vocab.bos_id, vocab.class_token(i % vocab.num_classes), vocab.boi_id] for i in range(n)]


def bench_preset(preset: str, rounds: int, precision: str, images: int | None = None,
                 recompute_images: int | None = None) -> dict:
    from megacca.generation import generate

    shape = SHAPES.get(preset, SHAPES["small"])
    n, m = images or shape["images"], recompute_images or shape["recompute_images"]
    model, vocab = build_sampler_model(preset, precision)
    kinds = {"guidance-free": (n, {}), "cfg": (n, {"cfg_scale": CFG_SCALE}),
             "kv-cache": (m, {}), "recompute": (m, {"use_cache": False})}
    for count, kw in kinds.values():  # warm-up: allocator, kernels, the cache's first use
        generate(model, vocab, _prompts(vocab, min(count, 4)), seed=0, **kw)
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for kind, (count, kw) in kinds.items():
            _sync()
            t0 = time.perf_counter()
            out = generate(model, vocab, _prompts(vocab, count), seed=r, **kw)
            _sync()
            seconds[kind].append(time.perf_counter() - t0)
            tokens[kind] = sum(len(o) for o in out)
            assert tokens[kind] == count * (GRID * GRID + 1), "every image is exactly its codes and <eoi>"
    tps = {k: tokens[k] / statistics.median(v) for k, v in seconds.items()}

    def paired(fast: str, slow: str) -> float:  # same tokens on both sides: the ratio of tokens/s is of seconds
        return statistics.median(b / a for a, b in zip(seconds[fast], seconds[slow]))

    return dict(preset=preset, params=sum(p.numel() for p in model.parameters()), images=n, recompute_images=m,
                tps=tps, seconds={k: statistics.median(v) for k, v in seconds.items()}, rounds=rounds,
                ratio=paired("guidance-free", "cfg"), cache_speedup=paired("kv-cache", "recompute"))


def line(r: dict) -> str:
    t, s = r["tps"], r["seconds"]
    return (f"{r['preset']:>6} ({r['params'] / 1e6:.1f}M params, random weights, {GRID}x{GRID} codes/image): "
            f"{r['images']} images: guidance-free {t['guidance-free']:,.0f} tok/s ({s['guidance-free']:.2f} s, "
            f"batch {r['images']}) | CFG {t['cfg']:,.0f} tok/s ({s['cfg']:.2f} s, batch {2 * r['images']}) | "
            f"ratio {r['ratio']:.2f}; {r['recompute_images']} images: KV cache {t['kv-cache']:,.0f} tok/s | "
            f"recompute {t['recompute']:,.0f} tok/s | speedup {r['cache_speedup']:.1f}x")


def main(argv=None) -> int:
    from megacca.bench.train import run_presets

    prog = "megacca bench sample"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"examples:\n  {prog}\n  {prog} --presets debug --rounds 1\n"
                                        f"  {prog} --presets small --images 64 --recompute-images 2\n")
    ap.add_argument("--presets", default="debug,small",
                    help="comma-separated model presets (megacca/model/presets.py; default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (default: %(default)s)")
    ap.add_argument("--images", type=int, default=None,
                    help="images for guidance-free vs CFG (default per preset: "
                         + ", ".join(f"{k} {v['images']}" for k, v in SHAPES.items()) + ")")
    ap.add_argument("--recompute-images", type=int, default=None,
                    help="images for KV cache vs recomputation (default per preset: "
                         + ", ".join(f"{k} {v['recompute_images']}" for k, v in SHAPES.items()) + ")")
    ap.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"],
                    help="default: bf16 on a GPU, fp32 on CPU")
    args = ap.parse_args(argv)
    for name in ("rounds", "images", "recompute_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    results = run_presets(args, lambda preset, a: bench_preset(preset, a.rounds, a.precision, a.images,
                                                               a.recompute_images), line)
    print(f"guidance-free/CFG tokens-per-second ratio: {results[-1]['ratio']:.2f}")
    return 0
