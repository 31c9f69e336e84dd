"""Unified vocabulary: one id space for specials, class tokens, text pieces and image codes.

Layout (docs/data-format.md, "Unified vocabulary"); the ids are recorded in the manifest ``vocab.json``
and read back from it, the values below are what ``UnifiedVocab.build`` writes:

======================  =====================================================================
ids                     tokens
======================  =====================================================================
0                       ``<pad>``   (``pad_id``)
1                       ``<bos>``   (``bos_id``)
2                       ``<eos>``   (``eos_id``)
3                       ``<boi>``   (``boi_id``, begin of image)
4                       ``<eoi>``   (``eoi_id``, end of image)
5                       ``<null>``  (``null_id``, unconditional / CFG-null condition)
6                       ``<sep>``   (``sep_id``)
7                       reserved    (``<reserved7>``, never produced)
8 .. 8+C-1              class tokens, ``class_token(k) == class_offset + k`` (C = ``num_classes``, may be 0)
T .. T+P-1              text pieces: sentencepiece id ``p`` ↔ ``T + p`` (T = ``text_offset`` = 8 + C,
                        P = ``text_size``, 0 without a text model)
I .. I+K-1              image codes: VQ code ``k`` ↔ ``I + k`` (I = ``image_offset`` = T + P,
                        K = ``codebook_size``)
======================  =====================================================================

``vocab_size = I + K`` (unpadded; the model pads it).

Manifest (``save`` / ``to_manifest``)::

    {"format": "megacca-vocab/1",
     "specials": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<boi>": 3, "<eoi>": 4, "<null>": 5, "<sep>": 6,
                  "<reserved7>": 7},
     "class_offset": 8, "num_classes": C, "class_names": [...],
     "text_offset": T, "text_size": P, "text_model": "spm.model" | null, "text_model_sha256": "..." | null,
     "image_offset": I, "codebook_size": K, "image_grid": [h, w] | null, "vq_sha256": "..." | null,
     "vocab_size": I + K}

``text_model`` is only the file's base name, a hint for ``load``; the identity of the text model is its
sha256.  ``check_compatible`` compares every field that changes what an id means (everything but
``text_model``); ``vq_sha256`` of ``None`` on either side means "unknown" and matches any value.

The vocabulary checks of a run live here: ``load_manifest`` reads and validates ``vocab.json`` (the config
takes the model's vocabulary size, ``<boi>`` id and image grid from it), ``check_checkpoint`` refuses to resume
a checkpoint on another vocabulary, ``check_fits_shards`` asks whether a shard directory's classes, text and
codes can be expressed (the loader and the CLI's check before any rank starts both call it).

Command line (write or show a manifest)::

    python megacca/tokenizer/vocab.py --text-model tok.model --codebook-size 512 --image-grid 8 8 \\
        [--classes-from SHARD_DIR | --classes a b c] [--vq-sha256 HEX] --out vocab.json
    python megacca/tokenizer/vocab.py --show vocab.json [--text-model tok.model]
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

if __package__ in (None, ""):  # run as a script: make `megacca` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megacca.fileio import atomic_write_json  # noqa: E402
from megacca.tokenizer.text import TextTokenizer  # noqa: E402

__all__ = ["UnifiedVocab", "VocabMismatchError", "FORMAT", "SPECIALS", "load_manifest", "check_checkpoint",
           "check_fits_shards"]

FORMAT = "megacca-vocab/1"
SPECIALS: dict[str, int] = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<boi>": 3, "<eoi>": 4, "<null>": 5,
                            "<sep>": 6, "<reserved7>": 7}
NUM_SPECIALS = 8
_SPECIAL_ATTRS = {"<pad>": "pad_id", "<bos>": "bos_id", "<eos>": "eos_id", "<boi>": "boi_id",
                  "<eoi>": "eoi_id", "<null>": "null_id", "<sep>": "sep_id"}
# Fields compared by check_compatible, causes first (the first difference is the one reported).
_COMPARED = ("format", "specials", "class_names", "num_classes", "text_model_sha256", "text_size",
             "codebook_size", "image_grid", "vq_sha256", "class_offset", "text_offset", "image_offset",
             "vocab_size")


class VocabMismatchError(ValueError):
    """A vocabulary does not fit what it is used with (another manifest, a text model, a checkpoint's
    vocabulary, a shard directory's samples); the message names where."""


class UnifiedVocab:
    pad_id: int
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    null_id: int
    sep_id: int
    num_classes: int
    class_offset: int
    class_names: list[str]
    text_offset: int
    text_size: int
    image_offset: int
    codebook_size: int
    image_grid: Optional[tuple[int, int]]
    vocab_size: int

    def __init__(self, manifest: dict, text: Optional[TextTokenizer] = None, source: str = "<manifest>"):
        """Prefer ``build`` / ``load``.  ``manifest`` is validated; ``text`` must match its sha256."""
        _validate(manifest, source)
        self._manifest = json.loads(json.dumps(manifest))  # private deep copy
        self.specials: dict[str, int] = dict(manifest["specials"])
        for name, attr in _SPECIAL_ATTRS.items():
            setattr(self, attr, int(self.specials[name]))
        self.class_offset = int(manifest["class_offset"])
        self.num_classes = int(manifest["num_classes"])
        self.class_names = list(manifest["class_names"])
        self.text_offset = int(manifest["text_offset"])
        self.text_size = int(manifest["text_size"])
        self.text_model_sha256: Optional[str] = manifest["text_model_sha256"]
        self.image_offset = int(manifest["image_offset"])
        self.codebook_size = int(manifest["codebook_size"])
        g = manifest["image_grid"]
        self.image_grid = None if g is None else (int(g[0]), int(g[1]))
        self.vq_sha256: Optional[str] = manifest["vq_sha256"]
        self.vocab_size = int(manifest["vocab_size"])
        self.text: Optional[TextTokenizer] = None
        self._id_names = {v: k for k, v in self.specials.items()}
        if text is not None:
            self._attach_text(text, source)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, text_model: Optional[str], codebook_size: int, image_grid: Optional[Sequence[int]],
              class_names: Optional[list[str]] = None, vq_sha256: Optional[str] = None) -> "UnifiedVocab":
        """New vocabulary: fixed specials, then ``class_names``, then the text model's pieces, then codes."""
        text = TextTokenizer(text_model) if text_model is not None else None
        names = [str(c) for c in (class_names or [])]
        c = len(names)
        t = NUM_SPECIALS + c
        p = text.vocab_size if text is not None else 0
        i = t + p
        manifest = {
            "format": FORMAT, "specials": dict(SPECIALS),
            "class_offset": NUM_SPECIALS, "num_classes": c, "class_names": names,
            "text_offset": t, "text_size": p,
            "text_model": os.path.basename(text.path) if text is not None else None,
            "text_model_sha256": text.sha256 if text is not None else None,
            "image_offset": i, "codebook_size": int(codebook_size),
            "image_grid": None if image_grid is None else [int(image_grid[0]), int(image_grid[1])],
            "vq_sha256": vq_sha256, "vocab_size": i + int(codebook_size),
        }
        return cls(manifest, text, source="UnifiedVocab.build")

    @classmethod
    def load(cls, manifest_path: str, text_model: Optional[str] = None) -> "UnifiedVocab":
        """Read ``vocab.json``; attach ``text_model`` (checked against the manifest's sha256).

        Without ``text_model``, a file named like the manifest's ``text_model`` next to the manifest is
        used if it exists (checked the same way); otherwise the vocabulary loads without text, and
        ``encode_text`` / ``decode_text`` raise.
        """
        manifest_path = os.fspath(manifest_path)
        manifest = load_manifest(manifest_path)
        if text_model is None and manifest.get("text_model"):
            beside = os.path.join(os.path.dirname(os.path.abspath(manifest_path)),
                                  os.path.basename(manifest["text_model"]))
            if os.path.exists(beside):
                text_model = beside
        text = None
        if text_model is not None:
            if manifest["text_size"] == 0:
                raise VocabMismatchError(f"{manifest_path} has no text model (text_size 0) but text model "
                                         f"{text_model} was given")
            text = TextTokenizer(text_model)
        return cls(manifest, text, source=manifest_path)

    def _attach_text(self, text: TextTokenizer, source: str) -> None:
        if text.sha256 != self.text_model_sha256:
            raise VocabMismatchError(f"text model {text.path} does not match {source}: field 'text_model_sha256' "
                                     f"is {self.text_model_sha256!r} in {source} but the file's sha256 is "
                                     f"{text.sha256!r}")
        if text.vocab_size != self.text_size:
            raise VocabMismatchError(f"text model {text.path} does not match {source}: field 'text_size' is "
                                     f"{self.text_size} in {source} but the model has {text.vocab_size} pieces")
        self.text = text

    # -- manifest --------------------------------------------------------------------------------------
    def to_manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    def save(self, path: str) -> None:
        """Write the manifest as JSON atomically (temporary file + rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_json(path, self._manifest)

    def check_compatible(self, other_manifest: Union[dict, "UnifiedVocab"], where: str) -> None:
        """Raise ``VocabMismatchError`` naming ``where`` and the first differing field."""
        other = other_manifest.to_manifest() if isinstance(other_manifest, UnifiedVocab) else other_manifest
        if not isinstance(other, dict):
            raise VocabMismatchError(f"{where}: vocabulary manifest is not a JSON object")
        mine = self._manifest
        for field in _COMPARED:
            if field not in other:
                raise VocabMismatchError(f"{where}: vocabulary mismatch: field {field!r} is missing "
                                         f"(expected {mine[field]!r})")
            a, b = mine[field], other[field]
            if field == "vq_sha256" and (a is None or b is None):
                continue
            if field == "image_grid":
                a = None if a is None else list(a)
                b = None if b is None else list(b)
            if a != b:
                raise VocabMismatchError(f"{where}: vocabulary mismatch in field {field!r}: "
                                         f"expected {_short(a)}, found {_short(b)}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnifiedVocab):
            return NotImplemented
        try:
            self.check_compatible(other, "eq")
        except VocabMismatchError:
            return False
        return True

    def __repr__(self) -> str:
        return (f"UnifiedVocab(vocab_size={self.vocab_size}, classes={self.num_classes}, "
                f"text={self.text_offset}+{self.text_size}, image={self.image_offset}+{self.codebook_size}, "
                f"grid={self.image_grid})")

    # -- ids -------------------------------------------------------------------------------------------
    def class_token(self, k: int) -> int:
        k = int(k)
        if not 0 <= k < self.num_classes:
            raise ValueError(f"class index {k} out of range [0, {self.num_classes})")
        return self.class_offset + k

    def token_name(self, i: int) -> str:
        """Readable name of one unified id (for messages and debugging)."""
        i = int(i)
        if i in self._id_names:
            return self._id_names[i]
        if self.class_offset <= i < self.class_offset + self.num_classes:
            return f"<class:{self.class_names[i - self.class_offset]}>"
        if self.text_offset <= i < self.text_offset + self.text_size:
            p = i - self.text_offset
            return f"<text:{self.text.id_to_piece(p) if self.text is not None else p}>"
        if self.image_offset <= i < self.image_offset + self.codebook_size:
            return f"<code:{i - self.image_offset}>"
        return f"<invalid:{i}>"

    def is_text(self, i: int) -> bool:
        return self.text_offset <= int(i) < self.text_offset + self.text_size

    def is_image(self, i: int) -> bool:
        return self.image_offset <= int(i) < self.image_offset + self.codebook_size

    def _need_text(self) -> TextTokenizer:
        if self.text is None:
            if self.text_size == 0:
                raise ValueError("this vocabulary has no text model (text_size 0)")
            raise RuntimeError("no text model attached: pass text_model= to UnifiedVocab.load "
                               f"(sha256 {self.text_model_sha256})")
        return self.text

    def encode_text(self, s: str) -> list[int]:
        """Unified ids of the text pieces of ``s`` (no bos/eos)."""
        t = self._need_text()
        off = self.text_offset
        return [off + p for p in t.encode(s)]

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text of unified text-piece ids; any other id is a ValueError."""
        t = self._need_text()
        pieces = []
        for pos, i in enumerate(ids):
            i = int(i)
            if not self.is_text(i):
                raise ValueError(f"decode_text: id {i} ({self.token_name(i)}) at position {pos} is not a text piece "
                                 f"(text ids are [{self.text_offset}, {self.text_offset + self.text_size}))")
            pieces.append(i - self.text_offset)
        return t.decode(pieces)

    def _grid_for(self, shape: Optional[Sequence[int]]) -> tuple[int, int]:
        if shape is not None:
            return int(shape[0]), int(shape[1])
        if self.image_grid is not None:
            return self.image_grid
        raise ValueError("image_grid is not set in this vocabulary: pass shape=(h, w)")

    def image_tokens(self, codes) -> list[int]:
        """Flat row-major unified ids of an integer code array ``[h, w]`` (``== image_grid`` if set)."""
        a = np.asarray(codes)
        if a.ndim != 2:
            raise ValueError(f"image codes must be a 2-D array [h, w], got shape {tuple(a.shape)}")
        if self.image_grid is not None and tuple(a.shape) != tuple(self.image_grid):
            raise ValueError(f"image codes have shape {tuple(a.shape)}, expected image_grid {tuple(self.image_grid)}")
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"image codes must be integers, got dtype {a.dtype}")
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.codebook_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"image code {bad} out of codebook range [0, {self.codebook_size})")
        return (a.reshape(-1).astype(np.int64) + self.image_offset).tolist()

    def codes_from_tokens(self, ids, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        """Inverse of ``image_tokens``: int64 array of shape ``image_grid`` (or ``shape``)."""
        h, w = self._grid_for(shape)
        a = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if a.size != h * w:
            raise ValueError(f"expected {h * w} image tokens for a {h}x{w} grid, got {a.size}")
        if a.size and (not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"image token ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = np.nonzero((a < self.image_offset) | (a >= self.image_offset + self.codebook_size))[0]
        if bad.size:
            i = int(a[bad[0]])
            raise ValueError(f"id {i} ({self.token_name(i)}) at position {int(bad[0])} is not an image code "
                             f"(image ids are [{self.image_offset}, {self.image_offset + self.codebook_size}))")
        return (a - self.image_offset).reshape(h, w)

    # -- documents -------------------------------------------------------------------------------------
    def encode_document(self, segments: list) -> list[int]:
        """``<bos>`` + segments + ``<eos>``: str → text pieces, array ``[h, w]`` → ``<boi> codes <eoi>``."""
        out = [self.bos_id]
        for n, seg in enumerate(segments):
            if isinstance(seg, str):
                out.extend(self.encode_text(seg))
            elif isinstance(seg, np.ndarray) or (hasattr(seg, "shape") and hasattr(seg, "dtype")):
                out.append(self.boi_id)
                out.extend(self.image_tokens(seg))
                out.append(self.eoi_id)
            else:
                raise TypeError(f"document segment {n} is a {type(seg).__name__}; expected str or an int array [h, w]")
        out.append(self.eos_id)
        return out

    def decode_document(self, ids) -> list:
        """Inverse of ``encode_document``: list of ``str`` and int64 arrays ``[h, w]`` (flat when
        ``image_grid`` is None).

        A leading ``<bos>`` and the ``<eos>`` are optional (generated sequences may be cut); after
        ``<eos>`` only ``<pad>`` may follow.  Consecutive text pieces form one ``str``.  Any other special,
        a class token, an image code outside ``<boi> ... <eoi>``, or a text piece inside is a ValueError.
        """
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        segments: list = []
        text: list[int] = []
        image: Optional[list[int]] = None
        image_start = 0
        pos = 1 if ids and ids[0] == self.bos_id else 0
        end = len(ids)
        while pos < end:
            i = ids[pos]
            if image is not None:
                if i == self.eoi_id:
                    segments.append(self.codes_from_tokens(image) if self.image_grid is not None
                                    else np.asarray(image, dtype=np.int64) - self.image_offset)
                    image = None
                elif self.is_image(i):
                    image.append(i)
                else:
                    raise ValueError(f"decode_document: {self.token_name(i)} at position {pos} inside the image "
                                     f"opened at position {image_start}")
            elif i == self.boi_id:
                if text:
                    segments.append(self.decode_text(text))
                    text = []
                image, image_start = [], pos
            elif self.is_text(i):
                text.append(i)
            elif i == self.eos_id:
                rest = [j for j in ids[pos + 1:] if j != self.pad_id]
                if rest:
                    raise ValueError(f"decode_document: {self.token_name(rest[0])} after <eos> at position {pos}")
                break
            else:
                raise ValueError(f"decode_document: unexpected {self.token_name(i)} (id {i}) at position {pos}")
            pos += 1
        if image is not None:
            raise ValueError(f"decode_document: image opened at position {image_start} is not closed by <eoi>")
        if text:
            segments.append(self.decode_text(text))
        return segments


def load_manifest(path: str) -> dict:
    """The validated manifest of a ``vocab.json``; FileNotFoundError or ValueError naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: vocabulary manifest not found") from e
    except IsADirectoryError as e:
        raise FileNotFoundError(f"{path}: is a directory, not a vocabulary manifest") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{path}: corrupt vocabulary manifest ({detail})") from e
    _validate(manifest, path)
    return manifest


def check_checkpoint(saved: Optional[dict], configured: Optional[str], ckpt: str) -> None:
    """A checkpoint trained on one vocabulary must not silently continue on another.

    ``saved``: the manifest stored in the checkpoint (None: trained without one); ``configured``: the
    ``data.vocab`` path of this run (or None). The checkpoint's manifest is the reference; the message names
    the configured file that differs.
    """
    if saved is None and configured is None:
        return
    if saved is None or configured is None:
        raise VocabMismatchError(f"{ckpt}: checkpoint vocabulary is {'absent' if saved is None else 'set'} but "
                                 f"data.vocab is {configured or 'not set'}")
    UnifiedVocab(saved, source=str(ckpt)).check_compatible(load_manifest(configured),
                                                           where=f"{configured} vs checkpoint {ckpt}")


TEXT_TASKS = ("t2i", "i2t", "text", "interleaved")


def check_fits_shards(vocab, task: str, shard_manifest: dict, where: str) -> None:
    """Can ``vocab`` express the samples of a shard directory read as ``task``? VocabMismatchError naming
    ``where`` otherwise: classes (c2i), text pieces (tasks with text), the codebook and VQ weights the codes
    came from (the shard manifest's ``vq`` entry). ``vocab`` is duck-typed (the loader's tests use a stub)."""
    if task == "c2i":
        if not vocab.num_classes:
            raise VocabMismatchError(f"{where} is class-conditional but the vocabulary has no classes")
        classes = shard_manifest.get("classes")
        if classes is not None and len(classes) != vocab.num_classes:
            raise VocabMismatchError(f"{where} has {len(classes)} classes, the vocabulary {vocab.num_classes}")
        names = list(getattr(vocab, "class_names", None) or [])
        if classes is not None and names and list(classes) != names:
            raise VocabMismatchError(f"{where}: class names differ from the vocabulary's")
    if task in TEXT_TASKS and (not getattr(vocab, "text_size", 0) or getattr(vocab, "text", True) is None):
        raise VocabMismatchError(f"{where} task {task!r} needs text pieces but the vocabulary has no text model"
                                 f"{' attached' if getattr(vocab, 'text_size', 0) else ''} (set data.text_model)")
    vq = shard_manifest.get("vq")
    if task != "text" and isinstance(vq, dict):
        if isinstance(vq.get("codebook_size"), int) and vq["codebook_size"] != vocab.codebook_size:
            raise VocabMismatchError(f"{where} codes come from a codebook of {vq['codebook_size']}, the "
                                     f"vocabulary has {vocab.codebook_size}")
        theirs = vq.get("vq_sha256") or vq.get("sha256")
        mine = getattr(vocab, "vq_sha256", None)
        if isinstance(theirs, str) and isinstance(mine, str) and theirs != mine:
            raise VocabMismatchError(f"{where} codes come from VQ weights {theirs[:12]}..., the vocabulary "
                                     f"names {mine[:12]}...")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def _validate(m: Any, source: str) -> None:
    """Check a manifest's fields and internal consistency; ValueError naming ``source``."""
    def bad(msg: str):
        raise ValueError(f"{source}: invalid vocabulary manifest: {msg}")

    if not isinstance(m, dict):
        bad("not a JSON object")
    if m.get("format") != FORMAT:
        bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    for k in ("specials", "class_offset", "num_classes", "class_names", "text_offset", "text_size",
              "text_model_sha256", "image_offset", "codebook_size", "image_grid", "vq_sha256", "vocab_size"):
        if k not in m:
            bad(f"missing field {k!r}")
    sp = m["specials"]
    if not isinstance(sp, dict) or any(n not in sp for n in _SPECIAL_ATTRS):
        bad(f"'specials' must map each of {', '.join(_SPECIAL_ATTRS)} to an id")
    ints = ["class_offset", "num_classes", "text_offset", "text_size", "image_offset", "codebook_size", "vocab_size"]
    for k in ints:
        if not isinstance(m[k], int) or m[k] < 0:
            bad(f"{k!r} must be a non-negative integer, got {m[k]!r}")
    ids = list(sp.values())
    if not all(isinstance(i, int) and 0 <= i < m["class_offset"] for i in ids) or len(set(ids)) != len(ids):
        bad(f"special ids must be distinct integers below class_offset {m['class_offset']}, got {sp}")
    names = m["class_names"]
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        bad("'class_names' must be a list of strings")
    if len(names) != m["num_classes"]:
        bad(f"num_classes {m['num_classes']} but {len(names)} class_names")
    if len(set(names)) != len(names):
        bad("class_names are not unique")
    if m["class_offset"] + m["num_classes"] != m["text_offset"]:
        bad("text_offset != class_offset + num_classes")
    if m["text_offset"] + m["text_size"] != m["image_offset"]:
        bad("image_offset != text_offset + text_size")
    if m["image_offset"] + m["codebook_size"] != m["vocab_size"]:
        bad("vocab_size != image_offset + codebook_size")
    if m["codebook_size"] < 1:
        bad("codebook_size must be >= 1")
    if (m["text_size"] > 0) != isinstance(m["text_model_sha256"], str):
        bad("text_model_sha256 must be set exactly when text_size > 0")
    g = m["image_grid"]
    if g is not None and (not isinstance(g, (list, tuple)) or len(g) != 2
                          or not all(isinstance(x, int) and x > 0 for x in g)):
        bad(f"'image_grid' must be null or [h, w] of positive integers, got {g!r}")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vocab.py", description="Write or show a unified vocabulary manifest.")
    ap.add_argument("--show", metavar="VOCAB_JSON", help="print a summary of an existing manifest")
    ap.add_argument("--text-model", help="sentencepiece .model (omit for a vocabulary without text)")
    ap.add_argument("--codebook-size", type=int, help="VQ codebook size K")
    ap.add_argument("--image-grid", type=int, nargs=2, metavar=("H", "W"), help="image code grid")
    ap.add_argument("--classes", nargs="*", help="class names")
    ap.add_argument("--classes-from", metavar="SHARD_DIR", help="take class names from a shard manifest")
    ap.add_argument("--vq-sha256", help="sha256 of the VQ weights")
    ap.add_argument("--out", help="where to write vocab.json")
    a = ap.parse_args(argv)
    try:
        if a.show:
            v = UnifiedVocab.load(a.show, a.text_model)
        else:
            if a.codebook_size is None or a.out is None:
                raise ValueError("--codebook-size and --out are required (or use --show)")
            if a.codebook_size < 1:
                raise ValueError(f"--codebook-size must be >= 1, got {a.codebook_size}")
            names = a.classes
            if a.classes_from:
                from megacca.data.shards import read_manifest
                names = read_manifest(a.classes_from)["classes"] or []
            v = UnifiedVocab.build(a.text_model, a.codebook_size, a.image_grid, names, a.vq_sha256)
            v.save(a.out)
            print(f"wrote {a.out}")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"vocab.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{v!r}: vocab_size {v.vocab_size}, classes [{v.class_offset}, {v.text_offset}), text "
          f"[{v.text_offset}, {v.image_offset}), image [{v.image_offset}, {v.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
