"""Shift-conditioned augmentation (docs/data-format.md, "Augmented samples"): `make_shards.py digits
--augment-shifts`, the loader's token layout of augmented copies, their exclusion from the alignment stages,
and the sentencepiece model's coverage of the shift words.

Loader layouts use tests/test_loader.py's stand-in vocabulary (one text piece per character), so every row is
written out by hand.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from megacca.config import AlignConfig, ConfigError
from megacca.data.augment import SHIFTS, augment_text, is_augmented, shift_image, shift_record, shift_text
from megacca.data.config import SourceConfig, resolve_source
from megacca.data.loader import BadSample, build_alignment_source, build_webdataset_source
from megacca.data.shards import iter_samples, read_manifest, shard_paths
from test_loader import (BOI, BOS, CLS0, EOI, EOS, GRID, I0, NULL, P, PAD, T0, StubVocab, cfg, codes_for, npy, take,
                         write_dir)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
HW = GRID[0] * GRID[1]

# sha256s of `make_shards.py digits --out DIR` (default flags) measured with the code before --augment-shifts
# existed: without the flag the shards must stay byte-identical. They depend on PIL's PNG encoder (zlib)
# producing the same bytes, as tests/test_make_shards.py's determinism test does.
BEFORE = {"train-000000.tar": "b0ab14b6e7b8a63784cb6d05d2658896aed63964a77af6eee37f2ffe05587303",
          "train-000001.tar": "a1a60f909b260aabf369e9b183d5de76c41c606166dd41076f1ded1dc4a2db8a",
          "heldout-000000.tar": "517ab81b49e66284b796a6a21fc69cf34c9639eff5268e3d77d0516fcccd9722"}


def ch(s: str) -> list[int]:
    return [T0 + ord(c) % P for c in s]


def img(i: int) -> list[int]:
    return (I0 + codes_for(i).reshape(-1)).tolist()


def sample(i: int, label=3, captions=("ab",), augment=None) -> dict:
    meta = {"label": label, "captions": list(captions)}
    if augment is not None:
        meta["augment"] = augment
    return {"__key__": f"{i:06d}", "codes.npy": npy(codes_for(i)), "json": json.dumps(meta).encode()}


def sample_ids(batch) -> list[int]:
    """The ids (codes_for's first two cells) of the images in a batch's rows, one per row."""
    from test_loader import K

    out = []
    for row in batch["tokens"].tolist():
        j = row.index(BOI)
        out.append((row[j + 1] - I0) * K + (row[j + 2] - I0))
    return out


# ------------------------------------------------------------------------------------------------ the shifts
def test_shift_image_is_an_exact_shift_with_zero_fill():
    a = np.random.default_rng(0).integers(1, 256, (8, 8)).astype(np.uint8)  # no zeros: fill is visible
    assert len(SHIFTS) == 8 and len(set(SHIFTS)) == 8 and (0, 0) not in SHIFTS
    for dx, dy in SHIFTS:
        b = shift_image(a, dx, dy)
        assert b.dtype == a.dtype and b.shape == a.shape
        for y in range(8):
            for x in range(8):
                sy, sx = y - dy, x - dx  # the source pixel of (y, x)
                want = a[sy, sx] if 0 <= sy < 8 and 0 <= sx < 8 else 0
                assert b[y, x] == want, (dx, dy, y, x)
    assert np.array_equal(shift_image(a, 1, 0)[:, 1:], a[:, :-1])  # one example spelled out: right by one
    texts = {s: shift_text(*s) for s in SHIFTS}
    assert texts[(-1, -1)] == "up left" and texts[(1, 0)] == "right" and texts[(0, 1)] == "down"
    assert len(set(texts.values())) == 8
    with pytest.raises(ValueError):
        shift_text(0, 0)
    assert augment_text({"label": 1}) is None and not is_augmented({"label": 1})
    assert augment_text({"augment": shift_record(1, 1)}) == "down right" and is_augmented({"augment": {}})
    with pytest.raises(ValueError, match="augment"):
        augment_text({"augment": {"shift": [1, 0]}})


# ------------------------------------------------------------------------------------------- make_shards digits
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_aug", os.path.join(REPO, "tools", "make_shards.py"))
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    d = tmp_path_factory.mktemp("digits")
    assert ms.main(["digits", "--out", str(d / "off")]) == 0
    assert ms.main(["digits", "--out", str(d / "on"), "--augment-shifts"]) == 0
    assert ms.main(["caption-pairs", "--src", str(d / "on"), "--out", str(d / "pairs")]) == 0
    return d


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_flag_off_shards_byte_identical_to_before(digits):
    m = read_manifest(str(digits / "off"))
    assert "augment" not in m
    got = {os.path.basename(p): _sha(p) for s in m["splits"] for p in shard_paths(str(digits / "off"), s, m)}
    assert got == BEFORE


def test_heldout_untouched_and_train_has_every_shift(digits):
    off, on = read_manifest(str(digits / "off")), read_manifest(str(digits / "on"))
    # the held-out split: the same shard, byte for byte, and no augmented sample in it
    assert on["splits"]["heldout"] == off["splits"]["heldout"]
    assert not any(is_augmented(json.loads(s["json"])) for s in iter_samples(str(digits / "on"), "heldout"))
    assert on["augment"] == {"shifts": [list(s) for s in SHIFTS], "fill": 0, "split": "train", "originals": 1617}
    assert on["splits"]["train"]["count"] == 9 * 1617
    real = {s["__key__"]: s for s in iter_samples(str(digits / "off"), "train")}
    train = list(iter_samples(str(digits / "on"), "train"))
    by_key = {s["__key__"]: s for s in train}
    assert len(by_key) == len(train) == 9 * 1617
    for key, s in real.items():  # the real images are there unchanged, each with its 8 exact shifts
        assert by_key[key]["png"] == s["png"] and by_key[key]["json"] == s["json"]
        px = np.asarray(Image.open(io.BytesIO(s["png"])))
        meta = json.loads(s["json"])
        for dx, dy in SHIFTS:
            text = shift_text(dx, dy)
            c = by_key[f"{key}_{text.replace(' ', '_')}"]
            cmeta = json.loads(c["json"])
            assert cmeta == {**meta, "augment": {"shift": [dx, dy], "text": text}}
            cpx = np.asarray(Image.open(io.BytesIO(c["png"])))
            assert cpx.dtype == np.uint8 and np.array_equal(cpx, shift_image(px, dx, dy))
    # the copies are shuffled in among the originals, not written in blocks of 9
    first = [("_" in s["__key__"]) for s in train[:50]]
    assert 0 < sum(first) < 50


def test_caption_pairs_leave_augmented_copies_out(digits):
    m = read_manifest(str(digits / "pairs"))
    assert m["splits"]["train"]["count"] == 1617 and m["splits"]["heldout"]["count"] == 180
    keys = {s["__key__"] for s in iter_samples(str(digits / "pairs"), "train")}
    assert keys == {s["__key__"] for s in iter_samples(str(digits / "off"), "train")}


def test_sentencepiece_covers_the_shift_words(digits, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tokenizers"))
    import train_text

    from megacca.tokenizer.text import TextTokenizer

    corpus = tmp_path / "corpus.txt"
    n = train_text.write_corpus([str(digits / "on")], "train", str(corpus))
    lines = corpus.read_text().splitlines()
    assert n == 9 * 1617 * 6 + 8 * 1617  # six captions per sample, one shift text per copy
    assert lines.count("up left") == 1617
    # the digits recipe (launch/prepare_digits.sh): 128 BPE pieces
    summary = train_text.train([str(digits / "on")], 128, str(tmp_path / "text"), model_type="bpe")
    tok = TextTokenizer(summary["model"])
    for s in SHIFTS:
        pieces = tok.encode(shift_text(*s))
        assert 0 not in pieces, s  # never <unk>
        # measured 2..5 pieces (e.g. "▁" "up" "▁l" "eft"): the shift words got merges of their own
        assert len(pieces) <= 5, (s, pieces)


# ------------------------------------------------------------------------------------------------ the loader
def test_augmented_c2i_layout_and_dropped_condition(tmp_path):
    aug = shift_record(-1, -1)  # "up left"
    d = write_dir(tmp_path / "a", [[sample(7, augment=aug)]])
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="c2i")), StubVocab(), 20, 1, seed=0))
    row = [BOS, CLS0 + 3, *ch("up left"), BOI, *img(7), EOI, EOS]
    row += [PAD] * (21 - len(row))
    assert b["tokens"].tolist() == [row[:-1]] and b["labels"].tolist() == [row[1:]]
    # targets: the six codes and <eoi>, predicted from <boi> .. the last code; never the condition or AUG
    n_cond = 2 + len("up left")
    assert b["loss_mask"].tolist() == [[0] * n_cond + [1] * (HW + 1) + [0] * (20 - n_cond - HW - 1)]
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="c2i"), cond_dropout=1.0), StubVocab(),
                                     20, 1, seed=0))
    row = [BOS, NULL, *ch("up left"), BOI, *img(7), EOI, EOS]
    assert b["tokens"][0, :len(row)].tolist() == row  # dropped: <null>, and the augmentation stays


def test_augmented_t2i_and_i2t_layouts(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(5, captions=["ab"], augment=shift_record(0, 1))]])
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="t2i")), StubVocab(), 20, 1, seed=0))
    row = [BOS, *ch("ab"), *ch("down"), BOI, *img(5), EOI, EOS]
    row += [PAD] * (21 - len(row))
    assert b["tokens"].tolist() == [row[:-1]] and b["labels"].tolist() == [row[1:]]
    n_cond = 1 + 2 + 4
    assert b["loss_mask"].tolist() == [[0] * n_cond + [1] * (HW + 1) + [0] * (20 - n_cond - HW - 1)]
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="t2i"), cond_dropout=1.0), StubVocab(),
                                     20, 1, seed=0))
    assert b["tokens"][0, :7].tolist() == [BOS, NULL, *ch("down"), BOI]
    # image -> caption: the shifted image with its unchanged caption, the plain layout
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="i2t")), StubVocab(), 12, 1, seed=0))
    row = [BOS, BOI, *img(5), EOI, *ch("ab"), EOS]
    row += [PAD] * (13 - len(row))
    assert b["tokens"].tolist() == [row[:-1]] and b["labels"].tolist() == [row[1:]]
    assert b["loss_mask"].tolist() == [[0] * (HW + 2) + [1, 1, 1] + [0] * (12 - HW - 5)]


def test_real_samples_keep_the_plain_layout_next_to_copies(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(1), sample(2, augment=shift_record(1, 0))]])
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="c2i"), shuffle_buffer=0), StubVocab(),
                                     40, 1, seed=0))
    plain = [BOS, CLS0 + 3, BOI, *img(1), EOI, EOS]
    copy = [BOS, CLS0 + 3, *ch("right"), BOI, *img(2), EOI, EOS]
    row = plain + copy
    assert b["tokens"][0, :len(row)].tolist() == row


def test_augmented_false_skips_copies_in_pretraining(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(i, augment=shift_record(1, 0) if i % 3 else None) for i in range(9)]])
    one = lambda aug: cfg(SourceConfig(path=str(d), task="c2i", augmented=aug), shuffle_buffer=0)  # noqa: E731
    src = build_webdataset_source(one(False), StubVocab(), 12, 1, seed=0)
    assert [sample_ids(b)[0] for b in take(src, 6)] == [0, 3, 6, 0, 3, 6]  # real ones only, epoch after epoch
    assert src.error_counts() == {}  # a skipped copy is not a bad sample
    assert "augmented" in src.state_dict()["fingerprint"]["sources"][0]
    src = build_webdataset_source(one(True), StubVocab(), 20, 1, seed=0)
    assert [sample_ids(b)[0] for b in take(src, 9)] == list(range(9))
    assert "augmented" not in src.state_dict()["fingerprint"]["sources"][0]  # old loader states still match


def test_alignment_stages_read_only_real_samples(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(i, label=i % 10, augment=shift_record(0, -1) if i % 2 else None)
                                    for i in range(8)]])
    src = build_alignment_source(cfg(SourceConfig(path=str(d), task="c2i"), shuffle_buffer=0),
                                 AlignConfig(uncond_ratio=0.0), "cca", StubVocab(), 20, 2, seed=0)
    seen = [i for b in take(src, 4) for i in sample_ids(b)]
    assert sorted(set(seen)) == [0, 2, 4, 6]
    assert set(seen[:8]) == {0, 2, 4, 6}  # one epoch is the four real samples (pos + neg rows of each pair)
    for b in take(src, 2):  # no <boi> preceded by the AUG pieces: the condition is the class token only
        assert all(row.index(BOI) == 2 for row in b["tokens"].tolist())
    pairs = [{"__key__": f"k{i}", "json": json.dumps({"prompt": "ab", "chosen": "c", "rejected": "d",
                                                      **({"augment": shift_record(1, 1)} if i else {})}).encode()}
             for i in range(3)]
    d = write_dir(tmp_path / "p", [pairs], kind="pairs")
    src = build_alignment_source(cfg(d, shuffle_buffer=0), AlignConfig(), "dpo", StubVocab(), 12, 1, seed=0)
    assert [b["tokens"][0, :5].tolist() for b in take(src, 2)] == [[BOS, *ch("ab"), 6, *ch("c")]] * 2


def test_malformed_augment_is_a_bad_sample(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(0), sample(1, augment={"shift": [1, 0]}), sample(2)]])
    src = build_webdataset_source(cfg(SourceConfig(path=str(d), task="c2i"), shuffle_buffer=0, on_error="raise"),
                                  StubVocab(), 12, 1)
    with pytest.raises(BadSample) as ei:
        take(src, 3)
    assert ei.value.reason == "missing_field" and ei.value.key == "000001" and "augment" in str(ei.value)


def test_augmented_c2i_needs_a_text_model(tmp_path):
    d = write_dir(tmp_path / "a", [[sample(0)]])
    m = json.load(open(d / "manifest.json"))
    json.dump({**m, "augment": {"shifts": [[1, 0]]}}, open(d / "manifest.json", "w"))
    no_text = StubVocab(text_size=0)
    with pytest.raises(ConfigError, match="augmented copies"):
        resolve_source(0, SourceConfig(path=str(d), task="c2i"), no_text)
    resolve_source(0, SourceConfig(path=str(d), task="c2i", augmented=False), no_text)  # skips them: fine
    resolve_source(0, SourceConfig(path=str(d), task="c2i"), no_text, stage="cca")  # CCA never reads them
