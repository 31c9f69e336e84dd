"""The streaming loader: WebDataset shards → packed micro-batches, with exact resume (docs/data-format.md).

Entry point: ``build_webdataset_source(data_cfg, vocab, seq_length, micro_batch_size, dp_rank, dp_size,
seed)`` returns a `WebDatasetSource`: an infinite iterator over this data-parallel rank's micro-batches
(``tokens``/``labels`` int64 ``[mb, S]``, ``loss_mask`` float32 ``[mb, S]``) with ``state_dict()``,
``load_state_dict()``, ``error_counts()`` and ``close()``.

Design (what makes resume exact and cheap)
------------------------------------------
*Slots.* Every data-parallel rank runs ``W = max(1, num_workers)`` streams ("slots"); slot
``g = dp_rank * W + worker`` of ``dp_size * W``. Each slot reads, for every source, its own list of *units*
per epoch: the epoch's seeded permutation of the source's shards, dealt round-robin (slot ``g`` takes
positions ``g, g + slots, ...`` of the permutation); the ``n_shards % slots`` shards left over are split at
sample level (the slots sharing one take every ``k``-th sample at their own offset). So in every epoch each
sample belongs to exactly one slot, and with fewer shards than slots the split is purely by sample.

*Blocks.* A unit is processed as one block: read the shard with webdataset's tar iterators, keep the
slot's samples, tokenize them (cond-dropout and caption choice drawn from an RNG seeded by
``(seed, source, epoch, shard, stride, offset)``), shuffle them with webdataset's buffer shuffle
(``shuffle_buffer``, seeded the same way) and pack them into rows of ``S + 1`` tokens. Nothing crosses a unit
boundary, so a slot's position in a source is ``(epoch, unit, row)`` and resuming re-reads at most the one
current shard.

*Mixing.* A slot draws the source of each row by weight with an RNG seeded by ``(seed, slot, row counter)``,
so the mixing state is just the counter. A slot emits micro-batches of ``mb`` rows.

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

import io
import json
import logging
import os
import random
import tarfile
import zlib
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds

from megacca.data.packing import (BadSample, c2i_tokens, fit_sample, i2t_tokens, interleaved_tokens, pack,
                                  rows_to_batch, t2i_tokens, text_tokens)

log = logging.getLogger(__name__)

__all__ = ["build_webdataset_source", "WebDatasetSource", "BadSample", "plan_units", "read_shard_samples"]

STATE_FORMAT = "megacca-loader/1"
TASKS = ("c2i", "t2i", "i2t", "text", "interleaved")
ERROR_REASONS = ("corrupt_tar", "empty_shard", "missing_field", "bad_label", "bad_codes", "decode_error",
                 "too_long")
# Tags keep the seeded RNG streams of different purposes apart.
_TAG_PERM, _TAG_UNIT, _TAG_SHUF, _TAG_MIX = 0x5045524D, 0x554E4954, 0x53485546, 0x4D495820
_SEED_MASK = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------------------
# Reading: webdataset tar iteration + safe decoding (no pickle, no torch.load)
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


def read_shard_samples(path: str) -> tuple[list[dict], Optional[str], Optional[str]]:
    """Raw samples of one tar shard via webdataset (``tar_file_iterator`` + ``group_by_keys``).

    Returns ``(samples, error, last_member)``: the samples read (``{"__key__", "__url__", ext: bytes}``), the
    tar error that stopped reading (None when the archive read cleanly) and the name of the last member the
    reader reached. When the error strikes inside a member's data, that member's sample is dropped; when it
    strikes at a header, the samples read so far are all returned (the last one may lack members, which the
    field checks catch). Callers compare the sample count with the manifest as well.
    """
    st = {"last": None, "complete": True, "error": None}

    def note(fname: str) -> str:  # called before each member's data is read
        st["last"], st["complete"] = fname, False
        return fname

    def files(f):
        try:
            for member in wds.tariterators.tar_file_iterator(f, rename_files=note):
                st["complete"] = True
                member["__url__"] = path
                yield member
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
            st["error"] = f"{type(e).__name__}: {e}"

    samples: list[dict] = []
    try:
        with open(path, "rb") as f:
            for s in wds.tariterators.group_by_keys(files(f)):
                samples.append(s)
    except (OSError, ValueError) as e:  # unreadable file, duplicate member names
        st["error"] = st["error"] or f"{type(e).__name__}: {e}"
    if st["error"] is not None and not st["complete"] and samples \
            and samples[-1]["__key__"] == _key_of(st["last"]):
        samples.pop()
    return samples, st["error"], st["last"]


def _key_of(member: Optional[str]) -> Optional[str]:
    if not member:
        return None
    return wds.tariterators.base_plus_ext(member)[0] or member


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
                 counts: list[int]):
        self.index, self.path, self.split, self.task, self.weight = index, path, split, task, float(weight)
        self.names, self.counts = list(names), [int(c) for c in counts]
        self.paths = [os.path.join(path, n) for n in names]

    def fingerprint(self) -> dict:
        return {"split": self.split, "task": self.task, "weight": self.weight,
                "shards": [[n, c] for n, c in zip(self.names, self.counts)]}


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
                 on_error: str):
        self.sources, self.vocab = sources, vocab
        self.seq_length, self.micro_batch_size = int(seq_length), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.workers = int(dp_rank), int(dp_size), int(workers)
        self.slots = self.dp_size * self.workers
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.cond_dropout, self.on_error = float(cond_dropout), on_error
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.cum_weights = np.cumsum(w / w.sum())

    def fingerprint(self) -> dict:
        return {"seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "workers": self.workers,
                "seq_length": self.seq_length, "micro_batch_size": self.micro_batch_size,
                "shuffle_buffer": self.shuffle_buffer, "cond_dropout": self.cond_dropout,
                "sources": [s.fingerprint() for s in self.sources]}


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


def tokenize_sample(task: str, sample: dict, vocab, shard: str, u_drop: float, u_cap: float,
                    cond_dropout: float):
    """One raw sample → ``((ids, target), has_image)``; raises `BadSample` (without shard/key in the text)."""
    drop = u_drop < cond_dropout
    if task == "c2i":
        d = _decode(sample, ["codes.npy", "json"], shard)
        label = _meta(d).get("label")
        if label is None:
            raise BadSample("no class label (json 'label' is missing or null)", "missing_field")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < vocab.num_classes:
            raise BadSample(f"class label {label!r} outside [0, {vocab.num_classes})", "bad_label")
        return c2i_tokens(vocab, label, _check_codes(vocab, d["codes.npy"]), drop), True
    if task in ("t2i", "i2t"):
        d = _decode(sample, ["codes.npy", "json"], shard)
        caption = vocab.encode_text(_caption(_meta(d), u_cap))
        codes = _check_codes(vocab, d["codes.npy"])
        if task == "t2i":
            return t2i_tokens(vocab, caption, codes, drop), True
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


def _load_unit(plan: _Plan, src: _Source, epoch: int, unit: tuple[int, int, int],
               errors: Counter) -> tuple[np.ndarray, np.ndarray]:
    shard_idx, stride, offset = unit
    path, expected = src.paths[shard_idx], src.counts[shard_idx]
    raw, err, last_member = read_shard_samples(path)
    if not raw:
        _bad(plan, BadSample(f"{path}: empty shard: no sample (so no sample key) could be read"
                             f"{' (' + err + ')' if err else ''}; the manifest lists {expected}",
                             "empty_shard", path, None), errors)
        return pack([], plan.seq_length, plan.vocab.pad_id)
    if err is not None or len(raw) < expected:
        key = _key_of(last_member) or raw[-1]["__key__"]
        _bad(plan, BadSample(f"{path}: corrupt or truncated tar at sample key {key!r} (damage in or right after "
                             f"member {last_member!r}): read {len(raw)} of {expected} samples"
                             f"{' (' + err + ')' if err else ''}",
                             "corrupt_tar", path, key), errors)
    elif len(raw) > expected:
        log.warning("%s holds %d samples, its manifest says %d", path, len(raw), expected)
    kept = raw[offset::stride]
    rng = np.random.default_rng([plan.seed & _SEED_MASK, _TAG_UNIT, src.index, epoch, shard_idx, stride, offset])
    draws = rng.random((len(kept), 2))
    groups = []
    for s, (u_drop, u_cap) in zip(kept, draws):
        key = s["__key__"]
        try:
            tok, has_image = tokenize_sample(src.task, s, plan.vocab, path, float(u_drop), float(u_cap),
                                             plan.cond_dropout)
            groups.append(fit_sample(tok, plan.seq_length, has_image))
        except BadSample as e:
            _bad(plan, BadSample(f"{path}: sample key {key!r}: {e}", e.reason, path, key), errors)
        except Exception as e:  # not a known kind of bad input: a bug or an unforeseen case, never skipped
            raise RuntimeError(f"{path}: sample key {key!r}: {type(e).__name__}: {e}") from e
    if plan.shuffle_buffer > 1 and len(groups) > 1:
        shuffle_seed = np.random.SeedSequence([plan.seed & _SEED_MASK, _TAG_SHUF, src.index, epoch, shard_idx,
                                               stride, offset]).generate_state(2, np.uint64)
        rng_py = random.Random(int(shuffle_seed[0]) << 64 | int(shuffle_seed[1]))
        shuffle = wds.filters.shuffle(bufsize=plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng_py)
        groups = list(shuffle(iter(groups)))
    return pack((piece for g in groups for piece in g), plan.seq_length, plan.vocab.pad_id)


# ---------------------------------------------------------------------------------------------------------
# A slot's stream (runs in a DataLoader worker, or in the main process with num_workers=0)
# ---------------------------------------------------------------------------------------------------------
class _Cursor:
    __slots__ = ("epoch", "unit", "row", "errors", "loaded")

    def __init__(self, d: Optional[dict] = None):
        d = d or {}
        self.epoch, self.unit, self.row = int(d.get("epoch", 0)), int(d.get("unit", 0)), int(d.get("row", 0))
        self.errors = Counter({k: int(v) for k, v in d.get("errors", {}).items()})  # finished units only
        self.loaded = None  # (ids, tgt, unit_errors) of the current unit

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
            c.errors.update(c.loaded[2])
        c.loaded, c.unit, c.row = None, c.unit + 1, 0

    def _next_row(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        plan, src, c = self.plan, self.plan.sources[s], self.cursors[s]
        empty_loads = 0
        while True:
            if c.loaded is None:
                units = plan_units(len(src.paths), plan.slots, self.slot, plan.seed, s, c.epoch)
                if c.unit >= len(units):
                    c.epoch, c.unit, c.row = c.epoch + 1, 0, 0
                    continue
                unit_errors: Counter = Counter()
                ids, tgt = _load_unit(plan, src, c.epoch, units[c.unit], unit_errors)
                c.loaded = (ids, tgt, unit_errors)
                if c.row >= len(ids):
                    self._advance(c)
                    empty_loads += 1
                    if empty_loads > 2 * len(units) + 2:
                        raise RuntimeError(f"source {src.path} (split {src.split}) yields no usable samples for "
                                           f"slot {self.slot} of {plan.slots} over a whole epoch")
                    continue
            ids, tgt = c.loaded[0], c.loaded[1]
            out = ids[c.row], tgt[c.row]
            c.row += 1
            if c.row >= len(ids):
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
                total.update(c.loaded[2])
        return dict(total)

    def next_batch(self) -> dict:
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
            yield stream.next_batch()


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
            detail = "; ".join(f"{k}: saved {_short(theirs.get(k))} vs now {_short(mine.get(k))}" for k in diff)
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


def _short(v: Any, n: int = 200) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------
def _peek_first(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            files = wds.tariterators.tar_file_iterator(f)
            for s in wds.tariterators.group_by_keys({**x, "__url__": path} for x in files):
                return s
    except (tarfile.TarError, OSError, ValueError):
        return None
    return None


def _resolve_task(i: int, cfg_task: str, manifest: dict, paths: list[str], where: str) -> str:
    kind = manifest["kind"]
    if kind == "images":
        raise ValueError(f"data.sources[{i}] ({where}) holds raw images; encode them to codes first "
                         f"(tools/vq_encode.py) and point the source at the codes directory")
    if kind == "pairs":
        raise ValueError(f"data.sources[{i}] ({where}) holds preference pairs, which the streaming loader "
                         f"does not read")
    if cfg_task != "auto":
        ok = {"text": ("text",), "c2i": ("codes",), "t2i": ("codes",), "i2t": ("codes",),
              "interleaved": ("codes", "text")}[cfg_task]
        if kind not in ok:
            raise ValueError(f"data.sources[{i}] ({where}): task {cfg_task!r} cannot read {kind!r} shards")
        return cfg_task
    if kind == "text":
        return "text"
    # codes: captions → t2i, labels only → c2i. Use the manifest's hint when it has one, else the first sample.
    if manifest.get("captions") is True:
        return "t2i"
    if manifest.get("captions") is False and (manifest.get("labels") is True or manifest.get("classes")):
        return "c2i"
    first = _peek_first(paths[0]) if paths else None
    meta = None
    if first is not None and "json" in first:
        try:
            meta = _json(first["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list) and meta["captions"]:
        return "t2i"
    if manifest.get("classes") or (isinstance(meta, dict) and meta.get("label") is not None):
        return "c2i"
    raise ValueError(f"data.sources[{i}] ({where}): cannot tell the task from the manifest or the first sample; "
                     f"set data.sources[{i}].task")


def _check_vocab(i: int, task: str, manifest: dict, vocab, where: str) -> None:
    if task == "c2i":
        if not vocab.num_classes:
            raise ValueError(f"data.sources[{i}] ({where}) is class-conditional but the vocabulary has no classes")
        classes = manifest.get("classes")
        if classes is not None and len(classes) != vocab.num_classes:
            raise ValueError(f"data.sources[{i}] ({where}) has {len(classes)} classes, the vocabulary "
                             f"{vocab.num_classes}")
        names = list(getattr(vocab, "class_names", None) or [])
        if classes is not None and names and list(classes) != names:
            raise ValueError(f"data.sources[{i}] ({where}): class names differ from the vocabulary's")
    if task in ("t2i", "i2t", "text", "interleaved") and (not getattr(vocab, "text_size", 0)
                                                          or getattr(vocab, "text", True) is None):
        raise ValueError(f"data.sources[{i}] ({where}) task {task!r} needs text pieces but the vocabulary has "
                         f"no text model {'attached' if getattr(vocab, 'text_size', 0) else ''} "
                         f"(set data.text_model)")
    vq = manifest.get("vq")
    if task != "text" and isinstance(vq, dict):
        if isinstance(vq.get("codebook_size"), int) and vq["codebook_size"] != vocab.codebook_size:
            raise ValueError(f"data.sources[{i}] ({where}) codes come from a codebook of {vq['codebook_size']}, "
                             f"the vocabulary has {vocab.codebook_size}")
        theirs = vq.get("vq_sha256") or vq.get("sha256")
        mine = getattr(vocab, "vq_sha256", None)
        if isinstance(theirs, str) and isinstance(mine, str) and theirs != mine:
            raise ValueError(f"data.sources[{i}] ({where}) codes come from VQ weights {theirs[:12]}..., the "
                             f"vocabulary names {mine[:12]}...")


def build_webdataset_source(data_cfg, vocab, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
                            dp_size: int = 1, seed: int = 0) -> WebDatasetSource:
    """The streaming loader over ``data_cfg.sources`` for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``data_cfg``: a `megacca.data.config.DataConfig`; ``vocab``: a `UnifiedVocab`; ``seq_length`` S (rows
    are ``S + 1`` tokens); ``seed``: the data-order seed (the same on every rank).
    """
    from megacca.data.shards import read_manifest

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
    workers = max(1, int(data_cfg.num_workers))
    slots = dp_size * workers
    sources = []
    for i, sc in enumerate(data_cfg.sources):
        where = f"{sc.path}, split {sc.split!r}"
        if sc.weight <= 0:
            raise ValueError(f"data.sources[{i}].weight must be > 0, got {sc.weight}")
        m = read_manifest(sc.path)
        if sc.split not in m["splits"]:
            raise ValueError(f"data.sources[{i}] ({sc.path}) has no split {sc.split!r} "
                             f"(has: {', '.join(sorted(m['splits']))})")
        shards = m["splits"][sc.split]["shards"]
        names, counts = [s["name"] for s in shards], [s["count"] for s in shards]
        if not names:
            raise ValueError(f"data.sources[{i}] ({where}) lists no shards")
        if sum(counts) < slots:
            raise ValueError(f"data.sources[{i}] ({where}) has {sum(counts)} samples, fewer than the "
                             f"{slots} readers (dp_size {dp_size} x num_workers {workers})")
        task = _resolve_task(i, sc.task, m, [os.path.join(sc.path, n) for n in names], where)
        _check_vocab(i, task, m, vocab, where)
        sources.append(_Source(i, sc.path, sc.split, task, sc.weight, names, counts))
    plan = _Plan(sources, vocab, seq_length, micro_batch_size, dp_rank, dp_size, workers, seed,
                 data_cfg.shuffle_buffer, data_cfg.cond_dropout, data_cfg.on_error)
    return WebDatasetSource(plan, data_cfg.num_workers)
