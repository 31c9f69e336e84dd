"""Alignment batches (megacca/data/align.py, the loader's alignment mode, tools/precompute_ref_logps.py and the
`pairs` path of tools/vq_encode.py) against docs/data-format.md, "Alignment batches".

Shards and the stand-in vocabulary come from tests/test_loader.py (contract id layout, one text piece per
character), so every row can be written out by hand.
"""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megacca.config import AlignConfig, ConfigError
from megacca.data.align import (Pair, cca_pairs, collate_pairs, negative_permutation, split_condition)
from megacca.data.config import SourceConfig
from megacca.data.loader import BadSample, alignment_epoch, build_alignment_source, build_webdataset_source
from megacca.data.packing import c2i_tokens, i2t_tokens
from megacca.tokenizer.vocab import UnifiedVocab
from test_loader import (BOI, BOS, C, CLS0, EOI, EOS, GRID, I0, K, NULL, P, PAD, T0, StubVocab, c2i_sample, cfg,
                         codes_for, npy, take, write_dir)

ROOT = Path(__file__).resolve().parents[1]
SEP = 6
HW = GRID[0] * GRID[1]
KEYS = ("tokens", "labels", "loss_mask", "pos_like", "ref_logps")


def align(**kw) -> AlignConfig:
    kw.setdefault("uncond_ratio", 0.0)
    return AlignConfig(**kw)


def ch(s: str) -> list[int]:
    return [T0 + ord(c) % P for c in s]


def img(i: int) -> list[int]:
    return (I0 + codes_for(i).reshape(-1)).tolist()


def same(a, b) -> bool:
    return len(a) == len(b) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in KEYS if k in x)
                                    for x, y in zip(a, b))


def sample_id(row: list[int], image_offset: int = I0) -> int:
    """The c2i/t2i sample id a row's image carries (codes_for puts it in the first two cells)."""
    j = row.index(BOI)
    return (row[j + 1] - image_offset) * K + (row[j + 2] - image_offset)


def t2i_sample(i: int, caption: str, label=None) -> dict:
    return {"__key__": f"{i:06d}", "codes.npy": npy(codes_for(i)),
            "json": json.dumps({"label": label, "captions": [caption]}).encode()}


def pair_sample(key: str, prompt="ab", chosen="cd", rejected="e", codes=None, drop=()) -> dict:
    meta = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for k in drop:
        meta.pop(k)
    s = {"__key__": key, "json": json.dumps(meta).encode()}
    if codes is not None:
        s["prompt.codes.npy"] = npy(codes)
    return s


