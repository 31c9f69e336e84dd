"""UnifiedVocab: id layout, manifest round trip, documents, image tokens, mismatch errors."""
import importlib.util
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megacca.tokenizer.text import TextTokenizer  # noqa: E402
from megacca.tokenizer.vocab import UnifiedVocab, VocabMismatchError  # noqa: E402

WORDS = "the a cat dog sat on mat red blue small big picture of digit seven handwritten".split()


def _train(out_prefix, seed, n=300):
    spec = importlib.util.spec_from_file_location("train_text_for_vocab", os.path.join(REPO, "tokenizers", "train_text.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = random.Random(seed)
    corpus = f"{out_prefix}.txt"
    with open(corpus, "w") as f:
        for _ in range(n):
            f.write(" ".join(r.choice(WORDS) for _ in range(r.randint(2, 10))) + "\n")
    return mod.train([corpus], 50 + seed, out_prefix)["model"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return _train(str(d / "a"), 0), _train(str(d / "b"), 7)


@pytest.fixture
def vocab(models):
    return UnifiedVocab.build(models[0], codebook_size=16, image_grid=(2, 3), class_names=["cat", "dog", "bird"],
                              vq_sha256="ab" * 32)


def test_id_layout(vocab, models):
    v = vocab
    assert (v.pad_id, v.bos_id, v.eos_id, v.boi_id, v.eoi_id, v.null_id, v.sep_id) == (0, 1, 2, 3, 4, 5, 6)
    p = TextTokenizer(models[0]).vocab_size
    assert v.num_classes == 3 and v.class_offset == 8 and v.class_names == ["cat", "dog", "bird"]
    assert [v.class_token(k) for k in range(3)] == [8, 9, 10]
    assert v.text_offset == 11 and v.text_size == p
    assert v.image_offset == 11 + p and v.codebook_size == 16 and v.image_grid == (2, 3)
    assert v.vocab_size == 11 + p + 16
    with pytest.raises(ValueError):
        v.class_token(3)
    with pytest.raises(ValueError):
        v.class_token(-1)
    ids = v.encode_text("the small cat")
    assert ids and all(v.text_offset <= i < v.image_offset for i in ids)
    assert v.decode_text(ids) == "the small cat"
    assert v.image_tokens(np.array([[0, 1, 2], [3, 4, 15]])) == [v.image_offset + k for k in (0, 1, 2, 3, 4, 15)]
    m = v.to_manifest()
    assert m["specials"] == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<boi>": 3, "<eoi>": 4, "<null>": 5, "<sep>": 6,
                             "<reserved7>": 7}
    assert m["text_model_sha256"] == TextTokenizer(models[0]).sha256 and m["image_grid"] == [2, 3]


def test_no_text_no_classes():
    v = UnifiedVocab.build(None, codebook_size=512, image_grid=None)
    assert (v.num_classes, v.text_offset, v.text_size, v.image_offset, v.vocab_size) == (0, 8, 0, 8, 520)
    with pytest.raises(ValueError, match="no text model"):
        v.encode_text("hi")
    assert v.image_tokens(np.zeros((4, 5), dtype=np.int32)) == [8] * 20  # any shape without a grid
    assert v.codes_from_tokens([9] * 6, shape=(2, 3)).tolist() == [[1] * 3] * 2
    with pytest.raises(ValueError, match="image_grid"):
        v.codes_from_tokens([9] * 6)


def test_manifest_save_load_round_trip(vocab, models, tmp_path):
    path = tmp_path / "ckpt" / "vocab.json"
    vocab.save(str(path))
    assert sorted(os.listdir(path.parent)) == ["vocab.json"]  # atomic write leaves no temporary file
    on_disk = json.loads(path.read_text())
    assert on_disk == vocab.to_manifest()
    w = UnifiedVocab.load(str(path), text_model=models[0])
    assert w.to_manifest() == vocab.to_manifest() and w == vocab
    assert w.image_grid == (2, 3) and isinstance(w.image_grid, tuple)
    assert w.encode_text("a red dog") == vocab.encode_text("a red dog")
    # without text_model: the model named in the manifest, next to it, is used (and checked)
    shutil.copy(models[0], path.parent / os.path.basename(models[0]))
    assert UnifiedVocab.load(str(path)).decode_text(vocab.encode_text("a red dog")) == "a red dog"
    # neither given nor beside: loads, but text use is a clear error
    os.unlink(path.parent / os.path.basename(models[0]))
    bare = UnifiedVocab.load(str(path))
    assert bare.vocab_size == vocab.vocab_size
    with pytest.raises(RuntimeError, match="text_model"):
        bare.encode_text("x")


def test_load_checks_text_model_sha(vocab, models, tmp_path):
    path = tmp_path / "vocab.json"
    vocab.save(str(path))
    with pytest.raises(VocabMismatchError) as e:
        UnifiedVocab.load(str(path), text_model=models[1])
    assert "text_model_sha256" in str(e.value) and str(path) in str(e.value) and models[1] in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        UnifiedVocab.load(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        UnifiedVocab.load(str(tmp_path / "bad.json"))
    m = vocab.to_manifest()
    m["vocab_size"] += 1
    (tmp_path / "inconsistent.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="inconsistent.json.*vocab_size"):
        UnifiedVocab.load(str(tmp_path / "inconsistent.json"))


def test_document_round_trip(vocab):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 16, size=(2, 3))
    b = rng.integers(0, 16, size=(2, 3))
    segs = ["a picture of a cat", a, "the dog sat on the mat", b, "seven"]
    ids = vocab.encode_document(segs)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert ids.count(vocab.boi_id) == 2 and ids.count(vocab.eoi_id) == 2
    i = ids.index(vocab.boi_id)
    assert ids[i + 7] == vocab.eoi_id and ids[i + 1:i + 7] == vocab.image_tokens(a)
    out = vocab.decode_document(ids)
    assert len(out) == 5
    for got, want in zip(out, segs):
        if isinstance(want, str):
            assert got == want
        else:
            assert got.shape == (2, 3) and np.array_equal(got, want)
    # image-only document, class-free; trailing pads after <eos> are fine, missing <bos>/<eos> too
    only = vocab.encode_document([a])
    assert only == [vocab.bos_id, vocab.boi_id, *vocab.image_tokens(a), vocab.eoi_id, vocab.eos_id]
    assert np.array_equal(vocab.decode_document(only + [vocab.pad_id] * 3)[0], a)
    assert np.array_equal(vocab.decode_document(only[1:-1])[0], a)
    assert vocab.decode_document(np.asarray(ids))[0] == segs[0]
    with pytest.raises(TypeError):
        vocab.encode_document([42])


def test_decode_document_errors(vocab):
    a = np.zeros((2, 3), dtype=np.int64)
    ids = vocab.encode_document(["a cat", a])
    with pytest.raises(ValueError, match="not closed"):
        vocab.decode_document(ids[:-2])  # cut inside the image
    with pytest.raises(ValueError, match="class:dog"):
        vocab.decode_document([vocab.bos_id, vocab.class_token(1), vocab.eos_id])
    with pytest.raises(ValueError, match="inside the image"):
        vocab.decode_document([vocab.boi_id, vocab.image_offset, vocab.text_offset, vocab.eoi_id])
    with pytest.raises(ValueError, match="expected 6 image tokens"):
        vocab.decode_document([vocab.boi_id, vocab.image_offset, vocab.eoi_id])
    with pytest.raises(ValueError, match="after <eos>"):
        vocab.decode_document(ids + [vocab.text_offset + 1])
    with pytest.raises(ValueError, match="not a text piece"):
        vocab.decode_text([vocab.image_offset])


def test_image_tokens_range_and_shape_errors(vocab):
    ok = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        vocab.image_tokens(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        vocab.image_tokens(np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="16 out of codebook range"):
        vocab.image_tokens(ok + np.array([[0, 0, 0], [0, 0, 16]]))
    with pytest.raises(ValueError, match="-1 out of codebook range"):
        vocab.image_tokens(ok - 1)
    with pytest.raises(ValueError, match="integers"):
        vocab.image_tokens(ok.astype(np.float32))
    codes = np.arange(6).reshape(2, 3) % 16
    toks = vocab.image_tokens(codes)
    assert vocab.codes_from_tokens(toks).tolist() == codes.tolist()
    assert vocab.codes_from_tokens(np.asarray(toks)).dtype == np.int64
    with pytest.raises(ValueError, match="expected 6 image tokens"):
        vocab.codes_from_tokens(toks[:-1])
    with pytest.raises(ValueError, match="not an image code"):
        vocab.codes_from_tokens(toks[:-1] + [vocab.eos_id])


def test_check_compatible(vocab, models):
    vocab.check_compatible(vocab.to_manifest(), "same")
    vocab.check_compatible(json.loads(json.dumps(vocab.to_manifest())), "via json")  # tuple vs list grid
    other = UnifiedVocab.build(models[0], 32, (2, 3), ["cat", "dog", "bird"], "ab" * 32)
    with pytest.raises(VocabMismatchError) as e:
        vocab.check_compatible(other.to_manifest(), "checkpoint runs/x/vocab.json vs tokenizer vocab.json")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert msg.startswith("checkpoint runs/x/vocab.json vs tokenizer vocab.json")
    assert "'codebook_size'" in msg and "16" in msg and "32" in msg
    other = UnifiedVocab.build(models[1], 16, (2, 3), ["cat", "dog", "bird"], "ab" * 32)
    with pytest.raises(VocabMismatchError, match="'text_model_sha256'"):
        vocab.check_compatible(other.to_manifest(), "ckpt")
    other = UnifiedVocab.build(models[0], 16, (2, 3), ["cat", "dog", "fish"], "ab" * 32)
    with pytest.raises(VocabMismatchError, match="'class_names'"):
        vocab.check_compatible(other, "ckpt")
    other = UnifiedVocab.build(models[0], 16, (4, 4), ["cat", "dog", "bird"], "ab" * 32)
    with pytest.raises(VocabMismatchError, match="'image_grid'"):
        vocab.check_compatible(other.to_manifest(), "ckpt")
    # an unknown VQ hash (None) matches; two different ones do not
    vocab.check_compatible(UnifiedVocab.build(models[0], 16, (2, 3), ["cat", "dog", "bird"]).to_manifest(), "ckpt")
    with pytest.raises(VocabMismatchError, match="'vq_sha256'"):
        vocab.check_compatible(UnifiedVocab.build(models[0], 16, (2, 3), ["cat", "dog", "bird"], "cd" * 32), "ckpt")
    m = vocab.to_manifest()
    del m["codebook_size"]
    with pytest.raises(VocabMismatchError, match="'codebook_size' is missing"):
        vocab.check_compatible(m, "ckpt")


def test_cli_writes_manifest(models, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("vocab_cli", os.path.join(REPO, "megacca", "tokenizer", "vocab.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "v.json"
    assert mod.main(["--text-model", models[0], "--codebook-size", "8", "--image-grid", "2", "2",
                     "--classes", "x", "y", "--out", str(out)]) == 0
    v = UnifiedVocab.load(str(out), models[0])
    assert v.class_names == ["x", "y"] and v.codebook_size == 8 and v.image_grid == (2, 2)
    assert mod.main(["--codebook-size", "8"]) == 2
    assert "--out" in capsys.readouterr().err
