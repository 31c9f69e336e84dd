"""A checkpoint cannot run code when it is loaded (megacca.safe_load), and every real checkpoint still loads.

The hostile files are the attacks a tampered run directory can carry: a `.metadata` whose pickle calls
`torch.storage._load_from_bytes` (a full `torch.load` of bytes that call `os.system`), the same bytes as a DCP
byte item inside a `.distcp` file or as megatron's `common.pt`, and a DeepSpeed `.pt` naming `os.system`.
Each payload would create a marker file; the runs must refuse with an error naming the global, and no marker
may appear. The allow-lists are checked both ways: a global not on them is refused (also callables living in
the modules the allowed classes come from), and they hold exactly the globals real checkpoints name.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import megatron.core  # noqa: F401 - registers its safe globals process-wide, as in every megacca run
import numpy as np
import pytest
import torch

from conftest import losses, metrics, train
# Names are looked up when a test runs, so this file also runs against an older megacca.safe_load (the attacks
# must fail there).
import megacca.safe_load as sl

# Checkpoints of the layouts no other test resumes: the megatron engine with DDP, and with the
# DistributedOptimizer and tp=2 (its byte items and optimizer shards); DeepSpeed ZeRO-0 (the default) and ZeRO-1
# (the optimizer partition files of ZeRO-1/2). test_train_e2e resumes the others through the same loaders:
# megatron DistributedOptimizer and pp=2, DeepSpeed ZeRO-2 and ZeRO-3 over two ranks. Each run trains 2 steps
# and keeps both checkpoints.
KINDS = {
    "megatron": (1, ["parallel.engine=megatron"]),
    "megatron-distopt-tp2": (2, ["parallel.engine=megatron", "parallel.zero_stage=1", "parallel.tp=2"]),
    "deepspeed-zero0": (1, ["parallel.zero_stage=0"]),
    "deepspeed-zero1": (1, ["parallel.zero_stage=1"]),
}
TWO_STEPS = ["train.max_steps=2", "train.save_every=1"]
# Resuming must load the checkpoint: a run already at max_steps would only say it is complete.
ONE_MORE = ["train.max_steps=3", "train.save_every=1"]
STEP2 = Path("checkpoints") / "step_00000002"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    for kind, (nproc, opts) in KINDS.items():
        train(root / kind, *TWO_STEPS, *opts, nproc=nproc)
    return {kind: root / kind for kind in KINDS}


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---- payloads --------------------------------------------------------------------------------------------------
class _Reduce:
    """Pickles as `fn(*args)`: what a hostile file asks the unpickler to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch(marker: Path) -> _Reduce:
    return _Reduce(os.system, f"touch {shlex.quote(str(marker))}")


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_from_bytes_payload(marker: Path) -> bytes:
    """The issue's attack: a pickle whose reduce is torch.storage._load_from_bytes(torch.save of os.system)."""
    return pickle.dumps(_Reduce(torch.storage._load_from_bytes, _torch_saved(_touch(marker))))


def _real_metadata(engine_dir: Path):
    return sl.restricted_loads((engine_dir / ".metadata").read_bytes())


def _refused(p, *names: str) -> None:
    """Failed, saying what it refused (the global, the file) in the error's own line."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if "refusing to" in line]
    assert lines and all(name in lines[-1] for name in names), out[-3000:]


# ---- the attacks, end to end (the real launcher, resuming the tampered run) -------------------------------------
def test_hostile_metadata_runs_nothing_on_resume(runs, tmp_path):
    """The issue's reproduction: `.metadata` replaced by a `_load_from_bytes` pickle; the resume refuses."""
    marker = tmp_path / "pwned"
    payload = _load_from_bytes_payload(marker)
    pickle.loads(payload)  # the payload is live: a plain unpickle runs it ...
    assert marker.exists()
    marker.unlink()
    rd = _copy(runs["megatron"], tmp_path / "run")
    (rd / STEP2 / "engine" / ".metadata").write_bytes(payload)
    p = train(rd, *ONE_MORE, "parallel.engine=megatron", check=False)
    assert not marker.exists(), "resuming ran the checkpoint's payload"  # ... resuming does not
    _refused(p, "torch.storage._load_from_bytes", str(rd / STEP2 / "engine" / ".metadata"))


