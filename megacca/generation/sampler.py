"""Autoregressive sampling from a `UnifiedGPT`: KV cache, constrained decoding, classifier-free guidance.

`generate(model, vocab, prompts, ...)` returns the new ids of each prompt. The same call on every tensor-
parallel rank gives the same result: the logits are gathered over tp (identical on every rank) and the draws
come from one `torch.Generator` seeded alike on all ranks.

Constraints (always on). A row is either in text mode or inside an image span:
  - image span (after a `<boi>`): exactly grid_h*grid_w ids from the image-code range, then `<eoi>`. A span
    the prompt opened ends the row; a span the row opened itself returns it to text mode.
  - text mode: anything but `<pad>`, `<bos>`, `<eoi>`, reserved specials and image codes, until `<eos>` or
    `max_new_tokens`. `<boi>` only while the budget still fits a whole image, so every image closes.
  - never an id of the padded vocabulary rows (the logits are cut to the vocabulary's size).
Sampling: temperature (0 = greedy), then top-k, then top-p, then one draw by the exponential race
(argmax p_i / E_i with E_i ~ Exp(1), which picks i with probability p_i): it needs no renormalisation and
takes the same random numbers whatever the batch holds, so a row's draws depend only on the seed and its
position in the batch.

Classifier-free guidance with scale s: the batch is 2B rows, the B prompts and their unconditional versions
(`<bos> COND... <boi>` → `<bos> <null> <boi>`), both fed the token drawn from u + s*(c - u). `cfg_interval=(a,
b)` guides only image positions i with a <= i/(H*W) < b (elsewhere the conditional logits are used as they
are). s of None or 1 is guidance-free: a batch of B, no unconditional rows.

LlamaGen layout (`model.layout: llamagen`): a prompt is one condition, `<class_k>` or `<null>` (optionally
followed by codes already chosen), and the row gets the rest of the grid_h*grid_w codes and stops: there is no
`<boi>` or `<eoi>` in that layout. Its unconditional version is `<null>` in place of the condition.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from megacca.generation.kv_cache import IncrementalDecoder

__all__ = ["generate", "full_logits"]

# Row modes: the rows of the allowed-id table.
_TEXT, _TEXT_NO_IMAGE, _IMAGE, _CLOSE = 0, 1, 2, 3
# Specials a text-mode row may emit (the others start a sequence, pad, close a span or are reserved).
_TEXT_SPECIALS = ("<eos>", "<boi>", "<null>", "<sep>")


@contextlib.contextmanager
def _inference(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of every position, float [B, S, V] for tokens [B, S] (V: the unpadded vocabulary; the padded
    rows are dropped), gathered over tensor parallelism; one forward, no cache."""
    with _inference(model):
        out = model(tokens, None, None, runtime_gather_output=True)
    return out[..., :model.unpadded_vocab_size].float()


def _allowed_table(vocab, device) -> torch.Tensor:
    """Bool [4, V]: the ids each row mode may emit."""
    v = vocab.vocab_size
    img = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
    table = torch.zeros(4, v, dtype=torch.bool)
    table[_TEXT, vocab.class_offset:vocab.image_offset] = True  # classes and text pieces
    for name in _TEXT_SPECIALS:
        table[_TEXT, vocab.specials[name]] = True
    table[_TEXT_NO_IMAGE] = table[_TEXT]
    table[_TEXT_NO_IMAGE, vocab.boi_id] = False
    table[_IMAGE, img] = True
    table[_CLOSE, vocab.eoi_id] = True
    return table.to(device)


def _open_span(prompt: list[int], vocab, hw: int, n: int, llamagen: bool = False) -> Optional[int]:
    """Codes already in the image span the prompt leaves open (None: the prompt ends in text mode)."""
    if llamagen:  # `cond codes...`: the image starts right after the condition
        if vocab.is_image(prompt[0]) or not all(vocab.is_image(t) for t in prompt[1:]) or len(prompt) - 1 >= hw:
            raise ValueError(f"prompt {n}: a llamagen-layout prompt is one condition (a class or <null>) and fewer "
                             f"than {hw} image codes")
        return len(prompt) - 1
    boi = max((i for i, t in enumerate(prompt) if t == vocab.boi_id), default=-1)
    if boi < 0 or vocab.eoi_id in prompt[boi + 1:]:
        return None
    if hw == 0:
        raise ValueError(f"prompt {n} opens an image span but the vocabulary has no image_grid")
    codes = prompt[boi + 1:]
    if len(codes) > hw or not all(vocab.is_image(t) for t in codes):
        raise ValueError(f"prompt {n}: the image span after its last <boi> holds {len(codes)} ids that are not "
                         f"all image codes or exceed the grid's {hw}")
    return len(codes)


