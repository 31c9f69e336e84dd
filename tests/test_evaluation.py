"""megacca.evaluation on the real digits: the judge's held-out accuracy, the exact inverse of the digits'
preprocessing, the Fréchet distance, caption accuracy, the held-out loss against a hand computation, the ADM
batch, and the `megacca eval` / `megacca sweep` commands end to end on a tiny run (random VQ tokenizer, two
training steps: the plumbing is tested, not the figures)."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PY, ROOT, run, train

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The real digits as `tools/make_shards.py digits` writes them (1,617 train / 180 held out)."""
    d = tmp_path_factory.mktemp("evaldigits")
    run([PY, "tools/make_shards.py", "digits", "--out", str(d / "images")])
    return d


@pytest.fixture(scope="module")
def splits(digits):
    from megacca.evaluation.judge import load_digit_split

    return {s: load_digit_split(digits / "images", s) for s in ("train", "heldout")}


@pytest.fixture(scope="module")
def judge(splits):
    from megacca.evaluation.judge import DigitsJudge

    return DigitsJudge.fit(*splits["train"])


def _sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


# ------------------------------------------------------------------------------------------------- the judge
def test_digit_split_is_make_shards_input_exactly(digits, splits):
    from megacca.data.shards import iter_samples

    ref = _sklearn_digits()
    for split, (x, y) in splits.items():
        idx = [json.loads(s["json"])["index"] for s in iter_samples(str(digits / "images"), split)]
        assert x.dtype == np.uint8 and x.shape == (len(idx), 8, 8)
        assert np.array_equal(x, ref.images[idx].astype(np.uint8))
        assert np.array_equal(y, ref.target[idx])


def test_judge_heldout_accuracy_and_numpy_predictions_equal_sklearn(splits, judge, tmp_path):
    from sklearn.svm import SVC

    from megacca.evaluation.judge import JUDGE_PARAMS, DigitsJudge

    (xt, yt), (xh, yh) = splits["train"], splits["heldout"]
    assert judge.accuracy_on(xh, yh) >= 0.97   # the bound
    # The judge predicts from its stored arrays; the one-vs-one votes must be libsvm's, including on images
    # far from any digit (uniform noise) where the votes are closest.
    svc = SVC(**JUDGE_PARAMS).fit(xt.reshape(len(xt), -1).astype(float), yt)
    noise = np.random.default_rng(0).integers(0, 17, (3000, 8, 8))
    for x in (xh, xt, noise):
        assert np.array_equal(judge.predict(x), svc.predict(x.reshape(len(x), -1).astype(float)))
    judge.heldout_accuracy = judge.accuracy_on(xh, yh)
    judge.save(tmp_path / "j")
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["judge.json", "judge.safetensors"]
    again = DigitsJudge.load(tmp_path / "j")
    assert np.array_equal(again.predict(noise), judge.predict(noise))
    assert np.array_equal(again.features(xh), judge.features(xh))
    assert again.heldout_accuracy == judge.heldout_accuracy
    with pytest.raises(ValueError, match="0..16"):
        judge.predict(np.full((1, 8, 8), 17))


# ------------------------------------------------------------------------------------------------ pixels
def test_pil_resize_replica_is_pil_exactly():
    from megacca.evaluation.metrics import pil_resize, pil_resize_weights

    px = np.random.default_rng(1).integers(0, 256, (50, 8, 8)).astype(np.uint8)
    for name, flt in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
        for size in (13, 16, 24):
            _, k = pil_resize_weights(8, size, name)
            want = np.stack([np.asarray(Image.fromarray(p, mode="L").resize((size, size), flt)) for p in px])
            assert np.array_equal(pil_resize(px.astype(np.float64), k, k), want), (name, size)


