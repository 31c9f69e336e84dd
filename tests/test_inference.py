"""`megacca.load` and `megacca sample`: a checkpoint of either engine and any layout loads into one process with
the logits of its training layout, its vocabulary, prompts and generation, and its VQ decoder (checked against
the vocabulary's vq_sha256); the command writes a PNG grid of the right size, and a user's mistake is one line
with exit code 2.

One tiny class→image run (random 4x4 codes of a 128-code book, 10 classes, 2D rotary) is trained at tp=2 with
the megatron engine; a ZeRO-3 DeepSpeed run starts from it (`train.init_from`) with lr 0, so its checkpoint
holds the same weights in another layout. With 146 ids the tp=2 run pads the embedding to 256 rows where a
tp=1 run would pad to 192: loading must keep the checkpoint's padding.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, run, torchrun, train
from megacca.fileio import atomic_write_json, sha256_file

V = 8 + 10 + 128  # specials + classes + codes


def _vq(directory, seed: int):
    """A randomly initialised tiny VQ tokenizer (16 px → 4x4 codes of 128): decoding is what is tested, not
    the tokenizer's quality."""
    from megacca.tokenizer.vq import VQModel, save_vq, tiny

    torch.manual_seed(seed)
    save_vq(VQModel(tiny(codebook_size=128)), directory)
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megacca.bench.data import write_random_code_shards
    from megacca.tokenizer.vocab import UnifiedVocab

    d = tmp_path_factory.mktemp("inference")
    sha = sha256_file(_vq(d / "vq", seed=0) / "model.safetensors")
    _vq(d / "other_vq", seed=1)
    codes = write_random_code_shards(str(d / "codes"), samples=64, grid=4, codebook=128, classes=10, per_shard=64)
    manifest = json.loads((d / "codes" / "manifest.json").read_text())
    manifest["vq"].update(path=str(d / "vq"), sha256=sha)  # the block tools/vq_encode.py writes
    atomic_write_json(d / "codes" / "manifest.json", manifest)
    UnifiedVocab.build(None, 128, (4, 4), [str(k) for k in range(10)], vq_sha256=sha).save(str(d / "vocab.json"))
    common = ("data.kind=webdataset", f"data.vocab={d / 'vocab.json'}", f"data.sources=[{{path: {codes}, task: c2i}}]",
              "data.num_workers=0", "model.rope=2d", "model.seq_length=32", "train.micro_batch_size=4",
              "train.save_every=0", "train.tensorboard=false")
    train(d / "tp2", *common, "parallel.engine=megatron", "parallel.tp=2", "train.max_steps=2", nproc=2)
    train(d / "z3", *common, "parallel.zero_stage=3", "train.max_steps=1", "optim.lr=0", "optim.min_lr=0",
          f"train.init_from={d / 'tp2'}", nproc=2)
    return d


@pytest.fixture(scope="module")
def models(runs):
    import megacca

    loaded = {name: megacca.load(runs / name) for name in ("tp2", "z3")}
    yield loaded
    for m in loaded.values():
        m.close()


def _tokens() -> torch.Tensor:
    # The ids tests/init_worker.py scores.
    return torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(5))


def test_tp2_and_zero3_checkpoints_load_with_the_same_weights_and_logits(models):
    a, b = models["tp2"], models["z3"]
    assert (a.step, b.step) == (2, 1)
    # Each checkpoint's own padding is kept: 256 rows at tp=2, 192 for the tp=1 ZeRO-3 run.
    assert [m.model.embedding.word_embeddings.weight.shape[0] for m in (a, b)] == [256, 192]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sa) == set(sb)
    for k in sa:  # lr 0: the ZeRO-3 run saved the very numbers it started from (padding rows aside)
        if isinstance(sa[k], torch.Tensor):
            real = slice(0, V) if k in ("embedding.word_embeddings.weight", "output_layer.weight") else slice(None)
            assert torch.equal(sa[k][real], sb[k][real]), k
    la, lb = a.logits(_tokens()), b.logits(_tokens().tolist())
    assert la.dtype == torch.float32 and la.shape == (2, 32, V)
    # Same weights and computation; only the output matmul's width differs (256 vs 192 padded rows), which
    # may change how a BLAS kernel blocks it: a few fp32 ulps of logits of size ~1 at most (observed: equal).
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)


def test_logits_equal_the_training_layouts_forward(runs, models):
    out = runs / "tp2_logits.safetensors"
    torchrun(2, "tests/init_worker.py", runs / "tp2", out, 2)  # megatron's sharded load at tp=2, gathered
    at_tp2 = load_file(str(out))["logits"]
    # fp32, logits of size ~1: tp splits the matmul reductions, so the layouts agree to a few ulps (observed
    # ~2e-7 in tests/test_init_from.py); 1e-5 as there.
    torch.testing.assert_close(models["tp2"].logits(_tokens()), at_tp2, atol=1e-5, rtol=1e-5)
    m = models["tp2"]
    with torch.no_grad():  # the model's own forward, padded rows dropped
        plain = m.model(_tokens(), None, None)[..., :V]
    assert torch.equal(m.logits(_tokens()), plain)


