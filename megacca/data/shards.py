"""The one tar shard writer and reader of the project, on webdataset (see docs/data-format.md, "Shards").

A shard directory holds ``<split>-NNNNNN.tar`` files and a ``manifest.json``::

    {"format": "megacca-shards/1", "kind": "images|codes|text|pairs|ref_pairs",
     "splits": {"train": {"count": 1617, "shards": [{"name": "train-000000.tar", "count": 1000,
                                                    "sha256": "...", "bytes": 123456}]}},
     "classes": [...] | null, "image_size": [h, w] | null, "vq": {...} | null, "source": "..."}

webdataset does the tar work (``TarWriter`` writes, ``tar_file_iterator`` + ``group_by_keys`` read); this
module adds what it leaves to its users: the manifest, byte-identical reruns and one error policy.

Writing
    ``write_shard(path, samples)`` writes one shard file; ``ShardWriter(out_dir, split, max_count,
    max_bytes)`` spreads a split's samples over ``<split>-NNNNNN.tar`` files.  Samples are dicts with
    ``__key__`` and one entry per member extension (see ``encode_member``).  A shard is written under a
    hidden temporary name (``TMP_NAME_RE``) and renamed when complete, so a crash never leaves a truncated
    ``*.tar`` behind.  Shards are byte-for-byte deterministic (fixed mtime/owner/mode, USTAR, members sorted
    by extension, samples in write order), so two runs over the same input give identical sha256s.
    ``write_manifest(out_dir, kind, splits, **extra)`` writes ``manifest.json`` atomically (last, so a
    directory without a manifest is an incomplete one).

Reading
    ``read_manifest(dir)`` validates the manifest and raises ``ShardManifestError`` naming the path when it
    is missing or corrupt; ``shard_paths`` lists a split's tar files.  ``iter_tar(path)`` streams a shard's
    raw samples (``{"__key__", "__url__", ext: bytes, ...}``) and raises ``ShardReadError`` naming the shard
    and the sample key at an unreadable file, a corrupt or truncated tar, or a bad member (no extension,
    twice in a sample); ``read_shard_samples`` is the same reader for callers that keep what was readable
    before the damage (the loader's ``on_error=skip``) and judge it with ``shard_damage``.
    ``iter_samples`` reads a split, ``verify_shards`` checks sha256s and counts.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import zlib
from typing import Any, Iterable, Iterator, Mapping, Optional

from megacca.fileio import atomic_write_json, sha256_file  # noqa: F401  (re-exported)

import numpy as np

FORMAT = "megacca-shards/1"
KINDS = ("images", "codes", "text", "pairs", "ref_pairs")  # ref_pairs: tools/precompute_ref_logps.py
MANIFEST_NAME = "manifest.json"
SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
SHARD_NAME_RE = re.compile(r"^([a-z][a-z0-9_]*)-(\d{6})\.tar$")
TMP_NAME_RE = re.compile(r"^\..*\.tmp-\d+$")  # a shard being written (or left by a crash): ".NAME.tmp-PID"
# Fixed tar metadata so that shards are reproducible.
_TAR_MTIME = 0
_TAR_MODE = 0o444
_TAR_USER = "megacca"
# What a damaged tar raises while webdataset reads it (zlib: a compressed tar someone renamed to .tar).
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)

__all__ = [
    "FORMAT", "KINDS", "ShardManifestError", "ShardReadError", "ShardWriter", "write_shard", "encode_member",
    "write_manifest", "read_manifest", "shard_paths", "iter_tar", "read_shard_samples", "shard_damage",
    "iter_samples", "verify_shards", "file_sha256", "atomic_write_json",
]


class ShardManifestError(ValueError):
    """A shard directory's manifest is missing, unreadable or inconsistent (message names the path)."""


