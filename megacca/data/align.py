"""Alignment rows (docs/data-format.md, "Alignment batches"): pure functions shared by the streaming loader's
alignment mode and tools/precompute_ref_logps.py, so the stage and the precomputed reference see the same pairs.

A *pair* is two tokenized samples ``(ids, target)`` (the packing convention of `megacca.data.packing`:
``target[i]`` is 1 where ``ids[i]`` is scored) plus whether it is positive-like (CCA) and, from precomputed
pair shards, the reference's summed log-probs of both sides. A micro-batch of B pairs is 2B rows, one sample
per row, never packed: rows ``0..B-1`` the positives / chosen, row ``B + i`` the partner of row ``i``.

CCA (condition → image, Chen et al. 2025): a sample ``<bos> cond <boi> codes <eoi> <eos>`` splits into its
condition and its image part (`split_condition`). Inside a micro-batch, row ``i``'s negative is its own image
under the condition of row ``perm[i]`` (`negative_permutation`: the reference implementation's
``torch.roll(c, shifts=-1)``, or a seeded derangement); a seeded share ``uncond_ratio`` of rows gets ``<null>``
in both slots; such rows, rows whose negative condition is token-for-token their own, and (optionally) rows
whose partner has the same integer label are positive-like (`cca_pairs`). Only the H*W code labels are scored.
With ``model.layout: llamagen`` a sample is ``<class> codes`` (`megacca.data.packing.llamagen_c2i_tokens`): the
condition is its first token, the image the codes, and a row is ``cond codes`` (``layout="llamagen"``).

DPO: ``<bos> [<boi> prompt-codes <eoi>] [prompt-pieces <sep>] response-pieces <eos>`` per side; the response
pieces and ``<eos>`` are scored (`dpo_pair`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from megacca.data.packing import BadSample, _image, _sample, rows_to_batch

__all__ = ["CondImage", "Pair", "split_condition", "cca_row", "negative_permutation", "cca_pairs", "dpo_pair",
           "check_fits", "collate_pairs", "ref_pair_sample", "parse_ref_pair", "REF_PAIR_FIELDS", "NEGATIVES"]

NEGATIVES = ("roll", "derangement")
STAGES = ("cca", "dpo")
# Members of one record of a `ref_pairs` shard (tools/precompute_ref_logps.py writes them, the loader reads them).
REF_PAIR_FIELDS = ("chosen.npy", "rejected.npy", "chosen_mask.npy", "rejected_mask.npy", "json")


class CondImage(NamedTuple):
    """One condition → image sample, split for CCA. ``cond``: the ids between ``<bos>`` and the first ``<boi>``;
    ``image``: ``<boi> codes <eoi> <eos>``; ``label``: the sample's integer label (json ``label``) or None."""

    cond: np.ndarray
    image: np.ndarray
    label: Optional[int]


class Pair(NamedTuple):
    """Two rows that go into a micro-batch together: ``chosen`` / ``rejected`` are ``(ids int32, target uint8)``
    samples; ``ref_logps`` the reference's summed log-probs ``(chosen, rejected)`` when precomputed."""

    chosen: tuple
    rejected: tuple
    pos_like: bool = False
    ref_logps: Optional[tuple[float, float]] = None


# ---------------------------------------------------------------------------------------------------------
# CCA
# ---------------------------------------------------------------------------------------------------------
def split_condition(vocab, sample: tuple, label: Optional[int] = None, layout: str = "unified") -> CondImage:
    """A tokenized c2i / t2i sample (`c2i_tokens` / `t2i_tokens` layout, or `llamagen_c2i_tokens` with
    ``layout="llamagen"``) → its condition and image part."""
    ids = np.asarray(sample[0])
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        label = None
    label = None if label is None else int(label)
    if layout == "llamagen":
        if len(ids) < 2 or vocab.is_image(ids[0]) or not all(vocab.is_image(i) for i in ids[1:]):
            raise ValueError(f"not a llamagen-layout sample (cond codes): {ids.tolist()[:12]}")
        return CondImage(ids[:1].astype(np.int32), ids[1:].astype(np.int32), label)
    boi = np.flatnonzero(ids == vocab.boi_id)
    if len(ids) < 5 or ids[0] != vocab.bos_id or not len(boi) or ids[-2] != vocab.eoi_id or ids[-1] != vocab.eos_id:
        raise ValueError(f"not a condition -> image sample (<bos> cond <boi> codes <eoi> <eos>): {ids.tolist()[:12]}")
    j = int(boi[0])
    return CondImage(ids[1:j].astype(np.int32), ids[j:].astype(np.int32), label)


