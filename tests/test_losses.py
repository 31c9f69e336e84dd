"""Alignment losses: exact values against independent float64 math, the CCA closed form at the reference,
gradient signs and values, the rows form against the mean form, and input errors."""
from __future__ import annotations

import math

import pytest
import torch

from megacca.losses import DPO_KINDS, cca_loss, cca_loss_rows, dpo_loss, dpo_loss_rows

# Tensors below are float64 and the expected values are computed in float64 Python arithmetic in a different
# order, so the two differ only by rounding: a few ulps of values of order 1-100, far below 1e-12.
TOL = 1e-12

METRIC_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected"}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def mean(xs) -> float:
    return sum(xs) / len(xs)


def t(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# Four rows of summed log-probs of a few hundred tokens; Δ spans both signs so every branch is exercised.
PC = [-120.0, -95.5, -210.25, -60.0]
PR = [-130.0, -90.0, -200.0, -75.5]
RC = [-125.0, -97.0, -205.0, -61.0]
RR = [-128.0, -93.5, -199.0, -70.0]
BETA = 0.1


def approx(a: torch.Tensor, b: float) -> bool:
    return abs(float(a) - b) <= TOL * max(1.0, abs(b))


def reward_metrics(chosen_rewards, rejected_rewards, pc, pr) -> dict[str, float]:
    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean([a - b for a, b in zip(chosen_rewards, rejected_rewards)]),
        "rewards/accuracies": mean([1.0 if a > b else 0.0 for a, b in zip(chosen_rewards, rejected_rewards)]),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }


def assert_metrics(got: dict[str, torch.Tensor], want: dict[str, float]):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dim() == 0 and not got[k].requires_grad, k
        assert approx(got[k], v), (k, float(got[k]), v)


# ---------------------------------------------------------------------------------------------------- CCA

def cca_expected(pp, pn, rp, rn, beta, lam, pos_like):
    rows = []
    for a, b, c, d, like in zip(pp, pn, rp, rn, pos_like):
        dp, dn = a - c, b - d
        neg = -log_sigmoid(beta * dn) if like else -lam * log_sigmoid(-beta * dn)
        rows.append((-log_sigmoid(beta * dp) + neg) / max(lam, 1.0))
    return rows


@pytest.mark.parametrize("lam", [1000.0, 3.0, 0.5])
def test_cca_exact_values_and_metrics(lam):
    pos_like = [False, True, False, True]
    loss, metrics = cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=lam, pos_like=torch.tensor(pos_like))
    assert loss.dim() == 0
    assert approx(loss, mean(cca_expected(PC, PR, RC, RR, BETA, lam, pos_like)))
    want = reward_metrics([BETA * (a - b) for a, b in zip(PC, RC)], [BETA * (a - b) for a, b in zip(PR, RR)],
                          PC, PR)
    want["pos_like_frac"] = 0.5
    assert_metrics(metrics, want)


def test_cca_pos_like_none_is_all_negatives():
    a, _ = cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=7.0)
    b, m = cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=7.0, pos_like=torch.zeros(4, dtype=torch.bool))
    assert approx(a, mean(cca_expected(PC, PR, RC, RR, BETA, 7.0, [False] * 4)))
    assert torch.equal(a, b) and float(m["pos_like_frac"]) == 0.0


@pytest.mark.parametrize("lam", [1000.0, 300.0, 1.0, 0.25])
@pytest.mark.parametrize("n_like", [0, 1, 3, 8])
def test_cca_at_reference_equals_closed_form(lam, n_like):
    g = torch.Generator().manual_seed(n_like)
    logps = -torch.rand(8, generator=g, dtype=torch.float64) * 500
    logps_neg = -torch.rand(8, generator=g, dtype=torch.float64) * 500
    pos_like = torch.arange(8) < n_like
    loss, metrics = cca_loss(logps, logps_neg, logps.clone(), logps_neg.clone(), beta=0.02, lam=lam,
                             pos_like=pos_like)
    f = n_like / 8
    assert float(metrics["pos_like_frac"]) == f
    assert approx(loss, math.log(2) * (1 + f + (1 - f) * lam) / max(lam, 1.0))
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


