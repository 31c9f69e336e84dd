"""`train.init_from` and the one checkpoint reader (megacca.checkpoint): a checkpoint saved by either engine at
any layout loads at another with the same logits, and the single-process full state dict agrees with
DeepSpeed's own ZeRO consolidation.

Tolerances: fp32 logits of size ~1; tp splits the matmul reductions, so layouts agree to a few ulps (observed
~2e-7); atol=rtol=1e-5 as in tests/test_parallel.py. The full state dict is compared exactly: it is the same
fp32 numbers read back, not recomputed.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, losses, run, torchrun, train

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("init_from")
    train(d / "tp2", "parallel.engine=megatron", "parallel.tp=2", "train.max_steps=2", "train.tensorboard=false",
          nproc=2)
    train(d / "z3", "parallel.zero_stage=3", "train.max_steps=2", "train.tensorboard=false", nproc=2)
    return d


def _logits(runs, ckpt, nproc, tp, *mode) -> torch.Tensor:
    out = runs / f"logits_{ckpt.name}_{tp}{''.join(mode)}.safetensors"
    torchrun(nproc, "tests/init_worker.py", ckpt, out, tp, *mode)
    return load_file(str(out))["logits"]


def test_megatron_tp2_checkpoint_loads_at_tp1_and_in_one_process(runs):
    at_tp2 = _logits(runs, runs / "tp2", 2, 2)
    torch.testing.assert_close(_logits(runs, runs / "tp2", 1, 1), at_tp2, **TOL)
    torch.testing.assert_close(_logits(runs, runs / "tp2", 1, 1, "full"), at_tp2, **TOL)


def test_zero3_checkpoint_equals_deepspeed_consolidation_and_loads_at_tp2(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megacca.checkpoint import read_full_state_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(runs / "z3")
    ours = read_full_state_dict(runs / "z3")
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "engine"), tag="deepspeed")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    torch.testing.assert_close(_logits(runs, runs / "z3", 2, 2), _logits(runs, runs / "z3", 1, 1, "full"), **TOL)


def test_init_from_runs_start_from_the_same_weights_on_either_engine(runs):
    # lr 0: step 1's loss is the starting model's loss on the first batch, the same data at any layout.
    common = ("train.max_steps=1", "optim.lr=0", "optim.min_lr=0", "train.tensorboard=false",
              f"train.init_from={runs / 'tp2'}")
    train(runs / "from_tp2_ds", *common)
    train(runs / "from_tp2_mg", *common, "parallel.engine=megatron", "parallel.tp=2", nproc=2)
    a, b = losses(runs / "from_tp2_ds")[1], losses(runs / "from_tp2_mg")[1]
    assert abs(a - b) <= 1e-5 * abs(a)
    fresh = losses(runs / "tp2")[1]  # the same data from the untrained init: init_from really changed the weights
    assert abs(a - fresh) > 1e-3


def test_init_from_mismatch_exits_2_naming_both_sides(runs, tmp_path):
    r = run([PY, "-m", "megacca", "config", "configs/pretrain/debug.yaml", f"train.init_from={runs / 'tp2'}",
             "model.num_layers=3"], check=False)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "train.init_from" in line and "model.num_layers=2" in line and "model.num_layers=3" in line
    r = run([PY, "-m", "megacca", "config", "configs/pretrain/debug.yaml", f"train.init_from={tmp_path}"], check=False)
    assert r.returncode == 2 and "train.init_from" in r.stderr and str(tmp_path) in r.stderr
