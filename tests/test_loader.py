"""The streaming loader (megacca/data/loader.py, packing.py) against docs/data-format.md.

Fixtures are written here with webdataset.TarWriter following the contract (manifest.json + tar shards), and
the vocabulary is a small stand-in with the contract's id layout (specials 0..7, classes, text, codes) whose
text "tokenizer" maps each character to one piece, so token layouts can be checked by hand. A last test runs
the real `UnifiedVocab`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from megacca.data.config import DataConfig, SourceConfig
from megacca.data.loader import BadSample, build_webdataset_source, plan_units
from megacca.data.packing import fit_sample, pack, text_tokens
from megacca.tokenizer.vocab import UnifiedVocab

GRID = (2, 3)
K = 64
C = 10
P = 50
PAD, BOS, EOS, BOI, EOI, NULL = 0, 1, 2, 3, 4, 5
CLS0 = 8
T0 = 8 + C          # 18
I0 = T0 + P         # 68
C2I_LEN = 5 + GRID[0] * GRID[1]  # <bos> <class> <boi> 6 codes <eoi> <eos> = 11


class StubVocab:
    """The UnifiedVocab API with the contract's layout; one text piece per character (ord % P)."""

    pad_id, bos_id, eos_id, boi_id, eoi_id, null_id, sep_id = PAD, BOS, EOS, BOI, EOI, NULL, 6

    def __init__(self, num_classes=C, text_size=P, codebook_size=K, image_grid=GRID):
        self.num_classes, self.text_size, self.codebook_size, self.image_grid = \
            num_classes, text_size, codebook_size, image_grid
        self.class_offset = 8
        self.text_offset = 8 + num_classes
        self.image_offset = self.text_offset + text_size
        self.vocab_size = self.image_offset + codebook_size
        self.class_names = [str(i) for i in range(num_classes)]

    def class_token(self, k):
        if not 0 <= k < self.num_classes:
            raise ValueError(k)
        return self.class_offset + k

    def encode_text(self, s):
        return [self.text_offset + ord(ch) % self.text_size for ch in s]

    def image_tokens(self, codes):
        codes = np.asarray(codes)
        if codes.shape != tuple(self.image_grid) or codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError("bad codes")
        return (self.image_offset + codes.reshape(-1)).tolist()


# ------------------------------------------------------------------------------------------------- fixtures
def npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, np.asarray(a), allow_pickle=False)
    return b.getvalue()


def codes_for(i: int, rng=None) -> np.ndarray:
    """Codes that carry the sample id in their first two cells (id < K*K)."""
    rng = rng or np.random.default_rng(i)
    c = rng.integers(0, K, GRID)
    c[0, 0], c[0, 1] = i // K, i % K
    return c


def c2i_sample(i: int, label=None) -> dict:
    return {"__key__": f"{i:06d}", "codes.npy": npy(codes_for(i)),
            "json": json.dumps({"label": i % C if label is None else label, "captions": []}).encode()}


def write_dir(d, shards, kind="codes", classes=None, split="train"):
    """shards: list of lists of raw samples (bytes members), or bytes (a whole raw tar file)."""
    os.makedirs(d, exist_ok=True)
    entries = []
    for i, ss in enumerate(shards):
        name = f"{split}-{i:06d}.tar"
        path = os.path.join(d, name)
        if isinstance(ss, (bytes, bytearray)):
            with open(path, "wb") as f:
                f.write(ss)
            count = 6
        else:
            with wds.TarWriter(path, encoder=False) as w:
                for s in ss:
                    w.write(s)
            count = len(ss)
        with open(path, "rb") as f:
            entries.append({"name": name, "count": count, "sha256": hashlib.sha256(f.read()).hexdigest()})
    manifest = {"format": "megacca-shards/1", "kind": kind,
                "splits": {split: {"count": sum(e["count"] for e in entries), "shards": entries}},
                "classes": classes if classes is not None else
                ([str(i) for i in range(C)] if kind == "codes" else None),
                "image_size": None, "vq": None, "source": "test"}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return d


def c2i_dir(d, n_shards, per_shard, start=0):
    return write_dir(d, [[c2i_sample(start + s * per_shard + j) for j in range(per_shard)] for s in range(n_shards)])