def test_cca_gradient_signs_and_values():
    pos_like = torch.tensor([False, True, False, True])
    pp, pn = t(PC).requires_grad_(), t(PR).requires_grad_()
    lam = 10.0
    loss, _ = cca_loss(pp, pn, t(RC), t(RR), beta=BETA, lam=lam, pos_like=pos_like)
    loss.backward()
    # CCA raises log p(x|c) on every row ...
    assert (pp.grad < 0).all()
    # ... lowers log p(x|c_neg) for true negatives, and raises it for positive-like rows.
    assert (pn.grad[~pos_like] > 0).all() and (pn.grad[pos_like] < 0).all()
    # d/dΔ of −log σ(s·β·Δ) is −s·β·σ(−s·β·Δ); each row carries 1/B of the mean and 1/max(λ, 1).
    n = len(PC)
    for i, like in enumerate(pos_like.tolist()):
        dp, dn = PC[i] - RC[i], PR[i] - RR[i]
        want_pos = -BETA * sigmoid(-BETA * dp) / (n * lam)
        want_neg = (-BETA * sigmoid(-BETA * dn) if like else lam * BETA * sigmoid(BETA * dn)) / (n * lam)
        assert approx(pp.grad[i], want_pos) and approx(pn.grad[i], want_neg)


def test_cca_rows_mean_is_mean_form():
    pos_like = torch.tensor([True, False, False, False])
    rows, row_metrics = cca_loss_rows(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=300.0, pos_like=pos_like)
    loss, metrics = cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=300.0, pos_like=pos_like)
    assert rows.shape == (4,) and set(row_metrics) == set(metrics) == METRIC_KEYS | {"pos_like_frac"}
    assert torch.equal(rows.mean(), loss)
    for k in metrics:
        assert row_metrics[k].shape == (4,) and torch.equal(row_metrics[k].mean(), metrics[k]), k
    for i, want in enumerate(cca_expected(PC, PR, RC, RR, BETA, 300.0, pos_like.tolist())):
        assert approx(rows[i], want)


def test_cca_stable_at_extreme_margins():
    # β·Δ = ∓1000: a naive log(sigmoid(x)) underflows to -inf in float32; logsigmoid gives the exact 1000.
    z = torch.zeros(1)
    loss, _ = cca_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]), z, z, beta=1.0, lam=1.0)
    assert torch.isfinite(loss) and abs(float(loss) - 2000.0) < 1e-3  # float32 ulp at 2000 is 1.2e-4


def test_half_precision_inputs_compute_in_float32():
    bf = torch.tensor(PC, dtype=torch.bfloat16).requires_grad_()
    loss, metrics = cca_loss(bf, t(PR).bfloat16(), t(RC).bfloat16(), t(RR).bfloat16(), beta=BETA, lam=3.0)
    assert loss.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32
    loss.backward()
    assert bf.grad is not None and (bf.grad < 0).all()


# ---------------------------------------------------------------------------------------------------- DPO

def dpo_expected(kind, pc, pr, rc, rr, beta, eps=0.0, gamma=0.0):
    rows = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - b) - (c - d)
        if kind == "sigmoid":
            rows.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
        elif kind == "ipo":
            rows.append((h - 1 / (2 * beta)) ** 2)
        elif kind == "hinge":
            rows.append(max(0.0, 1 - beta * h))
        elif kind == "nca":
            x, y = beta * (a - c), beta * (b - d)
            rows.append(-log_sigmoid(x) - 0.5 * log_sigmoid(-x) - 0.5 * log_sigmoid(-y))
        elif kind == "simpo":
            m = beta * (a - b) - gamma
            rows.append(-(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m))
    return rows


CASES = [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0), ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0),
         ("nca", 0.0, 0.0), ("simpo", 0.0, 0.0), ("simpo", 0.0, 0.5), ("simpo", 0.2, 1.5)]


