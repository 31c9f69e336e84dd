"""The streaming loader: WebDataset shards → packed micro-batches, with exact resume (docs/data-format.md).

Entry points: ``build_webdataset_source(data_cfg, vocab, seq_length, micro_batch_size, dp_rank, dp_size,
seed)`` returns a `WebDatasetSource`: an infinite iterator over this data-parallel rank's micro-batches
(``tokens``/``labels`` int64 ``[mb, S]``, ``loss_mask`` float32 ``[mb, S]``) with ``state_dict()``,
``load_state_dict()``, ``error_counts()`` and ``close()``. ``build_alignment_source(data_cfg, align_cfg,
stage, vocab, seq_length, micro_batch_size, dp_rank, dp_size, seed)`` is the same source in alignment mode
(stages ``cca`` and ``dpo``): each micro-batch holds ``micro_batch_size`` pairs as ``2 * micro_batch_size``
unpacked rows (`megacca.data.align`, docs/data-format.md "Alignment batches").

Design (what makes resume exact and cheap)
------------------------------------------
*Slots.* Every data-parallel rank runs ``W = max(1, num_workers)`` streams ("slots"); slot
``g = dp_rank * W + worker`` of ``dp_size * W``. Each slot reads, for every source, its own list of *units*
per epoch: the epoch's seeded permutation of the source's shards, dealt round-robin (slot ``g`` takes
positions ``g, g + slots, ...`` of the permutation); the ``n_shards % slots`` shards left over are split at
sample level (the slots sharing one take every ``k``-th sample at their own offset). So in every epoch each
sample belongs to exactly one slot, and with fewer shards than slots the split is purely by sample.

*Blocks.* A unit is processed as one block: read the shard (``megacca.data.shards``), keep the
slot's samples, tokenize them (cond-dropout and caption choice drawn from an RNG seeded by
``(seed, source, epoch, shard, stride, offset)``), shuffle them with webdataset's buffer shuffle
(``shuffle_buffer``, seeded the same way) and pack them into rows of ``S + 1`` tokens. Nothing crosses a unit
boundary, so a slot's position in a source is ``(epoch, unit, row)`` and resuming re-reads at most the one
current shard.

*Mixing.* A slot draws the source of each row by weight with an RNG seeded by ``(seed, slot, row counter)``,
so the mixing state is just the counter. A slot emits micro-batches of ``mb`` rows.

*Alignment mode.* The same slots, units and cursors, with one item per sample instead of packed rows: a unit
yields condition → image samples (CCA, from code shards), preference pairs (DPO, from ``pairs`` shards) or
precomputed pairs (``ref_pairs`` shards), shuffled as above. A micro-batch takes ``mb`` items from one source
(drawn by weight per micro-batch, so a CCA negative's condition is always of the same task); CCA pairs them
with an RNG seeded by ``(seed, slot, micro-batch counter)``. The counter is the mixing counter, so the
position format and the resume logic are those of pretraining.

*Workers.* A torch DataLoader (``batch_size=None``) runs one slot per worker and returns their micro-batches
round-robin in worker order, so micro-batch ``n`` comes from local slot ``n % W``. Each micro-batch carries its
slot's position after it; the main process keeps the position of the last consumed micro-batch per slot and
the number consumed. A restored source hands slot ``(n + j) % W`` to worker ``j``, which starts from that
slot's saved position, so the next micro-batch is exactly the one that would have come next.

Bad input (``data.on_error``): a corrupt or truncated tar, an empty shard, a missing field, codes outside the
codebook or of the wrong shape, an undecodable member, an image sample longer than a row. ``raise`` raises
`BadSample` (a ValueError) naming the shard file and the sample key; ``skip`` drops the sample (for a damaged
tar: everything after the damage), logs a warning and counts it by reason in ``error_counts()``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import reprlib
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds

from megacca.data.align import (REF_PAIR_FIELDS, check_fits, cca_pairs, collate_pairs, dpo_pair, parse_ref_pair,
                                split_condition)
from megacca.data.augment import augment_text, is_augmented
from megacca.data.config import resolve_source
from megacca.data.packing import (BadSample, c2i_tokens, fit_sample, i2t_tokens, interleaved_tokens,
                                  llamagen_c2i_tokens, pack, rows_to_batch, t2i_tokens, text_tokens)
from megacca.data.shards import read_shard_samples, shard_damage

log = logging.getLogger(__name__)

__all__ = ["build_webdataset_source", "build_alignment_source", "WebDatasetSource", "BadSample", "plan_units",
           "tokenize_sample", "alignment_epoch"]

STATE_FORMAT = "megacca-loader/1"
TASKS = ("c2i", "t2i", "i2t", "text", "interleaved")
ALIGN_TASKS = ("c2i", "t2i", "pairs", "ref_pairs")  # what alignment mode reads (pairs: DPO from `pairs` shards)
ERROR_REASONS = ("corrupt_tar", "empty_shard", "missing_field", "bad_label", "bad_codes", "decode_error",
                 "too_long", "bad_pair")
# Tags keep the seeded RNG streams of different purposes apart.
_TAG_PERM, _TAG_UNIT, _TAG_SHUF, _TAG_MIX = 0x5045524D, 0x554E4954, 0x53485546, 0x4D495820
_TAG_PAIR = 0x50414952
_SEED_MASK = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------------------
# Decoding members safely (no pickle, no torch.load); reading the tar is megacca.data.shards' job
# ---------------------------------------------------------------------------------------------------------
def _npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def _txt(data: bytes) -> str:
    return data.decode("utf-8")


_DECODER = wds.autodecode.Decoder(
    [wds.autodecode.handle_extension("npy", _npy), wds.autodecode.handle_extension("json", _json),
     wds.autodecode.handle_extension("txt", _txt)],
    pre=[], post=[])


def _decode(sample: dict, fields: list[str], shard: str) -> dict:
    key = sample.get("__key__")
    missing = [f for f in fields if f not in sample]
    if missing:
        raise BadSample(f"missing field(s) {', '.join(missing)} (has: {', '.join(_exts(sample)) or 'none'})",
                        "missing_field", shard, key)
    try:
        return _DECODER.decode({f: sample[f] for f in fields})
    except wds.autodecode.DecodingError as e:
        cause = e.__cause__
        raise BadSample(f"cannot decode member {e.k!r}: {type(cause).__name__}: {cause}", "decode_error",
                        shard, key) from None


def _exts(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


# ---------------------------------------------------------------------------------------------------------
# Sources, planning
# ---------------------------------------------------------------------------------------------------------
class _Source:
    """One resolved `SourceConfig`: its shard files and task (picklable, sent to the workers)."""

    def __init__(self, index: int, path: str, split: str, task: str, weight: float, names: list[str],
                 counts: list[int], augmented: bool = True):
        self.index, self.path, self.split, self.task, self.weight = index, path, split, task, float(weight)
        self.names, self.counts = list(names), [int(c) for c in counts]
        self.paths = [os.path.join(path, n) for n in names]
        self.augmented = bool(augmented)  # pretraining reads augmented copies (json 'augment') too

    def fingerprint(self) -> dict:
        fp = {"split": self.split, "task": self.task, "weight": self.weight,
              "shards": [[n, c] for n, c in zip(self.names, self.counts)]}
        if not self.augmented:  # states saved before the option existed stay loadable
            fp["augmented"] = False
        return fp


def plan_units(num_shards: int, slots: int, slot: int, seed: int, source_index: int,
               epoch: int) -> list[tuple[int, int, int]]:
    """The units ``(shard index, stride, offset)`` slot ``slot`` of ``slots`` reads from one source in ``epoch``.

    The epoch's shards are permuted with ``(seed, source, epoch)``; slot ``g`` takes whole shards at positions
    ``g, g + slots, ...`` below ``slots * (num_shards // slots)``; each of the ``r = num_shards % slots``
    remaining shards goes to the slots ``g`` with ``g % r == i``, which take its samples ``j`` with
    ``j % stride == offset`` (``offset = g // r``). Over all slots every sample is read exactly once per epoch.
    """
    if num_shards <= 0:
        return []
    perm = np.random.default_rng([seed & _SEED_MASK, _TAG_PERM, source_index, epoch]).permutation(num_shards)
    full = num_shards // slots
    units = [(int(perm[r * slots + slot]), 1, 0) for r in range(full)]
    rem = perm[full * slots:]
    r = len(rem)
    if r:
        i = slot % r
        stride = (slots - i + r - 1) // r
        units.append((int(rem[i]), stride, slot // r))
    return units


class _Plan:
    """Everything a slot needs to produce its stream (picklable; identical in every worker)."""

    def __init__(self, sources: list[_Source], vocab, seq_length: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, workers: int, seed: int, shuffle_buffer: int, cond_dropout: float,
                 on_error: str, mode: str = "pretrain", align: Optional[dict] = None, layout: str = "unified"):
        self.sources, self.vocab = sources, vocab
        self.layout = layout  # model.layout: "unified", or "llamagen" (c2i samples `<class> codes`)
        self.seq_length, self.micro_batch_size = int(seq_length), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.workers = int(dp_rank), int(dp_size), int(workers)
        self.slots = self.dp_size * self.workers
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.cond_dropout, self.on_error = float(cond_dropout), on_error
        # "pretrain", or the alignment stage ("cca" / "dpo") with its pairing options: negatives,
        # uncond_ratio, same_label_positive, ref_logps (keep the pair shards' reference log-probs)
        self.mode, self.align = mode, dict(align or {})
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.cum_weights = np.cumsum(w / w.sum())

    def fingerprint(self) -> dict:
        fp = {"seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "workers": self.workers,
              "seq_length": self.seq_length, "micro_batch_size": self.micro_batch_size,
              "shuffle_buffer": self.shuffle_buffer, "cond_dropout": self.cond_dropout,
              "sources": [s.fingerprint() for s in self.sources]}
        if self.mode != "pretrain":  # pretraining states saved before alignment mode existed stay loadable
            fp.update(mode=self.mode, align=self.align)
        if self.layout != "unified":  # likewise for states saved before layouts existed
            fp["layout"] = self.layout
        return fp


# ---------------------------------------------------------------------------------------------------------
# Sample → tokens
# ---------------------------------------------------------------------------------------------------------
def _check_codes(vocab, codes, what: str = "codes") -> np.ndarray:
    if not isinstance(codes, np.ndarray) or not np.issubdtype(codes.dtype, np.integer):
        raise BadSample(f"{what} must be an integer array, got {getattr(codes, 'dtype', type(codes).__name__)}",
                        "bad_codes")
    grid = getattr(vocab, "image_grid", None)
    if codes.ndim != 2 or (grid is not None and tuple(codes.shape) != tuple(grid)):
        raise BadSample(f"{what} have shape {list(codes.shape)}, expected {list(grid) if grid else '[h, w]'}",
                        "bad_codes")
    if codes.size and (codes.min() < 0 or codes.max() >= vocab.codebook_size):
        raise BadSample(f"{what} values in [{codes.min()}, {codes.max()}] outside the codebook "
                        f"[0, {vocab.codebook_size})", "bad_codes")
    return codes


def _caption(meta: dict, u: float) -> str:
    caps = meta.get("captions")
    caps = [c for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []
    if not caps:
        raise BadSample("no caption (json 'captions' is missing or empty)", "missing_field")
    return caps[min(int(u * len(caps)), len(caps) - 1)]


def _meta(d: dict) -> dict:
    meta = d["json"]
    if not isinstance(meta, dict):
        raise BadSample(f"json member is a {type(meta).__name__}, expected an object", "missing_field")
    return meta


def _augment_ids(vocab, meta: dict) -> list[int]:
    """The pieces of an augmented copy's augmentation words (none for a real sample)."""
    try:
        text = augment_text(meta)
    except ValueError as e:
        raise BadSample(str(e), "missing_field") from None
    return [] if text is None else vocab.encode_text(text)


def _augmented(sample: dict, shard: str) -> bool:
    """Whether a raw sample is an augmented copy (json ``augment``); a sample without json is not."""
    return "json" in sample and is_augmented(_decode(sample, ["json"], shard)["json"])


def tokenize_sample(task: str, sample: dict, vocab, shard: str, u_drop: float, u_cap: float,
                    cond_dropout: float, layout: str = "unified"):
    """One raw sample → ``((ids, target), has_image)``; raises `BadSample` (without shard/key in the text).
    An augmented copy's c2i / t2i condition ends with its augmentation words, dropped condition or not; its
    i2t sample is the plain layout (the caption describes the shifted image as well)."""
    drop = u_drop < cond_dropout
    if task == "c2i":
        d = _decode(sample, ["codes.npy", "json"], shard)
        meta = _meta(d)
        label = meta.get("label")
        if label is None:
            raise BadSample("no class label (json 'label' is missing or null)", "missing_field")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < vocab.num_classes:
            raise BadSample(f"class label {label!r} outside [0, {vocab.num_classes})", "bad_label")
        codes, aug = _check_codes(vocab, d["codes.npy"]), _augment_ids(vocab, meta)
        if layout == "llamagen":
            if aug:
                raise BadSample("an augmented copy: the llamagen layout's condition is the class alone (set the "
                                "source's augmented: false)", "bad_label")
            return llamagen_c2i_tokens(vocab, label, codes, drop), True
        return c2i_tokens(vocab, label, codes, drop, aug), True
    if task in ("t2i", "i2t"):
        d = _decode(sample, ["codes.npy", "json"], shard)
        meta = _meta(d)
        caption = vocab.encode_text(_caption(meta, u_cap))
        codes = _check_codes(vocab, d["codes.npy"])
        if task == "t2i":
            return t2i_tokens(vocab, caption, codes, drop, _augment_ids(vocab, meta)), True
        return i2t_tokens(vocab, codes, caption), True
    if task == "text":
        d = _decode(sample, ["txt"], shard)
        return text_tokens(vocab, vocab.encode_text(d["txt"])), False
    if task == "interleaved":
        meta = _meta(_decode(sample, ["json"], shard))
        segs = meta.get("segments")
        if not isinstance(segs, list) or not segs:
            raise BadSample("no segments (json 'segments' is missing or empty)", "missing_field")
        out, has_image = [], False
        for seg in segs:
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                out.append(("text", vocab.encode_text(seg["text"])))
            elif isinstance(seg, dict) and isinstance(seg.get("image"), (str, int)) \
                    and not isinstance(seg.get("image"), bool):
                member = f"{seg['image']}.codes.npy"
                codes = _decode(sample, [member], shard)[member]
                out.append(("image", _check_codes(vocab, codes, member)))
                has_image = True
            else:
                raise BadSample(f"bad segment {seg!r}: need {{'text': str}} or {{'image': name}}", "missing_field")
        return interleaved_tokens(vocab, out), has_image
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------------------
# One unit (a shard, or this slot's share of one) as a block of packed rows
# ---------------------------------------------------------------------------------------------------------
def _bad(plan: _Plan, err: BadSample, errors: Counter) -> None:
    if plan.on_error == "raise":
        raise err
    errors[err.reason] += 1
    log.warning("skipping bad input (%s): %s", err.reason, err)


def _pair_sample(sample: dict, vocab, shard: str):
    """A `pairs` shard sample (json ``{prompt, chosen, rejected}``, optional ``prompt.codes.npy``) → `Pair`."""
    if "prompt.png" in sample and "prompt.codes.npy" not in sample:
        raise BadSample("prompt image not VQ-encoded (has prompt.png, no prompt.codes.npy): run tools/vq_encode.py "
                        "on the pairs shards", "missing_field")
    fields = ["json"] + (["prompt.codes.npy"] if "prompt.codes.npy" in sample else [])
    d = _decode(sample, fields, shard)
    meta = _meta(d)
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(meta.get(k), str)]
    if missing:
        raise BadSample(f"json lacks string field(s) {', '.join(missing)}", "missing_field")
    codes = _check_codes(vocab, d["prompt.codes.npy"], "prompt.codes.npy") if len(fields) > 1 else None
    if not meta["chosen"].strip() or not meta["rejected"].strip():
        raise BadSample("empty chosen or rejected response", "bad_pair")
    if codes is None and not meta["prompt"].strip():
        raise BadSample("no prompt: neither prompt text nor a prompt image", "missing_field")
    return dpo_pair(vocab, vocab.encode_text(meta["prompt"]) if meta["prompt"] else [], codes,
                    vocab.encode_text(meta["chosen"]), vocab.encode_text(meta["rejected"]))


def _sample_item(plan: _Plan, src: _Source, sample: dict, shard: str, u_drop: float, u_cap: float):
    """One raw sample → what a unit holds for it: its packing pieces (pretraining), a `CondImage` (CCA) or a
    `Pair` (DPO, precomputed pairs), or None for an augmented copy that is not read (alignment stages always,
    pretraining with the source's ``augmented: false``). Raises `BadSample` without shard and key in the text."""
    if (plan.mode != "pretrain" or not src.augmented) and _augmented(sample, shard):
        return None
    if plan.mode == "pretrain":
        tok, has_image = tokenize_sample(src.task, sample, plan.vocab, shard, u_drop, u_cap, plan.cond_dropout,
                                         plan.layout)
        return fit_sample(tok, plan.seq_length, has_image)
    if src.task in ("c2i", "t2i"):  # CCA: the pretraining layout, never dropped (CCA draws its own <null> rows)
        tok, _ = tokenize_sample(src.task, sample, plan.vocab, shard, u_drop, u_cap, 0.0, plan.layout)
        check_fits(tok, plan.seq_length)
        return split_condition(plan.vocab, tok, _meta(_decode(sample, ["json"], shard)).get("label"), plan.layout)
    if src.task == "pairs":
        pair = _pair_sample(sample, plan.vocab, shard)
    else:
        pair = parse_ref_pair(_decode(sample, list(REF_PAIR_FIELDS), shard), plan.mode, plan.vocab.vocab_size)
    check_fits(pair.chosen, plan.seq_length)
    check_fits(pair.rejected, plan.seq_length)
    return pair


def _unit_items(plan: _Plan, src: _Source, epoch: int, unit: tuple[int, int, int], errors: Counter,
                shuffle: bool = True) -> list[tuple[str, Any]]:
    """``(key, item)`` for this unit's samples (see `_sample_item`), bad ones handled by ``on_error``, in the
    seeded buffer-shuffled order (``shuffle``) or in shard order."""
    shard_idx, stride, offset = unit
    path, expected = src.paths[shard_idx], src.counts[shard_idx]
    raw, err, last_member = read_shard_samples(path)
    damage = shard_damage(path, len(raw), err, last_member, expected)
    if damage is not None:
        _bad(plan, BadSample(str(damage), damage.reason, path, damage.key), errors)
    if not raw:
        return []
    if damage is None and len(raw) > expected:
        log.warning("%s holds %d samples, its manifest says %d", path, len(raw), expected)
    kept = raw[offset::stride]
    rng = np.random.default_rng([plan.seed & _SEED_MASK, _TAG_UNIT, src.index, epoch, shard_idx, stride, offset])
    draws = rng.random((len(kept), 2))
    items = []
    for s, (u_drop, u_cap) in zip(kept, draws):
        key = s["__key__"]
        try:
            item = _sample_item(plan, src, s, path, float(u_drop), float(u_cap))
            if item is not None:
                items.append((key, item))
        except BadSample as e:
            _bad(plan, BadSample(f"{path}: sample key {key!r}: {e}", e.reason, path, key), errors)
        except Exception as e:  # not a known kind of bad input: a bug or an unforeseen case, never skipped
            raise RuntimeError(f"{path}: sample key {key!r}: {type(e).__name__}: {e}") from e
    if shuffle and plan.shuffle_buffer > 1 and len(items) > 1:
        shuffle_seed = np.random.SeedSequence([plan.seed & _SEED_MASK, _TAG_SHUF, src.index, epoch, shard_idx,
                                               stride, offset]).generate_state(2, np.uint64)
        rng_py = random.Random(int(shuffle_seed[0]) << 64 | int(shuffle_seed[1]))
        buffer = wds.filters.shuffle(bufsize=plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng_py)
        items = list(buffer(iter(items)))
    return items


def _load_unit(plan: _Plan, src: _Source, epoch: int, unit: tuple[int, int, int], errors: Counter) -> list:
    """The unit's rows: packed ``(ids, target)`` rows of ``S + 1`` (pretraining) or its items (alignment)."""
    items = _unit_items(plan, src, epoch, unit, errors)
    if plan.mode != "pretrain":
        return [item for _, item in items]
    ids, tgt = pack((piece for _, g in items for piece in g), plan.seq_length, plan.vocab.pad_id)
    return list(zip(ids, tgt))


# ---------------------------------------------------------------------------------------------------------
# A slot's stream (runs in a DataLoader worker, or in the main process with num_workers=0)
# ---------------------------------------------------------------------------------------------------------
class _Cursor:
    __slots__ = ("epoch", "unit", "row", "errors", "loaded")

    def __init__(self, d: Optional[dict] = None):
        d = d or {}
        self.epoch, self.unit, self.row = int(d.get("epoch", 0)), int(d.get("unit", 0)), int(d.get("row", 0))
        self.errors = Counter({k: int(v) for k, v in d.get("errors", {}).items()})  # finished units only
        self.loaded = None  # (rows, unit_errors) of the current unit (see `_load_unit`)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "row": self.row, "errors": dict(self.errors)}


class _SlotStream:
    def __init__(self, plan: _Plan, local_slot: int, pos: Optional[dict]):
        self.plan, self.local_slot = plan, local_slot
        self.slot = plan.dp_rank * plan.workers + local_slot
        pos = pos or {}
        self.mix = int(pos.get("mix", 0))
        srcs = pos.get("sources") or [None] * len(plan.sources)
        self.cursors = [_Cursor(d) for d in srcs]

    def _advance(self, c: _Cursor) -> None:
        if c.loaded is not None:
            c.errors.update(c.loaded[1])
        c.loaded, c.unit, c.row = None, c.unit + 1, 0

    def _next_row(self, s: int):
        plan, src, c = self.plan, self.plan.sources[s], self.cursors[s]
        empty_loads = 0
        while True:
            if c.loaded is None:
                units = plan_units(len(src.paths), plan.slots, self.slot, plan.seed, s, c.epoch)
                if c.unit >= len(units):
                    c.epoch, c.unit, c.row = c.epoch + 1, 0, 0
                    continue
                unit_errors: Counter = Counter()
                c.loaded = (_load_unit(plan, src, c.epoch, units[c.unit], unit_errors), unit_errors)
                if c.row >= len(c.loaded[0]):
                    self._advance(c)
                    empty_loads += 1
                    if empty_loads > 2 * len(units) + 2:
                        raise RuntimeError(f"source {src.path} (split {src.split}) yields no usable samples for "
                                           f"slot {self.slot} of {plan.slots} over a whole epoch")
                    continue
            rows = c.loaded[0]
            out = rows[c.row]
            c.row += 1
            if c.row >= len(rows):
                self._advance(c)
            return out

    def _choose(self) -> int:
        if len(self.plan.sources) == 1:
            return 0
        u = np.random.default_rng([self.plan.seed & _SEED_MASK, _TAG_MIX, self.slot, self.mix]).random()
        return int(min(np.searchsorted(self.plan.cum_weights, u, side="right"), len(self.plan.sources) - 1))

    def position(self) -> dict:
        return {"mix": self.mix, "sources": [c.to_dict() for c in self.cursors]}

    def error_counts(self) -> dict:
        total: Counter = Counter()
        for c in self.cursors:
            total.update(c.errors)
            if c.loaded is not None:
                total.update(c.loaded[1])
        return dict(total)

    def _pairs_batch(self) -> dict:
        """Alignment mode: ``mb`` items of one source → ``mb`` pairs → ``2 * mb`` rows."""
        plan = self.plan
        s, counter = self._choose(), self.mix
        self.mix += 1
        items = [self._next_row(s) for _ in range(plan.micro_batch_size)]
        if plan.sources[s].task in ("c2i", "t2i"):
            a = plan.align
            rng = np.random.default_rng([plan.seed & _SEED_MASK, _TAG_PAIR, self.slot, counter])
            items = cca_pairs(plan.vocab, items, negatives=a["negatives"], uncond_ratio=a["uncond_ratio"],
                              same_label_positive=a["same_label_positive"], rng=rng, layout=plan.layout)
        return collate_pairs(items, plan.seq_length, plan.vocab.pad_id, pos_like=plan.mode == "cca",
                             ref_logps=plan.align["ref_logps"])

    def next_batch(self) -> dict:
        if self.plan.mode != "pretrain":
            batch = self._pairs_batch()
        else:
            rows = []
            for _ in range(self.plan.micro_batch_size):
                s = self._choose()
                self.mix += 1
                rows.append(self._next_row(s))
            batch = rows_to_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        batch["slot"] = self.local_slot
        batch["pos"] = json.dumps(self.position())
        batch["errors"] = json.dumps(self.error_counts())
        return batch


class _SlotsDataset(torch.utils.data.IterableDataset):
    """DataLoader worker ``j`` runs local slot ``roles[j]`` from its saved position."""

    def __init__(self, plan: _Plan, roles: list[int], positions: dict):
        super().__init__()
        self.plan, self.roles, self.positions = plan, roles, positions

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        local = self.roles[j]
        stream = _SlotStream(self.plan, local, self.positions.get(local))
        while True:
            try:
                batch = stream.next_batch()
            except BadSample as e:
                if info is None:
                    raise
                # torch re-raises a worker's exception as its type built from the formatted traceback, which
                # loses shard, key and reason: hand the error over as data; the main process raises it.
                yield {"bad_sample": json.dumps([str(e), e.reason, e.shard, e.key])}
                return
            yield batch


# ---------------------------------------------------------------------------------------------------------
# The source the training stage iterates
# ---------------------------------------------------------------------------------------------------------
class WebDatasetSource:
    """Infinite iterator over this rank's micro-batches; see the module docstring for the design."""

    def __init__(self, plan: _Plan, num_workers: int):
        self._plan = plan
        self._num_workers = int(num_workers)  # 0 = read in this process
        self._W = plan.workers
        self._consumed = 0
        self._positions: dict[int, Optional[dict]] = {j: None for j in range(self._W)}
        self._errors: dict[int, dict] = {j: {} for j in range(self._W)}
        self._it = None
        self._stream: Optional[_SlotStream] = None

    # -- iteration ------------------------------------------------------------------------------------
    def _start(self) -> None:
        roles = [(self._consumed + j) % self._W for j in range(self._W)]
        ds = _SlotsDataset(self._plan, roles, dict(self._positions))
        if self._num_workers == 0:
            self._it = iter(ds)
        else:
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self._num_workers,
                                                 prefetch_factor=2, persistent_workers=False)
            self._it = iter(loader)

    def __iter__(self) -> "WebDatasetSource":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        item = next(self._it)
        if "bad_sample" in item:
            raise BadSample(*json.loads(item["bad_sample"]))
        local = int(item.pop("slot"))
        if local != self._consumed % self._W:  # the DataLoader's round-robin is what resume relies on
            raise RuntimeError(f"micro-batch {self._consumed} came from slot {local}, expected "
                               f"{self._consumed % self._W}")
        self._positions[local] = json.loads(item.pop("pos"))
        self._errors[local] = json.loads(item.pop("errors"))
        self._consumed += 1
        return item

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable position after the last micro-batch returned by ``next``."""
        return {"format": STATE_FORMAT, "consumed": self._consumed, "fingerprint": self._plan.fingerprint(),
                "positions": {str(j): p for j, p in self._positions.items()},
                "errors": {str(j): e for j, e in self._errors.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a `state_dict`): the next micro-batch is the one that followed it.

        The data layout (seed, dp rank/size, num_workers, seq_length, micro_batch_size, shuffle_buffer,
        cond_dropout, each source's split/task/weight/shard list) must be the same; a difference is an error
        naming the keys (the stream cannot continue exactly under another layout).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a loader state (format {got!r}, expected {STATE_FORMAT!r})")
        mine, theirs = self._plan.fingerprint(), state.get("fingerprint", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {reprlib.repr(theirs.get(k))} vs now {reprlib.repr(mine.get(k))}"
                               for k in diff)
            raise ValueError(f"loader state does not match this data layout ({detail})")
        self.close()
        self._consumed = int(state["consumed"])
        self._positions = {j: state["positions"].get(str(j)) for j in range(self._W)}
        self._errors = {j: dict(state.get("errors", {}).get(str(j)) or {}) for j in range(self._W)}

    def error_counts(self) -> dict:
        """Bad inputs skipped so far on this rank, by reason (``on_error=skip``); empty when none."""
        total: Counter = Counter()
        for e in self._errors.values():
            total.update(e)
        return dict(sorted(total.items()))

    def close(self) -> None:
        """Stop the DataLoader workers (a later ``next`` restarts them from the current state)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------
