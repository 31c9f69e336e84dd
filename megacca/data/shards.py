"""WebDataset shard writer and reader shared by every tool (see docs/data-format.md, "Shards").

A shard directory holds ``<split>-NNNNNN.tar`` files and a ``manifest.json``::

    {"format": "megacca-shards/1", "kind": "images|codes|text|pairs",
     "splits": {"train": {"count": 1617, "shards": [{"name": "train-000000.tar", "count": 1000,
                                                    "sha256": "...", "bytes": 123456}]}},
     "classes": [...] | null, "image_size": [h, w] | null, "vq": {...} | null, "source": "..."}

Writing
    ``ShardWriter(out_dir, split, max_count, max_bytes)`` writes samples (dicts with ``__key__`` and one
    entry per member extension) into ``<split>-NNNNNN.tar`` with ``webdataset.TarWriter``; each shard is
    written under a hidden temporary name and renamed when it is complete, so a crash never leaves a truncated ``*.tar`` behind.  Shards are
    byte-for-byte deterministic (fixed mtime/owner/mode, members sorted by extension), so two runs over the
    same input give identical sha256s.  ``close()`` returns the split entry for the manifest;
    ``write_manifest(out_dir, kind, splits, **extra)`` writes ``manifest.json`` atomically (last, so a
    directory without a manifest is an incomplete one).

Reading
    ``read_manifest(dir)`` validates the manifest and raises ``ShardManifestError`` naming the path when
    it is missing or corrupt; ``shard_paths`` lists a split's tar files; ``iter_samples`` yields the raw
    samples of a split (``{"__key__", "__url__", ext: bytes, ...}``); ``verify_shards`` checks counts and
    sha256s.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import Any, Iterator, Mapping, Optional

from megacca.fileio import atomic_write_json, sha256_file  # noqa: F401  (re-exported)

import numpy as np

FORMAT = "megacca-shards/1"
KINDS = ("images", "codes", "text", "pairs")
MANIFEST_NAME = "manifest.json"
SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
SHARD_NAME_RE = re.compile(r"^([a-z][a-z0-9_]*)-(\d{6})\.tar$")
# Fixed tar metadata so that shards are reproducible.
_TAR_MTIME = 0
_TAR_MODE = 0o444
_TAR_USER = "megacca"

__all__ = [
    "FORMAT", "KINDS", "ShardManifestError", "ShardWriter", "encode_member", "write_manifest",
    "read_manifest", "shard_paths", "iter_samples", "verify_shards", "file_sha256", "atomic_write_json",
]


class ShardManifestError(ValueError):
    """A shard directory's manifest is missing, unreadable or inconsistent (message names the path)."""


file_sha256 = sha256_file  # shard manifests call it by this name