def _tampered_byte_item(engine: Path, payload: bytes) -> str:
    """Point the first DCP byte item of `engine` (a copy) at `payload`, appended to its shard file, as a hostile
    checkpoint would (metadata rewritten to match). Returns the item's key."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = _real_metadata(engine)
    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    index, info = next((i, s) for i, s in meta.storage_data.items() if i.fqn in byte_keys)
    shard = engine / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload)
    with shard.open("ab") as f:
        f.write(payload)
    (engine / ".metadata").write_bytes(pickle.dumps(meta))
    return index.fqn


def test_hostile_distcp_byte_item_runs_nothing(runs, tmp_path):
    """DCP keeps non-tensor objects as bytes in the `.distcp` files and loads them with
    `torch.load(weights_only=False)`, through megatron's load planner as in a resume."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    marker = tmp_path / "pwned"
    engine = _copy(runs["megatron"] / STEP2 / "engine", tmp_path / "engine")
    key = _tampered_byte_item(engine, _torch_saved(_touch(marker)))

    def load():
        dcp.load({key: io.BytesIO()}, storage_reader=dcp.FileSystemReader(str(engine)), planner=MCoreLoadPlanner(),
                 no_dist=True)

    with pytest.raises(sl.UnsafeCheckpointError, match="it names posix.system"):
        with sl.restricted_pickle():
            load()
    assert not marker.exists()
    load()  # the hole: torch DCP on its own runs the payload
    assert marker.exists()


def test_hostile_common_pt_runs_nothing(runs, tmp_path, monkeypatch):
    """megatron reads `common.pt` with torch.load's default: a full unpickle on torch < 2.6, or (simulated
    here) with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    marker = tmp_path / "pwned"
    engine = _copy(runs["megatron"] / STEP2 / "engine", tmp_path / "engine")
    (engine / "common.pt").write_bytes(_torch_saved({"state": _touch(marker)}))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(sl.UnsafeCheckpointError, match=re.escape(f"{engine / 'common.pt'}: it names posix.system")):
        with sl.restricted_pickle():
            TorchCommonLoadStrategy().load_common(engine)
    assert not marker.exists()
    TorchCommonLoadStrategy().load_common(engine)  # the hole, without megacca's loader
    assert marker.exists()


def test_hostile_deepspeed_file_runs_nothing_on_resume(runs, tmp_path):
    marker = tmp_path / "pwned"
    rd = _copy(runs["deepspeed-zero1"], tmp_path / "run")
    (optim,) = (rd / STEP2 / "engine" / "deepspeed").glob("*optim_states.pt")
    optim.write_bytes(_torch_saved({"optimizer_state_dict": _touch(marker)}))
    p = train(rd, *ONE_MORE, "parallel.zero_stage=1", check=False)
    assert not marker.exists(), "resuming ran the checkpoint's payload"
    _refused(p, "posix.system", optim.name)


# ---- every real checkpoint kind loads --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_real_checkpoints_resume(runs, tmp_path, kind):
    """Resume each kind from its step-1 checkpoint: step 2 repeats the uninterrupted run's loss exactly (the
    same computation on the same machine; 1e-6 as test_train_e2e's kill-and-resume)."""
    nproc, opts = KINDS[kind]
    rd = _copy(runs[kind], tmp_path / "run")
    shutil.rmtree(rd / STEP2)  # back to the state after step 1
    (rd / "checkpoints" / "latest").write_text("step_00000001\n")
    (rd / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                              (rd / "metrics.jsonl").read_text().splitlines()[:1]))
    p = train(rd, *TWO_STEPS, *opts, nproc=nproc)
    assert "resumed from" in p.stdout + p.stderr
    assert [m["step"] for m in metrics(rd)] == [1, 2] and (rd / STEP2).is_dir()
    assert abs(losses(rd)[2] - losses(runs[kind])[2]) < 1e-6