def cca_row(vocab, cond: np.ndarray, image: np.ndarray, layout: str = "unified") -> tuple[np.ndarray, np.ndarray]:
    """``<bos> cond <boi> codes <eoi> <eos>`` with the H*W codes as the only targets (not ``<eoi>``: CCA's
    sequence log-prob is the image's, as in the reference implementation); ``cond codes`` with the codes as
    targets for ``layout="llamagen"``."""
    if layout == "llamagen":
        ids = np.concatenate([np.asarray(cond, np.int32), np.asarray(image, np.int32)])
        tgt = np.zeros(len(ids), np.uint8)
        tgt[len(cond):] = 1
        return ids, tgt
    ids = np.concatenate([np.array([vocab.bos_id], np.int32), np.asarray(cond, np.int32),
                          np.asarray(image, np.int32)])
    tgt = np.zeros(len(ids), np.uint8)
    start = 1 + len(cond) + 1  # first code, right after <boi>
    tgt[start:len(ids) - 2] = 1  # up to, not including, <eoi> <eos>
    return ids, tgt


def negative_permutation(n: int, negatives: str, rng: np.random.Generator) -> np.ndarray:
    """``perm`` with row ``i`` taking the condition of row ``perm[i]``.

    ``roll``: ``perm[i] = (i + 1) % n``, i.e. ``torch.roll(c, shifts=-1)`` of the reference implementation (no
    draw from ``rng``). ``derangement``: uniform over the permutations without a fixed point (rejection
    sampling, about e draws); ``n = 1`` has none, so the one row keeps its own condition (positive-like).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if n <= 1 or negatives == "roll":
        return (np.arange(n) + 1) % max(n, 1)
    idx = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == idx):
            return perm


def cca_pairs(vocab, items: Sequence[CondImage], *, negatives: str, uncond_ratio: float,
              same_label_positive: bool, rng: np.random.Generator, layout: str = "unified") -> list[Pair]:
    """The B pairs of one micro-batch of condition → image samples (draws: the permutation, then one uniform
    per row for the ``<null>`` choice; all from ``rng``); rows in ``layout`` (`cca_row`)."""
    n = len(items)
    perm = negative_permutation(n, negatives, rng)
    uncond = rng.random(n) < uncond_ratio
    null = np.array([vocab.null_id], np.int32)
    out = []
    for i, it in enumerate(items):
        other = items[int(perm[i])]
        if uncond[i]:
            pos_cond = neg_cond = null
            pos_like = True
        else:
            pos_cond, neg_cond = it.cond, other.cond
            pos_like = bool(np.array_equal(pos_cond, neg_cond)) or bool(
                same_label_positive and it.label is not None and it.label == other.label)
        out.append(Pair(cca_row(vocab, pos_cond, it.image, layout), cca_row(vocab, neg_cond, it.image, layout),
                        pos_like))
    return out


# ---------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------
def dpo_pair(vocab, prompt_ids: Sequence[int], prompt_codes, chosen_ids: Sequence[int],
             rejected_ids: Sequence[int]) -> Pair:
    """Both sides of a preference pair. An image prompt (``prompt_codes`` not None) comes first as
    ``<boi> codes <eoi>``; prompt text, when there is any, is followed by ``<sep>``; so an image-only prompt
    gives exactly the i2t pretraining layout."""
    prefix: list = [([vocab.bos_id], 0)]
    if prompt_codes is not None:
        prefix += [([vocab.boi_id], 0), (_image(vocab, prompt_codes), 0), ([vocab.eoi_id], 0)]
    if len(prompt_ids):
        prefix += [(list(prompt_ids), 0), ([vocab.sep_id], 0)]
    side = lambda ids: _sample(prefix + [(list(ids), 1), ([vocab.eos_id], 1)])  # noqa: E731
    return Pair(side(chosen_ids), side(rejected_ids))


# ---------------------------------------------------------------------------------------------------------
# Rows → micro-batch
# ---------------------------------------------------------------------------------------------------------
def check_fits(sample: tuple, seq_length: int) -> None:
    """`BadSample` (``too_long``) when a sample is longer than a row of ``S + 1`` tokens (an alignment row is
    never cut: its log-prob would no longer be the sequence's)."""
    if len(sample[0]) > seq_length + 1:
        raise BadSample(f"sample of {len(sample[0])} tokens does not fit seq_length + 1 = {seq_length + 1}",
                        "too_long")


def collate_pairs(pairs: Sequence[Pair], seq_length: int, pad_id: int, *, pos_like: bool = False,
                  ref_logps: bool = False) -> dict:
    """B pairs → the micro-batch: ``tokens`` / ``labels`` int64 ``[2B, S]``, ``loss_mask`` float32 ``[2B, S]``
    (rows right-padded with ``<pad>``), plus ``pos_like`` bool ``[B]`` and ``ref_logps`` float32 ``[2B]``
    (chosen rows' then rejected rows') when asked for."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = seq_length + 1
    ids = np.full((len(rows), width), pad_id, np.int32)
    tgt = np.zeros((len(rows), width), np.uint8)
    for r, (i, t) in enumerate(rows):
        if len(i) > width:
            raise BadSample(f"alignment row of {len(i)} tokens does not fit seq_length + 1 = {width}", "too_long")
        ids[r, :len(i)] = i
        tgt[r, :len(t)] = t
    batch = rows_to_batch(ids, tgt)
    if pos_like:
        batch["pos_like"] = torch.tensor([bool(p.pos_like) for p in pairs], dtype=torch.bool)
    if ref_logps:
        if any(p.ref_logps is None for p in pairs):
            raise ValueError("ref_logps asked for, but a pair has no precomputed reference log-probs")
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------------------
# Precomputed reference pair shards (kind `ref_pairs`)
# ---------------------------------------------------------------------------------------------------------
def ref_pair_sample(key: str, pair: Pair, ref_logps: tuple[float, float], stage: str, source_key: str) -> dict:
    """One `ref_pairs` record as a `ShardWriter` sample. The log-probs are stored as the Python floats of their
    float32 values, so reading them back as float32 gives the same bits."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    logps = [float(np.float32(x)) for x in ref_logps]
    if not all(math.isfinite(x) for x in logps):
        raise ValueError(f"record {key!r}: reference log-probs {logps} are not finite")
    (ci, ct), (ri, rt) = pair.chosen, pair.rejected
    return {"__key__": key,
            "chosen.npy": np.asarray(ci, np.int32), "chosen_mask.npy": np.asarray(ct, np.uint8),
            "rejected.npy": np.asarray(ri, np.int32), "rejected_mask.npy": np.asarray(rt, np.uint8),
            "json": {"pos_like": bool(pair.pos_like), "ref_logps": logps, "stage": stage,
                     "source_key": source_key}}


def parse_ref_pair(d: dict, stage: str, vocab_size: int) -> Pair:
    """A decoded `ref_pairs` record (``REF_PAIR_FIELDS`` → arrays and the json object) → its `Pair`.
    `BadSample` (without shard and key: the caller adds them) on anything that is not as written."""
    meta = d["json"]
    if not isinstance(meta, dict):
        raise BadSample(f"json member is a {type(meta).__name__}, expected an object", "missing_field")
    missing = [k for k in ("pos_like", "ref_logps", "stage") if k not in meta]
    if missing:
        raise BadSample(f"json lacks field(s) {', '.join(missing)}", "missing_field")
    if meta["stage"] != stage:
        raise BadSample(f"a pair for stage {meta['stage']!r}, this stage is {stage!r}", "bad_pair")
    logps = meta["ref_logps"]
    if not isinstance(meta["pos_like"], bool) or not isinstance(logps, list) or len(logps) != 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in logps):
        raise BadSample(f"json needs pos_like (bool) and ref_logps ([chosen, rejected] finite numbers), got "
                        f"{meta['pos_like']!r}, {logps!r}", "bad_pair")
    sides = []
    for side in ("chosen", "rejected"):
        ids, mask = d[f"{side}.npy"], d[f"{side}_mask.npy"]
        if not (isinstance(ids, np.ndarray) and isinstance(mask, np.ndarray) and np.issubdtype(ids.dtype, np.integer)
                and np.issubdtype(mask.dtype, np.integer) and ids.ndim == 1 and ids.shape == mask.shape
                and ids.size >= 2):
            raise BadSample(f"{side}: ids and mask must be 1-D integer arrays of one length (>= 2)", "bad_pair")
        if ids.min() < 0 or ids.max() >= vocab_size or mask.min() < 0 or mask.max() > 1:
            raise BadSample(f"{side}: ids outside the vocabulary [0, {vocab_size}) or a mask value not 0/1",
                            "bad_pair")
        sides.append((ids.astype(np.int32), mask.astype(np.uint8)))
    return Pair(sides[0], sides[1], meta["pos_like"], (float(logps[0]), float(logps[1])))