def encode_member(value: Any) -> bytes:
    """Bytes of one tar member: bytes as is, str as UTF-8, dict/list as canonical JSON, ndarray as ``.npy``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise TypeError(f"cannot store a {type(value).__name__} in a shard (use bytes, str, dict/list or ndarray)")


def _tar_size(nbytes: int) -> int:
    """Bytes one member takes in a tar: 512-byte header + payload padded to 512."""
    return 512 + ((nbytes + 511) // 512) * 512


def _file_size(nbytes: int) -> int:
    """Size of a tar file whose blocks (incl. the end marker) total ``nbytes``: padded to a whole record."""
    return -(-nbytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Write the samples of one split into ``<split>-NNNNNN.tar`` shards.

    A new shard starts when the current one holds ``max_count`` samples or the next sample would make its
    file (tar records are 10 KiB) bigger than ``max_bytes``; a sample that alone exceeds ``max_bytes`` gets
    a shard of its own.  Keys must be
    unique within the split and must not contain ``.`` (WebDataset splits the member name at the first dot).

    Use as a context manager: a clean exit closes it, an exception aborts it (removes the temporary file
    and every shard this writer completed).
    """

    def __init__(self, out_dir: str, split: str, max_count: int = 1000, max_bytes: int = 512 * 1024 ** 2):
        if not SPLIT_RE.match(split or ""):
            raise ValueError(f"bad split name {split!r}: use lowercase letters, digits and '_' (no '-')")
        if int(max_count) < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if int(max_bytes) < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.out_dir = os.fspath(out_dir)
        self.split = split
        self.max_count = int(max_count)
        self.max_bytes = int(max_bytes)
        os.makedirs(self.out_dir, exist_ok=True)
        self.shards: list[dict] = []
        self.count = 0
        self._keys: set[str] = set()
        self._file = None
        self._tar = None
        self._tmp: Optional[str] = None
        self._cur_count = 0
        self._cur_bytes = 0
        self._closed = False

    # -- internals -------------------------------------------------------------------------------------
    def _shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def _open_next(self) -> None:
        name = self._shard_name(len(self.shards))
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp-{os.getpid()}")
        import webdataset  # imported lazily: it pulls in torch (seconds), which readers do not need

        self._file = open(self._tmp, "wb")
        # Values are encoded by us (encoder=False); fixed mtime/owner/mode + USTAR make the bytes reproducible.
        self._tar = webdataset.TarWriter(self._file, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE,
                                         encoder=False, mtime=_TAR_MTIME, compress=False)
        self._cur_count = 0
        self._cur_bytes = 1024  # end-of-archive blocks

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name(len(self.shards))
        final = os.path.join(self.out_dir, name)
        os.replace(self._tmp, final)
        self.shards.append({"name": name, "count": self._cur_count, "sha256": file_sha256(final),
                            "bytes": os.path.getsize(final)})
        self._tar = self._file = self._tmp = None

    # -- API -------------------------------------------------------------------------------------------
    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample: ``{"__key__": str, "png": bytes, "json": dict, ...}`` (see ``encode_member``)."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for split {self.split!r} in {self.out_dir} is closed")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key or key.startswith("_"):
            raise ValueError(f"bad sample key {key!r}: need a non-empty string without '.', not starting with '_'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in split {self.split!r}")
        members = {}
        for ext, value in sample.items():
            if ext.startswith("_"):
                continue
            if not ext or ext.startswith(".") or ext.endswith(".") or "/" in ext:
                raise ValueError(f"sample {key!r}: bad member extension {ext!r}")
            members[ext] = encode_member(value)
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        size = sum(_tar_size(len(v)) for v in members.values())
        if self._tar is not None and self._cur_count > 0 and (
                self._cur_count >= self.max_count or _file_size(self._cur_bytes + size) > self.max_bytes):
            self._finish_current()
        if self._tar is None:
            self._open_next()
        self._tar.write({"__key__": key, **members})  # TarWriter writes members sorted by extension
        self._keys.add(key)
        self._cur_count += 1
        self._cur_bytes += size
        self.count += 1

    def close(self) -> dict:
        """Finish the last shard; returns the split's manifest entry ``{"count", "shards"}``."""
        if not self._closed:
            self._finish_current()
            self._closed = True
        return {"count": self.count, "shards": [dict(s) for s in self.shards]}

    def abort(self) -> None:
        """Drop everything this writer wrote (temporary file and completed shards)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._file.close()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        for s in self.shards:
            p = os.path.join(self.out_dir, s["name"])
            if os.path.exists(p):
                os.unlink(p)
        self._tar = self._file = self._tmp = None
        self.shards = []
        self.count = 0
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(out_dir: str, kind: str, splits: Mapping[str, Mapping], **extra) -> dict:
    """Write ``out_dir/manifest.json`` atomically and return it.

    ``splits`` maps split name → ``ShardWriter.close()`` result.  ``classes``, ``image_size``, ``vq`` and
    ``source`` default to ``None``; any other keyword is stored as is (must be JSON-serialisable).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    manifest: dict = {"format": FORMAT, "kind": kind,
                      "splits": {k: {"count": int(v["count"]), "shards": [dict(s) for s in v["shards"]]}
                                 for k, v in splits.items()},
                      "classes": None, "image_size": None, "vq": None, "source": None}
    for k, v in extra.items():
        if k in ("format", "kind", "splits"):
            raise ValueError(f"write_manifest: {k!r} cannot be passed as an extra field")
        manifest[k] = list(v) if isinstance(v, tuple) else v
    _validate_manifest(manifest, os.path.join(out_dir, MANIFEST_NAME))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def _manifest_path(path: str) -> str:
    path = os.fspath(path)
    return path if os.path.basename(path) == MANIFEST_NAME and not os.path.isdir(path) \
        else os.path.join(path, MANIFEST_NAME)


