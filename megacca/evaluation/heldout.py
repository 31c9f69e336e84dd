"""Held-out loss: the mean next-token NLL of a model over one split of a code shard directory.

Each sample becomes the row the training loader makes of it (``megacca.data.loader.tokenize_sample``: the same
layout and loss targets, docs/data-format.md "Sample → token layout"), never condition-dropped, one row per
sample (no packing: a packed row's later samples would see the earlier ones, which the loss mask already
makes irrelevant, so the figure is the same). The loss is summed over the target tokens of every row and
divided by their number: the training loss's definition (a mean over loss tokens), on unseen samples.

- c2i: ``<bos> <class_k> <boi> codes <eoi> <eos>``, targets the codes and ``<eoi>``;
- t2i / i2t: every caption of a sample is one row (the loader draws one at random; all of them make the
  figure deterministic), targets the codes and ``<eoi>`` (t2i) or the caption pieces and ``<eos>`` (i2t).

Augmented copies (json ``augment``) are skipped: the figure is about real images. Log-probabilities are
normalised over the real vocabulary (``InferenceModel.logits`` drops the padded rows, which are never
targets), so the figure can sit a hair below a training loss computed over the padded vocabulary.
"""
from __future__ import annotations

import io
import json
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["TASKS", "heldout_rows", "rows_nll", "heldout_loss", "heldout_report", "heldout_codes"]

TASKS = ("c2i", "t2i", "i2t")


def _samples(shard_dir, split: str):
    """Raw un-augmented samples of one split, with their decoded json."""
    from megacca.data.augment import is_augmented
    from megacca.data.shards import iter_samples

    for s in iter_samples(str(shard_dir), split):
        meta = json.loads(s["json"]) if "json" in s else {}
        if not is_augmented(meta):
            yield s, meta


def heldout_codes(codes_dir, split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """The image codes int64 [N, h, w] and labels int64 [N] of one split of a code shard directory, in shard
    order, augmented copies skipped (the prompts of the captioning evaluation)."""
    codes, labels = [], []
    for s, meta in _samples(codes_dir, split):
        where = f"{s.get('__url__')}: sample key {s['__key__']!r}"
        if "codes.npy" not in s:
            raise ValueError(f"{where}: no codes.npy member (is {codes_dir} a code shard directory?)")
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{where}: json has no integer 'label'")
        codes.append(np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False).astype(np.int64))
        labels.append(label)
    if not codes:
        raise ValueError(f"{codes_dir}: split {split!r} holds no un-augmented samples")
    return np.stack(codes), np.asarray(labels, dtype=np.int64)


def heldout_rows(vocab, shard_dir, split: str, task: str, seq_length: Optional[int] = None) -> list[tuple]:
    """``(ids int32 [n], target uint8 [n])`` per row: the loader's tokenization of each sample (each caption, for
    t2i / i2t), without condition dropout. A row longer than ``seq_length + 1`` is a `BadSample`, as in the
    loader."""
    from megacca.data.loader import tokenize_sample
    from megacca.data.packing import BadSample, fit_sample

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rows = []
    for s, meta in _samples(shard_dir, split):
        shard, key = s.get("__url__"), s["__key__"]
        variants = [s]
        if task != "c2i":
            caps = meta.get("captions") if isinstance(meta, dict) else None
            caps = [c for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []
            # One sample per caption, each holding only that caption: the loader's draw then has one choice.
            variants = [dict(s, json=json.dumps(dict(meta, captions=[c])).encode()) for c in caps] or [s]
        for v in variants:
            try:
                tok, has_image = tokenize_sample(task, v, vocab, shard, 1.0, 0.0, 0.0)
                if seq_length is not None:
                    fit_sample(tok, seq_length, has_image)
            except BadSample as e:
                raise BadSample(f"{shard}: sample key {key!r}: {e}", e.reason, shard, key) from None
            rows.append(tok)
    if not rows:
        raise ValueError(f"{shard_dir}: split {split!r} holds no un-augmented samples")
    return rows


def rows_nll(model, rows: Sequence[tuple], pad_id: int, batch_size: int = 64) -> tuple[float, int]:
    """Summed NLL of the target tokens of ``rows`` and their number. ``model.logits(LongTensor [B, S])`` gives
    float [B, S, V]; rows of a batch are right-padded with ``pad_id`` (causal attention: the padding is never
    seen by a real position) after sorting by length, so little is padded."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    total, count = 0.0, 0
    for b in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[b:b + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        tgt = np.zeros((len(batch), width), dtype=bool)
        for r, (i, t) in enumerate(batch):
            ids[r, :len(i)] = i
            tgt[r, :len(t)] = t.astype(bool)
        tokens = torch.from_numpy(ids)
        with torch.no_grad():
            logp = torch.log_softmax(model.logits(tokens[:, :-1]).float(), dim=-1)
        picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).double()
        mask = torch.from_numpy(tgt[:, 1:])
        total -= float(picked[mask].sum())
        count += int(mask.sum())
    return total, count


def _seq_length(model) -> Optional[int]:
    cfg = getattr(model, "cfg", None)
    return getattr(getattr(cfg, "model", None), "seq_length", None)


def heldout_report(model, shard_dir, split: str = "heldout", task: str = "c2i", batch_size: int = 64,
                   rows: Optional[Sequence[tuple]] = None) -> dict:
    """``{"loss", "tokens", "rows", "task", "split", "path"}`` of one shard split and task (module docstring).
    ``model``: an `InferenceModel` (``.vocab``, ``.logits``; ``.cfg`` bounds the row length). ``rows``: that
    split's `heldout_rows`, when the caller has read them already."""
    vocab = model.vocab
    if vocab is None:
        raise ValueError("the model has no vocabulary: a held-out loss needs one to tokenize the shards")
    if rows is None:
        rows = heldout_rows(vocab, shard_dir, split, task, _seq_length(model))
    total, count = rows_nll(model, rows, vocab.pad_id, batch_size)
    return {"loss": total / count, "tokens": count, "rows": len(rows), "task": task, "split": split,
            "path": str(shard_dir)}


def heldout_loss(model, shard_dir, split: str = "heldout", task: str = "c2i", batch_size: int = 64) -> float:
    """The mean per-token NLL of ``model`` on ``split`` of ``shard_dir`` for ``task`` (see `heldout_report`)."""
    return heldout_report(model, shard_dir, split, task, batch_size)["loss"]
