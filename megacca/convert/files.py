"""Input checkpoints read without running code from them; outputs that appear only when complete.

Reading: `.safetensors` is plain data. A pickle (`.pt`, `.pth`, `.bin`, `.ckpt`) goes through
`torch.load(weights_only=True)` with torch's own safe set only (tensors, containers, primitive values); a file
that names anything else is refused, naming the global, unless the caller passes `trust_pickle=True` (the
tools' `--trust-pickle`), which unpickles it fully: only for files from a source the user trusts.

Writing: `staged_dir` / `staged_file` write next to the destination under a temporary name, fsync, and rename
into place only after the last byte; an interrupted conversion leaves no destination at all (and no partial
one a later step would read). An existing destination is never overwritten.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from megacca.convert import ConversionError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_tensor_file(path: str | Path, trust_pickle: bool = False, allowed: tuple = ()):
    """The object in a weights file: a dict of tensors for `.safetensors`, whatever the pickle holds otherwise
    (usually a state dict, or a dict around one). `allowed`: classes a pickle may name beyond torch's safe set
    (LlamaGen's training checkpoints hold their `argparse.Namespace` of arguments)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConversionError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors or one of "
                              f"{', '.join(PICKLE_SUFFIXES)})")
    if trust_pickle:
        # The user's explicit `--trust-pickle` for a file they vouch for (issue: "a legacy pickle that needs more
        # is refused unless the user passes --trust-pickle"); without it only the allow-list below is unpickled.
        log.warning("%s: unpickling fully (--trust-pickle): this runs whatever code the file names", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    from megacca.safe_load import UnsafeCheckpointError, only_safe_globals

    with only_safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is advice to unpickle fully; say what the file names and how to accept it.
            named = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
            what = f"it names {named.group(1) or named.group(2)}, which" if named else "it holds an object that"
            raise UnsafeCheckpointError(
                f"refusing to unpickle {path}: {what} loading would call (not plain tensors and containers); "
                f"pass --trust-pickle if the file comes from a source you trust") from None
        except (RuntimeError, EOFError) as e:
            raise ConversionError(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _refuse_existing(dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        raise ConversionError(f"{dst} already exists; remove it or choose another destination")


@contextlib.contextmanager
def staged_dir(dst: str | Path) -> Iterator[Path]:
    """`with staged_dir(dst) as tmp:` write the output directory's contents into `tmp`; on a clean exit it is
    fsynced and renamed to `dst`, on an exception removed."""
    from megacca.checkpoint import fsync_tree

    dst = Path(dst)
    _refuse_existing(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        _refuse_existing(dst)  # created meanwhile by someone else: keep theirs
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(dst: str | Path) -> Iterator[Path]:
    """`with staged_file(dst) as tmp:` write the output file at `tmp` (same directory); renamed to `dst` on a
    clean exit, removed on an exception."""
    dst = Path(dst)
    _refuse_existing(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    try:
        yield tmp
        _fsync_file(tmp)
        _refuse_existing(dst)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def megacca_checkpoint(src):
    """(checkpoint directory, its trainer state, its Config) of a megacca run directory or checkpoint; a path
    that is neither is a ConversionError."""
    from megacca.checkpoint import CheckpointNotFound, read_trainer_state, resolve_checkpoint
    from megacca.config import Config, from_dict

    try:
        ckpt = resolve_checkpoint(src)
    except CheckpointNotFound as e:
        raise ConversionError(str(e)) from None
    saved = read_trainer_state(ckpt)
    return ckpt, saved, from_dict(Config, saved["config"])
