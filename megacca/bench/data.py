"""Data-loader benchmark: can the streaming loader feed training? (``megacca bench data``)

1. Builds ``codes`` shards of random class→image samples (or reads ``--shards DIR``).
2. Runs the streaming loader (`megacca.data.loader`) with ``--workers`` DataLoader workers (default 2) and
   prints samples/s and tokens/s (tokens = ``micro_batch x seq_length`` per micro-batch, what a training step
   consumes, padding included; the share of non-pad tokens is printed too).
3. Measures what training consumes: tokens/s of megacca's own training step (DeepSpeed engine over the
   megatron-core model, `megacca.bench.train`) for the ``debug`` and ``small`` (~20M) presets, and the VQ
   encoder's images/s.
4. Last line: ``loader/consumption ratio: R`` = loader tokens/s ÷ the faster consumer's tokens/s (> 1: the
   loader keeps up with even the faster model on this machine).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megacca.data.config import DataConfig, SourceConfig  # noqa: E402
from megacca.data.loader import build_webdataset_source  # noqa: E402

CONSUMERS = ("debug", "small")  # model presets whose training step the loader must outpace


# ------------------------------------------------------------------------------------------------- data
def write_random_code_shards(out: str, samples: int, grid: int, codebook: int, classes: int,
                             per_shard: int, seed: int = 0) -> str:
    """A ``codes`` shard directory (docs/data-format.md) of ``samples`` random class→image samples."""
    from megacca.data.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    with ShardWriter(out, "train", max_count=per_shard) as w:
        for i in range(samples):
            w.write({"__key__": f"{i:08d}", "codes.npy": rng.integers(0, codebook, (grid, grid), dtype=np.int16),
                     "json": {"label": int(rng.integers(classes)), "captions": []}})
    split = w.close()
    write_manifest(out, "codes", {"train": split}, classes=[str(k) for k in range(classes)],
                   image_size=[grid, grid], vq={"codebook_size": codebook}, source="bench-random",
                   captions=False, labels=True)
    return out


def _class_vocab(codebook: int, grid: tuple[int, int], classes: list[str]):
    from megacca.tokenizer.vocab import UnifiedVocab

    return UnifiedVocab.build(None, codebook, grid, class_names=classes)


def _vocab_for_dir(path: str, vocab_path: Optional[str], text_model: Optional[str], codebook: int):
    from megacca.data.loader import read_shard_samples
    from megacca.data.shards import read_manifest, shard_paths

    if vocab_path:
        from megacca.tokenizer.vocab import UnifiedVocab

        return UnifiedVocab.load(vocab_path, text_model)
    m = read_manifest(path)
    if m["kind"] != "codes" or not m.get("classes"):
        raise SystemExit(f"{path}: without --vocab the bench reads class-labelled codes shards only "
                         f"(kind {m['kind']!r}, classes {'yes' if m.get('classes') else 'no'})")
    first = read_shard_samples(shard_paths(path, "train", m)[0])[0][0]
    grid = tuple(np.lib.format.read_array(io.BytesIO(first["codes.npy"]), allow_pickle=False).shape)
    vq = m.get("vq") or {}
    return _class_vocab(int(vq.get("codebook_size", codebook)), grid, list(m["classes"]))


def bench_loader(source, seconds: float, warmup: int = 2) -> dict:
    for _ in range(warmup):  # starts the workers, fills their first blocks
        next(source)
    n_batches = n_samples = n_tokens = n_real = 0
    t0 = time.perf_counter()
    bos = source._plan.vocab.bos_id
    pad = source._plan.vocab.pad_id
    while True:
        b = next(source)
        tok = b["tokens"]
        n_batches += 1
        n_samples += int((tok == bos).sum())
        n_tokens += tok.numel()
        n_real += int((tok != pad).sum())
        dt = time.perf_counter() - t0
        if dt >= seconds and n_batches >= 5:
            break
    return {"batches": n_batches, "seconds": dt, "samples_per_s": n_samples / dt, "tokens_per_s": n_tokens / dt,
            "non_pad_share": n_real / max(n_tokens, 1)}


# --------------------------------------------------------------------------------------------- consumers
def bench_vq_encode(vq_dir: Optional[str], images: int = 512, batch: int = 64) -> dict:
    """Images/s of `VQModel.encode` (the trained tokenizer in `vq_dir`, else the tiny preset's shape)."""
    from megacca.tokenizer.vq import VQModel, load_vq, tiny

    model = load_vq(vq_dir) if vq_dir else VQModel(tiny(image_size=16, ch=32, ch_mult=[1, 1, 2]))
    model.eval()
    size = model.config.image_size
    x = torch.rand(batch, 3, size, size) * 2 - 1
    with torch.no_grad():
        model.encode(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(max(1, images // batch)):
            model.encode(x)
        dt = time.perf_counter() - t0
    return {"images_per_s": max(1, images // batch) * batch / dt, "image_size": size}


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="megacca bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n  megacca bench data\n"
                                        "  megacca bench data --vq data/digits/vq\n"
                                        "  megacca bench data --shards data/digits/codes "
                                        "--vocab data/digits/vocab.json --skip-models\n")
    ap.add_argument("--shards", default=None, help="codes shard directory to read (default: generate random codes)")
    ap.add_argument("--vocab", default=None,
                    help="vocab.json for --shards (default: a class vocabulary from its manifest)")
    ap.add_argument("--text-model", default=None, help="sentencepiece model for --vocab")
    ap.add_argument("--samples", type=int, default=4096, help="generated samples (default: %(default)s)")
    ap.add_argument("--per-shard", type=int, default=256, help="generated samples per shard (default: %(default)s)")
    ap.add_argument("--grid", type=int, default=16, help="generated code grid, grid x grid (default: %(default)s)")
    ap.add_argument("--codebook", type=int, default=16384, help="generated codebook size (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=1000, help="generated classes (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    ap.add_argument("--seq-length", type=int, default=1024, help="loader sequence length S (default: %(default)s)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default: %(default)s)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000,
                    help="samples per shuffle buffer (default: %(default)s)")
    ap.add_argument("--loader-seconds", type=float, default=6.0,
                    help="how long the loader is measured (default: %(default)s)")
    ap.add_argument("--skip-models", action="store_true", help="measure the loader only")
    ap.add_argument("--vq", default=None, help="trained VQ directory for the encode rate (default: tiny preset)")
    args = ap.parse_args(argv)

    tmp = None
    t_start = time.perf_counter()
    try:
        if args.shards:
            path = args.shards
            vocab = _vocab_for_dir(path, args.vocab, args.text_model, args.codebook)
            print(f"shards: {path}")
        else:
            tmp = tempfile.TemporaryDirectory(prefix="megacca-bench-data-")
            path = os.path.join(tmp.name, "codes")
            t = time.perf_counter()
            write_random_code_shards(path, args.samples, args.grid, args.codebook, args.classes, args.per_shard)
            vocab = _class_vocab(args.codebook, (args.grid, args.grid), [str(k) for k in range(args.classes)])
            print(f"shards: {args.samples} random c2i samples ({args.grid}x{args.grid} codes, codebook "
                  f"{args.codebook}, {args.classes} classes) in {-(-args.samples // args.per_shard)} shards, "
                  f"written in {time.perf_counter() - t:.1f}s")
        cfg = DataConfig(kind="webdataset", sources=[SourceConfig(path=path)], num_workers=args.workers,
                         shuffle_buffer=args.shuffle_buffer, cond_dropout=0.1, on_error="raise")
        src = build_webdataset_source(cfg, vocab, args.seq_length, args.micro_batch, 0, 1, seed=0)
        try:
            r = bench_loader(src, args.loader_seconds)
        finally:
            src.close()
        print(f"loader ({args.workers} workers, S={args.seq_length}, mb={args.micro_batch}): "
              f"{r['samples_per_s']:,.0f} samples/s, {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['non_pad_share']:.0%} non-pad; {r['batches']} micro-batches in {r['seconds']:.1f}s)")
        print(f"loader_samples_per_s: {r['samples_per_s']:.1f}")
        print(f"loader_tokens_per_s: {r['tokens_per_s']:.1f}")
        if args.skip_models:
            return 0
        from megacca.bench.train import consumption_rate
        from megacca.distributed.init import init_distributed, shutdown

        init_distributed(1, 1, seed=0, use_deepspeed=True)
        best = 0.0
        try:
            for preset in CONSUMERS:
                tps = consumption_rate(preset)
                print(f"consumer: megacca training step, preset {preset} (DeepSpeed engine, tp=1): "
                      f"{tps:,.0f} tokens/s")
                best = max(best, tps)
        finally:
            shutdown()
        v = bench_vq_encode(args.vq)
        print(f"VQ encode ({'trained ' + args.vq if args.vq else 'tiny preset, random weights'}, "
              f"{v['image_size']}px): {v['images_per_s']:,.0f} images/s")
        print(f"total bench time: {time.perf_counter() - t_start:.0f}s")
        print(f"loader/consumption ratio: {r['tokens_per_s'] / best:.2f}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