def cfg(*sources, **kw) -> DataConfig:
    srcs = [s if isinstance(s, SourceConfig) else SourceConfig(path=str(s)) for s in sources]
    kw.setdefault("cond_dropout", 0.0)
    kw.setdefault("num_workers", 0)
    return DataConfig(kind="webdataset", sources=srcs, **kw)


def ids_in(batch) -> list[int]:
    """Sample ids of the c2i samples in a batch (codes[0,0], codes[0,1] after <bos> <cls> <boi>)."""
    out = []
    for row in batch["tokens"].tolist():
        for t, tok in enumerate(row):
            if tok == BOS and t + 4 < len(row):
                out.append((row[t + 3] - I0) * K + (row[t + 4] - I0))
    return out


def take(src, n):
    return [next(src) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "labels", "loss_mask")) \
        and len(a) == len(b)


# ---------------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("n_shards,slots", [(8, 4), (9, 4), (3, 4), (1, 4), (5, 2), (7, 3), (2, 6)])
def test_plan_units_cover_every_sample_once(n_shards, slots):
    counts = [5 + (i % 3) for i in range(n_shards)]
    for epoch in range(3):
        seen = Counter()
        for slot in range(slots):
            for shard, stride, offset in plan_units(n_shards, slots, slot, 7, 0, epoch):
                seen.update((shard, j) for j in range(offset, counts[shard], stride))
        assert seen == Counter({(s, j): 1 for s in range(n_shards) for j in range(counts[s])})


