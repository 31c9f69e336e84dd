"""Pretraining: next-token loss over packed sequences of interleaved text and image tokens.

The stage is the generic trainer fed by a data source; `build_data` picks the synthetic source or the
WebDataset streaming loader from `data.kind`.
"""
from __future__ import annotations

from megacca.config import Config
from megacca.model.gpt import summed_logprobs
from megacca.trainer import Trainer


class NextTokenLoss:
    """Mean next-token NLL over every loss token of the global batch (the engine divides the sum by the
    global token count)."""

    reference = False
    metric_names = ()
    unit = "loss_tokens"
    sequences_per_sample = 1

    def units(self, mb: dict) -> float:
        return float(mb["loss_mask"].sum())

    def __call__(self, mb: dict, nll):
        return -summed_logprobs(nll, mb["loss_mask"]).sum(), {}


def build_data(cfg: Config, dp_rank: int, dp_size: int):
    tr, m, d = cfg.train, cfg.model, cfg.data
    seed = tr.seed
    if d.kind == "synthetic":
        from megacca.data.synthetic import SyntheticSource

        grid = m.image_grid if m.rope == "2d" else 4
        return SyntheticSource(m.vocab_size, m.seq_length, tr.micro_batch_size, dp_rank, dp_size, seed,
                               num_samples=d.synthetic_samples, image_grid=grid)
    from megacca.data.loader import build_webdataset_source
    from megacca.tokenizer.vocab import UnifiedVocab

    vocab = UnifiedVocab.load(d.vocab, text_model=d.text_model)
    return build_webdataset_source(d, vocab, m.seq_length, tr.micro_batch_size, dp_rank, dp_size, seed, m.layout)


def run(cfg: Config) -> list[dict]:
    from megacca.checkpoint import resolve_checkpoint

    init = resolve_checkpoint(cfg.train.init_from) if cfg.train.init_from else None
    return Trainer(cfg, build_data, NextTokenLoss(), init_from=init).fit()