class ShardReadError(ValueError):
    """A tar shard that cannot be read as written; the message names the shard file and the sample key.

    ``reason`` is ``"empty_shard"`` (no sample could be read) or ``"corrupt_tar"``; ``key`` is None when no
    sample was reached."""

    def __init__(self, message: str, shard: str, key: Optional[str], reason: str):
        super().__init__(message)
        self.shard, self.key, self.reason = shard, key, reason


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


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def _tar_size(nbytes: int) -> int:
    """Bytes one member takes in a tar: 512-byte header + payload padded to 512."""
    return 512 + ((nbytes + 511) // 512) * 512


def _file_size(nbytes: int) -> int:
    """Size of a tar file whose blocks (incl. the end marker) total ``nbytes``: padded to a whole record."""
    return -(-nbytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _members(sample: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    """Check a sample's key and member names; returns ``(key, {ext: bytes})``."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or key.startswith("_"):
        raise ValueError(f"bad sample key {key!r}: need a non-empty string without '.', not starting with '_'")
    members = {}
    for ext, value in sample.items():
        if ext.startswith("_"):
            continue
        # webdataset's reader lowercases extensions, so an upper-case one would not read back as written
        if not ext or ext.startswith(".") or ext.endswith(".") or "/" in ext or ext != ext.lower():
            raise ValueError(f"sample {key!r}: bad member extension {ext!r}")
        members[ext] = encode_member(value)
    if not members:
        raise ValueError(f"sample {key!r} has no members")
    return key, members


class _ShardFile:
    """One tar shard being written: webdataset's TarWriter on a hidden temporary file, renamed by ``close``.

    ``keys``: the keys already used where this file's samples must be unique (shared by the files of a split).
    """

    def __init__(self, path: str, keys: set):
        import webdataset  # imported lazily: it pulls in torch (seconds), which manifest readers do not need

        self.path = os.fspath(path)
        head, name = os.path.split(self.path)
        self.name, self.keys = name, keys
        self.tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}")
        self.count, self.tar_bytes = 0, 1024  # the end-of-archive blocks
        self._file = open(self.tmp, "wb")
        # Values are encoded by us (encoder=False); fixed mtime/owner/mode + USTAR make the bytes reproducible.
        self._tar = webdataset.TarWriter(self._file, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE,
                                         encoder=False, mtime=_TAR_MTIME, compress=False)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.name}")
        self._tar.write({"__key__": key, **members})  # TarWriter writes members sorted by extension
        self.keys.add(key)
        self.count += 1
        self.tar_bytes += sum(_tar_size(len(v)) for v in members.values())

    def close(self) -> dict:
        """Finish and rename the file; returns its manifest entry ``{name, count, sha256, bytes}``."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"name": self.name, "count": self.count, "sha256": file_sha256(self.path),
                "bytes": os.path.getsize(self.path)}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_shard(path: str, samples: Iterable[Mapping[str, Any]]) -> dict:
    """Write ``samples`` as the one shard file ``path``; returns its manifest entry ``{name, count, sha256,
    bytes}``.  The file appears complete or not at all: an exception (also one raised by ``samples``) removes
    the temporary file and propagates."""
    f = _ShardFile(path, set())
    try:
        for sample in samples:
            f.add(*_members(sample))
    except BaseException:
        f.abort()
        raise
    return f.close()


class ShardWriter:
    """Write the samples of one split into ``<split>-NNNNNN.tar`` shards.

    A new shard starts when the current one holds ``max_count`` samples or the next sample would make its
    file (tar records are 10 KiB) bigger than ``max_bytes``; a sample that alone exceeds ``max_bytes`` gets
    a shard of its own.  Keys must be unique within the split and must not contain ``.`` (WebDataset splits
    the member name at the first dot).

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
        self._cur: Optional[_ShardFile] = None
        self._closed = False

    def _finish_current(self) -> None:
        if self._cur is not None:
            self.shards.append(self._cur.close())
            self._cur = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample: ``{"__key__": str, "png": bytes, "json": dict, ...}`` (see ``encode_member``)."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for split {self.split!r} in {self.out_dir} is closed")
        key, members = _members(sample)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in split {self.split!r}")
        size = sum(_tar_size(len(v)) for v in members.values())
        cur = self._cur
        if cur is not None and cur.count > 0 and (
                cur.count >= self.max_count or _file_size(cur.tar_bytes + size) > self.max_bytes):
            self._finish_current()
        if self._cur is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._cur = _ShardFile(os.path.join(self.out_dir, name), self._keys)
        self._cur.add(key, members)
        self.count += 1

    def close(self) -> dict:
        """Finish the last shard; returns the split's manifest entry ``{"count", "shards"}``."""
        if not self._closed:
            self._finish_current()
            self._closed = True
        return {"count": self.count, "shards": [dict(s) for s in self.shards]}

    def abort(self) -> None:
        """Drop everything this writer wrote (temporary file and completed shards)."""
        if self._cur is not None:
            self._cur.abort()
            self._cur = None
        for s in self.shards:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.out_dir, s["name"]))
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


# ---------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def _key_of(member: Optional[str]) -> Optional[str]:
    """The sample key of a member name (webdataset's split at the first dot of the base name)."""
    if not member:
        return None
    import webdataset as wds

    return wds.tariterators.base_plus_ext(member)[0] or member


def _describe(e: BaseException, fileobj: Any = None) -> str:
    """``Type: message`` of a read error, without the context webdataset's handlers append to its args."""
    msg = str(e.args[0]) if e.args else str(e)
    if fileobj is not None:
        msg = msg.removesuffix(f" @ {fileobj}")
    return f"{type(e).__name__}: {msg}"