def _validate_manifest(m: Any, path: str) -> None:
    def bad(msg: str):
        raise ShardManifestError(f"{path}: {msg}")

    if not isinstance(m, dict):
        bad("not a JSON object")
    if m.get("format") != FORMAT:
        bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("kind") not in KINDS:
        bad(f"kind is {m.get('kind')!r}, expected one of {', '.join(KINDS)}")
    splits = m.get("splits")
    if not isinstance(splits, dict):
        bad("'splits' must be an object mapping split name to {count, shards}")
    for name, s in splits.items():
        if not SPLIT_RE.match(str(name)):
            bad(f"bad split name {name!r}")
        if not isinstance(s, dict) or not isinstance(s.get("count"), int) or not isinstance(s.get("shards"), list):
            bad(f"split {name!r} must be {{\"count\": int, \"shards\": [...]}}")
        total = 0
        for sh in s["shards"]:
            if not isinstance(sh, dict) or not isinstance(sh.get("name"), str) \
                    or not isinstance(sh.get("count"), int) or not isinstance(sh.get("sha256"), str):
                bad(f"split {name!r}: each shard needs name, count and sha256, got {sh!r}")
            mm = SHARD_NAME_RE.match(sh["name"])
            if not mm or mm.group(1) != name:
                bad(f"split {name!r}: shard name {sh['name']!r} is not '{name}-NNNNNN.tar'")
            total += sh["count"]
        if total != s["count"]:
            bad(f"split {name!r}: count {s['count']} but its shards hold {total}")
    classes = m.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        bad("'classes' must be null or a list of strings")
    size = m.get("image_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(isinstance(x, int) and x > 0 for x in size)):
        bad("'image_size' must be null or [h, w]")


def read_manifest(path: str, check_files: bool = True) -> dict:
    """Load and validate a shard directory's ``manifest.json`` (``path``: the directory or the file).

    Raises ``ShardManifestError`` naming the path when it is missing, not JSON, inconsistent, or (with
    ``check_files``) lists a shard file that does not exist.
    """
    mpath = _manifest_path(path)
    if not os.path.exists(mpath):
        raise ShardManifestError(f"{mpath}: shard manifest not found (is {os.path.dirname(mpath) or '.'} a "
                                 f"shard directory written by tools/make_shards.py, and did it finish?)")
    try:
        with open(mpath, "r", encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ShardManifestError(f"{mpath}: cannot read shard manifest: {e}") from e
    except json.JSONDecodeError as e:
        raise ShardManifestError(f"{mpath}: corrupt shard manifest (line {e.lineno}: {e.msg})") from e
    _validate_manifest(m, mpath)
    if check_files:
        d = os.path.dirname(mpath)
        for split, s in m["splits"].items():
            for sh in s["shards"]:
                if not os.path.exists(os.path.join(d, sh["name"])):
                    raise ShardManifestError(f"{mpath}: split {split!r} lists {sh['name']} but "
                                             f"{os.path.join(d, sh['name'])} does not exist")
    return m


def shard_paths(path: str, split: str, manifest: Optional[dict] = None) -> list[str]:
    """Paths of a split's shard files, in manifest order."""
    m = manifest if manifest is not None else read_manifest(path)
    d = os.path.dirname(_manifest_path(path))
    if split not in m["splits"]:
        raise ShardManifestError(f"{_manifest_path(path)}: no split {split!r} "
                                 f"(has: {', '.join(sorted(m['splits'])) or 'none'})")
    return [os.path.join(d, sh["name"]) for sh in m["splits"][split]["shards"]]


def iter_tar(tar_path: str) -> Iterator[dict]:
    """Raw samples of one tar shard: ``{"__key__", "__url__", ext: bytes}`` (members grouped by key)."""
    cur: Optional[dict] = None
    with tarfile.open(tar_path, mode="r|") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            base = os.path.basename(ti.name)
            if "." not in base:
                raise ValueError(f"{tar_path}: member {ti.name!r} has no extension")
            prefix = os.path.dirname(ti.name)
            key, ext = base.split(".", 1)
            key = f"{prefix}/{key}" if prefix else key
            data = tf.extractfile(ti).read()
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key, "__url__": tar_path}
            if ext in cur:
                raise ValueError(f"{tar_path}: duplicate member {ti.name!r}")
            cur[ext] = data
    if cur is not None:
        yield cur


def iter_samples(path: str, split: str = "train", manifest: Optional[dict] = None) -> Iterator[dict]:
    """All raw samples of a split, shard by shard, in written order."""
    for p in shard_paths(path, split, manifest):
        yield from iter_tar(p)


def verify_shards(path: str, count_samples: bool = False) -> dict:
    """Check every shard's sha256 (and, with ``count_samples``, its sample count) against the manifest."""
    m = read_manifest(path)
    mpath = _manifest_path(path)
    for split in m["splits"]:
        for p, sh in zip(shard_paths(path, split, m), m["splits"][split]["shards"]):
            got = file_sha256(p)
            if got != sh["sha256"]:
                raise ShardManifestError(f"{mpath}: {sh['name']} sha256 {got} != manifest {sh['sha256']}")
            if count_samples:
                n = sum(1 for _ in iter_tar(p))
                if n != sh["count"]:
                    raise ShardManifestError(f"{mpath}: {sh['name']} holds {n} samples, manifest says {sh['count']}")
    return m