def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path):
    # 8 shards x 6 samples, 4 slots: each slot reads 2 whole shards per epoch = 12 samples = 6 rows of 2
    # samples (S + 1 = 2 * 11) = 3 micro-batches of 2; a rank's 2 slots alternate, so 6 batches = one epoch.
    d = c2i_dir(tmp_path / "a", 8, 6)
    epochs = {0: [], 1: []}
    for rank in range(2):
        src = build_webdataset_source(cfg(d, num_workers=2), StubVocab(), 2 * C2I_LEN - 1, 2, rank, 2, seed=3)
        batches = take(src, 12)
        src.close()
        for e in range(2):
            for b in batches[6 * e:6 * e + 6]:
                epochs[e] += ids_in(b)
    for e in range(2):
        assert sorted(epochs[e]) == list(range(48)), f"epoch {e}"
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    # 3 shards x 8 samples over 4 ranks x 1 reader: one shard is shared at sample level by 2 slots.
    d = c2i_dir(tmp_path / "a", 3, 8)
    seen = []
    for rank in range(4):
        units = plan_units(3, 4, rank, 5, 0, 0)
        n_samples = sum(len(range(o, 8, s)) for _, s, o in units)
        src = build_webdataset_source(cfg(d), StubVocab(), 2 * C2I_LEN - 1, 1, rank, 4, seed=5)
        for b in take(src, (n_samples + 1) // 2):
            seen += ids_in(b)
    assert sorted(seen) == list(range(24))


def test_deterministic_for_seed_and_differs_across_seeds(tmp_path):
    d = c2i_dir(tmp_path / "a", 4, 10)
    run = lambda seed: take(build_webdataset_source(cfg(d, cond_dropout=0.3), StubVocab(), 32, 3, 0, 1, seed), 6)
    a, b, c = run(11), run(11), run(12)
    assert same(a, b)
    assert not same(a, c)


# ---------------------------------------------------------------------------------------- token layouts
def test_c2i_layout_exact(tmp_path):
    codes = np.array([[0, 1, 2], [10, 20, 63]])
    s = {"__key__": "k0", "codes.npy": npy(codes), "json": json.dumps({"label": 3}).encode()}
    d = write_dir(tmp_path / "a", [[s]], )
    b = next(build_webdataset_source(cfg(d), StubVocab(), 13, 1, seed=0))
    # row (S+1 = 14): <bos> <class 3> <boi> 68 69 70 78 88 131 <eoi> <eos> <pad> <pad> <pad>
    row = [BOS, CLS0 + 3, BOI, 68, 69, 70, 78, 88, 131, EOI, EOS, PAD, PAD, PAD]
    assert b["tokens"].tolist() == [row[:-1]]
    assert b["labels"].tolist() == [row[1:]]
    # targets: the six codes and <eoi> (predicted at positions 2..8); not <eos>, not the condition, not pad
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["tokens"].shape == (1, 13)
    # cond_dropout=1 replaces the class by one <null>
    b = next(build_webdataset_source(cfg(d, cond_dropout=1.0), StubVocab(), 13, 1, seed=0))
    assert b["tokens"][0, :3].tolist() == [BOS, NULL, BOI]


def test_t2i_layout_exact(tmp_path):
    codes = np.array([[5, 4, 3], [2, 1, 0]])
    s = {"__key__": "k0", "codes.npy": npy(codes), "json": json.dumps({"label": None, "captions": ["ab"]}).encode()}
    d = write_dir(tmp_path / "a", [[s]], classes=None)
    src = build_webdataset_source(cfg(d), StubVocab(), 14, 1, seed=0)
    assert src._plan.sources[0].task == "t2i"  # auto: codes with captions
    b = next(src)
    a_, b_ = T0 + ord("a") % P, T0 + ord("b") % P  # 65, 66
    row = [BOS, a_, b_, BOI, 73, 72, 71, 70, 69, 68, EOI, EOS, PAD, PAD, PAD]
    assert b["tokens"].tolist() == [row[:-1]] and b["labels"].tolist() == [row[1:]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    b = next(build_webdataset_source(cfg(d, cond_dropout=1.0), StubVocab(), 14, 1, seed=0))
    assert b["tokens"][0, :4].tolist() == [BOS, NULL, BOI, 73]


def test_i2t_and_text_layout(tmp_path):
    s = {"__key__": "k0", "codes.npy": npy(np.zeros(GRID, int)), "json": json.dumps({"captions": ["a"]}).encode()}
    d = write_dir(tmp_path / "a", [[s]])
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="i2t")), StubVocab(), 12, 1, seed=0))
    a_ = T0 + ord("a") % P
    row = [BOS, BOI] + [I0] * 6 + [EOI, a_, EOS, PAD, PAD]
    assert b["tokens"].tolist() == [row[:-1]]
    assert b["loss_mask"].tolist() == [[0] * 8 + [1, 1, 0, 0]]  # caption piece and <eos>
    d = write_dir(tmp_path / "t", [[{"__key__": "k0", "txt": b"ab"}]], kind="text")
    b = next(build_webdataset_source(cfg(d), StubVocab(), 5, 1, seed=0))
    assert b["tokens"].tolist() == [[BOS, T0 + 47, T0 + 48, EOS, PAD]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 0, 0]]


def test_interleaved_layout_and_auto_task(tmp_path):
    seg = {"segments": [{"text": "a"}, {"image": "img0"}, {"text": "b"}]}
    s = {"__key__": "k0", "json": json.dumps(seg).encode(), "img0.codes.npy": npy(np.ones(GRID, int))}
    d = write_dir(tmp_path / "a", [[s]])
    b = next(build_webdataset_source(cfg(SourceConfig(path=str(d), task="interleaved")), StubVocab(), 12, 1,
                                     seed=0))
    a_, b_ = T0 + ord("a") % P, T0 + ord("b") % P
    assert b["tokens"].tolist() == [[BOS, a_, BOI] + [I0 + 1] * 6 + [EOI, b_, EOS]]
    assert b["loss_mask"].tolist() == [[1] + [0] * 8 + [1, 0, 0]]  # labels a and b: the text pieces only
    # make_shards' manifest hint: captions=true -> t2i even with labels; captions=false + labels -> c2i
    d = c2i_dir(tmp_path / "c", 1, 4)
    m = json.load(open(d / "manifest.json"))
    for hint, task in ((True, "t2i"), (False, "c2i")):
        m.update(captions=hint, labels=True)
        json.dump(m, open(d / "manifest.json", "w"))
        assert build_webdataset_source(cfg(d), StubVocab(), 32, 1)._plan.sources[0].task == task


