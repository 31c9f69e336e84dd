"""tools/make_shards.py and megacca.data.shards on the bundled digits and tiny generated inputs."""
import collections
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megacca.data.shards import (  # noqa: E402
    ShardManifestError, ShardReadError, ShardWriter, iter_samples, iter_tar, read_manifest, shard_paths, verify_shards,
    write_manifest, write_shard)

SCRIPT = os.path.join(REPO, "tools", "make_shards.py")


def _load():
    spec = importlib.util.spec_from_file_location("make_shards_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MS = _load()


def run(args, capsys):
    """main() in-process: (exit code, stdout, stderr)."""
    try:
        rc = MS.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def samples(d, split):
    return list(iter_samples(str(d), split))


# -- digits ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    # once through the real command line, from the repo root, as documented
    r = subprocess.run([sys.executable, "tools/make_shards.py", "digits", "--out", str(d / "a")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train 1617 samples" in r.stdout and "heldout 180 samples" in r.stdout
    assert MS.main(["digits", "--out", str(d / "b")]) == 0
    return d


def test_digits_counts_and_split(digits):
    m = read_manifest(str(digits / "a"))
    assert m["format"] == "megacca-shards/1" and m["kind"] == "images" and m["source"] == "digits"
    assert m["classes"] == [str(k) for k in range(10)] and m["image_size"] == [8, 8]
    tr, he = m["splits"]["train"], m["splits"]["heldout"]
    assert tr["count"] + he["count"] == 1797
    assert (tr["count"], he["count"]) == (1617, 180)
    assert [s["count"] for s in tr["shards"]] == [1000, 617]
    train, held = samples(digits / "a", "train"), samples(digits / "a", "heldout")
    assert len(train) == 1617 and len(held) == 180
    tk, hk = {s["__key__"] for s in train}, {s["__key__"] for s in held}
    assert len(tk) == 1617 and len(hk) == 180 and not tk & hk
    per_class = collections.Counter(json.loads(s["json"])["label"] for s in held)
    assert per_class == {k: 18 for k in range(10)}  # ~10% of every class
    verify_shards(str(digits / "a"), count_samples=True)
    import webdataset as wds  # the streaming loader's reader sees the same samples

    ds = wds.WebDataset(shard_paths(str(digits / "a"), "heldout"), shardshuffle=False, empty_check=False)
    assert sorted(s["__key__"] for s in ds) == sorted(hk)


def test_digits_content(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    for s in samples(digits / "a", "heldout")[:40]:
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "L" and img.size == (8, 8)
        px = np.asarray(img)
        i = meta["index"]
        assert meta["label"] == int(ref.target[i])
        assert np.abs(px / 255.0 * 16.0 - ref.images[i]).max() < 0.04
        caps = meta["captions"]
        assert len(set(caps)) >= 4 and all(isinstance(c, str) and c for c in caps)
        word = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][meta["label"]]
        assert any(word in c for c in caps) and any(str(meta["label"]) in c for c in caps)


def test_digits_deterministic(digits):
    a, b = read_manifest(str(digits / "a")), read_manifest(str(digits / "b"))
    assert a == b
    for split in a["splits"]:
        for pa, pb in zip(shard_paths(str(digits / "a"), split), shard_paths(str(digits / "b"), split)):
            assert open(pa, "rb").read() == open(pb, "rb").read()


def test_refuses_existing_output_unless_overwrite(digits, capsys, tmp_path):
    rc, _, err = run(["digits", "--out", digits / "a"], capsys)
    assert rc == 2 and "--overwrite" in err
    out = tmp_path / "o"
    assert run(["digits", "--out", out, "--shard-size", "500", "--heldout-fraction", "0.2"], capsys)[0] == 0
    assert run(["digits", "--out", out, "--overwrite", "--shard-size", "2000", "--heldout-fraction", "0"],
               capsys)[0] == 0
    m = read_manifest(str(out))
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["count"] == 1797
    assert sorted(os.listdir(out)) == ["manifest.json", "train-000000.tar"]  # old shards removed


# -- other subcommands -------------------------------------------------------------------------------------
def _rand_image(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_imagefolder(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    lines = []
    for i in range(7):
        _rand_image(imgs / f"{i}.jpg", 10 + i, 14, i)
        lines.append({"file": f"{i}.jpg", "caption": f"picture {i}"} if i % 2 else
                     {"file": f"{i}.jpg", "captions": [f"pic {i}", "another"]})
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rc, out, err = run(["imagefolder", "--images", imgs, "--captions", tmp_path / "caps.jsonl", "--out",
                        tmp_path / "o", "--shard-size", "3", "--heldout-fraction", "0.3", "--size", "8"], capsys)
    assert rc == 0, err
    m = read_manifest(str(tmp_path / "o"))
    assert m["splits"]["train"]["count"] == 5 and m["splits"]["heldout"]["count"] == 2
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [3, 2]
    assert m["image_size"] == [8, 8] and m["classes"] is None
    got = {}
    for split in ("train", "heldout"):
        for s in samples(tmp_path / "o", split):
            meta = json.loads(s["json"])
            assert Image.open(io.BytesIO(s["png"])).size == (8, 8)
            got[meta["file"]] = meta["captions"]
    assert got["1.jpg"] == ["picture 1"] and got["0.jpg"] == ["pic 0", "another"] and len(got) == 7


def test_imagenet(tmp_path, capsys):
    root = tmp_path / "train"
    for c in ("n02", "n01"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            _rand_image(root / c / f"{c}_{i}.JPEG", 20, 30, i)
    (root / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "names.txt").write_text("n01 apple, pomme\nn02 goldfish, Carassius auratus\n")
    rc, _, err = run(["imagenet", "--root", root, "--out", tmp_path / "o", "--max-per-class", "4", "--size", "16",
                      "--class-names", tmp_path / "names.txt", "--heldout-fraction", "0.25", "--workers", "2"], capsys)
    assert rc == 0, err
    m = read_manifest(str(tmp_path / "o"))
    assert m["classes"] == ["n01", "n02"] and m["image_size"] == [16, 16]
    assert m["splits"]["train"]["count"] == 6 and m["splits"]["heldout"]["count"] == 2
    held = [json.loads(s["json"]) for s in samples(tmp_path / "o", "heldout")]
    assert sorted(h["label"] for h in held) == [0, 1]  # stratified
    train = [json.loads(s["json"]) for s in samples(tmp_path / "o", "train")]
    files = sorted(t["file"] for t in train + held)
    assert files == sorted(f"{c}/{c}_{i}.JPEG" for c in ("n01", "n02") for i in range(4))
    apple = next(t for t in train + held if t["label"] == 0)
    assert "a photo of an apple" in apple["captions"]
    # without class names: labels only, no captions
    rc, _, err = run(["imagenet", "--root", root, "--out", tmp_path / "o2"], capsys)
    assert rc == 0, err
    m2 = read_manifest(str(tmp_path / "o2"))
    assert m2["splits"]["train"]["count"] == 10 and m2["captions"] is False and m2["image_size"] == [20, 30]
    assert all(json.loads(s["json"])["captions"] == [] for s in samples(tmp_path / "o2", "train"))


def test_text(tmp_path, capsys):
    docs = [f"document {i}\nsecond line of {i}" for i in range(25)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + '{"text": ""}\n')
    rc, out, err = run(["text", "--input", tmp_path / "t.jsonl", "--out", tmp_path / "o", "--max-shard-bytes", "20K"],
                       capsys)
    assert rc == 0, err
    assert "1 empty documents skipped" in out
    m = read_manifest(str(tmp_path / "o"))
    assert m["kind"] == "text" and m["splits"]["train"]["count"] == 25
    assert len(m["splits"]["train"]["shards"]) > 1  # the byte limit split it
    assert all(s["bytes"] <= 20 * 1024 for s in m["splits"]["train"]["shards"])
    got = sorted(s["txt"].decode() for s in samples(tmp_path / "o", "train"))
    assert got == sorted(docs)


def test_pairs(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    _rand_image(tmp_path / "imgs" / "p.png", 12, 12, 0)
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    rows[2]["prompt_image"] = "imgs/p.png"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(["pairs", "--input", tmp_path / "p.jsonl", "--out", tmp_path / "o", "--no-shuffle"], capsys)
    assert rc == 0, err
    m = read_manifest(str(tmp_path / "o"))
    assert m["kind"] == "pairs" and m["splits"]["train"]["count"] == 5
    got = samples(tmp_path / "o", "train")
    assert [json.loads(s["json"]) for s in got] == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    assert [("prompt.png" in s) for s in got] == [False, False, True, False, False]


# -- bad input ---------------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    rc, _, err = run(["text", "--input", bad, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and f"{bad}:3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # input is validated before anything is created
    # a valid JSON line missing a field
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    rc, _, err = run(["pairs", "--input", bad, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and f"{bad}:2" in err and "rejected" in err


def test_malformed_input_exit_code_from_command_line(tmp_path):
    bad = tmp_path / "caps.jsonl"
    (tmp_path / "imgs").mkdir()
    bad.write_text('["not", "an", "object"]\n')
    r = subprocess.run([sys.executable, SCRIPT, "imagefolder", "--images", str(tmp_path / "imgs"), "--captions",
                        str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "Traceback" not in r.stderr


def test_missing_inputs(tmp_path, capsys):
    rc, _, err = run(["text", "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "nope.jsonl" in err
    (tmp_path / "imgs").mkdir()
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"file": "missing.jpg", "caption": "x"}\n')
    rc, _, err = run(["imagefolder", "--images", tmp_path / "imgs", "--captions", caps, "--out", tmp_path / "o"],
                     capsys)
    assert rc == 2 and f"{caps}:1" in err and "missing.jpg" in err
    rc, _, err = run(["imagenet", "--root", tmp_path / "noroot", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "noroot" in err


def test_unreadable_image_leaves_nothing(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    _rand_image(tmp_path / "imgs" / "ok.png", 8, 8, 0)
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not an image")
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"file": "ok.png", "caption": "x"}\n{"file": "bad.jpg", "caption": "y"}\n')
    rc, _, err = run(["imagefolder", "--images", tmp_path / "imgs", "--captions", caps, "--out", tmp_path / "o",
                      "--shard-size", "1", "--no-shuffle"], capsys)
    assert rc == 2 and f"{caps}:2" in err and "bad.jpg" in err
    assert os.listdir(tmp_path / "o") == []


# -- shard library -----------------------------------------------------------------------------------------
def test_shard_writer_rollover_and_errors(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_count=4, max_bytes=1 << 30) as w:
        for i in range(10):
            w.write({"__key__": f"k{i}", "txt": f"doc {i}", "codes.npy": np.full((2, 2), i, dtype=np.int16)})
    info = w.close()
    assert info["count"] == 10 and [s["count"] for s in info["shards"]] == [4, 4, 2]
    write_manifest(str(tmp_path), "codes", {"train": info}, image_size=(2, 2))
    got = samples(tmp_path, "train")
    assert [s["__key__"] for s in got] == [f"k{i}" for i in range(10)]
    assert np.load(io.BytesIO(got[3]["codes.npy"]), allow_pickle=False).tolist() == [[3, 3], [3, 3]]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    # byte limit: a sample takes 4.5 KiB in the tar, files grow in 10 KiB records → 4 per 20 KiB shard
    bw = ShardWriter(str(tmp_path / "b"), "heldout", max_count=100, max_bytes=20 * 1024)
    for i in range(10):
        bw.write({"__key__": f"b{i}", "bin": b"x" * 4000})
    shards = bw.close()["shards"]
    assert [s["count"] for s in shards] == [4, 4, 2] and all(s["bytes"] <= 20 * 1024 for s in shards)
    # a sample bigger than the limit still gets written, alone
    big = ShardWriter(str(tmp_path / "big"), "train", max_count=100, max_bytes=1000)
    for i in range(2):
        big.write({"__key__": f"b{i}", "bin": b"x" * 2000})
    assert [s["count"] for s in big.close()["shards"]] == [1, 1]
    w = ShardWriter(str(tmp_path / "c"), "train", 10, 1 << 20)
    w.write({"__key__": "a", "txt": "x"})
    with pytest.raises(ValueError, match="duplicate"):
        w.write({"__key__": "a", "txt": "y"})
    with pytest.raises(ValueError, match="bad sample key"):
        w.write({"__key__": "a.b", "txt": "y"})
    with pytest.raises(ValueError, match="bad split"):
        ShardWriter(str(tmp_path), "train-1", 10, 100)
    with pytest.raises(RuntimeError):  # aborting context manager removes everything this writer made
        with ShardWriter(str(tmp_path / "d"), "train", 1, 1 << 20) as w2:
            w2.write({"__key__": "a", "txt": "x"})
            w2.write({"__key__": "b", "txt": "x"})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "d") == []


def test_read_manifest_errors_name_path(tmp_path):
    with pytest.raises(ShardManifestError, match=str(tmp_path / "manifest.json")):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ShardManifestError, match="corrupt"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "megacca-shards/1", "kind": "text",
         "splits": {"train": {"count": 3, "shards": [{"name": "train-000000.tar", "count": 2, "sha256": "x"}]}}}))
    with pytest.raises(ShardManifestError, match="count 3 but its shards hold 2"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "megacca-shards/1", "kind": "text",
         "splits": {"train": {"count": 2, "shards": [{"name": "train-000000.tar", "count": 2, "sha256": "x"}]}}}))
    with pytest.raises(ShardManifestError, match="does not exist"):
        read_manifest(str(tmp_path))
    assert read_manifest(str(tmp_path / "manifest.json"), check_files=False)["kind"] == "text"


def _docs(n, reps=1):
    return ({"__key__": f"k{i}", "txt": f"doc {i} " * reps, "json": {"i": i}} for i in range(n))


def test_write_shard_deterministic_atomic_and_same_as_shard_writer(tmp_path):
    a = write_shard(str(tmp_path / "train-000000.tar"), _docs(5))
    data = (tmp_path / "train-000000.tar").read_bytes()
    assert a == {"name": "train-000000.tar", "count": 5, "sha256": hashlib.sha256(data).hexdigest(),
                 "bytes": len(data)}
    assert write_shard(str(tmp_path / "b.tar"), _docs(5))["sha256"] == a["sha256"]  # a rerun: identical bytes
    with ShardWriter(str(tmp_path / "w"), "train") as w:  # the split writer writes the very same file
        for s in _docs(5):
            w.write(s)
    assert w.close()["shards"][0]["sha256"] == a["sha256"]
    with tarfile.open(tmp_path / "train-000000.tar") as tf:  # fixed metadata, members sorted within a sample
        members = tf.getmembers()
    assert [m.name for m in members] == [f"k{i}.{e}" for i in range(5) for e in ("json", "txt")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "megacca", "megacca",
                                                                                     0o444)}

    def failing():
        yield from _docs(2)
        raise RuntimeError("encoder died")

    (tmp_path / "c").mkdir()
    with pytest.raises(RuntimeError, match="encoder died"):
        write_shard(str(tmp_path / "c" / "train-000000.tar"), failing())
    assert os.listdir(tmp_path / "c") == []  # neither the shard nor its temporary file
    with pytest.raises(ValueError, match="duplicate sample key 'k0'"):
        write_shard(str(tmp_path / "c" / "d.tar"), [{"__key__": "k0", "txt": "a"}, {"__key__": "k0", "txt": "b"}])
    with pytest.raises(ValueError, match="bad member extension 'TXT'"):  # it would read back as 'txt'
        write_shard(str(tmp_path / "c" / "e.tar"), [{"__key__": "k0", "TXT": "a"}])
    assert os.listdir(tmp_path / "c") == []


def test_iter_tar_names_shard_and_key_at_damage(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_shard(str(path), _docs(4, reps=200))  # ~1.2 KB per txt member: several blocks to cut into
    raw = path.read_bytes()
    got = list(iter_tar(str(path), 4))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2", "k3"] and got[2]["txt"] == b"doc 2 " * 200
    assert {s["__url__"] for s in got} == {str(path)}

    pos = raw.index(b"k2.txt")
    path.write_bytes(raw[:pos + 512 + 100])  # cut inside k2's txt data
    seen = []
    with pytest.raises(ShardReadError) as ei:
        for s in iter_tar(str(path)):
            seen.append(s["__key__"])
    assert seen == ["k0", "k1"]  # the cut sample is never handed out
    assert ei.value.key == "k2" and ei.value.reason == "corrupt_tar" and ei.value.shard == str(path)
    assert str(path) in str(ei.value) and "'k2'" in str(ei.value)

    zeroed = bytearray(raw)
    zeroed[pos:pos + 512] = bytes(512)  # reads as a clean end of archive: only the count tells
    path.write_bytes(bytes(zeroed))
    assert [sorted(s) for s in iter_tar(str(path))][2] == ["__key__", "__url__", "json"]  # k2 lost its txt
    seen = []
    with pytest.raises(ShardReadError, match="read 3 of 4 samples") as ei:
        for s in iter_tar(str(path), 4):
            seen.append(s["__key__"])
    assert seen == ["k0", "k1"]  # held back: the count shows that k2 may be cut short
    assert ei.value.key == "k2" and "'k2.json'" in str(ei.value)  # the last member reached

    with tarfile.open(path, "w") as tf:  # a member without an extension is not silently dropped
        for name in ("k0.txt", "README"):
            ti = tarfile.TarInfo(name)
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"hi"))
    with pytest.raises(ShardReadError, match="'README' has no extension") as ei:
        list(iter_tar(str(path)))
    assert ei.value.key == "README" and ei.value.reason == "corrupt_tar"
    with pytest.raises(ShardReadError, match="empty shard") as ei:
        list(iter_tar(str(tmp_path / "missing.tar")))
    assert ei.value.reason == "empty_shard" and "missing.tar" in str(ei.value)


def test_iter_samples_checks_counts_against_manifest(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_count=3) as w:
        for s in _docs(5):
            w.write(s)
    write_manifest(str(tmp_path), "text", {"train": w.close()})
    assert [s["__key__"] for s in iter_samples(str(tmp_path), "train")] == [f"k{i}" for i in range(5)]
    write_shard(str(tmp_path / "train-000001.tar"), _docs(1))  # the second shard lost a sample
    with pytest.raises(ShardReadError, match="read 1 of 2 samples") as ei:
        list(iter_samples(str(tmp_path), "train"))
    assert "train-000001.tar" in str(ei.value)