def _load_script(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ CCA layouts
def test_cca_c2i_rows_exact(tmp_path):
    d = write_dir(tmp_path / "a", [[c2i_sample(i, label=i) for i in range(3)]])
    b = next(build_alignment_source(cfg(d, shuffle_buffer=0), align(), "cca", StubVocab(), 12, 3, seed=0))
    assert b["tokens"].shape == (6, 12) and b["tokens"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["pos_like"].dtype == torch.bool
    for i in range(3):
        pos = [BOS, CLS0 + i, BOI, *img(i), EOI, EOS, PAD, PAD]
        neg = [BOS, CLS0 + (i + 1) % 3, BOI, *img(i), EOI, EOS, PAD, PAD]  # roll: row i+1's condition
        assert b["tokens"][i].tolist() == pos[:-1] and b["labels"][i].tolist() == pos[1:]
        assert b["tokens"][3 + i].tolist() == neg[:-1] and b["labels"][3 + i].tolist() == neg[1:]
    # exactly the H*W code labels (positions 2..7 predict the codes): not <eoi>, not the condition, not padding
    assert b["loss_mask"].tolist() == [[0, 0] + [1] * HW + [0, 0, 0, 0]] * 6
    assert b["pos_like"].tolist() == [False] * 3
    assert "ref_logps" not in b


def test_cca_t2i_rows_and_label_positives(tmp_path):
    # samples 0 and 1 show the same label with different captions; sample 2 another label
    d = write_dir(tmp_path / "a", [[t2i_sample(0, "ab", 0), t2i_sample(1, "xyz", 0), t2i_sample(2, "q", 1)]],
                  classes=None)
    for flag in (True, False):
        src = build_alignment_source(cfg(d, shuffle_buffer=0), align(same_label_positive=flag), "cca",
                                     StubVocab(), 15, 3, seed=0)
        assert src._plan.sources[0].task == "t2i"
        b = next(src)
        caps = [ch("ab"), ch("xyz"), ch("q")]
        for i in range(3):
            pos = [BOS, *caps[i], BOI, *img(i), EOI, EOS]
            neg = [BOS, *caps[(i + 1) % 3], BOI, *img(i), EOI, EOS]
            pos, neg = pos + [PAD] * (16 - len(pos)), neg + [PAD] * (16 - len(neg))
            assert b["tokens"][i].tolist() == pos[:-1] and b["tokens"][3 + i].tolist() == neg[:-1]
            # the mask starts at the label after <boi>: position len(cond) + 1 predicts the first code
            for r, cond in ((i, caps[i]), (3 + i, caps[(i + 1) % 3])):
                want = [0] * 15
                want[len(cond) + 1:len(cond) + 1 + HW] = [1] * HW
                assert b["loss_mask"][r].tolist() == want
        # row 0's negative is caption "xyz" of the same digit: positive-like only with same_label_positive
        assert b["pos_like"].tolist() == [flag, False, False]
    # identical captions are positive-like whatever the flag (and without labels)
    d = write_dir(tmp_path / "b", [[t2i_sample(0, "ab"), t2i_sample(1, "ab")]], classes=None)
    b = next(build_alignment_source(cfg(d, shuffle_buffer=0), align(same_label_positive=False), "cca",
                                    StubVocab(), 15, 2, seed=0))
    assert b["pos_like"].tolist() == [True, True]


def test_negative_permutations():
    rng = np.random.default_rng(0)
    assert negative_permutation(5, "roll", rng).tolist() == [1, 2, 3, 4, 0]  # torch.roll(c, shifts=-1)
    assert negative_permutation(1, "roll", rng).tolist() == [0]
    assert negative_permutation(1, "derangement", rng).tolist() == [0]
    seen = Counter()
    for _ in range(900):
        p = negative_permutation(4, "derangement", rng)
        assert sorted(p.tolist()) == [0, 1, 2, 3] and not np.any(p == np.arange(4))
        seen[tuple(p.tolist())] += 1
    # 4 elements have 9 derangements; uniform sampling gives each 100 +- 9.4 (binomial sd): all 9 appear and
    # none is off by more than 4 sd (the draws are seeded: no flakiness)
    assert len(seen) == 9 and all(abs(c - 100) < 40 for c in seen.values()), seen
    a = negative_permutation(6, "derangement", np.random.default_rng(3))
    assert a.tolist() == negative_permutation(6, "derangement", np.random.default_rng(3)).tolist()


def test_cca_derangement_in_loader(tmp_path):
    d = write_dir(tmp_path / "a", [[c2i_sample(i, label=i) for i in range(10)]])
    src = build_alignment_source(cfg(d, shuffle_buffer=0), align(negatives="derangement"), "cca", StubVocab(), 12,
                                 5, seed=1)
    perms = []
    for b in take(src, 4):
        t = b["tokens"]
        labels = t[:5, 1].tolist()
        neg = t[5:, 1].tolist()
        assert all(n != p for n, p in zip(neg, labels))  # no fixed point, so every row is a true negative
        assert sorted(neg) == sorted(labels)  # a permutation of the batch's conditions
        assert torch.equal(t[:5, 2:], t[5:, 2:])  # the same images
        assert b["pos_like"].tolist() == [False] * 5
        perms.append([labels.index(n) for n in neg])
    assert any(p != [1, 2, 3, 4, 0] for p in perms)  # not the roll


def test_uncond_rows_get_null_in_both(tmp_path):
    d = write_dir(tmp_path / "a", [[c2i_sample(i, label=i % C) for i in range(40)]])
    b = next(build_alignment_source(cfg(d), align(uncond_ratio=1.0), "cca", StubVocab(), 12, 4, seed=0))
    assert b["tokens"][:, 1].tolist() == [NULL] * 8 and b["pos_like"].tolist() == [True] * 4
    assert torch.equal(b["tokens"][:4], b["tokens"][4:])
    src = build_alignment_source(cfg(d), align(uncond_ratio=0.3), "cca", StubVocab(), 12, 4, seed=0)
    nulls = 0
    for b in take(src, 40):
        pos, neg = b["tokens"][:4, 1], b["tokens"][4:, 1]
        null = pos == NULL
        assert torch.equal(null, neg == NULL)  # <null> in both slots or in neither
        assert b["pos_like"][null].all()
        # a conditional row's negative is another sample's class (roll): positive-like exactly when equal
        assert torch.equal(b["pos_like"][~null], (pos == neg)[~null])
        nulls += int(null.sum())
    # 160 independent draws at p = 0.3: sd 0.036; 0.12 is > 3 sd (seeded)
    assert abs(nulls / 160 - 0.3) < 0.12


def test_pos_like_pure_function():
    v = StubVocab()
    mk = lambda i, label: split_condition(v, c2i_tokens(v, label, codes_for(i), False), label)  # noqa: E731
    items = [mk(0, 3), mk(1, 3), mk(2, 4)]
    pairs = cca_pairs(v, items, negatives="roll", uncond_ratio=0.0, same_label_positive=False,
                      rng=np.random.default_rng(0))
    assert [p.pos_like for p in pairs] == [True, False, False]  # row 0 takes row 1's class 3: its own
    assert pairs[0].rejected[0].tolist() == [BOS, CLS0 + 3, BOI, *img(0), EOI, EOS]
    assert pairs[2].rejected[0].tolist() == [BOS, CLS0 + 3, BOI, *img(2), EOI, EOS]


# --------------------------------------------------------------------------------- reproducibility, resume
def mixed_cca_dirs(tmp_path):
    a = write_dir(tmp_path / "a", [[c2i_sample(s * 7 + j) for j in range(7)] for s in range(5)])
    t = write_dir(tmp_path / "t", [[t2i_sample(100 + s * 6 + j, "cap %d" % (j % 3), j % 3) for j in range(6)]
                                   for s in range(3)], classes=None)
    return [SourceConfig(path=str(a), weight=2.0), SourceConfig(path=str(t), weight=1.0)]


def test_reproducible_and_exact_resume_with_workers_and_ranks(tmp_path):
    conf = cfg(*mixed_cca_dirs(tmp_path), num_workers=2, shuffle_buffer=4)
    al = align(negatives="derangement", uncond_ratio=0.25)
    build = lambda seed=9: build_alignment_source(conf, al, "cca", StubVocab(), 15, 3, 1, 2, seed)  # noqa: E731
    s0 = build()
    ref = take(s0, 14)
    s0.close()
    s1 = build()
    assert same(take(s1, 14), ref)  # same seed, same batches (pairing and <null> draws included)
    s1.close()
    s2 = build(10)
    assert not same(take(s2, 14), ref)
    s2.close()
    for k in (1, 6):
        s = build()
        take(s, k)
        state = json.loads(json.dumps(s.state_dict()))
        s.close()
        r = build()
        r.load_state_dict(state)
        assert same(take(r, 5), ref[k:k + 5]), f"resume after {k}"
        r.close()
    # a state saved under other pairing options is refused, naming them
    s = build()
    state = s.state_dict()
    with pytest.raises(ValueError, match="align"):
        other = build_alignment_source(conf, align(uncond_ratio=0.25), "cca", StubVocab(), 15, 3, 1, 2, 9)
        other.load_state_dict(state)


def test_each_pair_once_per_epoch_over_ranks_and_workers(tmp_path):
    # 8 shards x 6 samples over 2 ranks x 2 workers: a slot reads 2 shards = 12 samples = 6 micro-batches of 2
    # pairs per epoch; a rank's two slots alternate, so 12 micro-batches per rank are one epoch.
    d = write_dir(tmp_path / "a", [[c2i_sample(s * 6 + j) for j in range(6)] for s in range(8)])
    epochs = {0: [], 1: []}
    for rank in range(2):
        src = build_alignment_source(cfg(d, num_workers=2), align(), "cca", StubVocab(), 12, 2, rank, 2, seed=3)
        batches = take(src, 24)
        src.close()
        for e in range(2):
            for b in batches[12 * e:12 * e + 12]:
                rows = b["tokens"].tolist()
                epochs[e] += [sample_id(r) for r in rows[:2]]
                assert [sample_id(r) for r in rows[2:]] == [sample_id(r) for r in rows[:2]]
    for e in range(2):
        assert sorted(epochs[e]) == list(range(48)), f"epoch {e}"
    assert epochs[0] != epochs[1]


# ------------------------------------------------------------------------------------------------------- DPO
def test_dpo_rows_text_and_image_prompts(tmp_path):
    codes = np.arange(HW).reshape(GRID)
    d = write_dir(tmp_path / "p", [[pair_sample("k0"), pair_sample("k1", prompt="", codes=codes),
                                    pair_sample("k2", prompt="a", codes=codes)]], kind="pairs")
    b = next(build_alignment_source(cfg(d, shuffle_buffer=0), align(), "dpo", StubVocab(), 13, 3, seed=0))
    a_, b_, c_, d_, e_ = ch("abcde")
    image = [BOI, *(I0 + codes.reshape(-1)).tolist(), EOI]
    rows = {0: [BOS, a_, b_, SEP, c_, d_, EOS], 3: [BOS, a_, b_, SEP, e_, EOS],  # text prompt
            1: [BOS, *image, c_, d_, EOS], 4: [BOS, *image, e_, EOS],  # image prompt: the i2t layout
            2: [BOS, *image, a_, SEP, c_, d_, EOS], 5: [BOS, *image, a_, SEP, e_, EOS]}  # both
    for r, row in rows.items():
        n = len(row)
        full = row + [PAD] * (14 - n)
        assert b["tokens"][r].tolist() == full[:-1] and b["labels"][r].tolist() == full[1:], r
        resp = 3 if r < 3 else 2  # response pieces + <eos>: "cd" chosen, "e" rejected
        assert b["loss_mask"][r].tolist() == [0] * (n - 1 - resp) + [1] * resp + [0] * (14 - n), r
    ids, tgt = i2t_tokens(StubVocab(), codes, ch("cd"))
    assert b["tokens"][1, :len(ids) - 1].tolist() == ids[:-1].tolist()
    assert b["loss_mask"][1, :len(ids) - 1].tolist() == tgt[1:].tolist()
    assert "pos_like" not in b and "ref_logps" not in b


@pytest.mark.parametrize("case,reason,needle", [
    ("no_rejected", "missing_field", "rejected"),
    ("no_json", "missing_field", "json"),
    ("png_not_encoded", "missing_field", "vq_encode"),
    ("empty_chosen", "bad_pair", "empty"),
])
def test_bad_pair_sample_names_shard_and_key(tmp_path, case, reason, needle):
    bad = {"no_rejected": pair_sample("k1", drop=("rejected",)),
           "no_json": {"__key__": "k1", "txt": b"x"},
           "png_not_encoded": {**pair_sample("k1"), "prompt.png": b"\x89PNG"},
           "empty_chosen": pair_sample("k1", chosen=" ")}[case]
    d = write_dir(tmp_path / "p", [[pair_sample("k0"), bad, pair_sample("k2")]], kind="pairs")
    src = build_alignment_source(cfg(d, shuffle_buffer=0, on_error="raise"), align(), "dpo", StubVocab(), 13, 1)
    with pytest.raises(BadSample) as ei:
        take(src, 3)
    msg = str(ei.value)
    assert ei.value.reason == reason and ei.value.key == "k1" and "train-000000.tar" in msg and "'k1'" in msg
    assert needle in msg
    src = build_alignment_source(cfg(d, shuffle_buffer=0, on_error="skip"), align(), "dpo", StubVocab(), 13, 1)
    got = [b["tokens"][0, 1:3].tolist() for b in take(src, 2)]
    assert got == [ch("ab")] * 2 and src.error_counts() == {reason: 1}


def test_source_kinds_per_stage(tmp_path):
    codes = write_dir(tmp_path / "c", [[c2i_sample(i) for i in range(4)]])
    pairs = write_dir(tmp_path / "p", [[pair_sample("k0")]], kind="pairs")
    text = write_dir(tmp_path / "t", [[{"__key__": "k0", "txt": b"ab"}]], kind="text")
    v = StubVocab()
    with pytest.raises(ConfigError, match="pretraining does not read"):
        build_webdataset_source(cfg(pairs), v, 12, 1)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path.*preference pairs"):
        build_alignment_source(cfg(pairs), align(), "cca", v, 12, 1)
    with pytest.raises(ConfigError, match=r"stage dpo reads pairs"):
        build_alignment_source(cfg(codes), align(), "dpo", v, 12, 1)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].task.*c2i or t2i"):
        build_alignment_source(cfg(SourceConfig(path=str(codes), task="i2t")), align(), "cca", v, 12, 1)
    with pytest.raises(ConfigError, match="stage cca reads"):
        build_alignment_source(cfg(text), align(), "cca", v, 12, 1)
    with pytest.raises(ConfigError, match="precomputed.*ref_pairs"):
        build_alignment_source(cfg(codes), align(reference="precomputed"), "cca", v, 12, 1)
    m = json.loads((pairs / "manifest.json").read_text())
    m.update(image_mode="L")  # make_shards' mark of prompt images; vq_encode replaces it by a vq block
    (pairs / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="not VQ-encoded"):
        build_alignment_source(cfg(pairs), align(), "dpo", v, 12, 1)


# ----------------------------------------------------------------------------------------- ref_pairs shards
def _ref_records(tmp_path, vocab):
    """An epoch of CCA pairs as the tool walks it, with made-up float32 reference log-probs."""
    d = write_dir(tmp_path / "a", [[c2i_sample(s * 5 + j) for j in range(5)] for s in range(2)])
    epoch = list(alignment_epoch(cfg(d), align(uncond_ratio=0.4), "cca", vocab, 12, 3, seed=5))
    assert [len(b) for _, b in epoch] == [3, 3, 3, 1]  # micro-batches per source, the last one shorter
    pairs = [kp for _, b in epoch for kp in b]
    assert sorted(sample_id(p.chosen[0].tolist(), vocab.image_offset) for _, p in pairs) == list(range(10))
    rng = np.random.default_rng(0)
    logps = [tuple(float(x) for x in (-rng.random(2) * 50).astype(np.float32)) for _ in pairs]
    return [(k, p, lp, k) for (k, p), lp in zip(pairs, logps)]


def test_ref_pairs_round_trip(tmp_path):
    tool = _load_script("tools/precompute_ref_logps.py", "precompute_under_test")
    v = StubVocab()
    records = _ref_records(tmp_path, v)
    out = tmp_path / "ref"
    man = tool.write_ref_pairs(str(out), "train", records, "cca", shard_size=4, vocab=None)
    assert man["kind"] == "ref_pairs" and man["stage"] == "cca" and len(man["splits"]["train"]["shards"]) == 3
    src = build_alignment_source(cfg(out, shuffle_buffer=0), align(reference="precomputed"), "cca", v, 12, 2)
    assert src._plan.sources[0].task == "ref_pairs"
    # one slot, shards in the plan's seeded order, records in written order: the batches collate the records
    # in that order, and the reference log-probs come back with the same float32 bits
    from megacca.data.loader import plan_units

    order = [u[0] for u in plan_units(3, 1, 0, 0, 0, 0)]
    recs = [r for s in order for r in records[4 * s:4 * s + 4]]
    got = take(src, 5)
    for j, b in enumerate(got):
        want = collate_pairs([r[1]._replace(ref_logps=r[2]) for r in recs[2 * j:2 * j + 2]], 12, PAD,
                             pos_like=True, ref_logps=True)
        assert same([b], [want])
        lp = [r[2] for r in recs[2 * j:2 * j + 2]]
        assert b["ref_logps"].tolist() == [lp[0][0], lp[1][0], lp[0][1], lp[1][1]]
    assert sum(int(b["pos_like"].sum()) for b in got) == sum(r[1].pos_like for r in recs)
    # align.reference=model reads the same pairs and leaves the log-probs to the reference model
    b = next(build_alignment_source(cfg(out, shuffle_buffer=0), align(), "cca", v, 12, 2))
    assert same([b], [{k: v_ for k, v_ in got[0].items() if k != "ref_logps"}])
    with pytest.raises(ConfigError, match="stage 'cca', this is stage 'dpo'"):
        build_alignment_source(cfg(out), align(), "dpo", v, 12, 2)
    with pytest.raises(ConfigError, match="pretraining does not read"):
        build_webdataset_source(cfg(out), v, 12, 1)


def test_ref_pairs_vocab_checked_and_bad_record(tmp_path):
    tool = _load_script("tools/precompute_ref_logps.py", "precompute_under_test")
    v = UnifiedVocab.build(None, K, GRID, class_names=[str(i) for i in range(C)])
    other = UnifiedVocab.build(None, 2 * K, GRID, class_names=[str(i) for i in range(C)])
    records = _ref_records(tmp_path, v)
    tool.write_ref_pairs(str(tmp_path / "ok"), "train", records, "cca", vocab=v.to_manifest())
    assert len(take(build_alignment_source(cfg(tmp_path / "ok"), align(reference="precomputed"), "cca", v, 12, 2),
                    3)) == 3
    tool.write_ref_pairs(str(tmp_path / "other"), "train", records, "cca", vocab=other.to_manifest())
    with pytest.raises(ConfigError, match="data.vocab.*codebook_size"):
        build_alignment_source(cfg(tmp_path / "other"), align(reference="precomputed"), "cca", v, 12, 2)
    # a record without its rejected mask: BadSample naming shard and key
    from megacca.data.shards import iter_samples, write_manifest, write_shard

    bad = tmp_path / "bad"
    bad.mkdir()
    samples = list(iter_samples(str(tmp_path / "ok")))
    samples[1] = {k: s for k, s in samples[1].items() if k not in ("rejected_mask.npy", "__url__")}
    entry = write_shard(str(bad / "train-000000.tar"),
                        ({k: s for k, s in x.items() if k != "__url__"} for x in samples))
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    write_manifest(str(bad), "ref_pairs", {"train": {"count": entry["count"], "shards": [entry]}},
                   **{k: m[k] for k in m if k not in ("format", "kind", "splits")})
    src = build_alignment_source(cfg(bad, shuffle_buffer=0), align(reference="precomputed"), "cca", v, 12, 2)
    with pytest.raises(BadSample) as ei:
        next(src)
    key = samples[1]["__key__"]
    assert ei.value.key == key and f"{key!r}" in str(ei.value) and "rejected_mask.npy" in str(ei.value)
    assert "train-000000.tar" in str(ei.value)


# --------------------------------------------------------------------------------- vq_encode on pairs shards
def test_vq_encode_pairs_prompt_images(tmp_path):
    from PIL import Image

    from megacca.tokenizer import vq as V

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(imgs / f"{i}.png")
    lines = [{"prompt": "", "chosen": "a cat", "rejected": "a dog", "prompt_image": "0.png"},
             {"prompt": "what is it", "chosen": "two", "rejected": "three"},
             {"prompt": "and this", "chosen": "x", "rejected": "y", "prompt_image": "1.png"}]
    (imgs / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    def run(*a):
        return subprocess.run([sys.executable, *map(str, a)], cwd=ROOT, capture_output=True, text=True, timeout=120)

    p = run("tools/make_shards.py", "pairs", "--input", imgs / "pairs.jsonl", "--out", tmp_path / "pairs",
            "--heldout-fraction", "0", "--no-shuffle", "--mode", "L", "--size", "8")
    assert p.returncode == 0, p.stderr
    torch.manual_seed(0)
    model = V.VQModel(V.tiny(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=[1, 2], num_res_blocks=1,
                             z_channels=16, norm_groups=4, image_size=8)).eval()
    V.save_vq(model, tmp_path / "vq")
    p = run("tools/vq_encode.py", "--vq", tmp_path / "vq", "--src", tmp_path / "pairs", "--out", tmp_path / "enc",
            "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "encoded 2 images" in p.stdout
    from megacca.data.shards import iter_samples, read_manifest

    man = read_manifest(str(tmp_path / "enc"))
    assert man["kind"] == "pairs" and man["vq"]["codebook_size"] == 32 and "image_mode" not in man
    src = {s["__key__"]: s for s in iter_samples(str(tmp_path / "pairs"))}
    got = {s["__key__"]: s for s in iter_samples(str(tmp_path / "enc"))}
    assert sorted(got) == sorted(src)
    for k, s in got.items():
        assert s["json"] == src[k]["json"]
        assert ("prompt.codes.npy" in s) == ("prompt.png" in src[k]) and "prompt.png" not in s
        if "prompt.png" in src[k]:
            x = V.preprocess(Image.open(io.BytesIO(src[k]["prompt.png"])), model.config)[None]
            want = model.encode(x).numpy()[0]
            c = np.load(io.BytesIO(s["prompt.codes.npy"]), allow_pickle=False)
            np.testing.assert_array_equal(c, want)  # same weights, same preprocessing: exact
    # the encoded shards feed the DPO loader; the raw ones are refused before reading
    v = StubVocab(codebook_size=32, image_grid=(4, 4))
    assert len(take(build_alignment_source(cfg(tmp_path / "enc"), align(), "dpo", v, 40, 1), 3)) == 3
    with pytest.raises(ConfigError, match="not VQ-encoded"):
        build_alignment_source(cfg(tmp_path / "pairs"), align(), "dpo", v, 40, 1)


def test_collate_refuses_rows_longer_than_seq():
    v = StubVocab()
    pair = Pair(c2i_tokens(v, 0, codes_for(0), False), c2i_tokens(v, 1, codes_for(0), False))
    with pytest.raises(BadSample, match="does not fit"):
        collate_pairs([pair], 9, PAD)
    b = collate_pairs([pair], 10, PAD)  # 11 tokens fit a row of S + 1 exactly
    assert b["tokens"].shape == (2, 10) and b["labels"][:, -1].tolist() == [EOS, EOS]


# ------------------------------------------------------------------------- tools/precompute_ref_logps.py, e2e
def _score_independently(cfg, ckpt, batch) -> torch.Tensor:
    """Summed log-probs of a micro-batch's rows by another route than the tool's: the checkpoint read into one
    full state dict (`read_full_state_dict`, not megatron's sharded load) and a plain log_softmax + gather
    (not the vocab-parallel cross-entropy)."""
    from megacca.checkpoint import read_full_state_dict
    from megacca.distributed.init import init_distributed
    from megacca.model.gpt import UnifiedGPT

    init_distributed(1, 1, seed=0)
    model = UnifiedGPT(cfg)
    missing, unexpected = model.load_state_dict(read_full_state_dict(ckpt), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], None, None).float()
    lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return (lp * batch["loss_mask"]).sum(-1)


def test_precompute_ref_logps_end_to_end(tmp_path, capsys):
    from conftest import PY, run, train
    from megacca.bench.data import write_random_code_shards
    from megacca.checkpoint import resolve_checkpoint
    from megacca.config import load_config
    from megacca.data.shards import read_manifest

    d = tmp_path
    write_random_code_shards(str(d / "codes"), samples=30, grid=4, codebook=64, classes=10, per_shard=12)
    vocab = UnifiedVocab.build(None, 64, (4, 4), [str(k) for k in range(10)])
    vocab.save(str(d / "vocab.json"))
    config = "configs/pretrain/digits.yaml"
    base = [f"data.vocab={d / 'vocab.json'}", f"data.sources=[{{path: {d / 'codes'}, task: c2i}}]",
            "model.seq_length=24", "train.micro_batch_size=4", "data.num_workers=0"]
    train(d / "pre", *base, "train.max_steps=2", "train.save_every=2", config=config)
    opts = [*base, "stage=cca", f"train.init_from={d / 'pre'}", "align.uncond_ratio=0.3"]
    tool = [PY, "tools/precompute_ref_logps.py", config, *opts, "--out", str(d / "ref"), "--shard-size", "8"]
    p = run(tool)
    assert "train with: align.reference=precomputed" in p.stdout
    man = read_manifest(str(d / "ref"))
    assert man["kind"] == "ref_pairs" and man["stage"] == "cca" and man["splits"]["train"]["count"] == 30
    assert man["init_step"] == 2 and man["align"]["uncond_ratio"] == 0.3 and man["vocab"] == vocab.to_manifest()
    shas = [s["sha256"] for s in man["splits"]["train"]["shards"]]
    # an existing output is kept unless --overwrite (checked before any model is built: in this process);
    # the rerun writes the same bytes
    main = _load_script("tools/precompute_ref_logps.py", "precompute_under_test").main
    assert main([config, *opts, "--out", str(d / "ref")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    run(tool + ["--overwrite"])
    assert [s["sha256"] for s in read_manifest(str(d / "ref"))["splits"]["train"]["shards"]] == shas

    # the stage's loader reads them back; their log-probs are the reference's, computed another way
    cfg = load_config(config, opts + ["align.reference=precomputed", f"data.sources=[{{path: {d / 'ref'}}}]"])
    src = build_alignment_source(cfg.data, cfg.align, "cca", vocab, 24, 5, seed=1)
    batches = take(src, 6)  # 30 pairs = one epoch
    assert sum(int(b["pos_like"].sum()) for b in batches) > 0
    ckpt = resolve_checkpoint(d / "pre")
    for b in batches[:2]:
        want = _score_independently(cfg, ckpt, b)
        # fp32 sums of 16 code log-probs of about -4.2 each, by two kernels (vocab-parallel cross-entropy vs
        # log_softmax): agreement to 1e-4 absolute is rounding, a wrong row or mask is off by whole nats
        torch.testing.assert_close(b["ref_logps"], want, atol=1e-4, rtol=0)
        assert float(b["ref_logps"].mean()) < -16 * 3  # an untrained model: about log(128) nats per code

    # a bad sample with data.on_error=raise: one line naming the shard and the key, exit 2, no output
    bad = d / "bad"
    from megacca.data.shards import ShardWriter, write_manifest

    with ShardWriter(str(bad), "train") as w:
        for i in range(6):
            label = 99 if i == 4 else i
            w.write({"__key__": f"s{i}", "codes.npy": np.zeros((4, 4), np.int16),
                     "json": {"label": label, "captions": []}})
    write_manifest(str(bad), "codes", {"train": w.close()}, classes=[str(k) for k in range(10)])
    p = run([PY, "tools/precompute_ref_logps.py", config, *opts, f"data.sources=[{{path: {bad}, task: c2i}}]",
             "--out", str(d / "ref_bad")], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()[-1]
    assert "train-000000.tar" in err and "'s4'" in err and "label" in err
    assert not (d / "ref_bad" / "manifest.json").exists() and not list((d / "ref_bad").glob("*.tar"))
