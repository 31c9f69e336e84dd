"""VQ image tokenizer: megacca/tokenizer/vq/, tokenizers/train_vq.py and tools/vq_encode.py."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.config import ConfigError  # noqa: E402
from megacca.fileio import sha256_file  # noqa: E402
from megacca.tokenizer import vq as V  # noqa: E402

PY = sys.executable


def _load_script(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, timeout=180):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def small_cfg(**kw) -> V.VQConfig:
    """A very small model so tests run fast: 8x8 images → 4x4 codes of 32."""
    base = dict(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=16,
                norm_groups=4, image_size=8)
    base.update(kw)
    return V.tiny(**base)


# ---- fixture shards (written with webdataset.TarWriter, per docs/data-format.md) ---------------------------
def _image(rng: np.random.RandomState, label: int) -> np.ndarray:
    """8x8 grayscale: a bright bar (label 0 horizontal, 1 vertical) at a random position on a dark ground."""
    a = np.zeros((8, 8), np.uint8)
    p = rng.randint(1, 7)
    if label == 0:
        a[p, 1:7] = 255
    else:
        a[1:7, p] = 255
    return a


def write_image_shards(d: Path, layout: dict[str, list[int]], seed: int = 0) -> dict:
    """`layout`: split → samples per shard. Writes <split>-NNNNNN.tar + manifest.json; returns the manifest."""
    import webdataset as wds

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    man = {"format": "megacca-shards/1", "kind": "images", "splits": {}, "classes": ["horizontal", "vertical"],
           "image_size": [8, 8], "vq": None, "source": "bars", "captions": True, "labels": True}
    n = 0
    for split, counts in layout.items():
        shards = []
        for si, cnt in enumerate(counts):
            name = f"{split}-{si:06d}.tar"
            with wds.TarWriter(str(d / name)) as w:
                for _ in range(cnt):
                    label = int(rng.randint(2))
                    buf = io.BytesIO()
                    Image.fromarray(_image(rng, label), "L").save(buf, "PNG")
                    meta = {"label": label, "captions": [f"a {man['classes'][label]} bar", f"sample {n}"]}
                    w.write({"__key__": f"s{n:05d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})
                    n += 1
            shards.append({"name": name, "count": cnt, "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()})
        man["splits"][split] = {"count": sum(counts), "shards": shards}
    (d / "manifest.json").write_text(json.dumps(man, indent=1))
    return man


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    write_image_shards(d, {"train": [40, 24], "heldout": [16]})
    return d


# ---- model --------------------------------------------------------------------------------------------------
def test_encode_decode_shapes_and_range():
    torch.manual_seed(0)
    cfg = small_cfg()
    m = V.VQModel(cfg).eval()
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (5, 4, 4) and codes.dtype == torch.long and cfg.grid == (4, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    with torch.no_grad():
        y = m.decode(codes)
        recon, losses = m(x)
    assert y.shape == (5, 3, 8, 8) and float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    assert recon.shape == x.shape
    assert {"recon", "codebook", "commit", "loss"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # decoding the codes is exactly the forward pass's quantised path (same codes, eval mode, same math;
    # 1e-5 absorbs float reassociation between the two code paths' lookups)
    assert torch.allclose(y, recon.clamp(-1, 1), atol=1e-5)
    # L1 variant and non-normalised codebook also work
    m1 = V.VQModel(small_cfg(recon_loss="l1", codebook_l2_norm=False, entropy_loss_ratio=0.1))
    _, l1 = m1(x)
    assert torch.isfinite(l1["loss"]) and "entropy" in l1
    with pytest.raises(ValueError):
        m.decode(torch.full((1, 4, 4), cfg.codebook_size))
    with pytest.raises(ValueError):
        m.encode(torch.zeros(1, 3, 7, 7))  # 7 is not a multiple of the downsampling factor 2


def test_config_validation_and_presets():
    assert V.vq16().downsample == 16 and V.vq16(image_size=256).grid == (16, 16)
    assert V.tiny().grid == (4, 4)
    with pytest.raises(ConfigError) as e:
        V.VQConfig(ch=24, norm_groups=32).check()
    assert e.value.key == "norm_groups"
    with pytest.raises(ConfigError) as e:
        V.tiny(codebok_size=3)
    assert e.value.key == "codebok_size" and "unknown key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        V.tiny(image_size=18)
    assert e.value.key == "image_size"
    with pytest.raises(ConfigError) as e:
        V.tiny(ch_mult=(1, 2))  # the same type check as YAML: a list, not a tuple
    assert e.value.key == "ch_mult"
    with pytest.raises(ConfigError, match="unknown preset"):
        V.preset("huge")
    cfg = V.tiny(codebook_size=64)
    assert cfg.codebook_size == 64 and cfg.ch == V.tiny().ch and cfg.ch_mult is not V.PRESETS["tiny"]["ch_mult"]


def test_tokenizer_config_json_of_earlier_versions_loads(tmp_path):
    """A config.json written by the pre-split `megacca/tokenizer/vq.py` (this exact text: every field plus the
    format tag) loads to the same architecture, and save_vq writes it back byte-identically."""
    old = {"format": "megacca-vq/1", "codebook_size": 512, "codebook_embed_dim": 8, "codebook_l2_norm": True,
           "codebook_show_usage": False, "commit_loss_beta": 0.25, "codebook_loss_weight": 1.0,
           "entropy_loss_ratio": 0.0, "entropy_temperature": 0.01, "recon_loss": "l2", "in_channels": 3, "ch": 32,
           "ch_mult": [1, 1, 2], "num_res_blocks": 1, "z_channels": 64, "dropout_p": 0.0, "norm_groups": 8,
           "image_size": 16, "resample": "bicubic"}
    text = json.dumps(old, indent=2) + "\n"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(text)
    cfg = V.load_vq_config(tmp_path / "old")
    assert cfg == V.tiny()
    V.save_vq(V.VQModel(cfg), tmp_path / "new")
    assert (tmp_path / "new" / "config.json").read_text() == text
    (tmp_path / "old" / "config.json").write_text(text.replace('"ch": 32', '"ch": 30'))
    with pytest.raises(ConfigError) as e:
        V.load_vq_config(tmp_path / "old")
    assert e.value.key == "norm_groups"


# ---- LlamaGen compatibility -----------------------------------------------------------------------------------
# LlamaGen VQ-16 (tokenizer/tokenizer_image/vq_model.py, ch_mult [1,1,2,2,4], num_res_blocks 2), written out by
# hand from its module structure: per level (in multiplier, out multiplier, has attention, has resampler).
# Encoder level i: num_res_blocks ResnetBlocks, attention only at the last (lowest-resolution) level,
# Downsample on all but the last. Decoder conv_blocks run from the lowest resolution up: num_res_blocks + 1
# ResnetBlocks, attention only in the first, Upsample on all but the last.
ENC_LEVELS = [(1, 1, False, True), (1, 1, False, True), (1, 2, False, True), (2, 2, False, True), (2, 4, True, False)]
DEC_LEVELS = [(4, 4, True, True), (4, 2, False, True), (2, 2, False, True), (2, 1, False, True), (1, 1, False, False)]


def llamagen_vq_table(ch=128, K=16384, D=8, z=256, n_res=2, usage=True) -> dict[str, tuple]:
    t: dict[str, tuple] = {}

    def conv(p, cin, cout, k):
        t[f"{p}.weight"], t[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def norm(p, c):
        t[f"{p}.weight"], t[f"{p}.bias"] = (c,), (c,)

    def res(p, cin, cout):
        norm(f"{p}.norm1", cin), conv(f"{p}.conv1", cin, cout, 3), norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    def mid(p, c):
        res(f"{p}.0", c, c), attn(f"{p}.1", c), res(f"{p}.2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    for i, (mi, mo, has_attn, down) in enumerate(ENC_LEVELS):
        for j in range(n_res):
            res(f"encoder.conv_blocks.{i}.res.{j}", ch * (mi if j == 0 else mo), ch * mo)
            if has_attn:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", ch * mo)
        if down:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", ch * mo, ch * mo, 3)
    mid("encoder.mid", 4 * ch)
    norm("encoder.norm_out", 4 * ch)
    conv("encoder.conv_out", 4 * ch, z, 3)
    conv("quant_conv", z, D, 1)
    t["quantize.embedding.weight"] = (K, D)
    if usage:
        t["quantize.codebook_used"] = (65536,)
    conv("post_quant_conv", D, z, 1)
    conv("decoder.conv_in", z, 4 * ch, 3)
    mid("decoder.mid", 4 * ch)
    for k, (mi, mo, has_attn, up) in enumerate(DEC_LEVELS):
        for j in range(n_res + 1):
            res(f"decoder.conv_blocks.{k}.res.{j}", ch * (mi if j == 0 else mo), ch * mo)
            if has_attn:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", ch * mo)
        if up:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", ch * mo, ch * mo, 3)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", ch, 3, 3)
    return t


def random_state_dict(table: dict[str, tuple], seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in table.items()}
    if "quantize.codebook_used" in sd:
        sd["quantize.codebook_used"] = torch.randint(0, 100, (65536,), generator=g).float()
    return sd


def test_llamagen_vq16_state_dict_loads_strict():
    table = llamagen_vq_table()
    assert "encoder.conv_blocks.0.res.0.norm1.weight" in table and "decoder.conv_blocks.4.res.2.conv2.weight" in table
    n_params = sum(int(np.prod(s)) for k, s in table.items() if k != "quantize.codebook_used")
    assert round(n_params / 1e6) == 72  # LlamaGen's paper lists its VQ-16 tokenizer at 72M parameters
    sd = random_state_dict(table)
    m = V.VQModel(V.vq16())
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert torch.equal(m.decoder.conv_blocks[0].attn[2].proj_out.weight,
                       sd["decoder.conv_blocks.0.attn.2.proj_out.weight"])
    codes = m.eval().encode(torch.zeros(1, 3, 16, 16))  # 16 px → one code (downsample 16)
    assert codes.shape == (1, 1, 1) and 0 <= int(codes) < 16384


def test_llamagen_checkpoint_files(tmp_path):
    """`.safetensors` and a LlamaGen-style training `.pt` ({"model": ..., "args": Namespace}) both load strictly,
    the architecture is inferred from the weights, and both give the same codes."""
    from safetensors.torch import save_file

    table = llamagen_vq_table(ch=32, K=64, D=8, z=32)
    sd = random_state_dict(table, seed=1)
    save_file(sd, str(tmp_path / "vq.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(vq_model="VQ-16"),
                "steps": 10}, tmp_path / "vq.pt")
    a = V.load_llamagen(tmp_path / "vq.safetensors")
    b = V.load_llamagen(tmp_path / "vq.pt")
    assert a.config.ch == 32 and a.config.ch_mult == [1, 1, 2, 2, 4] and a.config.codebook_size == 64
    assert a.config.num_res_blocks == 2 and a.config.z_channels == 32 and a.config.codebook_show_usage
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x))
    # a checkpoint without the usage buffer still loads (buffer zero-filled); a config without it drops it
    sd.pop("quantize.codebook_used")
    save_file(sd, str(tmp_path / "nousage.safetensors"))
    c = V.load_llamagen(tmp_path / "nousage.safetensors",
                        config=V.config_from_llamagen_state_dict(sd, codebook_show_usage=True))
    assert torch.equal(c.encode(x), a.encode(x))
    d = V.load_llamagen(tmp_path / "vq.pt", config=V.config_from_llamagen_state_dict(sd))
    assert d.quantize.codebook_used is None and torch.equal(d.encode(x), a.encode(x))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = V.VQModel(small_cfg()).eval()
    V.save_vq(m, tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["format"] == "megacca-vq/1"
    m2 = V.load_vq(tmp_path / "vq")
    assert m2.config == m.config
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    assert torch.equal(m.encode(x), m2.encode(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


# ---- training script ------------------------------------------------------------------------------------------
TINY_TRAIN_YAML = """
model: {preset: tiny, codebook_size: 32, codebook_embed_dim: 4, ch: 16, ch_mult: [1, 2], num_res_blocks: 1,
        z_channels: 16, norm_groups: 4, image_size: 8}
