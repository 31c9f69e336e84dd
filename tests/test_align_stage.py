"""The CCA stage through its real launcher (`launch/cca_stage.sh`): step 1 against the closed form, rewards that
separate, exact kill-and-resume, 2 ranks under the deepspeed launcher, and the precomputed reference
(tools/precompute_ref_logps.py) against the reference model on the same pairs; bad inputs exit 2.

Data: random class->image code shards (tests need no trained tokenizer), a 6-step pretraining run as the start.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import PY, losses, metrics, run, train
from megacca.tokenizer.vocab import UnifiedVocab

CCA = "configs/cca/digits.yaml"


def write_class_codes(out, samples: int = 240, classes: int = 10, codebook: int = 64, seed: int = 0) -> None:
    """Code shards in which the class decides the codes (class k draws from codes 6k..6k+5), so there is a
    condition for CCA to sharpen; random codes would give it nothing to separate on unseen pairs."""
    from megacca.data.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    with ShardWriter(str(out), "train", max_count=60) as w:
        for i in range(samples):
            k = int(rng.integers(classes))
            w.write({"__key__": f"{i:08d}", "codes.npy": (6 * k + rng.integers(0, 6, (4, 4))).astype(np.int16),
                     "json": {"label": k, "captions": []}})
    write_manifest(str(out), "codes", {"train": w.close()}, classes=[str(k) for k in range(classes)],
                   image_size=[4, 4], vq={"codebook_size": codebook}, source="test", captions=False, labels=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cca")
    write_class_codes(d / "codes")
    UnifiedVocab.build(None, 64, (4, 4), [str(k) for k in range(10)]).save(str(d / "vocab.json"))
    src = f"[{{path: {d / 'codes'}, task: c2i, weight: 1.0}}]"
    opts = [f"data.vocab={d / 'vocab.json'}", f"data.sources={src}", "model.seq_length=32", "train.tensorboard=false",
            # the figures below were measured on the debug preset (the shipped digits configs use `digits`)
            "model.preset=debug", "model.rope=2d"]
    train(d / "base", *opts, "train.micro_batch_size=8", "train.max_steps=6", config="configs/pretrain/digits.yaml")
    return SimpleNamespace(dir=d, run=d / "base", codes=d / "codes", opts=opts)


def _cca(run_dir, base, *extra, **kw):
    return train(run_dir, *base.opts, f"train.init_from={base.run}", "train.micro_batch_size=4",
                 "train.global_batch_size=8", "train.max_steps=8", "train.save_every=4", "optim.lr=1e-3",
                 "align.lam=3", "align.beta=0.5", *extra, config=CCA, script="launch/cca_stage.sh", **kw)


def test_step1_is_the_closed_form_and_rewards_separate(tmp_path, base):
    _cca(tmp_path / "r", base)
    m = metrics(tmp_path / "r")
    f, lam = m[0]["pos_like_frac"], 3.0
    # policy == reference at step 1: every Δ is 0, each term is log 2
    assert abs(m[0]["loss"] - math.log(2) * (1 + f + (1 - f) * lam) / max(lam, 1)) < 1e-6
    assert m[0]["rewards/margins"] == 0.0 and 0.0 < f < 1.0
    # 7 updates on fresh batches of 8 pairs (seeded, so the same numbers on every run): the positives' reward
    # pulls ahead of the negatives' (measured: last three margins 0.24, 0.17, 0.30)
    last = [row["rewards/margins"] for row in m[-3:]]
    assert sum(last) / 3 > 0.1 and m[-1]["rewards/chosen"] > m[-1]["rewards/rejected"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(key in row for row in m)


def test_kill_and_resume_repeats_the_losses(tmp_path, base):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _cca(full, base)
    k = _cca(cut, base, check=False, MEGACCA_TEST_KILL_AFTER_STEP=6)
    assert k.returncode != 0
    _cca(cut, base)
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:  # the same computation on the same pairs (fp32 CPU): the 1e-6
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])


def test_two_ranks_under_the_deepspeed_launcher(tmp_path, base):
    # `deepspeed --num_gpus 2 launch/cca_stage.sh ...`: each rank reads its own share of the shards (so not the
    # 1-rank batches; dp parity on one global batch is tests/test_align_engine.py). Step 1 still has the
    # closed form over the global batch, and the checkpoint is complete.
    _cca(tmp_path / "two", base, "train.max_steps=2", "train.save_every=2", nproc=2, launcher="deepspeed")
    m = metrics(tmp_path / "two")
    f, lam = m[0]["pos_like_frac"], 3.0
    assert abs(m[0]["loss"] - math.log(2) * (1 + f + (1 - f) * lam) / max(lam, 1)) < 1e-6
    assert (tmp_path / "two" / "checkpoints" / "step_00000002" / "model" / ".metadata").is_file()


def test_precomputed_reference_equals_the_reference_model(tmp_path, base):
    out = tmp_path / "ref_pairs"
    run([PY, "tools/precompute_ref_logps.py", CCA, *base.opts, f"train.init_from={base.run}",
         "train.micro_batch_size=4", f"train.run_dir={tmp_path / 'p'}", "--out", str(out)])
    src = f"data.sources=[{{path: {out}}}]"
    _cca(tmp_path / "model", base, src, "train.max_steps=4")
    _cca(tmp_path / "pre", base, src, "train.max_steps=4", "align.reference=precomputed")
    a, b = metrics(tmp_path / "model"), metrics(tmp_path / "pre")
    for x, y in zip(a, b):  # one process, the same pairs: the stored fp32 log-probs are the model's own
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["rewards/margins"] - y["rewards/margins"]) < 1e-6


def test_bad_inputs_exit_2_naming_what(tmp_path, base):
    p = _cca(tmp_path / "x", base, "model.num_layers=3", check=False)
    assert p.returncode == 2 and "train.init_from" in p.stderr and "num_layers" in p.stderr
    p = _cca(tmp_path / "y", base, "align.reference=precomputed", check=False)  # code shards hold no log-probs
    assert p.returncode == 2 and str(base.codes) in p.stderr
    p = train(tmp_path / "z", *base.opts, config=CCA, script="launch/dpo_stage.sh", check=False)
    assert p.returncode == 2 and "stage" in p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
