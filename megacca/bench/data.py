"""Data-loader benchmark: can the streaming loader feed training? (``megacca bench data``)

1. Builds ``codes`` shards of random class→image samples (or reads ``--shards DIR``).
2. Runs the streaming loader (`megacca.data.loader`) with ``--workers`` DataLoader workers (default 2) and
   prints samples/s and tokens/s (tokens = ``micro_batch x seq_length`` per micro-batch, what a training step
   consumes, padding included; the share of non-pad tokens is printed too).
3. Measures what training consumes, tokens/s of a forward+backward+AdamW step, for two model shapes:
   ``debug`` (4 layers, hidden 256, 4 heads, seq 256, mb 4) and ``~20M`` (8 layers, hidden 512, 8 heads,
   seq 512, mb 4). Until the megatron model is wired here, the consumer is a plain-PyTorch Llama-like
   reference of those shapes (embedding, pre-norm RMSNorm layers with causal SDPA attention and SwiGLU
   (ffn = 2 x hidden), lm head), on CUDA when available, else CPU.
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
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megacca.data.config import DataConfig, SourceConfig  # noqa: E402
from megacca.data.loader import build_webdataset_source  # noqa: E402

CONSUMERS = {
    "debug": dict(layers=4, hidden=256, heads=4, seq=256, mb=4),
    "~20M": dict(layers=8, hidden=512, heads=8, seq=512, mb=4),
}


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


# --------------------------------------------------------------------------------------------- consumer
class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden, eps=1e-5), nn.RMSNorm(hidden, eps=1e-5)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class RefLlama(nn.Module):
    """Plain-PyTorch stand-in for the trainer's model (same matmul shapes, no rotary)."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-5)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def bench_consumer(vocab_size: int, layers: int, hidden: int, heads: int, seq: int, mb: int,
                   min_steps: int, seconds: float, device: str) -> dict:
    torch.manual_seed(0)
    model = RefLlama(vocab_size, layers, hidden, heads, 2 * hidden).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_body = n_params - model.emb.weight.numel() - model.head.weight.numel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab_size, (mb, seq), device=device)
    labels = torch.randint(0, vocab_size, (mb, seq), device=device)
    mask = torch.ones(mb, seq, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            logits = model(tokens)
        loss = (F.cross_entropy(logits.float().view(-1, vocab_size), labels.view(-1), reduction="none")
                * mask.view(-1)).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, optimizer state)
    sync()
    steps, t0 = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        sync()
        dt = time.perf_counter() - t0
        if steps >= min_steps and (dt >= seconds or steps >= 50 * min_steps):
            break
    return {"params": n_params, "non_embedding_params": n_body, "steps": steps, "step_s": dt / steps,
            "tokens_per_s": steps * mb * seq / dt}


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="megacca bench data", description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=None, help="codes shard directory to read (default: generate random codes)")
    ap.add_argument("--vocab", default=None,
                    help="vocab.json for --shards (default: a class vocabulary from its manifest)")
    ap.add_argument("--text-model", default=None, help="sentencepiece model for --vocab")
    ap.add_argument("--samples", type=int, default=4096, help="generated samples")
    ap.add_argument("--per-shard", type=int, default=256, help="generated samples per shard")
    ap.add_argument("--grid", type=int, default=16, help="generated code grid (grid x grid)")
    ap.add_argument("--codebook", type=int, default=16384, help="generated codebook size")
    ap.add_argument("--classes", type=int, default=1000, help="generated classes")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--seq-length", type=int, default=1024, help="loader sequence length S")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--loader-seconds", type=float, default=6.0)
    ap.add_argument("--model-seconds", type=float, default=4.0, help="time per consumer (at least --min-steps)")
    ap.add_argument("--min-steps", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip-models", action="store_true", help="measure the loader only")
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
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        best = 0.0
        for name, shape in CONSUMERS.items():
            c = bench_consumer(vocab.vocab_size, shape["layers"], shape["hidden"], shape["heads"], shape["seq"],
                               shape["mb"], args.min_steps, args.model_seconds, device)
            print(f"consumer {name} ({shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads, "
                  f"seq {shape['seq']}, mb {shape['mb']}; {c['params'] / 1e6:.1f}M params, "
                  f"{c['non_embedding_params'] / 1e6:.1f}M non-embedding; reference model on {device}): "
                  f"{c['step_s'] * 1e3:,.0f} ms/step, {c['tokens_per_s']:,.0f} tokens/s")
            best = max(best, c["tokens_per_s"])
        print(f"total bench time: {time.perf_counter() - t_start:.0f}s")
        print(f"loader/consumption ratio: {r['tokens_per_s'] / best:.2f}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