def _build_plan(data_cfg, vocab, seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                stage: str = "pretrain", align_cfg=None, split: Optional[str] = None,
                workers: Optional[int] = None, layout: str = "unified") -> _Plan:
    """Check the arguments, resolve the sources (``split`` overrides each source's) and make the plan."""
    if layout not in ("unified", "llamagen"):
        raise ValueError(f"layout must be 'unified' or 'llamagen', got {layout!r}")
    if not data_cfg.sources:
        raise ValueError("data.sources is empty")
    if data_cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {data_cfg.on_error!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    if seq_length < 1 or micro_batch_size < 1:
        raise ValueError(f"seq_length and micro_batch_size must be >= 1, got {seq_length}, {micro_batch_size}")
    if data_cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {data_cfg.num_workers}")
    workers = max(1, int(data_cfg.num_workers)) if workers is None else workers
    slots = dp_size * workers
    reference = getattr(align_cfg, "reference", "model")
    sources = []
    for i, sc in enumerate(data_cfg.sources):
        if sc.weight <= 0:
            raise ValueError(f"data.sources[{i}].weight must be > 0, got {sc.weight}")
        if split is not None:
            sc = dataclasses.replace(sc, split=split)
        # the same resolution the CLI checks before ranks start
        m, task = resolve_source(i, sc, vocab, stage=stage, reference=reference)
        shards = m["splits"][sc.split]["shards"]
        names, counts = [s["name"] for s in shards], [s["count"] for s in shards]
        if sum(counts) < slots:
            raise ValueError(f"data.sources[{i}] ({sc.path}, split {sc.split!r}) has {sum(counts)} samples, "
                             f"fewer than the {slots} readers (dp_size {dp_size} x num_workers {workers})")
        if layout == "llamagen" and task not in ("c2i", "ref_pairs"):
            raise ValueError(f"data.sources[{i}] ({sc.path}) reads as {task}; the llamagen layout is class->image only")
        sources.append(_Source(i, sc.path, sc.split, task, sc.weight, names, counts, sc.augmented))
    align = None
    if stage != "pretrain":
        a = align_cfg
        align = {"negatives": a.negatives, "uncond_ratio": float(a.uncond_ratio),
                 "same_label_positive": bool(a.same_label_positive), "ref_logps": a.reference == "precomputed"}
    return _Plan(sources, vocab, seq_length, micro_batch_size, dp_rank, dp_size, workers, seed,
                 data_cfg.shuffle_buffer, 0.0 if stage != "pretrain" else data_cfg.cond_dropout, data_cfg.on_error,
                 mode=stage, align=align, layout=layout)


def build_webdataset_source(data_cfg, vocab, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
                            dp_size: int = 1, seed: int = 0, layout: str = "unified") -> WebDatasetSource:
    """The streaming loader over ``data_cfg.sources`` for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``data_cfg``: a `megacca.data.config.DataConfig`; ``vocab``: a `UnifiedVocab`; ``seq_length`` S (rows
    are ``S + 1`` tokens); ``seed``: the data-order seed (the same on every rank); ``layout``: the model's
    (`model.layout`; ``llamagen`` reads c2i samples as ``<class> codes``).
    """
    plan = _build_plan(data_cfg, vocab, seq_length, micro_batch_size, dp_rank, dp_size, seed, layout=layout)
    return WebDatasetSource(plan, data_cfg.num_workers)


def build_alignment_source(data_cfg, align_cfg, stage: str, vocab, seq_length: int, micro_batch_size: int,
                           dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                           layout: str = "unified") -> WebDatasetSource:
    """The streaming loader in alignment mode for ``stage`` ``cca`` or ``dpo``: each micro-batch holds
    ``micro_batch_size`` pairs as ``2 * micro_batch_size`` rows (docs/data-format.md, "Alignment batches").

    ``align_cfg``: the `AlignConfig` (``negatives``, ``uncond_ratio``, ``same_label_positive``: the CCA
    pairing; ``reference``: ``precomputed`` reads only ``ref_pairs`` shards and yields their ``ref_logps``).
    Sources: CCA reads code shards as c2i / t2i, DPO reads ``pairs`` shards, both read ``ref_pairs`` shards of
    their stage. Shuffling, the data-parallel split, ``on_error`` and exact resume are the pretraining
    loader's; the other arguments are `build_webdataset_source`'s.
    """
    if stage not in ("cca", "dpo"):
        raise ValueError(f"alignment stage must be 'cca' or 'dpo', got {stage!r}")
    plan = _build_plan(data_cfg, vocab, seq_length, micro_batch_size, dp_rank, dp_size, seed, stage, align_cfg,
                       layout=layout)
    return WebDatasetSource(plan, data_cfg.num_workers)


def alignment_epoch(data_cfg, align_cfg, stage: str, vocab, seq_length: int, micro_batch_size: int, seed: int,
                    split: Optional[str] = None, errors: Optional[Counter] = None,
                    layout: str = "unified") -> Iterator[tuple[int, list[tuple[str, Any]]]]:
    """One epoch of alignment pairs in a fixed order, for tools/precompute_ref_logps.py.

    Every source's split (``split`` overrides it) is read shard by shard in manifest order, each shard's
    samples in written order (no shuffle), tokenized as the loader tokenizes them (the same caption draws as
    an unshuffled reader of epoch 0), and cut into micro-batches of ``micro_batch_size`` samples per source
    (a source's last one may be shorter). CCA batches are paired by the loader's `cca_pairs`, with an RNG
    seeded by ``(seed, source index, batch index)``. Yields ``(source index, [(sample key, Pair), ...])`` per
    micro-batch. Bad samples follow ``data.on_error``; with ``skip`` they are counted into ``errors``.
    """
    if stage not in ("cca", "dpo"):
        raise ValueError(f"alignment stage must be 'cca' or 'dpo', got {stage!r}")
    model_ref = dataclasses.replace(align_cfg, reference="model")  # reads the samples the reference scores
    plan = _build_plan(data_cfg, vocab, seq_length, micro_batch_size, 0, 1, seed, stage, model_ref, split, 1, layout)
    errors = Counter() if errors is None else errors
    a = plan.align
    for src in plan.sources:
        if src.task == "ref_pairs":
            from megacca.config import ConfigError

            raise ConfigError(f"data.sources[{src.index}].path", f"{src.path} already holds precomputed pairs "
                                                                 f"(ref_pairs); point it at the code or pairs shards")
        batch: list = []
        n = 0

        def flush():
            nonlocal n
            if src.task in ("c2i", "t2i"):
                rng = np.random.default_rng([plan.seed & _SEED_MASK, _TAG_PAIR, src.index, n])
                pairs = cca_pairs(vocab, [it for _, it in batch], negatives=a["negatives"],
                                  uncond_ratio=a["uncond_ratio"], same_label_positive=a["same_label_positive"],
                                  rng=rng, layout=layout)
            else:
                pairs = [it for _, it in batch]
            n += 1
            return src.index, [(k, p) for (k, _), p in zip(batch, pairs)]

        for shard in range(len(src.paths)):
            for key, item in _unit_items(plan, src, 0, (shard, 1, 0), errors, shuffle=False):
                batch.append((key, item))
                if len(batch) == plan.micro_batch_size:
                    yield flush()
                    batch = []
        if batch:
            yield flush()