def _tar_samples(path: str, st: dict) -> Iterator[dict]:
    """Raw samples of one tar file through webdataset (``tar_file_iterator`` + ``group_by_keys``).

    Stops at the first damage and records it in ``st``: ``error`` (the message; None while clean), ``last``
    (the name of the last member reached) and ``complete`` (whether that member's data was read)."""
    import webdataset as wds

    def note(fname: str) -> str:  # webdataset calls it before it reads a member's data
        st["last"], st["complete"] = fname, False
        return fname

    def files(f):
        try:
            for member in wds.tariterators.tar_file_iterator(f, rename_files=note):
                st["complete"] = True
                if wds.tariterators.base_plus_ext(member["fname"])[0] is None:  # group_by_keys would drop it
                    raise ValueError(f"member {member['fname']!r} has no extension")
                member["__url__"] = path
                yield member
        except _TAR_ERRORS as e:
            st["error"] = _describe(e, f)

    try:
        with open(path, "rb") as f:
            yield from wds.tariterators.group_by_keys(files(f))
    except (OSError, ValueError) as e:  # unreadable file; a member twice in one sample
        st["error"] = st["error"] or _describe(e)


def read_shard_samples(path: str) -> tuple[list[dict], Optional[str], Optional[str]]:
    """Every sample of one tar shard that could be read, for callers that go on past damage.

    Returns ``(samples, error, last_member)``: the samples read (``{"__key__", "__url__", ext: bytes}``), the
    error that stopped reading (None when the archive read cleanly) and the name of the last member the
    reader reached. When the error strikes inside a member's data, that member's sample is dropped; when it
    strikes at a header, the samples read so far are all returned (the last one may lack members, which
    field checks catch). ``shard_damage`` turns the result, with the manifest's count, into the error.
    """
    st = {"last": None, "complete": True, "error": None}
    samples = list(_tar_samples(path, st))
    if st["error"] is not None and not st["complete"] and samples \
            and samples[-1]["__key__"] == _key_of(st["last"]):
        samples.pop()
    return samples, st["error"], st["last"]


def shard_damage(path: str, n_read: int, error: Optional[str], last_member: Optional[str],
                 expected: Optional[int] = None) -> Optional[ShardReadError]:
    """The `ShardReadError` for a read of ``path`` that stopped on ``error`` or gave fewer than ``expected``
    samples (a zeroed header reads as a clean end of archive: only the count tells), else None.  It names the
    sample key of the last member reached; with no member reached, the shard counts as empty."""
    why = f" ({error})" if error else ""
    if last_member is None and (error is not None or expected):
        listed = f"; the manifest lists {expected}" if expected is not None else ""
        return ShardReadError(f"{path}: empty shard: no sample (so no sample key) could be read{why}{listed}",
                              path, None, "empty_shard")
    if error is not None or (expected is not None and n_read < expected):
        key = _key_of(last_member)
        of = f" of {expected}" if expected is not None else ""
        return ShardReadError(f"{path}: corrupt or truncated tar at sample key {key!r} (damage in or right after "
                              f"member {last_member!r}): read {n_read}{of} samples{why}", path, key, "corrupt_tar")
    return None


def iter_tar(path: str, expected: Optional[int] = None) -> Iterator[dict]:
    """Stream the raw samples of one tar shard (``{"__key__", "__url__", ext: bytes}``), in written order.

    Raises `ShardReadError` naming the shard and the sample key at the first damage, or at the end when
    ``expected`` is given and fewer samples were read.  A sample the damage may have cut short is not
    yielded: each is held back until the next one has started or the read has ended cleanly."""
    st = {"last": None, "complete": True, "error": None}
    held, n = None, 0
    with contextlib.closing(_tar_samples(path, st)) as samples:
        for s in samples:
            if held is not None:
                yield held
            held, n = s, n + 1
    err = shard_damage(path, n, st["error"], st["last"], expected)
    # After damage the last sample is whole only if the damage struck the next sample's first member.
    if held is not None and (err is None or held["__key__"] != _key_of(st["last"])):
        yield held
    if err is not None:
        raise err


def iter_samples(path: str, split: str = "train", manifest: Optional[dict] = None) -> Iterator[dict]:
    """All raw samples of a split, shard by shard, in written order (`ShardReadError` on damage)."""
    m = manifest if manifest is not None else read_manifest(path)
    for p, sh in zip(shard_paths(path, split, m), m["splits"][split]["shards"]):
        yield from iter_tar(p, sh["count"])


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
