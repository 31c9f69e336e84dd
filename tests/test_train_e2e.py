"""The real entry point (`bash launch/pretrain.sh`) end to end: files written, dp/ZeRO equivalence, exact resume.

Loss tolerances: fp32 on CPU. Runs that split the same global batch differently (dp=2 vs accumulation, ZeRO
partitions) reduce gradients in a different order, so per-step losses agree to ~1e-7 relative, and Adam
carries the difference through 3 steps without amplifying it past 1e-6 here; 1e-5 absolute on a loss of ~6
catches any real error (a dropped micro-batch or a wrong scaling moves the loss by >1e-3). Kill-and-resume
repeats the very same computation, so it is held to the issue's 1e-6.
"""
from __future__ import annotations


import pytest

from conftest import losses, metrics, train

GB = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=3", "train.save_every=0"]


def test_pulse_two_ranks_tp2(tmp_path):
    """A 2-step run of the real launcher with 2 ranks and tp=2 writes everything a run should."""
    rd = tmp_path / "run"
    p = train(rd, "parallel.tp=2", "train.max_steps=2", "train.save_every=1", nproc=2, launcher="deepspeed")
    m = metrics(rd)
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert "step      2 | loss" in p.stdout
    assert (rd / "config.yaml").is_file() and "tp: 2" in (rd / "config.yaml").read_text()
    assert list((rd / "tensorboard").rglob("events.out.tfevents.*"))
    ck = rd / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (ck / "step_00000002" / "engine" / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, global batch 8 as 2 accumulated micro-batches of 4: {step: metrics record}."""
    rd = tmp_path_factory.mktemp("ref") / "run"
    train(rd, *GB)
    return {m["step"]: m for m in metrics(rd)}


def _matches_reference(rd, reference: dict) -> None:
    """Same losses and the same logged grad_norm (before clipping) at every step as the one-rank run.

    grad_norm: every rank's gradient part enters one global norm. The gradients agree to ~1e-7 relative, and so
    does the norm (observed <= 2e-7); 1e-6 relative catches a replicated parameter counted twice under tp (the
    norm weights alone move it by more) or a ZeRO partition left out of the norm (>= 1e-2)."""
    got = {m["step"]: m for m in metrics(rd)}
    assert got.keys() == reference.keys()
    for s, ref in reference.items():
        assert abs(got[s]["loss"] - ref["loss"]) < 1e-5, (s, got[s]["loss"], ref["loss"])
        assert got[s]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6, abs=0), (s, got[s], ref)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_deepspeed_dp2_zero_matches_dp1(tmp_path, reference, zero):
    rd = tmp_path / "run"
    train(rd, *GB, f"parallel.zero_stage={zero}", nproc=2)
    _matches_reference(rd, reference)


def test_megatron_dp2_distributed_optimizer_matches_dp1(tmp_path, reference):
    rd = tmp_path / "run"
    train(rd, *GB, "parallel.engine=megatron", "parallel.zero_stage=1", nproc=2)
    _matches_reference(rd, reference)


def test_deepspeed_tp2_matches_tp1(tmp_path, reference):
    rd = tmp_path / "run"
    train(rd, *GB, "parallel.tp=2", nproc=2)
    _matches_reference(rd, reference)


RESUME = ["train.max_steps=6", "train.save_every=3"]


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_sigkill_and_resume_repeats_losses(tmp_path, engine):
    opts = [*RESUME, f"parallel.engine={engine}", f"parallel.zero_stage={1 if engine == 'megatron' else 2}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, *opts)
    killed = train(cut, *opts, check=False, MEGACCA_TEST_KILL_AFTER_STEP=4)
    assert killed.returncode != 0  # really killed after step 4 ...
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    p = train(cut, *opts)  # ... and resumed from step 3
    assert "resumed from" in p.stdout + p.stderr
    a, b = losses(full), losses(cut)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl has one record per step after the resume
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    # The LR is a pure function of the step (no scheduler state): bit-for-bit the uninterrupted run's.
    assert {m["step"]: m["lr"] for m in metrics(cut)} == {m["step"]: m["lr"] for m in metrics(full)}


@pytest.mark.parametrize("layout", [["parallel.engine=megatron", "parallel.pp=2", "train.global_batch_size=4"],
                                    ["parallel.engine=deepspeed", "parallel.zero_stage=3"]],
                         ids=["megatron-pp2", "deepspeed-dp2-zero3"])
def test_sigkill_and_resume_two_ranks(tmp_path, layout):
    """Pipeline stages and data-parallel ranks each save and restore their own part (state, data position)."""
    opts = [*RESUME, "train.micro_batch_size=2", *layout]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, *opts, nproc=2)
    assert train(cut, *opts, nproc=2, check=False, MEGACCA_TEST_KILL_AFTER_STEP=4).returncode != 0
    train(cut, *opts, nproc=2)
    a, b = losses(full), losses(cut)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    rd = tmp_path / "run"
    killed = train(rd, *RESUME, check=False, MEGACCA_TEST_KILL_IN_SAVE=6)
    assert killed.returncode != 0
    ck = rd / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert not (ck / "step_00000006").exists()  # the half-published save is invisible
    train(rd, *RESUME)
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert not list(ck.glob(".tmp-*"))


@pytest.mark.parametrize("override,key", [
    ("parallel.tp=3", "parallel.tp"),
    ("model.num_attention_heads=5", "model.hidden_size"),
    ("parallel.pp=2", "parallel.pp"),
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.max_steps=abc", "train.max_steps"),
    ("parallel.engine=fsdp", "parallel.engine"),
])
def test_config_errors_exit_2_naming_the_key(tmp_path, override, key):
    p = train(tmp_path / "run", override, nproc=1, check=False)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("megacca: config error:")]
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_bare_megacca_train_starts_the_ranks_a_layout_needs(tmp_path):
    """`megacca train CONFIG parallel.tp=2` without a launcher runs 2 ranks itself (the issue's own example)."""
    from conftest import PY, run

    rd = tmp_path / "run"
    p = run([PY, "-m", "megacca", "train", "configs/pretrain/debug.yaml", f"train.run_dir={rd}", "train.max_steps=2",
             "parallel.tp=2", "train.save_every=0"])
    assert "starting 2 ranks" in p.stderr
    assert [m["step"] for m in metrics(rd)] == [1, 2]
    assert sorted(x.name for x in (rd / "checkpoints" / "step_00000002" / "engine" / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]


def test_world_size_not_divisible(tmp_path):
    p = train(tmp_path / "run", "parallel.tp=2", nproc=3, check=False)
    assert p.returncode == 2 and "world size 3 is not divisible by tp*pp=2" in p.stderr
