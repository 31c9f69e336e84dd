"""The alignment seam of both engines: CCA loss, reward metrics and gradient norms at tp=2, pp=2 (megatron) and
2-rank ZeRO-3 (DeepSpeed) equal one rank on the same global batch; a precomputed reference equals the reference
model; the policy moves the way CCA says (tests/align_worker.py runs each layout under torchrun).

Tolerances: fp32. The loss and metrics are means of summed log-probs over ~100 tokens (|log p| ~ 100); tp and
ZeRO change the order of partial sums, which moves a summed log-prob by a few ulps of 100 (~1e-5 absolute)
and β·Δ by β times that. rtol 1e-5 / atol 1e-4 on log-probs (atol 2e-5 on the O(1) loss and rewards) is that
margin; a wrong shard, a missed all-reduce or a mis-normalised mean moves them by 1e-2 or more.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import torchrun

W = "tests/align_worker.py"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    torchrun(1, W, "deepspeed", d, 1, 1, 0, "model")  # also writes ref_ckpt / policy_ckpt
    return d


def _steps(d, tag):
    return json.loads((d / f"{tag}.json").read_text())


def _close(got: dict, ref: dict):
    for a, b in zip(got["steps"], ref["steps"]):
        assert a.keys() == b.keys()
        for k in a:
            tol = dict(atol=1e-4, rtol=1e-5) if k.startswith("logps") or k == "grad_norm" else dict(atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(torch.tensor(a[k], dtype=torch.float64), torch.tensor(b[k], dtype=torch.float64),
                                       **tol, msg=lambda m: f"{k}: {m}")


def test_one_rank_cca_moves_policy_the_right_way(out):
    ref = _steps(out, "deepspeed_tp1pp1z0dp1_model")
    s1, s2 = ref["steps"]
    assert s1["units"] == 4 and s1["pos_like_frac"] == 0.25
    # What CCA promises: after one update the positives gained reward relative to the negatives.
    assert s2["rewards/margins"] > s1["rewards/margins"] + 1.0
    assert s2["loss"] < s1["loss"]
    assert all(math.isfinite(v) for v in s1.values())


@pytest.mark.parametrize("engine,nproc,tp,pp,zero", [
    ("megatron", 1, 1, 1, 0),   # the other engine, one rank
    ("megatron", 2, 2, 1, 0),   # tensor parallel
    ("megatron", 2, 1, 2, 0),   # pipeline: the reference runs a forward-only pipeline pass
    ("deepspeed", 2, 1, 1, 3),  # 2 data-parallel ranks, ZeRO-3 (the reference is partitioned too)
])
def test_layout_equals_one_rank(out, engine, nproc, tp, pp, zero):
    torchrun(nproc, W, engine, out, tp, pp, zero, "model")
    dp = nproc // (tp * pp)
    _close(_steps(out, f"{engine}_tp{tp}pp{pp}z{zero}dp{dp}_model"), _steps(out, "deepspeed_tp1pp1z0dp1_model"))


def test_precomputed_reference_equals_reference_model(out):
    torchrun(1, W, "deepspeed", out, 1, 1, 0, "precomputed")
    got, ref = _steps(out, "deepspeed_tp1pp1z0dp1_precomputed"), _steps(out, "deepspeed_tp1pp1z0dp1_model")
    # Same pairs, same reference log-probs (as numbers instead of a model): the same losses to the last bit.
    assert got["steps"] == ref["steps"]
