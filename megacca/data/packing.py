"""Sample → token layout and sequence packing (docs/data-format.md, "Sample → token layout", "Batches").

A tokenized sample is a pair ``(ids, target)`` of equal length: ``ids`` the unified token ids, ``target[i]``
1 where token ``ids[i]`` is a loss target (predicted from ``ids[i-1]``). The first token of every sample is
never a target (it would be predicted from the previous sample). Packing concatenates samples into rows of
``S + 1`` tokens; a micro-batch takes ``tokens = row[:-1]``, ``labels = row[1:]``,
``loss_mask = target[1:]``, so ``loss_mask[t]`` is 1 exactly when ``labels[t]`` is a target of the same
sample as ``tokens[t]``.

Layouts (``<c>`` the condition; a ``cond_dropout`` share of c2i/t2i samples get ``<null>`` instead):

- c2i:  ``<bos> <class_k> <boi> codes <eoi> <eos>``   targets: codes, ``<eoi>``
- t2i:  ``<bos> caption <boi> codes <eoi> <eos>``     targets: codes, ``<eoi>``
  (an augmented copy: its augmentation's pieces follow the condition, ``<null>`` included)
- i2t:  ``<bos> <boi> codes <eoi> caption <eos>``     targets: caption pieces, ``<eos>``
- text: ``<bos> pieces <eos>``                        targets: everything after ``<bos>``
- interleaved: ``<bos> segment... <eos>``, each image ``<boi> codes <eoi>``; targets: text pieces

With ``model.layout: llamagen`` (LlamaGen's class-conditional GPT) c2i is the only task:

- c2i:  ``<class_k> codes``                           targets: codes
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "BadSample", "c2i_tokens", "llamagen_c2i_tokens", "t2i_tokens", "i2t_tokens", "text_tokens", "interleaved_tokens",
    "fit_sample", "pack", "rows_to_batch",
]

TokenSample = tuple  # (ids: np.ndarray int32 [n], target: np.ndarray uint8 [n])


class BadSample(ValueError):
    """One bad input sample (or a bad shard). ``reason`` is the `error_counts()` key; the message names the
    shard file and the sample key."""

    def __init__(self, message: str, reason: str = "bad_sample", shard: Optional[str] = None,
                 key: Optional[str] = None):
        super().__init__(message)
        self.reason = reason
        self.shard = shard
        self.key = key


def _sample(parts: Sequence[tuple[Sequence[int], int]]) -> TokenSample:
    """Concatenate ``(ids, is_target)`` parts into one ``(ids, target)`` sample."""
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p, _ in parts]
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    tgt = np.concatenate([np.full(len(a), m, dtype=np.uint8) for a, (_, m) in zip(arrays, parts)]) if arrays \
        else np.zeros(0, np.uint8)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise BadSample("token id outside int32", "bad_codes")
    tgt[:1] = 0
    return ids.astype(np.int32), tgt


def _image(vocab, codes) -> list[int]:
    try:
        return list(vocab.image_tokens(codes))
    except (ValueError, TypeError, IndexError) as e:
        raise BadSample(f"bad image codes: {e}", "bad_codes") from None


def c2i_tokens(vocab, label: int, codes, drop: bool, aug: Sequence[int] = ()) -> TokenSample:
    """``aug``: the pieces of an augmented copy's augmentation, kept after the condition even when it is
    dropped (docs/data-format.md, "Augmented samples")."""
    cond = ([vocab.null_id] if drop else [vocab.class_token(label)]) + list(aug)
    return _sample([([vocab.bos_id], 0), (cond, 0), ([vocab.boi_id], 0), (_image(vocab, codes), 1),
                    ([vocab.eoi_id], 1), ([vocab.eos_id], 0)])


def llamagen_c2i_tokens(vocab, label: int, codes, drop: bool) -> TokenSample:
    """The LlamaGen layout's class→image sample: the condition, then the codes, every code a target (LlamaGen
    predicts the first code from the condition and scores no end token)."""
    cond = [vocab.null_id] if drop else [vocab.class_token(label)]
    return _sample([(cond, 0), (_image(vocab, codes), 1)])


def t2i_tokens(vocab, caption_ids: Sequence[int], codes, drop: bool, aug: Sequence[int] = ()) -> TokenSample:
    """``aug`` as in `c2i_tokens`."""
    cond = ([vocab.null_id] if drop else list(caption_ids)) + list(aug)
    return _sample([([vocab.bos_id], 0), (cond, 0), ([vocab.boi_id], 0), (_image(vocab, codes), 1),
                    ([vocab.eoi_id], 1), ([vocab.eos_id], 0)])


def i2t_tokens(vocab, codes, caption_ids: Sequence[int]) -> TokenSample:
    return _sample([([vocab.bos_id], 0), ([vocab.boi_id], 0), (_image(vocab, codes), 0), ([vocab.eoi_id], 0),
                    (list(caption_ids), 1), ([vocab.eos_id], 1)])


def text_tokens(vocab, text_ids: Sequence[int]) -> TokenSample:
    return _sample([([vocab.bos_id], 0), (list(text_ids), 1), ([vocab.eos_id], 1)])


def interleaved_tokens(vocab, segments: Iterable[tuple[str, object]]) -> TokenSample:
    """``segments``: ``("text", piece_ids)`` or ``("image", codes)`` in document order."""
    parts: list = [([vocab.bos_id], 0)]
    for kind, value in segments:
        if kind == "text":
            parts.append((list(value), 1))
        else:
            parts += [([vocab.boi_id], 0), (_image(vocab, value), 0), ([vocab.eoi_id], 0)]
    parts.append(([vocab.eos_id], 0))
    return _sample(parts)


def fit_sample(sample: TokenSample, seq_length: int, has_image: bool) -> list[TokenSample]:
    """Pieces of one sample that each fit a row of ``seq_length + 1`` tokens.

    A sample that fits is returned as is. Text longer than a row is cut into rows of ``S + 1`` tokens that
    overlap by one token (row ``i`` = ``ids[i*S : i*S + S + 1]``), so every target of the document is
    predicted exactly once; the overlapping first token of each later piece is context only. An image sample
    longer than a row is a bad input (cutting it would cut through the image).
    """
    ids, tgt = sample
    row = seq_length + 1
    if len(ids) <= row:
        return [sample]
    if has_image:
        raise BadSample(f"image sample of {len(ids)} tokens does not fit seq_length + 1 = {row}", "too_long")
    out = []
    for start in range(0, len(ids) - 1, seq_length):
        i, t = ids[start:start + row], tgt[start:start + row].copy()
        t[0] = 0
        out.append((i, t))
    return out


def pack(samples: Iterable[TokenSample], seq_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing in order into rows of ``S + 1``: ``(ids int32 [n, S+1], target uint8 [n, S+1])``.

    A sample never straddles two rows: one that does not fit starts the next row, and the rest of the
    current row is ``<pad>`` (never a target). Every sample must already fit a row (see `fit_sample`).
    """
    row = seq_length + 1
    rows_ids: list[np.ndarray] = []
    rows_tgt: list[np.ndarray] = []
    cur_ids = np.full(row, pad_id, dtype=np.int32)
    cur_tgt = np.zeros(row, dtype=np.uint8)
    fill = 0
    for ids, tgt in samples:
        n = len(ids)
        if n > row:
            raise ValueError(f"sample of {n} tokens does not fit a row of {row} (call fit_sample first)")
        if fill + n > row:
            rows_ids.append(cur_ids)
            rows_tgt.append(cur_tgt)
            cur_ids = np.full(row, pad_id, dtype=np.int32)
            cur_tgt = np.zeros(row, dtype=np.uint8)
            fill = 0
        cur_ids[fill:fill + n] = ids
        cur_tgt[fill:fill + n] = tgt
        cur_tgt[fill] = 0
        fill += n
    if fill:
        rows_ids.append(cur_ids)
        rows_tgt.append(cur_tgt)
    if not rows_ids:
        return np.zeros((0, row), np.int32), np.zeros((0, row), np.uint8)
    return np.stack(rows_ids), np.stack(rows_tgt)


def rows_to_batch(ids: np.ndarray, tgt: np.ndarray) -> dict:
    """Packed rows ``[mb, S+1]`` → the contract's micro-batch dict (tokens, labels, loss_mask)."""
    ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    tgt = torch.from_numpy(np.ascontiguousarray(tgt))
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "loss_mask": tgt[:, 1:].to(torch.float32).contiguous()}