def test_packing_rules():
    v = StubVocab()
    a, b_, c = text_tokens(v, [20, 21]), text_tokens(v, [22]), text_tokens(v, [23, 24, 25])  # 4, 3, 5 tokens
    ids, tgt = pack([a, b_, c], 7, PAD)  # rows of 8: a+b fit (7), c starts the next row
    assert ids.tolist() == [[1, 20, 21, 2, 1, 22, 2, 0], [1, 23, 24, 25, 2, 0, 0, 0]]
    assert tgt.tolist() == [[0, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    # loss_mask = tgt[1:]: never 1 where the label is the next sample's <bos> or padding
    # a long text is cut into rows of S+1 overlapping by one token; every target once
    long = text_tokens(v, list(range(20, 31)))  # 13 tokens, S = 4
    pieces = fit_sample(long, 4, has_image=False)
    assert [p[0].tolist() for p in pieces] == [[1, 20, 21, 22, 23], [23, 24, 25, 26, 27], [27, 28, 29, 30, 2]]
    assert sum(int(p[1].sum()) for p in pieces) == int(long[1].sum()) == 12
    with pytest.raises(BadSample, match="does not fit"):
        fit_sample(long, 4, has_image=True)


# ---------------------------------------------------------------------------------------------- resume
def mixed_dirs(tmp_path):
    a = c2i_dir(tmp_path / "a", 5, 7)
    docs = [[{"__key__": f"d{s}{j}", "txt": ("doc %d %d " % (s, j) * (1 + (j * 3) % 7)).encode()}
             for j in range(9)] for s in range(3)]
    t = write_dir(tmp_path / "t", docs, kind="text")
    return [SourceConfig(path=str(a), weight=2.0), SourceConfig(path=str(t), weight=1.0)]


def test_resume_continues_exactly(tmp_path):
    srcs = mixed_dirs(tmp_path)
    conf = cfg(*srcs, num_workers=2, cond_dropout=0.2, shuffle_buffer=4)
    build = lambda: build_webdataset_source(conf, StubVocab(), 23, 2, 1, 2, seed=9)
    ref_src = build()
    ref = take(ref_src, 16)
    ref_src.close()
    for k in (1, 4, 11):
        s1 = build()
        take(s1, k)
        state = json.loads(json.dumps(s1.state_dict()))  # JSON-serialisable
        s1.close()
        s2 = build()
        s2.load_state_dict(state)
        assert same(take(s2, 5), ref[k:k + 5]), f"resume after {k}"
        s2.close()


def test_resume_rereads_at_most_current_shard(tmp_path, monkeypatch):
    import megacca.data.loader as L

    d = c2i_dir(tmp_path / "a", 6, 8)
    build = lambda: build_webdataset_source(cfg(d), StubVocab(), 2 * C2I_LEN - 1, 1, seed=1)
    s1 = build()
    ref = take(s1, 30)  # 24 rows/epoch: into epoch 1
    s2 = build()
    take(s2, 17)
    state = s2.state_dict()
    reads = []
    real = L.read_shard_samples
    monkeypatch.setattr(L, "read_shard_samples", lambda p: reads.append(p) or real(p))
    s3 = build()
    s3.load_state_dict(state)
    assert same([next(s3)], ref[17:18])
    assert len(reads) == 1
    with pytest.raises(ValueError, match="seed"):
        build_webdataset_source(cfg(d), StubVocab(), 2 * C2I_LEN - 1, 1, seed=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- bad input
def good(n=6):
    return [c2i_sample(i) for i in range(n)]


def tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def corrupt_header(samples, key, ext) -> bytes:
    raw = bytearray(tar_bytes(samples))
    name = f"{key}.{ext}".encode()
    pos = raw.index(name)
    assert pos % 512 == 0
    raw[pos + 148:pos + 156] = b"garbage!"  # break the header checksum
    return bytes(raw)


def zeroed_header(samples, key, ext) -> bytes:
    """A zero-filled header block reads as end-of-archive: tarfile stops silently, only the count tells."""
    raw = bytearray(tar_bytes(samples))
    pos = raw.index(f"{key}.{ext}".encode())
    raw[pos:pos + 512] = bytes(512)
    return bytes(raw)


def cut_before(samples, key, ext) -> bytes:
    raw = tar_bytes(samples)
    return raw[:raw.index(f"{key}.{ext}".encode())]  # ends cleanly between members, no end-of-archive


def truncated(samples, key, ext) -> bytes:
    raw = tar_bytes(samples)
    return raw[:raw.index(f"{key}.{ext}".encode()) + 512 + 40]  # cut inside the member's data


def replace(samples, i, **members):
    s = dict(samples[i])
    for k, v in members.items():
        if v is None:
            s.pop(k.replace("_", "."))
        else:
            s[k.replace("_", ".")] = v
    samples[i] = s
    return samples


BAD = {  # name: (shards, reason, key named in the message, ids still read under skip)
    "missing_codes": (lambda: [replace(good(), 3, codes_npy=None)], "missing_field", "000003", {0, 1, 2, 4, 5}),
    "missing_label": (lambda: [replace(good(), 3, json=b'{"captions": []}')], "missing_field", "000003",
                      {0, 1, 2, 4, 5}),
    "codes_out_of_range": (lambda: [replace(good(), 3, codes_npy=npy(np.full(GRID, K)))], "bad_codes", "000003",
                           {0, 1, 2, 4, 5}),
    "codes_negative": (lambda: [replace(good(), 3, codes_npy=npy(np.full(GRID, -1)))], "bad_codes", "000003",
                       {0, 1, 2, 4, 5}),
    "codes_wrong_shape": (lambda: [replace(good(), 3, codes_npy=npy(np.zeros((3, 2), int)))], "bad_codes",
                          "000003", {0, 1, 2, 4, 5}),
    "codes_float": (lambda: [replace(good(), 3, codes_npy=npy(np.zeros(GRID, np.float32)))], "bad_codes",
                    "000003", {0, 1, 2, 4, 5}),
    "undecodable_npy": (lambda: [replace(good(), 3, codes_npy=b"\x93NUMPY garbage")], "decode_error", "000003",
                        {0, 1, 2, 4, 5}),
    "pickled_npy": (lambda: [replace(good(), 3, codes_npy=_object_npy())], "decode_error", "000003",
                    {0, 1, 2, 4, 5}),
    "undecodable_json": (lambda: [replace(good(), 3, json=b"{not json")], "decode_error", "000003",
                         {0, 1, 2, 4, 5}),
    "label_out_of_range": (lambda: [replace(good(), 3, json=b'{"label": 99}')], "bad_label", "000003",
                           {0, 1, 2, 4, 5}),
    "corrupt_header": (lambda: [corrupt_header(good(), "000003", "json")], "corrupt_tar", "000003", {0, 1, 2}),
    "zeroed_header": (lambda: [zeroed_header(good(), "000003", "json")], "corrupt_tar", "000003", {0, 1, 2}),
    "cut_at_member": (lambda: [cut_before(good(), "000003", "codes.npy")], "corrupt_tar", "000002", {0, 1, 2}),
    "truncated_tar": (lambda: [truncated(good(), "000003", "codes.npy")], "corrupt_tar", "000003", {0, 1, 2}),
    "empty_shard_file": (lambda: [good(), b""], "empty_shard", None, {0, 1, 2, 3, 4, 5}),
    "empty_tar": (lambda: [good(), tar_bytes([])], "empty_shard", None, {0, 1, 2, 3, 4, 5}),
}


def _object_npy() -> bytes:
    """An .npy holding a pickled object array: must be refused (never unpickled)."""
    b = io.BytesIO()
    np.save(b, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return b.getvalue()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raise_names_shard_and_key(tmp_path, case):
    shards, reason, key, _ = BAD[case]
    d = write_dir(tmp_path / "a", shards())
    src = build_webdataset_source(cfg(d, on_error="raise"), StubVocab(), 2 * C2I_LEN - 1, 1, seed=0)
    with pytest.raises(BadSample) as ei:
        take(src, 8)
    msg = str(ei.value)
    assert ei.value.reason == reason
    assert ".tar" in msg and os.path.basename(ei.value.shard) in msg
    if key is not None:
        assert repr(key) in msg and ei.value.key == key


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_skip_drops_and_counts(tmp_path, case):
    shards, reason, _, expect = BAD[case]
    d = write_dir(tmp_path / "a", shards())
    src = build_webdataset_source(cfg(d, on_error="skip"), StubVocab(), 2 * C2I_LEN - 1, 1, seed=0)
    seen = []
    for b in take(src, (len(expect) + 1) // 2):  # one epoch: 2 samples per row
        seen += ids_in(b)
    assert sorted(seen) == sorted(expect)
    counts = src.error_counts()
    assert counts.get(reason) == 1, counts
    if case in ("zeroed_header", "corrupt_header"):  # sample 3 lost its json: dropped and counted as well
        assert counts == {"corrupt_tar": 1, "missing_field": 1}
    else:
        assert sum(counts.values()) == 1, counts


def test_bad_input_raise_through_workers(tmp_path):
    d = write_dir(tmp_path / "a", [good(), [replace(good(), 2, codes_npy=npy(np.full(GRID, K)))[2]]])
    src = build_webdataset_source(cfg(d, on_error="raise", num_workers=2), StubVocab(), 2 * C2I_LEN - 1, 1,
                                  seed=0)
    with pytest.raises(Exception) as ei:
        take(src, 6)
    assert "train-000001.tar" in str(ei.value) and "'000002'" in str(ei.value)
    src.close()


def test_image_sample_too_long(tmp_path):
    d = write_dir(tmp_path / "a", [good()])
    with pytest.raises(BadSample, match="does not fit") as ei:
        next(build_webdataset_source(cfg(d), StubVocab(), C2I_LEN - 2, 1, seed=0))
    assert "train-000000.tar" in str(ei.value) and ei.value.reason == "too_long"


# ---------------------------------------------------------------------------------------------- mixing
def test_mixing_weights_respected(tmp_path):
    a = c2i_dir(tmp_path / "a", 2, 20)
    b = write_dir(tmp_path / "b", [[{"__key__": f"t{s}{j}", "txt": b"x" * (C2I_LEN - 2)} for j in range(20)]
                                   for s in range(2)], kind="text")
    conf = cfg(SourceConfig(path=str(a), weight=3.0), SourceConfig(path=str(b), weight=1.0))
    src = build_webdataset_source(conf, StubVocab(), 2 * C2I_LEN - 1, 8, seed=4)
    rows = torch.cat([x["tokens"] for x in take(src, 50)])  # 400 rows
    share_a = float((rows[:, 2] == BOI).float().mean())  # c2i rows have <boi> at position 2, text rows don't
    # Each row's source is an independent draw with P(a) = 0.75, so the share over 400 rows has standard
    # deviation sqrt(.75 * .25 / 400) = 0.022; 0.08 is > 3.5 sd (and the draws are seeded, so no flakiness).
    assert abs(share_a - 0.75) < 0.08, share_a


def test_cond_dropout_share(tmp_path):
    d = c2i_dir(tmp_path / "a", 2, 100)
    src = build_webdataset_source(cfg(d, cond_dropout=0.25), StubVocab(), 2 * C2I_LEN - 1, 10, seed=0)
    conds = torch.cat([x["tokens"] for x in take(src, 10)])[:, [1, 1 + C2I_LEN]].reshape(-1)
    # 200 independent draws at p = 0.25: sd 0.031; +-0.1 is > 3 sd
    assert abs(float((conds == NULL).float().mean()) - 0.25) < 0.1


# ---------------------------------------------------------------------------------------------- real vocab
def test_with_real_unified_vocab(tmp_path):
    v = UnifiedVocab.build(None, K, GRID, class_names=[str(i) for i in range(C)])
    d = c2i_dir(tmp_path / "a", 2, 6)
    b = next(build_webdataset_source(cfg(d), v, 2 * C2I_LEN - 1, 2, seed=0))
    row = b["tokens"][0].tolist()
    assert row[0] == v.bos_id and row[2] == v.boi_id and v.class_offset <= row[1] < v.class_offset + C
    assert all(v.image_offset <= t < v.image_offset + K for t in row[3:3 + 6])
    assert row[9] == v.eoi_id and row[10] == v.eos_id