def _unconditional(prompt: list[int], vocab, n: int, llamagen: bool = False) -> list[int]:
    """`<bos> COND... <boi> REST` → `<bos> <null> <boi> REST`; LlamaGen layout: `COND REST` → `<null> REST`."""
    if llamagen:
        return [vocab.null_id] + prompt[1:]
    bos = prompt.index(vocab.bos_id) if vocab.bos_id in prompt else -1
    boi = max((i for i, t in enumerate(prompt) if t == vocab.boi_id), default=-1)
    if bos < 0 or boi <= bos:
        raise ValueError(f"cfg_scale needs prompts of the form <bos> COND... <boi>; prompt {n} is not")
    return prompt[:bos + 1] + [vocab.null_id] + prompt[boi:]


def _check_args(model, vocab, prompts, temperature, top_k, top_p, cfg_scale, cfg_interval) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("generate needs the whole model on each rank's pipeline stage (pp = 1)")
    if model.config.sequence_parallel:
        raise ValueError("generate cannot decode one token at a time with sequence parallelism: build the "
                         "model with parallel.sequence_parallel=false")
    if vocab.vocab_size != model.unpadded_vocab_size:
        raise ValueError(f"the vocabulary has {vocab.vocab_size} ids, the model {model.unpadded_vocab_size}")
    if vocab.boi_id != model.boi_token_id:
        raise ValueError(f"the vocabulary's <boi> is {vocab.boi_id}, the model's model.boi_token_id "
                         f"{model.boi_token_id}")
    if model.rope_mode == "2d" and vocab.image_grid is not None \
            and tuple(vocab.image_grid) != (model.image_grid, model.image_grid):
        raise ValueError(f"the vocabulary's image_grid {tuple(vocab.image_grid)} is not the model's 2D rotary "
                         f"grid {model.image_grid}x{model.image_grid}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    for n, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab.vocab_size]
        if bad:
            raise ValueError(f"prompt {n} has id {bad[0]} outside [0, {vocab.vocab_size})")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if cfg_scale is not None and not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0 or None, got {cfg_scale}")
    if cfg_interval is not None and not (len(cfg_interval) == 2 and 0 <= cfg_interval[0] <= cfg_interval[1]):
        raise ValueError(f"cfg_interval must be (a, b) with 0 <= a <= b, got {cfg_interval}")


def _shared_seed(seed: Optional[int]) -> int:
    """`seed`, or a fresh one that every tensor-parallel rank agrees on."""
    if seed is not None:
        return int(seed)
    import torch.distributed as dist
    from megatron.core import parallel_state

    s = torch.randint(0, 2 ** 62, (1,))
    if dist.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dev = "cuda" if dist.get_backend(parallel_state.get_tensor_model_parallel_group()) == "nccl" else "cpu"
        s = s.to(dev)
        dist.broadcast(s, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return int(s.item())


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            gen: torch.Generator) -> torch.Tensor:
    """One id per row of logits [N, V] (masked ids at -inf)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop an id once the mass ranked before it already reaches top_p (the top id always stays).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    race = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / race).argmax(-1)


def generate(model, vocab, prompts: list[list[int]], max_new_tokens: Optional[int] = None, *,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             cfg_scale: Optional[float] = None, cfg_interval: Optional[tuple[float, float]] = None,
             seed: Optional[int] = None, use_cache: bool = True) -> list[list[int]]:
    """New ids per prompt (see the module docstring). `max_new_tokens` None: a prompt that opens an image gets
    its codes and `<eoi>`, a text prompt runs until `<eos>` or the model's sequence length; given, it must fit
    every open image. `use_cache=False` recomputes the whole prefix at every step (the reference the KV cache
    equals, and the benchmark's baseline)."""
    guided = cfg_scale is not None and cfg_scale != 1
    return _generate(model, vocab, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     cfg_scale=cfg_scale if guided else None, cfg_interval=cfg_interval, seed=seed,
                     use_cache=use_cache)


def _generate(model, vocab, prompts, max_new_tokens, *, temperature, top_k, top_p, cfg_scale, cfg_interval,
              seed, use_cache) -> list[list[int]]:
    """`generate` with guidance decided by the caller: cfg_scale None is a batch of B, any other value (1
    included) the 2B-row guided batch."""
    prompts = [[int(t) for t in p] for p in prompts]
    _check_args(model, vocab, prompts, temperature, top_k, top_p, cfg_scale, cfg_interval)
    hw = vocab.image_grid[0] * vocab.image_grid[1] if vocab.image_grid is not None else 0
    llamagen = getattr(model, "layout", "unified") == "llamagen"
    close = 0 if llamagen else 1  # the <eoi> after the codes (the LlamaGen layout has none)
    spans = [_open_span(p, vocab, hw, n, llamagen) for n, p in enumerate(prompts)]
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for n, c in enumerate(spans):
            if c is not None and max_new_tokens < hw - c + close:
                raise ValueError(f"max_new_tokens={max_new_tokens} cannot close the image of prompt {n}: it "
                                 f"needs {hw - c + close} (the codes left{' and <eoi>' if close else ''})")
    # Per-row budget: an open image stops at its <eoi>; text runs to max_new_tokens or the sequence length.
    budgets = [hw - c + close if c is not None else
               (max_new_tokens if max_new_tokens is not None else max(1, model.max_sequence_length - len(p)))
               for p, c in zip(prompts, spans)]
    steps = max(budgets)
    rows = prompts + [_unconditional(p, vocab, n, llamagen) for n, p in enumerate(prompts)] if cfg_scale is not None \
        else prompts

    device = next(model.parameters()).device
    b = len(prompts)
    table = _allowed_table(vocab, device)
    in_img = torch.tensor([c is not None for c in spans], device=device)
    stop_after_img = in_img.clone()
    count = torch.tensor([c or 0 for c in spans], device=device)
    budget = torch.tensor(budgets, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    n_new = torch.zeros(b, dtype=torch.long, device=device)
    out = torch.full((b, steps), vocab.pad_id, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(_shared_seed(seed))
    lo, hi = cfg_interval if cfg_interval is not None else (0.0, float("inf"))

    with _inference(model):
        dec = IncrementalDecoder(model, rows, steps, vocab.pad_id, use_cache=use_cache)
        for step in range(steps):
            logits = dec.logits()[:, :vocab.vocab_size]
            if cfg_scale is not None:
                c, u = logits[:b], logits[b:]
                logits = u + cfg_scale * (c - u)
                if cfg_interval is not None:
                    frac = count.float() / max(hw, 1)
                    guide = ~in_img | ((frac >= lo) & (frac < hi))
                    logits = torch.where(guide[:, None], logits, c)
            # <boi> needs room for itself, H*W codes and <eoi>.
            can_open = (budget - step >= hw + 2) & (hw > 0)
            mode = torch.where(in_img, torch.where(count < hw, _IMAGE, _CLOSE),
                               torch.where(can_open, _TEXT, _TEXT_NO_IMAGE))
            logits = logits.masked_fill(~table[mode], float("-inf"))
            tok = torch.where(done, vocab.pad_id, _sample(logits, temperature, top_k, top_p, gen))
            out[:, step] = tok
            n_new += ~done
            closing = in_img & (count == hw)  # this token is the <eoi>
            opened = ~in_img & ~done & (tok == vocab.boi_id)
            finished = (closing & stop_after_img) | (~in_img & (tok == vocab.eos_id)) | (budget <= step + 1)
            count = torch.where(opened, 0, count + (in_img & ~closing).long())
            in_img = (in_img & ~closing) | opened
            done |= finished
            if bool(done.all()):
                break
            dec.append(torch.cat([tok, tok]) if cfg_scale is not None else tok)
    return [row[:n].tolist() for row, n in zip(out.cpu(), n_new.cpu().tolist())]