def test_vocab_prompts_and_generation(models):
    m = models["tp2"]
    v = m.vocab
    assert (v.vocab_size, v.num_classes, v.image_grid) == (V, 10, (4, 4))
    assert m.class_prompt(3) == [v.bos_id, v.class_offset + 3, v.boi_id]
    codes = np.arange(16).reshape(4, 4)
    assert m.caption_prompt(codes) == [v.bos_id, v.boi_id, *(v.image_offset + codes.reshape(-1)), v.eoi_id]
    with pytest.raises(ValueError, match="out of range"):
        m.class_prompt(10)
    with pytest.raises(ValueError, match="no text pieces"):
        m.text_prompt("the digit 3")
    out = m.generate([m.class_prompt(1), m.class_prompt(2)], seed=0)
    for ids in out:  # an image span: exactly 16 codes from the codebook, then <eoi>
        assert len(ids) == 17 and ids[-1] == v.eoi_id and all(v.is_image(i) for i in ids[:16])
    a, tokens_per_s = m.sample_images([m.class_prompt(k) for k in range(5)], seed=3, batch_size=2)
    b, _ = m.sample_images([m.class_prompt(k) for k in range(5)], seed=3, batch_size=2)
    assert a.shape == (5, 4, 4) and a.dtype == np.int64 and (a >= 0).all() and (a < 128).all()
    assert np.array_equal(a, b) and tokens_per_s > 0
    with pytest.raises(ValueError, match="<boi>"):
        m.sample_images([[v.bos_id]])


def test_decode_images_is_the_run_vqs_own_decoder(runs, models):
    from megacca.tokenizer.vq import load_vq

    m = models["z3"]
    assert m.vq_dir == runs / "vq"  # found through the shard manifest the run's config names
    codes = np.random.default_rng(0).integers(0, 128, (3, 4, 4))
    images = m.decode_images(codes)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, load_vq(runs / "vq").decode(torch.as_tensor(codes)))


def test_a_vq_of_other_weights_or_none_is_refused(runs):
    import megacca
    from megacca.checkpoint import CheckpointNotFound
    from megacca.inference import VQNotFound
    from megacca.tokenizer.vocab import VocabMismatchError

    ours, theirs = (sha256_file(runs / d / "model.safetensors")[:12] for d in ("vq", "other_vq"))
    with pytest.raises(VocabMismatchError) as e:
        megacca.load(runs / "tp2", vq=runs / "other_vq")
    assert ours in str(e.value) and theirs in str(e.value) and str(runs / "other_vq") in str(e.value)
    with pytest.raises(VQNotFound, match="nowhere"):
        megacca.load(runs / "tp2", vq=runs / "nowhere")
    with pytest.raises(CheckpointNotFound, match="not a megacca checkpoint"):
        megacca.load(runs / "codes")


def test_load_leaves_the_callers_rng_and_process_state_alone(runs):
    import torch.distributed as dist

    import megacca

    had_group = dist.is_initialized()
    before = torch.get_rng_state()
    m = megacca.load(runs / "z3")
    assert torch.equal(torch.get_rng_state(), before)
    m.close()
    assert dist.is_initialized() == had_group  # a group load started is ended by the last close


def _one_error_line(p) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("megacca")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_sample_writes_a_grid_of_the_right_size(runs, tmp_path):
    from PIL import Image

    for k, scale in ((5, None), (4, 3.0)):
        out = tmp_path / f"grid_{k}.png"
        cmd = [PY, "-m", "megacca", "sample", str(runs / "tp2"), "--class", "3", "--num-images", str(k),
               "--seed", "1", "--out", str(out)] + (["--cfg-scale", str(scale)] if scale else [])
        p = run(cmd, timeout=300)
        cols = math.ceil(math.sqrt(k))
        with Image.open(out) as img:  # 16 px images, ceil(sqrt(k)) columns
            assert img.format == "PNG" and img.size == (cols * 16, math.ceil(k / cols) * 16)
        assert f"wrote {out}" in p.stdout and ("CFG scale 3" in p.stdout) == bool(scale)


@pytest.mark.parametrize("args,words", [
    (["--class", "10"], ["--class 10", "out of range [0, 10)"]),
    (["--prompt", "the digit 3"], ["--prompt", "text"]),
    (["--class", "1", "--vq", "{runs}/other_vq"], ["other_vq", "sha256"]),
    (["--class", "1", "--top-p", "0"], ["--top-p"]),
])
def test_sample_mistakes_are_one_line_exit_2(runs, tmp_path, args, words):
    args = [a.format(runs=runs) for a in args]
    p = run([PY, "-m", "megacca", "sample", str(runs / "tp2"), *args, "--out", str(tmp_path / "g.png")], check=False)
    line = _one_error_line(p)
    assert all(w in line for w in words), line
    assert not (tmp_path / "g.png").exists()


