"""The alignment stages, CCA and DPO: a policy trained against a frozen reference on pairs of sequences.

Both stages are the generic trainer with an alignment data source and a pair loss over per-sequence summed
log-probs (`megacca.losses`); the engines (DeepSpeed ZeRO 0-3, megatron DDP / DistributedOptimizer with
pipelines) run them unchanged, as they run pretraining. A micro-batch holds B pairs as 2B rows: rows 0..B-1
the positives (CCA: the image under its own condition) or chosen responses (DPO), rows B..2B-1 their partners
(CCA: the same image under another row's condition; DPO: the rejected response). `docs/data-format.md`
("Alignment batches") gives the layouts.

The frozen reference is the starting checkpoint (`train.init_from`): the engine builds it with the same
layout and fills `mb["ref_logps"]` before each policy forward, or the pair shards bring those log-probs
precomputed (`align.reference: precomputed`, tools/precompute_ref_logps.py).
"""
from __future__ import annotations

import torch

from megacca.config import AlignConfig, Config
from megacca.losses import cca_loss_rows, dpo_loss_rows
from megacca.model.gpt import summed_logprobs
from megacca.trainer import Trainer

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class _PairLoss:
    """Shared by both stages: units are pairs; rows [0, B) and [B, 2B) of a micro-batch are the two sides."""

    unit = "pairs"
    sequences_per_sample = 2

    def units(self, mb: dict) -> float:
        return float(mb["tokens"].shape[0] // 2)

    @staticmethod
    def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0] // 2
        return x[:b], x[b:]

    @staticmethod
    def _sums(rows: torch.Tensor, metrics: dict) -> tuple[torch.Tensor, dict]:
        return rows.sum(), {k: v.sum() for k, v in metrics.items()}


class CCALoss(_PairLoss):
    """Condition Contrastive Alignment (Chen et al., ICLR 2025), per pair: `megacca.losses.cca_loss_rows`."""

    reference = True
    metric_names = METRICS + ("pos_like_frac",)

    def __init__(self, align: AlignConfig):
        self.beta, self.lam = align.beta, align.lam

    def __call__(self, mb: dict, nll: torch.Tensor):
        pos, neg = self._halves(summed_logprobs(nll, mb["loss_mask"]))
        ref_pos, ref_neg = self._halves(mb["ref_logps"].to(pos.dtype))
        return self._sums(*cca_loss_rows(pos, neg, ref_pos, ref_neg, beta=self.beta, lam=self.lam,
                                         pos_like=mb["pos_like"].bool()))


class DPOLoss(_PairLoss):
    """The DPO family (`align.loss`), per pair: `megacca.losses.dpo_loss_rows`. With `align.length_normalize`
    each summed log-prob (policy and reference) is divided by its number of scored tokens first. With
    `align.rpo_alpha` = α each pair adds α x its chosen response's per-token NLL (RPO)."""

    metric_names = METRICS

    def __init__(self, align: AlignConfig):
        self.align = align
        self.reference = align.loss != "simpo"

    def __call__(self, mb: dict, nll: torch.Tensor):
        a = self.align
        logps = summed_logprobs(nll, mb["loss_mask"])
        ref = mb["ref_logps"].to(logps.dtype) if self.reference else None
        n = mb["loss_mask"].to(logps.dtype).sum(dim=-1).clamp(min=1.0)  # scored tokens per row
        token_mean_nll = -logps / n
        if a.length_normalize:
            logps = logps / n
            ref = ref / n if ref is not None else None
        chosen, rejected = self._halves(logps)
        ref_c, ref_r = self._halves(ref) if ref is not None else (None, None)
        rows, metrics = dpo_loss_rows(chosen, rejected, ref_c, ref_r, beta=a.beta, kind=a.loss,
                                      label_smoothing=a.label_smoothing, gamma=a.gamma)
        if a.rpo_alpha:
            rows = rows + a.rpo_alpha * self._halves(token_mean_nll)[0]
        return self._sums(rows, metrics)


def build_loss(cfg: Config):
    return CCALoss(cfg.align) if cfg.stage == "cca" else DPOLoss(cfg.align)


def build_data(cfg: Config, dp_rank: int, dp_size: int):
    from megacca.data.loader import build_alignment_source
    from megacca.tokenizer.vocab import UnifiedVocab

    d = cfg.data
    vocab = UnifiedVocab.load(d.vocab, text_model=d.text_model)
    return build_alignment_source(d, cfg.align, cfg.stage, vocab, cfg.model.seq_length, cfg.train.micro_batch_size,
                                  dp_rank, dp_size, cfg.train.seed, cfg.model.layout)


def run(cfg: Config) -> list[dict]:
    from megacca.checkpoint import resolve_checkpoint

    # train.init_from was checked against the config before any rank started (megacca.checkpoint.check_init_from)
    init, loss = resolve_checkpoint(cfg.train.init_from), build_loss(cfg)
    # The frozen reference is the starting checkpoint, unless the loss needs none (SimPO) or its log-probs come
    # precomputed with the pairs.
    reference = init if loss.reference and cfg.align.reference == "model" else None
    return Trainer(cfg, build_data, loss, init_from=init, reference_from=reference).fit()