# ---- the allow-lists -------------------------------------------------------------------------------------------
class _Recorder(pickle.Unpickler):
    """A plain unpickler that notes what it resolves: only for files the fixture itself just wrote."""

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def test_metadata_allow_list_is_exactly_what_real_checkpoints_name(runs):
    files = sorted(p for run in runs.values() for p in run.rglob(".metadata"))
    assert len(files) >= 2 * len(KINDS)  # every checkpoint of every kind (DeepSpeed's `model/` copy included)
    seen = set()
    for path in files:
        with path.open("rb") as f:
            rec = _Recorder(f)
            rec.seen = set()
            rec.load()
        seen |= rec.seen
    assert {g for g in seen if not (g[0] == "torch" and g[1] in sl._DTYPES)} == sl._METADATA_GLOBALS
    for path in files:  # and each loads through the restricted unpickler
        assert _real_metadata(path.parent).storage_data


def test_torch_load_allow_lists_are_exactly_what_real_checkpoints_name(runs):
    """Beyond torch's own safe set (not counting megatron-core's process-wide registrations), DeepSpeed's files
    name exactly `_deepspeed_globals()`, and what megatron's loads torch.load (common.pt, DCP byte items)
    names nothing."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.serialization import get_unsafe_globals_in_checkpoint as unsafe

    ds_files = sorted(p for run in runs.values() for p in run.rglob("deepspeed/*.pt"))
    assert {k for k, run in runs.items() if any(run.rglob("deepspeed/*.pt"))} == {k for k in KINDS if "deepspeed" in k}
    n_items = 0
    with sl.only_safe_globals():
        assert {g for p in ds_files for g in unsafe(p)} == {f"{c.__module__}.{c.__qualname__}"
                                                            for c in sl._deepspeed_globals()}
        for engine in sorted(p.parent for run in runs.values() for p in run.rglob("common.pt")):
            assert unsafe(engine / "common.pt") == []
            meta = _real_metadata(engine)
            byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
            for index, info in meta.storage_data.items():
                if index.fqn in byte_keys:
                    with (engine / info.relative_path).open("rb") as f:
                        f.seek(info.offset)
                        assert unsafe(io.BytesIO(f.read(info.length))) == []
                    n_items += 1
    assert n_items > 0
    for path in ds_files:
        sl.safe_torch_load(path)


# Globals a hostile `.metadata` may name: code runners, loaders that unpickle, and callables or classes that
# live in the modules the allowed classes come from (the old allow-list admitted whole module prefixes).
FORBIDDEN = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("subprocess", "Popen"), ("torch.storage", "_load_from_bytes"), ("torch", "load"),
             ("torch.serialization", "load"), ("torch.distributed.checkpoint.state_dict_loader", "load"),
             ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
             ("torch.distributed.checkpoint.metadata", "field"),
             ("megatron.core.dist_checkpointing.serialization", "load"), ("collections", "namedtuple")]


def _call_pickle(module: str, name: str, marker: Path) -> bytes:
    """Protocol-0 pickle of `module.name(arg)`, arg creating `marker` if the callable runs it."""
    arg = f"touch {marker}" if name in ("system", "Popen") else f"open({str(marker)!r}, 'w')"
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize("module,name", FORBIDDEN, ids=[f"{m}.{n}" for m, n in FORBIDDEN])
def test_metadata_unpickler_refuses_globals_off_the_list(tmp_path, module, name):
    marker = tmp_path / "pwned"
    with pytest.raises(sl.UnsafeCheckpointError, match=re.escape(f"refusing to unpickle {module}.{name} ")):
        sl.restricted_loads(_call_pickle(module, name, marker))
    assert not marker.exists()


def test_dcp_reader_reads_metadata_through_the_allow_list(runs, tmp_path):
    """Where DCP really reads `.metadata`: refused inside restricted_pickle (also nested, a load inside a
    load); a real one reads the same inside and out, and DCP has its own pickle back after."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as fs

    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(_load_from_bytes_payload(marker))
    with pytest.raises(sl.UnsafeCheckpointError, match=re.escape(f"torch.storage._load_from_bytes from the "
                                                              f"checkpoint metadata {tmp_path / '.metadata'}")):
        with sl.restricted_pickle():
            with sl.restricted_pickle():
                dcp.FileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()
    assert fs.pickle is pickle
    real = runs["megatron"] / STEP2 / "engine"
    with sl.restricted_pickle():
        inside = dcp.FileSystemReader(str(real)).read_metadata()
    outside = dcp.FileSystemReader(str(real)).read_metadata()
    assert inside.state_dict_metadata == outside.state_dict_metadata and inside.storage_data == outside.storage_data