def test_to_digit_pixels_inverts_the_digits_preprocessing_exactly():
    """Every one of the 1,797 digits: make_shards' PNG values → the VQ's preprocessing (RGB, bicubic to 16 px,
    [-1, 1]) → to_digit_pixels gives the original 0..16 image back, pixel for pixel."""
    from megacca.evaluation.metrics import to_digit_pixels
    from megacca.tokenizer.vq import preprocess, tiny

    ref = _sklearn_digits()
    cfg = tiny()   # the digits tokenizer's preprocessing: image_size 16, bicubic
    assert (cfg.image_size, cfg.resample) == (16, "bicubic")
    png = np.clip(np.rint(ref.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)   # tools/make_shards.py
    pre = torch.stack([preprocess(Image.fromarray(p, mode="L"), cfg) for p in png])
    got = to_digit_pixels(pre, resample=cfg.resample)
    assert got.dtype == np.uint8 and np.array_equal(got, ref.images.astype(np.uint8))
    # at the digits' own size only the value mapping is undone
    same = torch.from_numpy(png.astype(np.float32) / 127.5 - 1.0)[:, None].expand(-1, 3, -1, -1)
    assert np.array_equal(to_digit_pixels(same), ref.images.astype(np.uint8))
    with pytest.raises(ValueError, match="smaller"):
        to_digit_pixels(torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------------------------- metrics
def test_frechet_distance_properties_and_closed_form():
    from megacca.evaluation.metrics import feature_stats, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(1.0, 2.0, size=(400, 6)) @ rng.normal(size=(6, 6))
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    # sqrtm of a 6x6 product in float64: agreement to ~1e-9 relative; 1e-6 leaves room across BLAS builds
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-6
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-6)
    # Diagonal covariances: FD = |mu1 - mu2|² + sum (sigma1 - sigma2)² (standard deviations), exactly.
    mu1, mu2, sd1, sd2 = np.array([0.0, 1, 2]), np.array([1.0, 1, 0]), np.array([1.0, 2, 3]), np.array([2.0, 2, 1])
    want = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2)) == pytest.approx(want, rel=1e-9)


def test_reference_figures_of_the_real_digits(splits, judge):
    from megacca.evaluation.metrics import digit_metrics, diversity, reference_figures

    (xt, yt), (xh, yh) = splits["train"], splits["heldout"]
    fig = reference_figures(judge, xt, xh, yh)
    # Pinned for `make_shards.py digits` (seed 0) and the judge's PCA-20: the floor a perfect generator of
    # 1,617 images would roughly reach against these 180 (a PCA axis flipping sign leaves FD unchanged).
    # 1e-3: the figures are quoted to 4 decimals; BLAS differences are ~1e-10.
    assert fig["fd_train_vs_heldout"] == pytest.approx(24.8973, abs=1e-3)
    assert fig["diversity_heldout"] == pytest.approx(36.0907, abs=1e-3)
    assert fig["judge_heldout_accuracy"] >= 0.97
    # The held-out set scored as samples of itself: its own accuracy, FD 0, its own diversity.
    m = digit_metrics(judge, xh, yh, xh)
    assert m["accuracy"] == fig["judge_heldout_accuracy"] and abs(m["fd"]) < 1e-6
    assert m["diversity"] == fig["diversity_heldout"]
    # diversity by hand on a toy set: class 0 has pairwise distances 1, 2, 1 (mean 4/3), class 1 one pair at 5
    toy = np.zeros((5, 8, 8))
    toy[1, 0, 0], toy[2, 0, 0], toy[4, 0, :2] = 1, 2, (3, 4)
    assert diversity(toy, [0, 0, 0, 1, 1]) == pytest.approx((4 / 3 + 5) / 2, rel=1e-12)


