"""Config tree: shipped configs parse, presets have their published sizes, overrides and validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from megacca.config import ConfigError, apply_preset, load_config, load_typed, to_dict
from megacca.model.flops import param_count
from megacca.model.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "debug.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path, monkeypatch, tmp_path):
    # Configs for clusters declare their world size in a comment-free way: validate at the smallest world
    # their layout allows.
    raw = yaml.safe_load(path.read_text()) or {}
    par = raw.get("parallel", {})
    monkeypatch.setenv("WORLD_SIZE", str(par.get("tp", 1) * par.get("pp", 1)))
    # Cluster configs point at data built elsewhere; without it, a stand-in vocabulary (a square grid, as 2d
    # rope needs) lets everything else be checked. Their data files are `megacca config`'s to check.
    vocab = (raw.get("data") or {}).get("vocab")
    over = []
    if vocab is not None and not (ROOT / vocab).is_file():
        from megacca.tokenizer.vocab import UnifiedVocab

        UnifiedVocab.build(None, 64, (4, 4), ["a", "b"]).save(str(tmp_path / "vocab.json"))
        over = [f"data.vocab={tmp_path / 'vocab.json'}"]
    cfg = load_config(str(path), over)
    assert cfg.name == path.stem
    assert cfg.train.run_dir == f"runs/{path.stem}" or raw.get("train", {}).get("run_dir")


# Published sizes (LlamaGen README / paper table; Llama-2-7B). Our counts use the unified vocabulary
# (1,000 class tokens and 8 specials share the embedding with the 16,384 codes, padded to a multiple of 64),
# which LlamaGen keeps in a separate class embedding; 3% covers that bookkeeping difference.
@pytest.mark.parametrize("name,published", [("llamagen-B", 111e6), ("llamagen-L", 343e6), ("llamagen-XL", 775e6),
                                            ("llamagen-XXL", 1.4e9), ("llamagen-3B", 3.1e9), ("unified-7B", 7.0e9)])
def test_preset_sizes(name, published):
    cfg = load_config(None, [f"model.preset={name}"])
    assert abs(param_count(cfg) - published) / published < 0.03, param_count(cfg)


def test_debug_preset_is_tiny():
    assert param_count(load_config(None, ["model.preset=debug"])) < 1e6
    assert 15e6 < param_count(load_config(None, ["model.preset=small"])) < 25e6


def test_resolution_order_defaults_preset_yaml_cli(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model: {preset: small, num_layers: 3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(str(f), ["train.max_steps=9", "optim.lr=1e-3", "train.progress_bar=off"])
    assert cfg.model.num_layers == 3                               # YAML over preset
    assert cfg.model.hidden_size == PRESETS["small"]["hidden_size"]  # preset over default
    assert cfg.train.max_steps == 9 and cfg.optim.lr == 1e-3        # CLI over YAML
    assert cfg.train.progress_bar == "off" and cfg.name == "exp" and cfg.train.run_dir == "runs/exp"


def test_round_trip_through_saved_yaml(tmp_path):
    from megacca.config import save_config

    cfg = load_config(str(ROOT / "configs/pretrain/debug.yaml"), ["parallel.zero_stage=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    d1, d2 = to_dict(cfg), to_dict(again)
    d1.pop("name"), d2.pop("name")
    assert d1 == d2


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.tp=2"], 3, "parallel.tp"),
    (["model.num_attention_heads=3", "model.hidden_size=66", "parallel.tp=2"], 2, "parallel.tp"),
    (["parallel.tp=8"], 8, "parallel.tp"),                        # 4 heads
    (["parallel.pp=2"], 2, "parallel.pp"),                        # deepspeed engine has no pipeline
    (["parallel.engine=megatron", "parallel.pp=3"], 3, "parallel.pp"),  # 2 layers
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
    (["parallel.engine=megatron", "parallel.zero_stage=2"], 1, "parallel.zero_stage"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.sequence_parallel=true", "parallel.tp=2"], 2, "parallel.sequence_parallel"),  # deepspeed engine
    (["parallel.engine=megatron", "parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["train.global_batch_size=6"], 2, "train.global_batch_size"),
    (["train.max_steps=0"], 1, "train.max_steps"),
    (["train.max_steps=1.5"], 1, "train.max_steps"),
    (["train.precision=fp16"], 1, "train.precision"),
    (["train.precision=bf16"], 1, "parallel.zero_stage"),  # deepspeed ZeRO-0 bf16 has no fp32 master weights
    (["model.rope=3d"], 1, "model.rope"),
    (["model.preset=huge"], 1, "model.preset"),
    (["optim.min_lr=1"], 1, "optim.min_lr"),
    (["data.kind=webdataset"], 1, "data.sources"),
    (["data.kind=webdataset", "data.sources=[{path: d}]"], 1, "data.vocab"),  # its size sets the model's
    (["nonsense.key=1"], 1, "nonsense"),
    (["train.nonsense=1"], 1, "train.nonsense"),
    (["train=3"], 1, "train"),
])
def test_invalid_combinations_name_the_key(monkeypatch, overrides, world, key):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs/pretrain/debug.yaml"), overrides)
    assert e.value.key.startswith(key), str(e.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "bad.yaml" in str(e.value) and "line" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_derived_sizes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_config(None, ["parallel.tp=2", "train.micro_batch_size=2", "train.global_batch_size=32",
                             "model.vocab_size=1003"])
    assert cfg.dp_size() == 4 and cfg.grad_accum() == 4
    assert cfg.padded_vocab_size() == 1024 and cfg.padded_vocab_size() % 2 == 0


def test_every_field_has_a_docstring():
    """The config reference is the code: every field of every section carries a docstring."""
    import ast
    import inspect

    import megacca.config as mc
    import megacca.data.config as dc
    import megacca.tokenizer.vq.config as vc

    for mod in (mc, dc, vc):
        tree = ast.parse(inspect.getsource(mod))
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]:
            body = cls.body
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    has_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    if cls.name == "Config" and node.target.id in ("model", "parallel", "train", "optim", "data", "align"):
                        continue  # sections are documented by their own class docstrings
                    assert has_doc, f"{cls.name}.{node.target.id} has no docstring"


# ---------------------------------------------------------------- the generic typed loader, used by every config


@dataclass
class _Inner:
    """A section with a check of its own."""

    size: int = 4
    """Must be even."""
    ratio: float = 0.5
    """A number."""

    def check(self) -> None:
        if self.size % 2:
            raise ConfigError("size", f"must be even, got {self.size}")


@dataclass
class _Outer:
    """A tree of one section."""

    inner: _Inner = field(default_factory=_Inner)
    """The section."""
    tags: list[str] = field(default_factory=list)
    """Strings."""


def test_load_typed_yaml_overrides_and_nested_check(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("inner: {size: 6, ratio: 1e-3}\ntags: [a]\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_typed(_Outer, f, ["inner.size=8", "tags[0]=b"])
    assert cfg == _Outer(_Inner(8, 1e-3), ["b"]) and isinstance(cfg.inner.ratio, float)
    assert load_typed(_Outer, None) == _Outer()
    for overrides, key in [(["inner.size=7"], "inner.size"),        # the section's own check, under its prefix
                           (["inner.size=x"], "inner.size"), (["inner.sise=2"], "inner.sise"),
                           (["tags=3"], "tags"), (["inner=3"], "inner")]:
        with pytest.raises(ConfigError) as e:
            load_typed(_Outer, f, overrides)
        assert e.value.key == key, (overrides, str(e.value))
    with pytest.raises(ConfigError) as e:
        load_typed(_Outer, tmp_path / "missing.yaml")
    assert e.value.message == "config file not found"


def test_load_typed_resolve_hook_sees_overrides_before_typing(tmp_path):
    seen = []

    def resolve(raw):
        seen.append(dict(raw["inner"]))
        apply_preset(raw, "inner", {"big": {"size": 100, "ratio": 2.0}}, keep_name=False)

    cfg = load_typed(_Outer, None, ["inner.preset=big", "inner.ratio=3"], resolve)
    assert seen == [{"preset": "big", "ratio": 3}] and cfg.inner == _Inner(100, 3.0)  # explicit keys over preset
    with pytest.raises(ConfigError) as e:
        load_typed(_Outer, None, ["inner.preset=huge"], resolve)
    assert e.value.key == "inner.preset"


# ---------------------------------------------------------------- tokenizer configs: the same loader and errors

TOKENIZER_CONFIGS = sorted((ROOT / "tokenizers" / "configs").glob("vq_*.yaml"))


@pytest.mark.parametrize("path", TOKENIZER_CONFIGS, ids=lambda p: p.name)
def test_shipped_vq_configs_parse(path):
    from megacca.tokenizer.vq.config import PRESETS, load_run_config

    raw = yaml.safe_load(path.read_text())
    run = load_run_config(path)
    # every key the file sets arrives typed; keys it leaves out come from its preset
    for k, v in raw["model"].items():
        if k != "preset":
            assert getattr(run.model, k) == v, k
    for k, v in PRESETS[raw["model"]["preset"]].items():
        if k not in raw["model"]:
            assert getattr(run.model, k) == v, k
    for section in ("train", "eval"):
        for k, v in (raw.get(section) or {}).items():
            assert getattr(getattr(run, section), k) == v, (section, k)


def test_vq_run_config_overrides_and_errors_name_the_dotted_key():
    from megacca.tokenizer.vq.config import load_run_config

    path = ROOT / "tokenizers" / "configs" / "vq_digits.yaml"
    run = load_run_config(path, ["train.steps=7", "model.codebook_size=64", "eval.sample_images=0",
                                 "model.preset=vq16", "model.image_size=32"])
    assert run.train.steps == 7 and run.model.codebook_size == 64 and run.eval.sample_images == 0
    file_ch = yaml.safe_load(path.read_text())["model"]["ch"]
    assert run.model.image_size == 32 and run.model.ch == file_ch != 128  # the file's ch wins over vq16's 128
    for overrides, key in [
        (["train.steps=0"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["train.lr=-1"], "train.lr"),
        (["train.betas=[0.9]"], "train.betas"),
        (["train.dead_code_until=2"], "train.dead_code_until"),
        (["train.max_time_s=150"], "train.max_time_s"),   # training stops by steps only
        (["eval.batch_size=0"], "eval.batch_size"),
        (["model.ch=20"], "model.norm_groups"),           # 20 channels into 8 groups
        (["model.image_size=18"], "model.image_size"),    # not a multiple of the downsampling 4
        (["model.recon_loss=l3"], "model.recon_loss"),
        (["model.preset=huge"], "model.preset"),
        (["model.ch_mult=[]"], "model.ch_mult"),
        (["optim.lr=1"], "optim"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_run_config(path, overrides)
        assert e.value.key == key, (overrides, str(e.value))
