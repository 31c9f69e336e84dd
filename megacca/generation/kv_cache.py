"""Next-token logits for a growing batch of left-padded token rows: megatron-core's static KV cache, or full
recomputation (the reference the cache must equal, and the baseline `megacca bench sample` measures).

The cache is megatron-core 0.16.1's own `StaticInferenceContext`: megatron's `Attention` writes each layer's
keys and values into it and reads the whole prefix back (`_adjust_key_value_for_inference`), so no layer code
is forked. What megatron leaves to the caller, and this module supplies:
  - positions: rotary angles come from each row's absolute positions over its whole history
    (`UnifiedGPT.history_positions`, handed to `UnifiedGPT.forward` as `rotary_positions`);
  - padding: prompts of different lengths are left-padded, so every row's next token is at the same index.
    The padding is hidden by an explicit mask (keys before a row's `start`); each pad query sees itself, so
    no softmax row is empty (an all-masked row would put NaN into the cache and, through 0 * NaN, into the
    real rows). Without padding no mask is passed and attention stays on the fused causal kernel.
"""
from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


def left_pad(prompts: list[list[int]], pad_id: int, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token buffer [N, capacity] with each prompt right-aligned at index L = max prompt length (the rest pad),
    and each row's first real index `start` [N]."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), capacity), pad_id, dtype=torch.long)
    start = torch.empty(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        start[i] = width - len(p)
    return tokens.to(device), start.to(device)


class IncrementalDecoder:
    """Feeds `model` a batch of prompts, then one token per row per step; `logits()` is the next-token
    distribution (full vocabulary, gathered over tensor parallelism, padding rows included) [N, V_padded].

    `model` is a `UnifiedGPT` (its rope mode, `<boi>` id and image grid place the rotary positions).
    """

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, use_cache: bool = True):
        device = next(model.parameters()).device
        self.model, self.use_cache = model, use_cache
        self.end = max(len(p) for p in prompts)  # tokens held so far (the next one goes at index end)
        capacity = self.end + max_new_tokens
        self.tokens, self.start = left_pad(prompts, pad_id, capacity, device)
        self.padded = bool((self.start > 0).any())
        if self.padded and getattr(model, "attention_backend", None) == "te":
            # TE's attention reads megatron's mask *types* and may ignore an explicit padding mask.
            raise NotImplementedError("prompts of different lengths (or CFG with prompts longer than their "
                                      "unconditional version) need explicit padding masks, which the te attention "
                                      "backend is not checked to honour: use model.attention_backend=sdpa or flash")
        self._key_pad = (torch.arange(capacity, device=device)[None, :] < self.start[:, None])[:, None, None, :]
        self.context = None
        if use_cache:
            self.context = StaticInferenceContext(len(prompts), capacity)
        self._fed = 0  # tokens already in the cache

    def _mask(self, begin: int, end: int):
        """Mask for queries begin..end-1 over keys 0..end-1 ([N or 1, 1, end-begin, end], True = masked):
        causal, pad keys hidden, each pad query sees itself (so every softmax row has a key). None where the
        layers need nothing: no padding and either the square causal prefill or one new token (megatron's
        cache runs the layers unmasked after the prefill, which is right for one token at the end)."""
        q = end - begin
        if not self.padded and (begin == 0 or q == 1):
            return None
        if q == 1:  # after the prefill the new token is a real one: only the padding to hide
            return self._key_pad[..., :end]
        ar = torch.arange(end, device=self.tokens.device)
        masked = ar[None, :] > ar[begin:end, None]  # the future, aligned so the last query is the last key
        if self.padded:
            masked = (masked | self._key_pad[..., :end]) & (ar[None, :] != ar[begin:end, None])
        return masked

    def _positions(self, end: int):
        """Rotary positions of the history [:end] (None: megatron's own 0..end-1, the same for every row)."""
        m = self.model
        if m.rope_mode == "1d" and not self.padded:
            return None
        pos = m.history_positions(self.tokens[:, :end], self.start if self.padded else None)
        if pos.shape[0] > 1 and bool((pos == pos[:1]).all()):
            # Rows with one position history (equal-length prompts, images in step) share one set of angles:
            # megatron re-rotates every cached key at every step, and per-row angles would multiply its cos/sin
            # work by the batch size.
            pos = pos[:1]
        return pos

    def logits(self) -> torch.Tensor:
        """Next-token logits after the history so far, float [N, V_padded]; feeds the model what it has not
        seen yet (the prompts, then the appended tokens)."""
        end = self.end
        pos = self._positions(end)
        if not self.use_cache:
            out = self.model(self.tokens[:, :end], None, self._mask(0, end), rotary_positions=pos,
                             runtime_gather_output=True)
            return out[:, -1].float()
        ctx, begin = self.context, self._fed
        if begin:
            ctx.enable_decode_mode()
        out = self.model(self.tokens[:, begin:end], None, self._mask(begin, end), rotary_positions=pos,
                         inference_context=ctx, runtime_gather_output=True)
        ctx.increment_sequence_len_offset(end - begin)
        self._fed = end
        return out[:, -1].float()

    def append(self, next_ids: torch.Tensor) -> None:
        """Add one token per row (next_ids [N]) to the history."""
        self.tokens[:, self.end] = next_ids
        self.end += 1