def test_caption_accuracy_on_real_and_shuffled_captions(digits):
    from megacca.data.shards import iter_samples
    from megacca.evaluation.metrics import caption_accuracy, digits_named

    caps, labels = [], []
    for split in ("train", "heldout"):
        for s in iter_samples(str(digits / "images"), split):
            meta = json.loads(s["json"])
            caps += meta["captions"]
            labels += [meta["label"]] * len(meta["captions"])
    assert len(caps) == 1797 * 6 and caption_accuracy(caps, labels) == 1.0
    shuffled = np.random.default_rng(0).permutation(labels)
    # ~10,800 captions against labels of a random permutation: expected 0.1, binomial sd 0.003
    assert caption_accuracy(caps, shuffled) == pytest.approx(0.1, abs=0.02)
    assert digits_named("The digit 7, written by hand") == {7}
    assert digits_named("someone wrote 17 and a seven") == {7}
    assert caption_accuracy(["a handwritten seven", "one or two", "a handwritten digit", ""], [7, 1, 1, 1]) == 0.25


# ---------------------------------------------------------------------------------------------- held-out loss
class _CausalToy:
    """A model stand-in whose logits at position t depend on tokens t and t-1 only (causal, so right padding
    changes nothing): logits[t] = A[x_t] + B[x_{t-1}]."""

    def __init__(self, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.a = torch.randn(vocab.vocab_size, vocab.vocab_size, generator=g)
        self.b = torch.randn(vocab.vocab_size, vocab.vocab_size, generator=g)

    def logits(self, tokens):
        t = torch.as_tensor(tokens)
        prev = torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], 1)
        return self.a[t] + self.b[prev]


def _nll(model, ids: list[int], targets: list[int]) -> tuple[float, int]:
    """Hand computation: -log p(ids[i] | ids[:i]) summed over the target positions i of one unpadded row."""
    logp = torch.log_softmax(model.logits(torch.tensor([ids[:-1]])).double(), -1)[0]
    return -sum(float(logp[i - 1, ids[i]]) for i in targets), len(targets)


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    """Code shards with labels and two captions per image (one augmented copy, which the held-out loss skips)
    and a vocabulary with a text model."""
    import sentencepiece as spm

    from megacca.data.shards import ShardWriter, write_manifest
    from megacca.tokenizer.vocab import UnifiedVocab

    d = tmp_path_factory.mktemp("evalcodes")
    (d / "corpus.txt").write_text("\n".join(f"the digit {k} a handwritten {w}" for k, w in enumerate(NUMBER_WORDS)))
    spm.SentencePieceTrainer.Train(input=str(d / "corpus.txt"), model_prefix=str(d / "text"), vocab_size=40,
                                   model_type="bpe", bos_id=-1, eos_id=-1, minloglevel=2)
    rng = np.random.default_rng(0)
    with ShardWriter(str(d / "codes"), "heldout", max_count=7) as w:
        for i in range(12):
            k = int(rng.integers(10))
            meta = {"label": k, "captions": [f"the digit {k}", f"a handwritten {NUMBER_WORDS[k]}"]}
            if i == 5:
                meta["augment"] = {"shift": [1, 0], "text": "right"}
            w.write({"__key__": f"s{i:03d}", "codes.npy": rng.integers(0, 16, (2, 2)).astype(np.int16), "json": meta})
    write_manifest(str(d / "codes"), "codes", {"heldout": w.close()}, classes=[str(k) for k in range(10)],
                   image_size=[2, 2], vq={"codebook_size": 16}, captions=True, labels=True)
    vocab = UnifiedVocab.build(str(d / "text.model"), 16, (2, 2), [str(k) for k in range(10)])
    return d / "codes", vocab


