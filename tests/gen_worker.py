"""Worker for the tensor-parallel generation tests (tests/test_generation.py), under torchrun with 1 or 2 ranks.

    python -m torch.distributed.run --nproc_per_node N tests/gen_worker.py OUT TP

For 1D and 2D rotary: builds the model at tp=TP from the seeded CPU init (the same weights at every tp layout),
computes the full-recompute logits of a fixed batch (`full_logits`, gathered over tp), then the same logits
through megatron's KV cache (a prefill of PREFIX tokens, then one token per step), and generates greedy,
sampled and CFG continuations. Each rank writes OUT/tp<TP>_rank<r>.json (its generated ids and the largest
cache-vs-recompute difference); rank 0 also writes the full logits to OUT/tp<TP>_<rope>.safetensors.

The helpers `make_vocab`, `make_cfg` and `fixed_tokens` are shared with tests/test_generation.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PREFIX = 5  # tokens of the prefill in the cache-vs-recompute check


def make_vocab():
    """10 classes, 20 text pieces, 64 image codes on a 2x2 grid: 102 ids, which the model pads to 128."""
    from megacca.tokenizer.vocab import FORMAT, SPECIALS, UnifiedVocab

    return UnifiedVocab({
        "format": FORMAT, "specials": dict(SPECIALS), "class_offset": 8, "num_classes": 10,
        "class_names": [str(k) for k in range(10)], "text_offset": 18, "text_size": 20, "text_model": None,
        # Ids only: the text model itself is never needed (the sampler works on ids).
        "text_model_sha256": "0" * 64, "image_offset": 38, "codebook_size": 64, "image_grid": [2, 2],
        "vq_sha256": None, "vocab_size": 102})


def make_cfg(rope: str, tp: int = 1, *overrides):
    from megacca.config import load_config

    # GQA (4 heads over 2 groups, so tp=2 splits both), a vocabulary that needs padding.
    return load_config(None, [
        f"parallel.tp={tp}", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.vocab_size=102", "model.seq_length=32",
        f"model.rope={rope}", "model.image_grid=2", *overrides])


def build(rope: str, tp: int = 1, *overrides):
    from megacca.model.gpt import UnifiedGPT

    cfg = make_cfg(rope, tp, *overrides)
    torch.manual_seed(0)  # CPU init draws the whole weight from the default generator, then slices it for tp
    return UnifiedGPT(cfg), cfg


def fixed_tokens(vocab, b: int = 3) -> torch.Tensor:
    """[b, 14]: <bos> <class> <boi> 4 codes <eoi> text text <boi> codes..., so positions cross a whole image,
    text after it and a second image (what 2D rotary must place from the full history)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(vocab.image_offset, vocab.vocab_size, (b, 8), generator=g)
    text = torch.randint(vocab.text_offset, vocab.image_offset, (b, 2), generator=g)
    t = torch.empty(b, 14, dtype=torch.long)
    t[:, 0], t[:, 1], t[:, 2] = vocab.bos_id, vocab.class_offset + torch.arange(b), vocab.boi_id
    t[:, 3:7], t[:, 7], t[:, 8:10], t[:, 10] = codes[:, :4], vocab.eoi_id, text, vocab.boi_id
    t[:, 11:14] = codes[:, 4:7]
    return t


def cached_logits(model, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Next-token logits [B, S - prefix + 1, V] through the KV cache: a prefill of `prefix` tokens, then one
    token per step."""
    from megacca.generation.kv_cache import IncrementalDecoder

    model.eval()
    with torch.no_grad():
        dec = IncrementalDecoder(model, tokens[:, :prefix].tolist(), tokens.shape[1] - prefix, 0)
        out = [dec.logits()]
        for t in range(prefix, tokens.shape[1]):
            dec.append(tokens[:, t])
            out.append(dec.logits())
    return torch.stack(out, 1)[..., :model.unpadded_vocab_size]


def main() -> None:
    from safetensors.torch import save_file
    import torch.distributed as dist

    from megacca.distributed.init import init_distributed, shutdown
    from megacca.generation.sampler import full_logits, generate

    out, tp = Path(sys.argv[1]), int(sys.argv[2])
    init_distributed(tp, 1, seed=0)
    rank = dist.get_rank()
    vocab = make_vocab()
    report = {}
    for rope in ("1d", "2d"):
        model, _ = build(rope, tp)
        tokens = fixed_tokens(vocab)
        full = full_logits(model, tokens)
        cached = cached_logits(model, tokens, PREFIX)
        report[f"{rope}_cache_vs_full"] = (cached - full[:, PREFIX - 1:]).abs().max().item()
        prompts = [[1, 8 + k, 3] for k in range(4)] + [[1, 20, 21, 22, 3], [1, 19, 3]]
        report[f"{rope}_greedy"] = generate(model, vocab, prompts, temperature=0)
        report[f"{rope}_sampled"] = generate(model, vocab, prompts, top_k=30, top_p=0.95, seed=5)
        report[f"{rope}_cfg"] = generate(model, vocab, prompts, cfg_scale=3.0, seed=5)
        report[f"{rope}_text"] = generate(model, vocab, [[1, 3, 40, 41, 42, 43, 4]], max_new_tokens=6, seed=5)
        if rank == 0:
            save_file({"logits": full.contiguous()}, str(out / f"tp{tp}_{rope}.safetensors"))
    (out / f"tp{tp}_rank{rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
