"""TensorBoard after a kill and a resume: one curve per scalar, indexed by step, each step exactly once."""
from __future__ import annotations

import pytest

from conftest import metrics, train

# Checkpoint at step 3, killed after step 5: steps 4 and 5 are logged twice on disk, once by each session.
OPTS = ["train.max_steps=6", "train.save_every=3"]


def _scalars(logdir, purge: bool) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resumed_run_has_each_step_once(tmp_path):
    """The DeepSpeed engine (the default): its own monitor used to add a samples-indexed `Train/Samples/lr`.
    The megatron engine logs through the same MetricsLogger."""
    rd = tmp_path / "run"
    opts = OPTS
    assert train(rd, *opts, check=False, MEGACCA_TEST_KILL_AFTER_STEP=5).returncode != 0
    assert (rd / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    train(rd, *opts)

    logdir = rd / "tensorboard"
    raw = _scalars(logdir, purge=False)
    # The premise: both sessions' events are in the files (steps 4 and 5 twice) ...
    assert [s for s, _ in raw["train/loss"]] == [1, 2, 3, 4, 5, 4, 5, 6]
    got = _scalars(logdir, purge=True)
    # ... and TensorBoard shows one curve per scalar: megacca's, over steps 1..6, nothing on a samples axis.
    assert set(got) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time",
                                                   "loss_tokens")}
    for tag, points in got.items():
        assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6], tag
    # The surviving points are the resumed session's: the same values as metrics.jsonl, which keeps one record
    # per step. TensorBoard stores float32, so compare at float32 resolution (relative 2**-23 ~ 1.2e-7).
    by_step = {m["step"]: m for m in metrics(rd)}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    for tag, points in got.items():
        key = tag.split("/", 1)[1]
        for step, value in points:
            assert value == pytest.approx(by_step[step][key], rel=2e-7), (tag, step)


def test_fresh_run_in_an_old_run_dir_replaces_its_curves(tmp_path):
    """`train.resume=false` restarts at step 1: the old run's points are purged, as in metrics.jsonl."""
    rd = tmp_path / "run"
    train(rd, "train.max_steps=3", "train.save_every=0")
    train(rd, "train.max_steps=2", "train.save_every=0", "train.resume=false", "optim.lr=1e-3")
    got = _scalars(rd / "tensorboard", purge=True)
    assert [s for s, _ in got["train/loss"]] == [1, 2]
    assert [v for _, v in got["train/lr"]] == pytest.approx([m["lr"] for m in metrics(rd)], rel=2e-7)
