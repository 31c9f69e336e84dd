"""Alignment losses over per-sequence summed log-probs: CCA (Chen et al., ICLR 2025) and the DPO family.

Each loss comes in two forms with one formula between them:
- `cca_loss_rows` / `dpo_loss_rows` return the loss and every metric per row ([B] tensors). The engines sum
  these over the global batch (all micro-batches and data-parallel ranks) and divide by its row count, so the
  gradient does not depend on how the batch is split (docs/decisions.md, "Loss normalised over the global
  batch").
- `cca_loss` / `dpo_loss` are their means over the rows given: `(loss, metrics)` with a 0-d differentiable
  loss and a dict of 0-d detached metrics.

Inputs are 1-D tensors of summed log-probs, one entry per row. Length normalisation (dividing by the number
of response tokens, as TRL does for `ipo` and SimPO does for its rewards) is never done here: it is a config
flag the caller applies to the log-probs before calling. Half-precision inputs are computed in float32, since
summed log-probs of hundreds of tokens lose their differences in bf16.

Metric keys (the names `metrics.jsonl` and TensorBoard log): `rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`, and for CCA `pos_like_frac`.
Rewards are β·(policy − reference) as in TRL's DPOTrainer (β·policy for the reference-free `simpo`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_KINDS = ("sigmoid", "ipo", "hinge", "nca", "simpo")
_SMOOTHED_KINDS = ("sigmoid", "simpo")  # the kinds whose TRL definition has a label_smoothing term

Tensor = torch.Tensor


def _compute_dtype(*xs: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _check_rows(names: tuple[str, ...], xs: tuple[Tensor, ...]) -> int:
    for name, x in zip(names, xs):
        if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
            desc = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 1-D float tensor of per-sequence log-probs, got {desc}")
    n = xs[0].shape[0]
    for name, x in zip(names, xs):
        if x.shape[0] != n:
            raise ValueError(f"{name} has {x.shape[0]} rows but {names[0]} has {n}")
    return n


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor,
                    policy_rejected: Tensor) -> dict[str, Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


def _mean(rows: Tensor, metrics: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    if rows.shape[0] == 0:
        raise ValueError("an alignment loss needs at least one row; got an empty batch")
    return rows.mean(), {k: v.mean() for k, v in metrics.items()}


def cca_loss_rows(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor, *, beta: float,
                  lam: float, pos_like: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row Condition Contrastive Alignment loss and metrics; `cca_loss` is their mean.

    Row i holds log p(x_i | c_i) (`*_pos`) and log p(x_i | c_neg_i) (`*_neg`). With Δ = policy − ref,

        row_i = ( −log σ(β·Δ⁺_i) + w_i · (−log σ(s_i·β·Δ⁻_i)) ) / max(λ, 1)

    with w = λ, s = −1 for a true negative, and w = 1, s = +1 where `pos_like` is set (the unconditional
    rows, and rows whose negative condition equals their own). Its mean over rows is exactly the loss of the
    official implementation, thu-ml/CCA `LlamaGen_finetune.py` (`loss_type == "CCA"`, `uncond_ratio > 0`):
    `-logsigmoid(gap*β).mean() - (mixed_weight * logsigmoid((2*neg_weight-1) * neg_gap * β)).mean()`, divided
    by `max(lambda_, 1)`. (That script logs unscaled Δ as rewards; here they are β·Δ, as TRL logs them.)
    """
    names = ("policy_pos", "policy_neg", "ref_pos", "ref_neg")
    n = _check_rows(names, (policy_pos, policy_neg, ref_pos, ref_neg))
    if not beta > 0:
        raise ValueError(f"cca_loss: beta must be > 0, got {beta}")
    if not lam >= 0:
        raise ValueError(f"cca_loss: lam must be >= 0, got {lam}")
    dtype = _compute_dtype(policy_pos, policy_neg, ref_pos, ref_neg)
    policy_pos, policy_neg = policy_pos.to(dtype), policy_neg.to(dtype)
    delta_pos = policy_pos - ref_pos.to(dtype)
    delta_neg = policy_neg - ref_neg.to(dtype)
    if pos_like is None:
        pos_like = torch.zeros(n, dtype=torch.bool, device=policy_pos.device)
    elif pos_like.dtype != torch.bool or pos_like.shape != (n,):
        raise ValueError(f"pos_like must be a bool tensor of shape ({n},), got {pos_like.dtype} "
                         f"{tuple(pos_like.shape)}")
    pos_like = pos_like.to(policy_pos.device)
    weight = torch.where(pos_like, 1.0, float(lam)).to(dtype)
    sign = torch.where(pos_like, 1.0, -1.0).to(dtype)
    rows = (-F.logsigmoid(beta * delta_pos) - weight * F.logsigmoid(sign * beta * delta_neg)) / max(lam, 1.0)
    metrics = _reward_metrics(beta * delta_pos, beta * delta_neg, policy_pos, policy_neg)
    metrics["pos_like_frac"] = pos_like.to(dtype)
    return rows, metrics


