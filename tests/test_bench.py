"""Benchmark building blocks: the reference model really has megacca's shape; the VQ encode probe runs."""
from __future__ import annotations

import pytest

from megacca.config import load_config
from megacca.model.flops import param_count


@pytest.mark.parametrize("preset", ["debug", "small"])
def test_reference_llama_has_the_same_parameter_count(preset):
    from megacca.bench.reference import ReferenceLlama

    cfg = load_config(None, [f"model.preset={preset}", "model.num_query_groups=2"])
    assert sum(p.numel() for p in ReferenceLlama(cfg).parameters()) == param_count(cfg)


def test_reference_trainer_learns():
    import torch

    from megacca.bench.reference import ReferenceTrainer
    from megacca.data.synthetic import SyntheticSource

    cfg = load_config(None, ["optim.lr=3e-3", "optim.warmup_steps=0"])
    torch.manual_seed(0)
    t = ReferenceTrainer(cfg)
    batch = next(SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, 4, 0, 1, seed=0))
    first = t.train_step([batch])
    for _ in range(10):
        last = t.train_step([batch])
    assert last < first - 0.5  # memorising one batch: a working step lowers the loss by far more than this


def test_vq_encode_probe():
    from megacca.bench.data import bench_vq_encode

    r = bench_vq_encode(None, images=64, batch=32)
    assert r["images_per_s"] > 0 and r["image_size"] == 16
