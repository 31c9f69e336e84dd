"""Pretraining from WebDataset code shards through the real entry point: exact resume with the streaming loader
(2 workers), vocabulary mismatch on resume, and the bad-input policy end to end."""
from __future__ import annotations

import json

import pytest

from conftest import losses, metrics, train
from megacca.bench.data import write_random_code_shards
from megacca.tokenizer.vocab import UnifiedVocab

CFG = "configs/pretrain/digits.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes")
    write_random_code_shards(str(d / "codes"), samples=240, grid=4, codebook=64, classes=10, per_shard=60)
    UnifiedVocab.build(None, 64, (4, 4), [str(k) for k in range(10)]).save(str(d / "vocab.json"))
    # Another vocabulary the shards do not rule out (their manifest pins the codebook and classes, not the
    # grid), so that only the checkpoint can refuse it.
    UnifiedVocab.build(None, 64, (8, 8), [str(k) for k in range(10)]).save(str(d / "other_vocab.json"))
    return d


def _opts(d, *extra):
    src = f"[{{path: {d / 'codes'}, task: c2i, weight: 1.0}}]"
    return [f"data.vocab={d / 'vocab.json'}", f"data.sources={src}", "model.seq_length=48",
            "train.micro_batch_size=4", "train.max_steps=6", "train.save_every=3", *extra]


def test_kill_and_resume_with_streaming_loader(tmp_path, shards):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, *_opts(shards), config=CFG)
    k = train(cut, *_opts(shards), config=CFG, check=False, MEGACCA_TEST_KILL_AFTER_STEP=5)
    assert k.returncode != 0
    train(cut, *_opts(shards), config=CFG)
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:  # the same computation on the same batches: the 1e-6
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    ck = json.loads((full / "checkpoints" / "step_00000006" / "vocab.json").read_text())
    assert ck["vocab_size"] == 8 + 10 + 64


def test_resume_with_another_vocabulary_is_refused(tmp_path, shards):
    rd = tmp_path / "run"
    train(rd, *_opts(shards, "train.max_steps=3"), config=CFG)
    p = train(rd, *_opts(shards, "train.max_steps=4", f"data.vocab={shards / 'other_vocab.json'}"), config=CFG,
              check=False)
    assert p.returncode == 2
    assert "vocabulary mismatch" in p.stderr and "image_grid" in p.stderr and "other_vocab.json" in p.stderr


def _corrupt_copy(shards, tmp_path):
    """A copy of the code shards with one sample's codes outside the codebook."""
    import io
    import shutil
    import tarfile

    import numpy as np

    d = tmp_path / "bad"
    shutil.copytree(shards / "codes", d)
    tar = sorted(d.glob("train-*.tar"))[0]
    members = []
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            members.append((m, t.extractfile(m).read()))
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name == f"{bad_key}.codes.npy":
                buf = io.BytesIO()
                np.save(buf, np.full((4, 4), 999, dtype=np.int16))
                data = buf.getvalue()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return d, tar.name, bad_key


def test_bad_sample_raise_and_skip(tmp_path, shards):
    bad, shard_name, key = _corrupt_copy(shards, tmp_path)
    src = f"[{{path: {bad}, task: c2i}}]"
    opts = [*_opts(shards), f"data.sources={src}", "train.max_steps=8", "data.num_workers=0"]
    p = train(tmp_path / "raise", *opts, config=CFG, check=False)
    assert p.returncode != 0 and shard_name in p.stderr and key in p.stderr
    p = train(tmp_path / "skip", *opts, "data.on_error=skip", config=CFG)
    m = metrics(tmp_path / "skip")
    assert len(m) == 8 and m[-1].get("skipped_samples", 0) >= 1