@pytest.mark.parametrize("kind,eps,gamma", CASES)
def test_dpo_exact_values_and_metrics(kind, eps, gamma):
    assert {c[0] for c in CASES} == set(DPO_KINDS)
    loss, metrics = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, kind=kind, label_smoothing=eps, gamma=gamma)
    rows = dpo_expected(kind, PC, PR, RC, RR, BETA, eps, gamma)
    assert loss.dim() == 0 and loss.requires_grad is False  # no input requires grad here
    assert approx(loss, mean(rows))
    if kind == "simpo":
        want = reward_metrics([BETA * a for a in PC], [BETA * b for b in PR], PC, PR)
    else:
        want = reward_metrics([BETA * (a - c) for a, c in zip(PC, RC)], [BETA * (b - d) for b, d in zip(PR, RR)],
                              PC, PR)
    assert_metrics(metrics, want)


def test_dpo_hinge_clips_and_ipo_targets_half_inverse_beta():
    # Row 0 has βh = 2 > 1 (hinge is 0 there); ipo is exactly 0 at h = 1/(2β).
    pc, pr, rc, rr = t([0.0, 0.0]), t([-20.0, -5.0]), t([0.0, 0.0]), t([0.0, 0.0])
    rows, _ = dpo_loss_rows(pc, pr, rc, rr, beta=BETA, kind="hinge")
    assert float(rows[0]) == 0.0 and approx(rows[1], 0.5)
    rows, _ = dpo_loss_rows(pc, pr, rc, rr, beta=BETA, kind="ipo")
    assert float(rows[1]) == 0.0 and approx(rows[0], 15.0 ** 2)


def test_conservative_dpo_is_the_smoothed_mixture():
    eps = 0.25
    plain, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA)
    flipped, _ = dpo_loss(t(PR), t(PC), t(RR), t(RC), beta=BETA)  # chosen and rejected swapped: h -> -h
    smoothed, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, label_smoothing=eps)
    assert approx(smoothed, float((1 - eps) * plain + eps * flipped))


def test_simpo_ignores_reference():
    a, ma = dpo_loss(t(PC), t(PR), None, None, beta=2.0, kind="simpo", gamma=0.5)
    b, mb = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=2.0, kind="simpo", gamma=0.5)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("kind", DPO_KINDS)
def test_dpo_gradient_signs(kind):
    # At the reference (h = 0) every kind raises the chosen log-prob and lowers the rejected one.
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    loss, _ = dpo_loss(pc, pr, t(PC), t(PR), beta=BETA, kind=kind)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("kind,eps,gamma", CASES)
def test_dpo_rows_mean_is_mean_form(kind, eps, gamma):
    kw = dict(beta=BETA, kind=kind, label_smoothing=eps, gamma=gamma)
    rows, row_metrics = dpo_loss_rows(t(PC), t(PR), t(RC), t(RR), **kw)
    loss, metrics = dpo_loss(t(PC), t(PR), t(RC), t(RR), **kw)
    assert rows.shape == (4,) and set(row_metrics) == set(metrics) == METRIC_KEYS
    assert torch.equal(rows.mean(), loss)
    for k in metrics:
        assert row_metrics[k].shape == (4,) and torch.equal(row_metrics[k].mean(), metrics[k]), k
    for i, want in enumerate(dpo_expected(kind, PC, PR, RC, RR, BETA, eps, gamma)):
        assert approx(rows[i], want)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_bad_kind_names_the_valid_kinds():
    with pytest.raises(ValueError, match="unknown kind 'kto'.*sigmoid, ipo, hinge, nca, simpo"):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, kind="kto")