def test_heldout_loss_equals_a_hand_computation(code_shards):
    from megacca.data.shards import iter_samples
    from megacca.evaluation.heldout import heldout_codes, heldout_loss, heldout_report

    path, v = code_shards
    model = _CausalToy(v)
    samples = [s for s in iter_samples(str(path), "heldout") if "augment" not in json.loads(s["json"])]
    assert len(samples) == 11
    want = {"c2i": [0.0, 0], "t2i": [0.0, 0], "i2t": [0.0, 0]}
    for s in samples:
        meta = json.loads(s["json"])
        img = [v.image_offset + int(c) for c in np.load(io.BytesIO(s["codes.npy"])).reshape(-1)]
        rows = {"c2i": [([v.bos_id, v.class_token(meta["label"]), v.boi_id, *img, v.eoi_id, v.eos_id], 3)]}
        for cap in meta["captions"]:
            pieces = v.encode_text(cap)
            rows.setdefault("t2i", []).append(([v.bos_id, *pieces, v.boi_id, *img, v.eoi_id, v.eos_id],
                                               len(pieces) + 2))
            rows.setdefault("i2t", []).append(([v.bos_id, v.boi_id, *img, v.eoi_id, *pieces, v.eos_id], 7))
        for task, rs in rows.items():
            for ids, first in rs:
                # targets: the codes and <eoi> (c2i, t2i) or the caption and <eos> (i2t), up to the row's end
                last = len(ids) - 1 if task == "i2t" else len(ids) - 2
                nll, n = _nll(model, ids, list(range(first, last + 1)))
                want[task][0] += nll
                want[task][1] += n
    for task, (nll, n) in want.items():
        rep = heldout_report(model, path, "heldout", task, batch_size=4)
        assert rep["tokens"] == n and rep["rows"] == (11 if task == "c2i" else 22)
        # float32 logits and log-softmax (as InferenceModel gives them) against this float64 computation
        assert rep["loss"] == pytest.approx(nll / n, rel=1e-5)
        assert heldout_loss(model, path, "heldout", task, batch_size=64) == pytest.approx(nll / n, rel=1e-5)
    codes, labels = heldout_codes(path, "heldout")
    assert codes.shape == (11, 2, 2) and codes.dtype == np.int64 and len(labels) == 11