def cca_loss(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor, *, beta: float,
             lam: float, pos_like: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CCA loss (mean over rows) and metrics; see `cca_loss_rows` for the formula.

    At policy == reference it is log 2 · (1 + f + (1 − f)·λ) / max(λ, 1), f the positive-like fraction.
    """
    return _mean(*cca_loss_rows(policy_pos, policy_neg, ref_pos, ref_neg, beta=beta, lam=lam,
                                pos_like=pos_like))


def dpo_loss_rows(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None,
                  ref_rejected: Tensor | None, *, beta: float, kind: str = "sigmoid",
                  label_smoothing: float = 0.0, gamma: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row preference loss and metrics; `dpo_loss` is their mean.

    With h = (πc − πr) − (rc − rr), the summed policy (π) and reference (r) log-probs of the chosen (c) and
    rejected (r) responses, and ε = `label_smoothing`:
    - `sigmoid`: −(1−ε)·log σ(βh) − ε·log σ(−βh); DPO, and conservative DPO (cDPO) when ε > 0.
    - `ipo`: (h − 1/(2β))².
    - `hinge`: relu(1 − βh) (SLiC).
    - `nca`: −log σ(β(πc−rc)) − ½·log σ(−β(πc−rc)) − ½·log σ(−β(πr−rr)).
    - `simpo`: reference-free; with m = β(πc − πr) − γ, −(1−ε)·log σ(m) − ε·log σ(−m). `ref_*` are ignored and
      may be None; rewards are β·π.
    `sigmoid`, `ipo`, `hinge` and `nca` match TRL's `DPOTrainer.dpo_loss` (huggingface/trl,
    trl/trainer/dpo_trainer.py, loss types "sigmoid", "ipo", "hinge", "nca_pair"); `simpo` matches TRL's
    `CPOTrainer.cpo_loss` with `loss_type="simpo"` (trl/experimental/cpo/cpo_trainer.py: logits =
    πc − πr − simpo_gamma/β), without CPO's optional NLL term (`cpo_alpha`). TRL length-normalises the log-probs
    for `ipo` and `simpo`; here that is the caller's flag, so pass per-token means to reproduce TRL.
    A `label_smoothing` on a kind without that term, or a `gamma` on a kind other than `simpo`, is a
    ValueError rather than silently ignored.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo_loss: unknown kind {kind!r}; valid kinds are {', '.join(DPO_KINDS)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and kind not in _SMOOTHED_KINDS:
        raise ValueError(f"dpo_loss: label_smoothing applies only to kinds {', '.join(_SMOOTHED_KINDS)}, "
                         f"not {kind!r}")
    if gamma and kind != "simpo":
        raise ValueError(f"dpo_loss: gamma (the target margin) applies only to kind 'simpo', not {kind!r}")

    if kind == "simpo":
        _check_rows(("policy_chosen", "policy_rejected"), (policy_chosen, policy_rejected))
        dtype = _compute_dtype(policy_chosen, policy_rejected)
        pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
        m = chosen_rewards - rejected_rewards - gamma
        rows = -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)
        return rows, _reward_metrics(chosen_rewards, rejected_rewards, pc, pr)

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"dpo_loss: kind {kind!r} needs ref_chosen and ref_rejected (only 'simpo' is "
                         "reference-free)")
    _check_rows(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
                (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    dtype = _compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    delta_chosen = pc - ref_chosen.to(dtype)
    delta_rejected = pr - ref_rejected.to(dtype)
    h = delta_chosen - delta_rejected
    if kind == "sigmoid":
        rows = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        rows = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        rows = torch.relu(1 - beta * h)
    else:  # nca
        rc, rr = beta * delta_chosen, beta * delta_rejected
        rows = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return rows, _reward_metrics(beta * delta_chosen, beta * delta_rejected, pc, pr)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None,
             ref_rejected: Tensor | None, *, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference loss (mean over rows) and metrics; see `dpo_loss_rows` for the kinds and their sources."""
    return _mean(*dpo_loss_rows(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, kind=kind,
                                label_smoothing=label_smoothing, gamma=gamma))
