"""The learning-rate schedule (`megacca.optim.lr_at`): exact values, and the same LR per step across a resume.

`lr_at` is a pure function of (step, optim config, current max_steps); there is no scheduler state in a
checkpoint (docs/decisions.md, "LR as a pure function of the step"). So a run killed and resumed logs exactly
the LR of an uninterrupted run, and a run resumed with a new `train.max_steps` follows the schedule of the new
max_steps from its first resumed step on.
"""
from __future__ import annotations

import math

import pytest

from conftest import metrics, train
from megacca.config import OptimConfig
from megacca.optim import lr_at

# The hand formulas below evaluate the same real numbers as lr_at in a different order of float operations, so
# they may differ in the last bit: 1e-15 relative is a few ulps of float64 and far below any schedule error
# (an off-by-one step moves the LR by >= 1/warmup_steps or a cosine step, i.e. >= 1e-3 relative here).
ULPS = dict(rel=1e-15, abs=1e-18)


def test_warmup_is_linear_from_the_first_step():
    opt = OptimConfig(lr=2.0, min_lr=0.5, warmup_steps=4)
    # Step s (0-based) uses lr*(s+1)/warmup: the first step already trains, the last warmup step reaches lr.
    assert [lr_at(s, opt, 100) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]


def test_cosine_hand_values():
    opt = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4, decay="cosine")
    # After warmup, progress = (s - warmup) / (max_steps - warmup) over 4 steps: cos at 0, pi/4, pi/2, 3pi/4, pi.
    r2 = math.sqrt(2) / 2
    expected = {4: 1.0, 5: (1 + r2) / 2, 6: 0.5, 7: (1 - r2) / 2, 8: 0.0}
    for s, v in expected.items():
        assert lr_at(s, opt, 8) == pytest.approx(v, **ULPS), s


def test_cosine_ends_at_min_lr_and_stays_there():
    opt = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay="cosine")
    assert lr_at(10, opt, 10) == 3e-4
    assert lr_at(25, opt, 10) == 3e-4  # progress is clamped: never below min_lr, even past max_steps
    # The general formula, for every step of a 10-step run.
    for s in range(2, 10):
        p = (s - 2) / 8
        assert lr_at(s, opt, 10) == pytest.approx(3e-4 + (3e-3 - 3e-4) * (1 + math.cos(math.pi * p)) / 2, **ULPS)


def test_constant_after_warmup():
    opt = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=3, decay="constant")
    assert [lr_at(s, opt, 10) for s in range(6)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3],
                                                                   **ULPS)
    assert lr_at(10**6, opt, 10) == 1e-3  # constant means constant, even past max_steps


def test_no_warmup_starts_at_peak():
    opt = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay="cosine")
    assert lr_at(0, opt, 4) == 1e-3
    assert lr_at(2, opt, 4) == pytest.approx(1e-4 + 0.9e-3 / 2, **ULPS)


def test_warmup_as_long_as_the_run_does_not_divide_by_zero():
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=5, decay="cosine")
    assert [lr_at(s, opt, 5) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0], **ULPS)
    assert lr_at(6, opt, 5) == 0.1  # the decay span clamps to one step instead of dividing by zero


# The deepspeed engine (the default), 1 rank: both engines call the same lr_at(step, cfg.optim,
# cfg.train.max_steps) before each step. test_train_e2e's kill-and-resume test checks, for both engines, that a
# run resumed with the same max_steps logs bit-for-bit the LR of an uninterrupted one.
SCHED = ["train.max_steps=6", "train.save_every=3", "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=2"]
OPT = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2)


def _lrs(run_dir) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in metrics(run_dir)}


def test_lr_after_a_kill_and_a_resume_with_a_new_max_steps(tmp_path):
    rd = tmp_path / "run"
    killed = train(rd, *SCHED, check=False, MEGACCA_TEST_KILL_AFTER_STEP=4)
    assert killed.returncode != 0
    assert (rd / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    first = _lrs(rd)
    # metrics.jsonl step s is the s-th optimizer step, which used lr_at(s - 1); JSON keeps floats exact.
    assert first == {s: lr_at(s - 1, OPT, 6) for s in range(1, 5)}
    assert first[1] == pytest.approx(1e-3, **ULPS) and first[2] == pytest.approx(2e-3, **ULPS)
    assert first[4] == pytest.approx(2e-4 + 1.8e-3 * (1 + math.cos(math.pi * 1 / 4)) / 2, **ULPS)

    # Resumed from step 3 as a longer run: the schedule of the new max_steps applies from the first resumed
    # step on (no saved scheduler state pins the old one), and the steps before the checkpoint keep their LR.
    train(rd, *SCHED[1:], "train.max_steps=9")
    b = _lrs(rd)
    assert sorted(b) == list(range(1, 10))
    assert {s: b[s] for s in (1, 2, 3)} == {s: first[s] for s in (1, 2, 3)}
    assert {s: b[s] for s in range(4, 10)} == {s: lr_at(s - 1, OPT, 9) for s in range(4, 10)}
    assert b[4] == pytest.approx(2e-4 + 1.8e-3 * (1 + math.cos(math.pi * 1 / 7)) / 2, **ULPS)
    assert b[4] > first[4]  # the old schedule (max_steps 6) had decayed further by then
    assert b[9] == pytest.approx(2e-4 + 1.8e-3 * (1 + math.cos(math.pi * 6 / 7)) / 2, **ULPS)