# ------------------------------------------------------------------------------------------------------- ADM
def test_adm_npz_has_the_evaluator_keys_and_dtypes(tmp_path):
    from megacca.evaluation.adm import read_adm_npz, to_adm_images, write_adm_npz

    decoded = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    imgs = to_adm_images(decoded)
    assert imgs.dtype == np.uint8 and imgs.shape == (2, 4, 5, 3)
    assert np.array_equal(imgs, ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    assert to_adm_images(decoded[:, :1]).shape == (2, 4, 5, 3)   # one channel is repeated
    p = write_adm_npz(tmp_path / "s.npz", imgs, [3, 4])
    with np.load(p, allow_pickle=False) as z:   # what evaluations/evaluator.py opens: arr_0 NHWC uint8
        assert z.files == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (2, 4, 5, 3) and not np.isfortran(z["arr_0"])
        assert z["arr_1"].dtype == np.int64 and list(z["arr_1"]) == [3, 4]
    assert np.array_equal(read_adm_npz(p)["arr_0"], imgs)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["s.npz"]   # no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "t.npz", imgs.astype(np.float32))


def test_inception_metrics_formulas_and_the_message_without_weights(tmp_path, monkeypatch):
    from megacca.evaluation.adm import (InceptionUnavailable, inception_metrics, inception_score, how_to_evaluate,
                                        write_adm_npz)
    from megacca.evaluation.metrics import feature_stats, frechet_distance

    imgs = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)

    def extractor(batch):  # a fixed stand-in for Inception: pool features = pixel means, logits = a projection
        f = batch.reshape(len(batch), -1).astype(np.float64) / 255.0
        return f[:, :16], f[:, :10] * 5.0

    write_adm_npz(tmp_path / "ref.npz", imgs)
    res = inception_metrics(imgs, tmp_path / "ref.npz", extractor=extractor, batch_size=7)
    assert abs(res["fid"]) < 1e-6   # the batch against itself
    # IS: identical predictions give exp(0) = 1; one-hot-like predictions over k classes give k
    assert inception_score(np.zeros((10, 5))) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.eye(4).repeat(5, 0) * 200.0) == pytest.approx(4.0, rel=1e-9)
    # a reference batch with stored statistics (as ADM's reference batches) is used as it is
    mu, sigma = feature_stats(extractor(imgs[:20])[0])
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    got = inception_metrics(imgs, tmp_path / "stats.npz", extractor=extractor)["fid"]
    assert got == pytest.approx(frechet_distance(*feature_stats(extractor(imgs)[0]), mu, sigma), rel=1e-9)
    # no weights on this machine: a clear refusal, and a message naming both ways forward
    monkeypatch.setenv("MEGACCA_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(InceptionUnavailable):
        inception_metrics(imgs)
    msg = how_to_evaluate("s.npz", "no Inception weights")
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "evaluations/evaluator.py" in msg


# ------------------------------------------------------------------------------------------------- commands
def test_eval_help_and_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    from megacca.evaluation import cli, sweep

    # through the `megacca` entry point, which hands `eval` / `sweep` to these modules
    p = run([PY, "-m", "megacca", "eval", "--help"])
    assert "examples:" in p.stdout and "megacca eval digits" in p.stdout
    p = run([PY, "-m", "megacca", "sweep", "--help"])
    assert "examples:" in p.stdout and "--models" in p.stdout
    p = run([PY, "-m", "megacca", "eval", "digits", str(tmp_path / "nope")], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == \
        [f"megacca eval: error: CKPT {tmp_path / 'nope'}: no such run or checkpoint directory"]
    cases = [
        (cli, ["loss", str(tmp_path / "nope")], "no such run or checkpoint"),
        (cli, ["digits", str(tmp_path), "--per-class", "0"], "--per-class"),
        (cli, ["digits", str(tmp_path), "--text-prompt", "{x}"], "--text-prompt"),
        (cli, ["adm", str(tmp_path), "--out", "x.png"], "--out x.png"),
        (cli, ["adm", str(tmp_path), "--out", "x.npz", "--inception", str(tmp_path / "w.pth")], "w.pth"),
        (cli, ["wat"], "invalid choice"),
        (sweep, ["--out", str(tmp_path / "s")], "name a checkpoint"),
        (sweep, ["--models", "a", "--out", str(tmp_path / "s")], "NAME=CKPT"),
        (sweep, ["--models", f"a={tmp_path / 'x'}", "--out", str(tmp_path / "s")], f"a={tmp_path / 'x'}: no such"),
        (sweep, [str(tmp_path), "--cfg-scales", "1,x", "--out", str(tmp_path / "s")], "--cfg-scales"),
    ]
    for mod, args, words in cases:
        try:
            rc = mod.main(args)
        except SystemExit as e:   # argparse's own errors
            rc = e.code
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and words in err[0], (args, err)


@pytest.fixture(scope="module")
def tiny_run(digits, tmp_path_factory):
    """The digits pipeline in miniature: the real image shards, sentencepiece on their captions, a randomly
    initialised tiny VQ tokenizer, its code shards, the vocabulary, and two pretraining steps on c2i, t2i, i2t."""
    from megacca.fileio import sha256_file
    from megacca.tokenizer.vq import VQModel, save_vq, tiny

    d = tmp_path_factory.mktemp("evalrun")
    (d / "images").symlink_to(digits / "images", target_is_directory=True)
    run([PY, "tokenizers/train_text.py", "--input", str(d / "images"), "--vocab-size", "64", "--model-type", "bpe",
         "--out", str(d / "text")])
    torch.manual_seed(0)
    save_vq(VQModel(tiny(codebook_size=64)), d / "vq")
    run([PY, "tools/vq_encode.py", "--vq", str(d / "vq"), "--src", str(d / "images"), "--out", str(d / "codes"),
         "--workers", "1"])
    run([PY, "megacca/tokenizer/vocab.py", "--text-model", str(d / "text.model"), "--codebook-size", "64",
         "--image-grid", "4", "4", "--classes-from", str(d / "codes"), "--vq-sha256",
         sha256_file(d / "vq" / "model.safetensors"), "--out", str(d / "vocab.json")])
    sources = ", ".join(f"{{path: {d / 'codes'}, task: {t}}}" for t in ("c2i", "t2i", "i2t"))
    train(d / "run", f"data.vocab={d / 'vocab.json'}", f"data.text_model={d / 'text.model'}",
          f"data.sources=[{sources}]", "data.num_workers=0", "train.max_steps=2", "train.save_every=0",
          "train.tensorboard=false", config="configs/pretrain/digits.yaml")
    return d


_WORKER = r"""
import json, sys
import numpy as np, torch
from megacca.evaluation import cli, sweep
d, out = sys.argv[1], sys.argv[2]
common = ["--data", d]
assert cli.main(["digits", f"{d}/run", "--per-class", "3", "--out", f"{out}/digits.json", "--npz",
                 f"{out}/samples.npz", *common]) == 0
assert cli.main(["digits", f"{d}/run", "--per-class", "2", "--cfg-scale", "2", "--text-prompt", "the digit {d}",
                 "--out", f"{out}/t2i.json", *common]) == 0
assert cli.main(["captions", f"{d}/run", "--out", f"{out}/captions.json", *common]) == 0
assert cli.main(["loss", f"{d}/run", "--out", f"{out}/loss.json"]) == 0
assert cli.main(["adm", f"{d}/run", "--per-class", "2", "--out", f"{out}/adm.npz"]) == 0
assert sweep.main([f"{d}/run", "--models", f"again={d}/run", "--cfg-scales", "1,2", "--per-class", "2",
                   "--out", f"{out}/sweep", *common]) == 0
# The batched, right-padded held-out loss equals the unpadded per-row computation on the real model.
import megacca
from megacca.evaluation.heldout import heldout_rows, rows_nll
m = megacca.load(f"{d}/run")
rows = heldout_rows(m.vocab, f"{d}/codes", "heldout", "t2i")[:40]
total, n = rows_nll(m, rows, m.vocab.pad_id, batch_size=16)
want, cnt = 0.0, 0
for ids, tgt in rows:
    logp = torch.log_softmax(m.logits(torch.tensor(ids[None, :-1], dtype=torch.long)).double(), -1)[0]
    t = np.nonzero(tgt[1:])[0]
    want -= float(logp[torch.from_numpy(t), torch.from_numpy(ids[1:][t].astype(np.int64))].sum())
    cnt += len(t)
m.close()
json.dump({"batched": total / n, "rowwise": want / cnt, "n": n, "cnt": cnt}, open(f"{out}/padding.json", "w"))
"""


def test_eval_commands_and_sweep_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = run([PY, "-c", _WORKER, str(tiny_run), str(out)], timeout=600)
    dig = json.loads((out / "digits.json").read_text())
    for k in ("accuracy", "fd", "diversity", "cfg_scale", "num_samples", "tokens_per_s"):
        assert isinstance(dig[k], (int, float)) and math.isfinite(dig[k]), k
    assert dig["num_samples"] == 30 and dig["cfg_scale"] == 1.0 and 0 <= dig["accuracy"] <= 1
    assert dig["reference"]["judge_heldout_accuracy"] >= 0.97
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (30, 8, 8) and z["images"].max() <= 16
        assert list(z["labels"]) == [k for k in range(10) for _ in range(3)]
    t2i = json.loads((out / "t2i.json").read_text())
    assert t2i["cfg_scale"] == 2.0 and t2i["prompt"] == "text: the digit {d}" and t2i["num_samples"] == 20
    cap = json.loads((out / "captions.json").read_text())
    assert cap["num_samples"] == 180 and 0 <= cap["accuracy"] <= 1
    loss = json.loads((out / "loss.json").read_text())
    assert [r["task"] for r in loss["per_task"]] == ["c2i", "t2i", "i2t"]
    # Two steps from a near-uniform init (std 0.02): every task's loss is still about ln V (V the real
    # vocabulary), so the figure is a per-token NLL in nats, not a sum or a mean over rows (the layout itself is
    # checked against the hand computation above); 0.5 nats is more than two steps at lr 3e-3 move it.
    v = json.loads((tiny_run / "vocab.json").read_text())["vocab_size"]
    assert all(abs(r["loss"] - math.log(v)) < 0.5 for r in loss["per_task"]), (loss, math.log(v))
    with np.load(out / "adm.npz", allow_pickle=False) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (20, 16, 16, 3) and len(z["arr_1"]) == 20
    assert "FID/IS not computed in-process" in p.stdout
    sw = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [(e["model"], e["cfg_scale"]) for e in sw["entries"]] == [("run", 1.0), ("run", 2.0), ("again", 1.0),
                                                                     ("again", 2.0)]
    # the same checkpoint, prompts and seed give the same samples: the sweep compares like with like
    assert sw["entries"][0]["accuracy"] == sw["entries"][2]["accuracy"]
    assert sw["entries"][0]["fd"] == sw["entries"][2]["fd"]
    assert (out / "sweep" / "sweep.md").read_text().startswith("| model | CFG scale |")
    assert Image.open(out / "sweep" / "tradeoff.png").format == "PNG"
    pad = json.loads((out / "padding.json").read_text())
    # float32 logits of a padded batch against unpadded rows: equal to float32 rounding of the kernels
    assert pad["n"] == pad["cnt"] and pad["batched"] == pytest.approx(pad["rowwise"], rel=1e-5)


def test_demo_pipeline_quick_smoke(tiny_run, tmp_path):
    """`python -m megacca.demo --quick` (what launch/demo.sh runs after the data) end to end on the tiny run's
    data: every stage launcher, every evaluation, and every output file with its documented shape."""
    d = tiny_run
    run([PY, "tools/make_shards.py", "caption-pairs", "--src", str(d / "images"), "--out", str(tmp_path / "cpi"),
         "--overwrite"])
    run([PY, "tools/vq_encode.py", "--vq", str(d / "vq"), "--src", str(tmp_path / "cpi"), "--out",
         str(d / "caption_pairs"), "--workers", "1"])
    out = tmp_path / "demo"
    run([PY, "-m", "megacca.demo", "--data", str(d), "--out", str(out), "--quick"], timeout=1200)
    res = json.loads((out / "results.json").read_text())
    entries = ["no_guidance", "cfg", "cca", "cca_cfg", "finetune_mle", "finetune_mle_cfg", "t2i_no_guidance",
               "t2i_cfg", "t2i_cca"]
    for name in entries:
        e = res[name]
        assert {"accuracy", "fd", "diversity", "cfg_scale", "num_samples", "tokens_per_s"} <= set(e), name
        assert e["num_samples"] == 100 and 0.0 <= e["accuracy"] <= 1.0
        npz = np.load(out / f"samples_{name}.npz")
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (100, 8, 8) and npz["images"].max() <= 16
        assert sorted(np.bincount(npz["labels"]).tolist()) == [10] * 10
    assert res["cfg"]["cfg_scale"] == 2.0 and res["no_guidance"]["cfg_scale"] == 1.0
    assert set(res["captioning"]) == {"before_dpo", "after_dpo"} and res["judge_accuracy"] >= 0.97
    assert {"heldout_loss", "wall_seconds"} <= set(res)
    assert res["dpo"] == {"loss": "sigmoid", "beta": 0.1, "rpo_alpha": 1.0, "lr": 1e-4, "steps": 4}
    assert "| cca | cca | class | none |" in (out / "results.md").read_text()
    for png in ("samples.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
