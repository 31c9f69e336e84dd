"""The benchmark measures what it says: the reference computes megacca's training step, the timed functions,
tokens and ratio are accounted right, and the printed figures are the measured ones; the VQ encode probe runs.

The trainer checks run `megacca bench train`'s own pieces in one subprocess (tests/bench_worker.py).
"""
from __future__ import annotations

import json
import statistics

import pytest

from conftest import PY, run
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


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "probe.json"
    run([PY, "tests/bench_worker.py", str(out)], timeout=300, OMP_NUM_THREADS=1)
    return json.loads(out.read_text())


def test_reference_computes_the_same_training_step(probe):
    """Same weights, same batches: the two trainers the benchmark times give the same loss and pre-clipping
    gradient norm, on the first step and on the second (after one update each, so AdamW, its decay groups and
    clipping match too; the norms are ~2.9, so clipping to 1.0 is active).

    fp32 on CPU; the two differ in kernels only (vocab-parallel cross-entropy vs F.cross_entropy, fused vs
    split qkv), observed <= 2e-7 relative. 1e-5 relative still catches any difference in what is computed: on
    these weights a non-causal mask moves the loss by 0.06, dropping rotary by 0.09, two swapped heads by 0.03."""
    s = probe["same_step"]
    for step, (ours, theirs) in enumerate(zip(s["megacca"], s["reference"])):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), step
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), step
        assert ours["grad_norm"] > 1.0  # the clipped regime
    assert s["megacca"][0]["loss"] != pytest.approx(s["megacca"][1]["loss"], rel=1e-3)


def test_timing_accounting(probe):
    """The durations of megacca's steps are reported as megacca's, the median is taken, the tokens are those of
    a batch, and the ratio is megacca/reference (tests/bench_worker.py scripts the durations)."""
    from bench_worker import SCRIPTED

    a = probe["accounting"]
    r = a["result"]
    # Rounds alternate, megacca first; only the first round of each warms up beyond one step.
    assert [(c["who"], c["warmup"], c["steps"]) for c in a["calls"]] == [
        ("megacca", 2, 3), ("reference", 2, 3), ("megacca", 1, 3), ("reference", 1, 3)]
    ours = statistics.median(t for rnd in SCRIPTED["megacca"] for t in rnd)
    ref = statistics.median(t for rnd in SCRIPTED["reference"] for t in rnd)
    assert r["ours_ms"] == pytest.approx(1000 * ours) and r["ref_ms"] == pytest.approx(1000 * ref)
    assert r["ratio"] == pytest.approx(ours / ref) and r["ratio"] > 1  # megacca's scripted steps are slower
    # Every step of either trainer got one micro-batch of the preset's 8 x 128 tokens, and that is what counts.
    assert a["batch_tokens"] == [8 * 128] * 4 and r["tokens"] == 8 * a["seq_length"] == 1024
    for name in ("megacca", "reference"):
        assert a["handed"][name] == [[1024]] * (2 + 3 + 1 + 3)
    assert r["ours_tps"] == pytest.approx(1024 / ours) and r["ref_tps"] == pytest.approx(1024 / ref)


def test_printed_figures_are_the_results(probe):
    from bench_worker import CANNED

    lines = probe["printed"]
    assert len(lines) == 3
    for line, preset in zip(lines, ("debug", "small")):
        c = CANNED[preset]
        assert line.lstrip().startswith(f"{preset} (") and f"{c['tokens']} tokens/step" in line
        assert f"megacca {c['ours_tps']:,.0f} tok/s ({c['ours_ms']:.1f} ms)" in line
        assert f"reference {c['ref_tps']:,.0f} tok/s ({c['ref_ms']:.1f} ms)" in line
        assert line.endswith(f"ratio {c['ratio']:.3f}")
    # The summary line is the last (largest) preset's ratio, the figure the README quotes.
    assert lines[-1] == "step-time ratio megacca/reference: 1.068"
