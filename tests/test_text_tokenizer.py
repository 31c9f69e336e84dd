"""TextTokenizer + tokenizers/train_text.py on a small generated corpus."""
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import sentencepiece as spm  # noqa: E402

from megacca.data.shards import ShardWriter, write_manifest  # noqa: E402
from megacca.tokenizer.text import TextTokenizer  # noqa: E402

SCRIPT = os.path.join(REPO, "tokenizers", "train_text.py")
WORDS = ("the a cat dog bird sat ran on under over mat tree house red blue green small big quickly slowly "
         "handwritten digit seven number scanned image picture of").split()


def _load_script():
    spec = importlib.util.spec_from_file_location("train_text_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_corpus(path, n=400, seed=0):
    r = random.Random(seed)
    lines = [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) for _ in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    lines = make_corpus(corpus)
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(corpus), "--vocab-size", "120",
                        "--out", str(d / "tok")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vocab_size" in r.stdout
    return d, lines, TextTokenizer(str(d / "tok.model"))


def test_train_writes_model_and_vocab(trained):
    d, _, tok = trained
    assert (d / "tok.model").is_file() and (d / "tok.vocab").is_file()
    assert 2 < tok.vocab_size <= 120
    assert len(tok) == tok.vocab_size
    assert tok.sha256 == hashlib.sha256((d / "tok.model").read_bytes()).hexdigest()
    # no leftovers of the temporary training folder
    assert sorted(p.name for p in d.iterdir()) == ["corpus.txt", "tok.model", "tok.vocab"]


def test_specials_disabled_unk_zero(trained):
    d, _, tok = trained
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (-1, -1, -1, 0)
    assert tok.unk_id == 0


def test_round_trip(trained):
    _, lines, tok = trained
    for s in lines[:50] + ["the small red cat sat on a mat"]:
        ids = tok.encode(s)
        assert ids and all(isinstance(i, int) and 0 < i < tok.vocab_size for i in ids)  # no <unk> in-domain
        assert tok.decode(ids) == s
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_decode_out_of_range_and_type_errors(trained):
    _, _, tok = trained
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(123)


def test_deterministic_training(tmp_path, trained):
    d, _, tok = trained
    mod = _load_script()
    summary = mod.train([str(d / "corpus.txt")], 120, str(tmp_path / "again"))
    assert summary["sha256"] == tok.sha256  # same corpus + flags → byte-identical model


def test_train_from_shard_directories(tmp_path):
    caps = ["a handwritten seven", "the digit 7", "a scanned image of the number seven", "the digit 1"]
    img = tmp_path / "img"
    with ShardWriter(str(img), "train", 10, 1 << 20) as w:
        for i in range(20):
            w.write({"__key__": f"k{i}", "png": b"\x89PNG-not-read", "json": {"label": 0, "captions": caps}})
    write_manifest(str(img), "images", {"train": w.close()})
    txt = tmp_path / "txt"
    with ShardWriter(str(txt), "train", 10, 1 << 20) as w:
        for i in range(20):
            w.write({"__key__": f"t{i}", "txt": "once upon a time\nthere was a small cat"})
    write_manifest(str(txt), "text", {"train": w.close()})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "draw a cat", "chosen": "yes", "rejected": "no"})
                               for _ in range(10)) + "\n")
    mod = _load_script()
    summary = mod.train([str(img), str(txt), str(pairs)], 60, str(tmp_path / "s"))
    assert summary["lines"] == 20 * 4 + 20 * 2 + 10 * 3
    tok = TextTokenizer(summary["model"])
    for s in caps + ["once upon a time", "draw a cat"]:
        ids = tok.encode(s)
        assert 0 not in ids and tok.decode(ids) == s


def _run(args, capsys):
    """Run the script's main() in-process (fast); returns (exit code, stdout, stderr)."""
    rc = _load_script().main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_vocab_too_large_or_small_is_clear_error(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    make_corpus(corpus, n=100)
    # soft limit by default: a smaller vocabulary and a note, not an error
    rc, out, err = _run(["--input", str(corpus), "--vocab-size", "5000", "--out", str(tmp_path / "soft")], capsys)
    assert rc == 0, err
    assert "requested 5000" in out
    rc, out, err = _run(["--input", str(corpus), "--vocab-size", "5000", "--hard-vocab-limit",
                         "--out", str(tmp_path / "h")], capsys)
    assert rc == 2
    assert "too high" in err and "--vocab-size" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _run(["--input", str(corpus), "--vocab-size", "5", "--out", str(tmp_path / "small")], capsys)
    assert rc == 2 and "raise --vocab-size" in err
    assert not (tmp_path / "h.model").exists() and not (tmp_path / "small.model").exists()


def test_missing_input_and_bad_jsonl(tmp_path, capsys):
    rc, _, err = _run(["--input", str(tmp_path / "nope.txt"), "--vocab-size", "50", "--out", str(tmp_path / "x")],
                      capsys)
    assert rc == 2 and "nope.txt" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    rc, _, err = _run(["--input", str(bad), "--vocab-size", "50", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and f"{bad}:2" in err
    rc, _, err = _run(["--input", str(tmp_path), "--vocab-size", "50", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "not a shard directory" in err
    assert not (tmp_path / "x.model").exists()


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        TextTokenizer(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        TextTokenizer(str(tmp_path / "junk.model"))