train: {steps: 80, batch_size: 16, lr: 3e-3, warmup_steps: 5, log_every: 10, kmeans_images: 64,
        dead_code_every: 20, threads: 1}
eval: {batch_size: 64, sample_images: 8}
"""


@pytest.fixture(scope="module")
def trained_vq(tmp_path_factory, image_dir):
    """One run of the real command (the step count given as a dotted override): (yaml, argv, out dir, stdout)."""
    d = tmp_path_factory.mktemp("train_vq")
    cfg = d / "vq.yaml"
    cfg.write_text(TINY_TRAIN_YAML.replace("steps: 80", "steps: 50"))
    args = [str(cfg), "train.steps=80", "--data", str(image_dir), "--out", str(d / "vqdir")]
    p = _run(["tokenizers/train_vq.py", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    return args, d / "vqdir", p.stdout


def test_train_vq_lowers_loss(trained_vq):
    _, out, stdout = trained_vq
    assert "recon MSE" in stdout and "codebook usage" in stdout
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["steps"] == 80 and rep["train"]["steps"] == 80 and rep["overrides"] == ["train.steps=80"]
    assert rep["eval_split"] == "heldout" and rep["eval"]["images"] == 16 and rep["log"][-1]["step"] == 80
    # mean loss over the last 10 steps vs the first 10: 80 Adam steps on 64 two-class bar images must at least
    # halve it (measured ~35x: 0.60 → 0.017); the factor 2 leaves ample room for seed/thread-count noise
    assert rep["final_loss"] < 0.5 * rep["initial_loss"], (rep["initial_loss"], rep["final_loss"])
    assert 0 < rep["codebook_usage"] <= 1 and np.isfinite(rep["recon_mse"])
    assert (out / "recon_heldout.png").is_file()
    m = V.load_vq(out)
    assert m.config.codebook_size == 32


def test_train_vq_same_command_same_weights(trained_vq, tmp_path):
    """Training stops by steps, not by a clock: rerunning the command (here in this process, after the first
    run in its own) gives bit-identical weights, config and loss log, however long either run took."""
    tv = _load_script("tokenizers/train_vq.py", "train_vq_rerun")
    args, first, _ = trained_vq
    again = tmp_path / "again"
    threads = torch.get_num_threads()
    try:
        assert tv.main([*args[:-1], str(again)]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    losses = [[{k: v for k, v in r.items() if k != "elapsed_s"} for r in json.loads((d / "train_report.json")
              .read_text())["log"]] for d in (first, again)]
    assert losses[0] == losses[1]


def test_train_vq_errors_exit_2(tmp_path, image_dir, capsys):
    tv = _load_script("tokenizers/train_vq.py", "train_vq_under_test")

    def one_line_error(*argv, kind="config error") -> str:
        assert tv.main([*map(str, argv), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"train_vq: {kind}: "), err
        return err

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny}\ntrain: {stepz: 3}\n")
    assert "train.stepz: unknown key" in one_line_error(bad, "--data", image_dir)
    bad.write_text("model: {preset: tiny, ch_mult: [1, 2], ch: 20}\n")
    assert "model.norm_groups: channel count 20" in one_line_error(bad, "--data", image_dir)
    good = tmp_path / "good.yaml"
    good.write_text(TINY_TRAIN_YAML)
    assert "train.steps: must be >= 1" in one_line_error(good, "train.steps=0", "--data", image_dir)
    assert "train.max_time_s: unknown key" in one_line_error(good, "train.max_time_s=150", "--data", image_dir)
    assert "model.image_size: expected an integer" in one_line_error(good, "model.image_size=big", "--data", image_dir)
    assert "missing: data directory not found" in one_line_error(good, "--data", tmp_path / "missing", kind="error")
    (tmp_path / "empty").mkdir()
    assert "no `train-*.tar` shards" in one_line_error(good, "--data", tmp_path / "empty", kind="error")
    assert "config file not found" in one_line_error(tmp_path / "nope.yaml", "--data", image_dir)
    assert not (tmp_path / "o").exists()


# ---- vq_encode --------------------------------------------------------------------------------------------------
def _direct_codes(model, src: Path) -> dict[str, np.ndarray]:
    """Encode each source shard as one batch, single-threaded, like a vq_encode worker does (shards here are
    smaller than its batch size), so results are bitwise comparable."""
    out = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tar in sorted(src.glob("*.tar")):
            samples = read_tar(tar)
            keys = list(samples)
            x = torch.stack([V.preprocess(Image.open(io.BytesIO(samples[k]["png"])), model.config) for k in keys])
            for k, c in zip(keys, model.encode(x).numpy()):
                out[k] = c
    finally:
        torch.set_num_threads(prev)
    return out


def test_vq_encode_manifest_codes_and_resume(tmp_path, image_dir):
    torch.manual_seed(0)
    vqdir = tmp_path / "vq"
    model = V.VQModel(small_cfg()).eval()
    V.save_vq(model, vqdir)
    out = tmp_path / "codes"
    p = _run(["tools/vq_encode.py", "--vq", vqdir, "--src", image_dir, "--out", out, "--workers", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "images/s" in p.stdout and "3 to encode" in p.stdout

    man = json.loads((out / "manifest.json").read_text())
    src_man = json.loads((image_dir / "manifest.json").read_text())
    assert man["kind"] == "codes" and man["format"] == "megacca-shards/1"
    assert man["classes"] == src_man["classes"] and man["captions"] is True
    assert man["vq"]["codebook_size"] == 32 and man["vq"]["grid"] == [4, 4]
    assert man["vq"]["sha256"] == sha256_file(vqdir / "model.safetensors")
    for split, s in src_man["splits"].items():
        assert man["splits"][split]["count"] == s["count"]
        assert [sh["name"] for sh in man["splits"][split]["shards"]] == [sh["name"] for sh in s["shards"]]
        for sh in man["splits"][split]["shards"]:
            assert sh["sha256"] == hashlib.sha256((out / sh["name"]).read_bytes()).hexdigest()
    from megacca.data.shards import read_manifest, verify_shards  # the shared reader accepts it

    read_manifest(str(out))
    verify_shards(str(out), count_samples=True)

    direct = _direct_codes(model, image_dir)
    got = {}
    for tar in sorted(out.glob("*.tar")):
        src_samples = read_tar(image_dir / tar.name)
        for k, mem in read_tar(tar).items():
            assert set(mem) == {"codes.npy", "json"}
            c = np.load(io.BytesIO(mem["codes.npy"]), allow_pickle=False)
            assert c.dtype == np.int16 and c.shape == (4, 4)
            assert json.loads(mem["json"]) == json.loads(src_samples[k]["json"])
            got[k] = c
    assert sorted(got) == sorted(direct)
    for k in got:
        np.testing.assert_array_equal(got[k], direct[k])  # exact: same weights, batch and thread count

    # interruption: one shard never finished (final file missing, a partial temp file left behind)
    first = {sh["name"]: sh["sha256"] for s in man["splits"].values() for sh in s["shards"]}
    (out / "train-000001.tar").unlink()
    (out / "train-000001.tar.tmp").write_bytes(b"partial garbage")
    p = _run(["tools/vq_encode.py", "--vq", vqdir, "--src", image_dir, "--out", out, "--workers", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 already complete, 1 to encode" in p.stdout and "encoded 24 images" in p.stdout
    assert not list(out.glob("*.tmp"))
    man2 = json.loads((out / "manifest.json").read_text())
    assert {sh["name"]: sh["sha256"] for s in man2["splits"].values() for sh in s["shards"]} == first  # deterministic

    # a different VQ makes every shard stale
    torch.manual_seed(1)
    V.save_vq(V.VQModel(small_cfg()), vqdir)
    p = _run(["tools/vq_encode.py", "--vq", vqdir, "--src", image_dir, "--out", out, "--workers", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 already complete, 3 to encode" in p.stdout
    assert json.loads((out / "manifest.json").read_text())["vq"]["sha256"] == sha256_file(vqdir / "model.safetensors")


def test_vq_encode_errors_exit_2(tmp_path, image_dir, capsys):
    ve = _load_script("tools/vq_encode.py", "vq_encode_under_test")
    V.save_vq(V.VQModel(small_cfg()), tmp_path / "vq")
    vq, o = str(tmp_path / "vq"), str(tmp_path / "o")
    assert ve.main(["--vq", vq, "--src", str(tmp_path / "missing"), "--out", o]) == 2
    assert "not found" in capsys.readouterr().err
    assert ve.main(["--vq", str(tmp_path / "novq"), "--src", str(image_dir), "--out", str(tmp_path / "o")]) == 2
    assert "VQ directory" in capsys.readouterr().err


def test_vq_encode_corrupt_source_then_resume_byte_identical(tmp_path, image_dir, capsys):
    """A damaged source shard is one exit-2 line naming the shard and the sample key and leaves no partial
    output; the rerun on the repaired source encodes only what is missing and writes the bytes a clean run does."""
    import shutil

    from megacca.data.shards import TMP_NAME_RE

    ve = _load_script("tools/vq_encode.py", "vq_encode_under_test")
    torch.manual_seed(0)
    vq = tmp_path / "vq"
    V.save_vq(V.VQModel(small_cfg()).eval(), vq)
    src = tmp_path / "src"
    shutil.copytree(image_dir, src)
    tar = src / "train-000001.tar"  # samples s00040..s00063
    good = tar.read_bytes()
    tar.write_bytes(good[:good.index(b"s00045.png") + 512 + 10])  # cut inside s00045's png
    out, clean = tmp_path / "codes", tmp_path / "clean"

    def args(o):
        return ["--vq", str(vq), "--src", str(src), "--out", str(o), "--workers", "1"]

    threads = torch.get_num_threads()
    try:  # --workers 1 encodes in this process (with one torch thread: restored below)
        assert ve.main(args(out)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "train-000001.tar" in err and "'s00045'" in err
        assert (out / "train-000000.tar").exists() and not (out / "train-000001.tar").exists()
        assert not [p.name for p in out.iterdir() if TMP_NAME_RE.match(p.name)]  # the aborted shard left nothing
        tar.write_bytes(good)
        (out / ".heldout-000000.tar.tmp-999999").write_bytes(b"left by a killed run")
        assert ve.main(args(out)) == 0
        assert "1 already complete, 2 to encode" in capsys.readouterr().out
        assert not (out / ".heldout-000000.tar.tmp-999999").exists()
        assert ve.main(args(clean)) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("train-000000.tar", "train-000001.tar", "heldout-000000.tar", "manifest.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