@pytest.mark.parametrize("bad", ["/etc/hostname", "../step_00000001/engine/__0_0.distcp", "sub/__0_0.distcp",
                                 "..", "C:\\x", ""])
def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(runs, bad):
    meta = _real_metadata(runs["megatron"] / STEP2 / "engine")
    next(iter(meta.storage_data.values())).relative_path = bad
    with pytest.raises(sl.UnsafeCheckpointError, match="not a file name inside the checkpoint directory"):
        sl.restricted_loads(pickle.dumps(meta))


# What a hostile DeepSpeed file may name (the global, as a regex of the error): code runners, a loader, a
# function and a class from the module the allowed LossScaler lives in, what the old allow-list admitted and no
# DeepSpeed file of ours holds, and what megatron-core registers as safe process-wide for its own files.
DS_FORBIDDEN = {
    "os.system": (lambda marker: _touch(marker), r"posix\.system"),
    "_load_from_bytes": (lambda marker: _Reduce(torch.storage._load_from_bytes, _torch_saved(_touch(marker))),
                         r"torch\.storage\._load_from_bytes"),
    "CreateLossScaler": (lambda marker: _Reduce(_ds("CreateLossScaler"), torch.float32, 1.0, False, None),
                         r"deepspeed\.runtime\.fp16\.loss_scaler\.CreateLossScaler"),
    "DynamicLossScaler": (lambda marker: _ds("DynamicLossScaler")(2.0**16, 1000, 1, 2, False),
                          r"deepspeed\.runtime\.fp16\.loss_scaler\.DynamicLossScaler"),
    "Namespace": (lambda marker: argparse.Namespace(x=1), r"argparse\.Namespace"),
    "numpy array": (lambda marker: np.arange(3), r"numpy\._?core\.multiarray\._reconstruct"),
}


def _ds(name: str):
    from deepspeed.runtime.fp16 import loss_scaler

    return getattr(loss_scaler, name)


def test_megatron_registers_safe_globals_process_wide():
    """The premise of the Namespace / numpy cases: in a megacca process they are on torch's global list."""
    registered = torch.serialization.get_safe_globals()
    assert argparse.Namespace in registered and np.ndarray in registered


@pytest.mark.parametrize("case", list(DS_FORBIDDEN))
def test_deepspeed_allow_list_refuses_globals_off_it(tmp_path, case):
    make, named = DS_FORBIDDEN[case]
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(_torch_saved({"module": {"w": torch.ones(2)}, "extra": make(marker)}))
    with pytest.raises(sl.UnsafeCheckpointError, match=re.escape(f"{path}: it names ") + named
                       + re.escape(", which is not on the allow-list")):
        sl.safe_torch_load(path)
    assert not marker.exists()


def test_every_torch_load_inside_restricted_pickle_is_weights_only(tmp_path):
    """DCP asks for weights_only=False and megatron for torch's default; inside, both get weights_only=True
    with nothing added (not DeepSpeed's classes, not megatron-core's registrations), and torch.load and the
    registrations are torch's own again after."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    marker = tmp_path / "pwned"
    registered = set(torch.serialization.get_safe_globals())
    files = {}
    for name, obj in {"hostile": _touch(marker), "scaler": LossScaler(1.0), "namespace": argparse.Namespace(x=1),
                      "tensor": torch.arange(3)}.items():
        files[name] = tmp_path / f"{name}.pt"
        files[name].write_bytes(_torch_saved({"x": obj}))
    original = torch.load
    with sl.restricted_pickle():
        for kwargs in ({"weights_only": False}, {}):
            with pytest.raises(sl.UnsafeCheckpointError, match="it names posix.system"):
                torch.load(files["hostile"], **kwargs)
        for name, named in (("scaler", "LossScaler"), ("namespace", "argparse.Namespace")):
            with pytest.raises(sl.UnsafeCheckpointError, match=named):
                torch.load(files[name], weights_only=False)
        with pytest.raises(sl.UnsafeCheckpointError, match="pickle module"):
            torch.load(files["hostile"], pickle_module=pickle)
        assert torch.equal(torch.load(files["tensor"], weights_only=False)["x"], torch.arange(3))
    assert torch.load is original and set(torch.serialization.get_safe_globals()) == registered
    assert not marker.exists()