def test_sample_of_a_missing_checkpoint_is_one_line_exit_2(tmp_path):
    p = run([PY, "-m", "megacca", "sample", str(tmp_path / "nothing"), "--class", "1", "--out", str(tmp_path / "g.png")],
            check=False)
    assert str(tmp_path / "nothing") in _one_error_line(p)


def test_a_run_directory_without_its_vq_needs_vq_dir(runs, tmp_path):
    """A checkpoint copied away from the shards its config names: decode_images says to pass vq=DIR."""
    import megacca
    from megacca.inference import VQNotFound

    shutil.copytree(runs / "z3", tmp_path / "z3")
    (runs / "codes" / "manifest.json").rename(runs / "codes" / "manifest.moved")
    try:
        m = megacca.load(tmp_path / "z3")
        try:
            with pytest.raises(VQNotFound, match="vq=DIR"):
                m.decode_images(np.zeros((1, 4, 4), np.int64))
        finally:
            m.close()
        m = megacca.load(tmp_path / "z3", vq=runs / "vq")
        assert m.decode_images(np.zeros((1, 4, 4), np.int64)).shape == (1, 3, 16, 16)
        m.close()
    finally:
        (runs / "codes" / "manifest.moved").rename(runs / "codes" / "manifest.json")


def test_bench_sample_prints_its_figures_and_the_ratio_last():
    import re

    p = run([PY, "-m", "megacca", "bench", "sample", "--presets", "debug", "--rounds", "1", "--images", "4",
             "--recompute-images", "2"], timeout=300)
    lines = p.stdout.strip().splitlines()
    figures = re.search(r"4 images: guidance-free ([\d,]+) tok/s .*batch 4\) \| CFG ([\d,]+) tok/s .*batch 8\) \| "
                        r"ratio ([\d.]+); 2 images: KV cache [\d,]+ tok/s \| recompute [\d,]+ tok/s", lines[-2])
    assert figures and "random weights" in lines[-2], p.stdout
    free, cfg = (float(figures.group(i).replace(",", "")) for i in (1, 2))
    # With one round the ratio (a median of per-round ratios) is the printed tokens/s divided; each figure is
    # rounded for printing (tokens/s to 0.5, the ratio to 0.005), which bounds how far the division may be off.
    ratio = free / cfg
    assert abs(float(figures.group(3)) - ratio) <= 0.005 + ratio * (0.5 / free + 0.5 / cfg) * 1.01
    assert re.fullmatch(r"guidance-free/CFG tokens-per-second ratio: [\d.]+", lines[-1])
    assert lines[-1].endswith(figures.group(3))


def test_the_runs_text_model_is_attached_when_found_and_matching(runs, tmp_path):
    """A copy of the ZeRO-3 checkpoint given a vocabulary with text pieces (same size: 10 classes, 40 pieces,
    88 codes): the text model is taken from beside data.vocab, and a missing or different one is named."""
    import sentencepiece as spm

    import megacca
    from megacca.tokenizer.vocab import UnifiedVocab

    def sentencepiece(name: str, seed: int):
        rng = np.random.default_rng(seed)  # enough distinct letters and words for 40 pieces
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 8)))) for _ in range(80)]
        (tmp_path / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(300)))
        spm.SentencePieceTrainer.Train(input=str(tmp_path / f"{name}.txt"), model_prefix=str(tmp_path / name),
                                       vocab_size=40, model_type="unigram", bos_id=-1, eos_id=-1, minloglevel=2)
        return tmp_path / f"{name}.model"

    text = sentencepiece("text", 0)
    other = sentencepiece("other", 1)
    (tmp_path / "data").mkdir()
    vocab = UnifiedVocab.build(str(text), 88, (4, 4), [str(k) for k in range(10)])
    assert vocab.vocab_size == V
    vocab.save(str(tmp_path / "data" / "vocab.json"))
    ckpt = shutil.copytree(runs / "z3" / "checkpoints" / "step_00000001", tmp_path / "ckpt")
    state = json.loads((ckpt / "trainer.json").read_text())
    state["vocab"] = vocab.to_manifest()
    state["config"]["data"]["vocab"] = str(tmp_path / "data" / "vocab.json")
    atomic_write_json(ckpt / "trainer.json", state)

    def prompt_or_error():
        m = megacca.load(ckpt)
        try:
            return m.text_prompt("the digit seven")
        except ValueError as e:
            return str(e)
        finally:
            m.close()

    shutil.copy(text, tmp_path / "data" / "text.model")  # the manifest's `text_model` name, beside data.vocab
    assert prompt_or_error() == [vocab.bos_id, *vocab.encode_text("the digit seven"), vocab.boi_id]
    shutil.copy(other, tmp_path / "data" / "text.model")
    assert "does not fit" in prompt_or_error() and "text_model_sha256" in prompt_or_error()
    (tmp_path / "data" / "text.model").unlink()
    assert "was not found" in prompt_or_error()
