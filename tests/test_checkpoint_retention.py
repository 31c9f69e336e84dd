"""`train.keep_last`: pruning keeps the newest checkpoints and never touches `latest` or a save in progress.

Single process, no process group: `CheckpointManager` only needs an engine whose `save(dir)` writes its files,
so a stand-in engine exercises the real save/publish/prune code in milliseconds.
"""
from __future__ import annotations

import pytest

from megacca.checkpoint import CheckpointManager


class FileEngine:
    """Writes two files per save; `fail_at` makes the save of that step die halfway, like a crashed rank."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.step = None

    def save(self, ckpt_dir):
        d = ckpt_dir / "fake_engine"
        d.mkdir(parents=True, exist_ok=True)
        (d / "weights").write_text(f"step {self.step}\n")
        if self.step == self.fail_at:
            raise RuntimeError("simulated crash mid-save")
        (d / "optimizer").write_text(f"step {self.step}\n")


def _engine_file(ckpt, name: str):
    """The stand-in engine's file `name` inside checkpoint (or temporary) directory `ckpt`, or None."""
    return next(iter(ckpt.rglob(name)), None)


def _save(mgr: CheckpointManager, engine: FileEngine, step: int):
    engine.step = step
    return mgr.save(step, engine, {"step": step}, {"position": step})


def _steps(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.root.glob("step_*"))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_and_latest_after_every_save(tmp_path, keep):
    mgr, eng = CheckpointManager(tmp_path, keep_last=keep), FileEngine()
    for step in range(1, 7):
        final = _save(mgr, eng, step)
        newest = [f"step_{s:08d}" for s in range(max(1, step - keep + 1), step + 1)]
        assert _steps(mgr) == newest
        assert mgr.latest() == final and _engine_file(final, "optimizer")
    assert not list(mgr.root.glob(".tmp-*"))


def test_keep_last_0_keeps_everything(tmp_path):
    mgr, eng = CheckpointManager(tmp_path, keep_last=0), FileEngine()
    for step in (5, 10, 15):
        _save(mgr, eng, step)
    assert _steps(mgr) == ["step_00000005", "step_00000010", "step_00000015"]


@pytest.mark.parametrize("keep", [1, 2])
def test_crash_mid_save_keeps_latest_and_the_partial_save_is_not_published(tmp_path, keep):
    mgr, eng = CheckpointManager(tmp_path, keep_last=keep), FileEngine(fail_at=4)
    for step in (1, 2, 3):
        _save(mgr, eng, step)
    before = _steps(mgr)
    with pytest.raises(RuntimeError, match="mid-save"):
        _save(mgr, eng, 4)
    # Nothing was pruned for the failed save, `latest` still resolves to a complete checkpoint, and the
    # half-written directory is only the temporary one.
    assert _steps(mgr) == before
    assert mgr.latest().name == "step_00000003" and _engine_file(mgr.latest(), "optimizer")
    tmp = mgr.root / ".tmp-step_00000004"
    assert _engine_file(tmp, "weights") and not _engine_file(tmp, "optimizer")

    # The resumed run saves step 4 again: the stale temporary directory is replaced, not published as is.
    eng.fail_at = None
    final = _save(mgr, eng, 4)
    assert mgr.latest() == final and _engine_file(final, "optimizer")
    assert not tmp.exists()
    assert _steps(mgr) == [f"step_{s:08d}" for s in range(5 - keep, 5)]


@pytest.mark.parametrize("keep", [1, 2])
def test_pruning_spares_a_save_in_progress(tmp_path, keep):
    """Another step's `.tmp-` directory (a save under way on other ranks, or one a crash left) is not a
    checkpoint: pruning must neither delete it nor count it, and `latest` never names it."""
    mgr, eng = CheckpointManager(tmp_path, keep_last=keep), FileEngine()
    _save(mgr, eng, 1)
    _save(mgr, eng, 2)
    pending = mgr.root / ".tmp-step_00000004"
    (pending / "engine").mkdir(parents=True)
    (pending / "engine" / "weights").write_text("in progress\n")
    _save(mgr, eng, 3)
    assert (pending / "engine" / "weights").read_text() == "in progress\n"
    assert _steps(mgr) == [f"step_{s:08d}" for s in range(4 - keep, 4)]
    assert mgr.latest().name == "step_00000003"


def test_latest_survives_a_newer_unpublished_checkpoint(tmp_path):
    """A crash between the rename and the `latest` update leaves a complete step directory that `latest` does
    not name. The resumed run continues from `latest`; its next saves with keep_last=1 must keep the checkpoint
    they publish (the stale, name-wise newer directory must not push it out)."""
    mgr, eng = CheckpointManager(tmp_path, keep_last=1), FileEngine()
    _save(mgr, eng, 3)
    stale = mgr.root / "step_00000006"
    (stale / "engine").mkdir(parents=True)
    (stale / "trainer.json").write_text('{"step": 6}\n')
    assert mgr.latest().name == "step_00000003"
    for step in (4, 5):
        final = _save(mgr, eng, step)
        assert mgr.latest() == final and final.is_dir() and _engine_file(final, "optimizer")
    # Re-saving step 6 replaces the stale directory with this run's state.
    final = _save(mgr, eng, 6)
    assert mgr.latest() == final and _engine_file(final, "optimizer").read_text() == "step 6\n"
    assert _steps(mgr) == ["step_00000006"]