@pytest.mark.parametrize("call,match", [
    (lambda: dpo_loss(t(PC), t(PR), None, None, beta=BETA), "needs ref_chosen"),
    (lambda: dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, kind="ipo", label_smoothing=0.1), "label_smoothing"),
    (lambda: dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, label_smoothing=0.7), r"\[0, 0.5\]"),
    (lambda: dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, gamma=1.0), "gamma"),
    (lambda: dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.0), "beta must be > 0"),
    (lambda: dpo_loss(t(PC), t(PR[:3]), t(RC), t(RR), beta=BETA), "policy_rejected has 3 rows"),
    (lambda: dpo_loss(t(PC)[None], t(PR), t(RC), t(RR), beta=BETA), "policy_chosen must be a 1-D"),
    (lambda: dpo_loss(t([]), t([]), t([]), t([]), beta=BETA), "at least one row"),
    (lambda: cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=1.0, pos_like=torch.ones(4)), "pos_like"),
    (lambda: cca_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, lam=-1.0), "lam must be >= 0"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("length_normalize", [False, True])
def test_rpo_adds_alpha_times_chosen_token_mean_nll(length_normalize):
    """`align.rpo_alpha` (DPOLoss, the stage's loss): each pair's loss is DPO's plus α x the chosen row's NLL
    divided by its scored tokens, taken before any length normalisation; the rejected rows add nothing."""
    from megacca.config import AlignConfig
    from megacca.stages.align import DPOLoss

    # 2 pairs -> rows [chosen0, chosen1, rejected0, rejected1]; per-token NLLs over 5 positions, masks of
    # different lengths so a per-row token count matters.
    nll = t([[9.0, 0.5, 1.0, 2.0, 0.25], [9.0, 1.5, 0.5, 7.0, 7.0], [9.0, 2.0, 2.0, 1.0, 3.0],
             [9.0, 0.75, 0.25, 7.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    ref = t([-4.0, -1.5, -7.5, -1.25])
    mb = {"loss_mask": mask, "ref_logps": ref}
    sums = [-(0.5 + 1.0 + 2.0 + 0.25), -(1.5 + 0.5), -(2.0 + 2.0 + 1.0 + 3.0), -(0.75 + 0.25)]
    counts = [4, 2, 4, 2]
    alpha, beta = 0.7, 0.1
    plain, _ = DPOLoss(AlignConfig(beta=beta, length_normalize=length_normalize))(mb, nll)
    rpo, metrics = DPOLoss(AlignConfig(beta=beta, length_normalize=length_normalize, rpo_alpha=alpha))(mb, nll)
    lp = [s / n for s, n in zip(sums, counts)] if length_normalize else sums
    rf = [r / n for r, n in zip(ref.tolist(), counts)] if length_normalize else ref.tolist()
    dpo = [-log_sigmoid(beta * ((lp[i] - rf[i]) - (lp[i + 2] - rf[i + 2]))) for i in range(2)]
    # The stage sums log-probs in float32 (megacca.model.gpt.summed_logprobs), as in training: values of order
    # 1-10 agree with the float64 arithmetic here to float32 rounding, ~1e-7; a wrong term or count moves them >0.1.
    assert abs(plain.item() - sum(dpo)) < 1e-6
    expected = sum(dpo) + alpha * (-sums[0] / counts[0] - sums[1] / counts[1])
    assert abs(rpo.item() - expected) < 1e-6
    assert set(metrics) == METRIC_KEYS  # the same metrics as plain DPO


def test_rpo_alpha_is_checked(tmp_path):
    from megacca.config import ConfigError, load_config
    from megacca.tokenizer.vocab import UnifiedVocab

    # the digits configs name data/digits/vocab.json, which a fresh clone has not built: a stand-in vocabulary
    UnifiedVocab.build(None, 64, (4, 4), [str(k) for k in range(10)]).save(str(tmp_path / "vocab.json"))
    vocab = f"data.vocab={tmp_path / 'vocab.json'}"
    with pytest.raises(ConfigError, match=r"align\.rpo_alpha.*>= 0"):
        load_config("configs/dpo/digits_captions.yaml", [vocab, "align.rpo_alpha=-1"])
    with pytest.raises(ConfigError, match=r"align\.rpo_alpha.*cca"):
        load_config("configs/cca/digits.yaml", [vocab, "align.rpo_alpha=1"])
