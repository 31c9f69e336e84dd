"""The one typed config tree: dataclasses (a docstring per field), YAML files mirroring them, dotted overrides.

Resolution order, later wins: dataclass defaults < model preset (`model.preset`) < YAML file < CLI overrides
(`train.max_steps=20 parallel.tp=2`). Everything is validated before any process group or model exists; a bad
key, type or combination raises `ConfigError`, which the CLI turns into one line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import yaml

from megacca.data.config import DataConfig  # the `data:` section of the tree


class ConfigError(ValueError):
    """A config problem; `key` is the dotted key it concerns (or the file)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (Llama-style: RMSNorm, SwiGLU, RoPE, no biases)."""

    preset: Optional[str] = "debug"
    """Named size from `megacca.model.presets` (debug, small, llamagen-B/L/XL/XXL/3B, unified-7B); fields
    set explicitly in YAML or on the command line override the preset's."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None = same as num_attention_heads."""
    ffn_hidden_size: int = 176
    """SwiGLU inner width."""
    vocab_size: int = 512
    """Unpadded unified vocabulary size; overwritten from `data.vocab` when that manifest is given."""
    make_vocab_size_divisible_by: int = 64
    """The embedding is padded to a multiple of this times `parallel.tp`."""
    seq_length: int = 128
    """Training sequence length (tokens per packed sequence)."""
    rotary_base: int = 10000
    """RoPE base."""
    rope: Literal["1d", "2d"] = "1d"
    """`1d`: standard rotary; `2d`: image-code spans get (row, column) rotary as in LlamaGen."""
    image_grid: int = 16
    """Codes per image side (for 2d rope): a `<boi>` token is followed by image_grid**2 codes."""
    boi_token_id: int = 3
    """Id of `<boi>` in the unified vocabulary (where 2d rope starts a grid)."""
    image_token_offset: Optional[int] = None
    """First image-code id of the unified vocabulary (codes are `[image_token_offset, image_token_offset +
    codebook_size)`); taken from `data.vocab`. Needed by `layout: llamagen` and `logprob_norm: codebook`."""
    codebook_size: Optional[int] = None
    """Number of image codes in the unified vocabulary; taken from `data.vocab` (see image_token_offset)."""
    layout: Literal["unified", "llamagen"] = "unified"
    """Sequence layout. `unified`: megacca's (`<bos> <class> <boi> codes <eoi> <eos>` for class→image, and
    every other task). `llamagen`: exactly LlamaGen's class-conditional GPT, so its checkpoints convert
    losslessly (tools/convert_checkpoint.py from-llamagen): a sample is `[class or <null>] codes` with no
    `<bos>` / `<boi>` / `<eoi>` / `<eos>`; every non-code token is a condition whose query and key are zero in
    every layer (LlamaGen's rotary table has all-zero rows there); the codes after it get 2D rotary with the
    grid at (0, 0). Class→image data only (`task: c2i`); needs `rope: 2d` and `logprob_norm: codebook`."""
    logprob_norm: Literal["vocab", "codebook"] = "vocab"
    """What the log-probs (the loss, the alignment stages' sequence log-probs) of a position are normalised
    over. `vocab`: the whole padded vocabulary. `codebook`: a position whose label is an image code is
    normalised over the image codes only (the other logits are masked out, as if the head covered only the
    codebook, like LlamaGen's); other positions keep the whole vocabulary."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    attention_backend: Literal["auto", "flash", "te", "sdpa", "local"] = "auto"
    """auto: flash-attn on GPU when installed, else Transformer Engine, else torch SDPA. `local` is
    megatron-core's unfused DotProductAttention (reference for tests)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""


@dataclass
class ParallelConfig:
    """How the model and the batch are spread over processes."""

    engine: Literal["deepspeed", "megatron"] = "deepspeed"
    """`deepspeed`: DeepSpeed engine (ZeRO 0-3, pp must be 1); `megatron`: megatron-core DDP +
    DistributedOptimizer + pipeline schedules."""
    tp: int = 1
    """Tensor-parallel size (megatron-core layers)."""
    pp: int = 1
    """Pipeline-parallel size (megatron engine only)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3; with engine=megatron, 1 selects the DistributedOptimizer."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, else gloo."""


@dataclass
class TrainConfig:
    """The training loop."""

    run_dir: Optional[str] = None
    """Run directory (config.yaml, metrics.jsonl, TensorBoard events, checkpoints/); default runs/<config name>."""
    init_from: Optional[str] = None
    """Start from the model weights of another run: its run directory (= its latest checkpoint) or one
    checkpoint directory, saved by either engine at any tp / pp / ZeRO layout; fresh optimizer. The run's own
    checkpoints/latest, when present, wins (an interrupted run resumes itself). Alignment stages also load
    their frozen reference model from here."""
    max_steps: int = 100
    """Optimizer steps to train for."""
    save_every: int = 50
    """Save a checkpoint every N steps (0 = only at the end); always saves at the end."""
    keep_last: int = 2
    """Checkpoints kept in checkpoints/ (older ones deleted after a newer one is complete); 0 keeps all."""
    seed: int = 1234
    """Seed for init, data order and dropout."""
    micro_batch_size: int = 2
    """Sequences per forward pass per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks; None = micro_batch_size x data-parallel size.
    Must be a multiple of micro_batch_size x dp (the quotient is the gradient accumulation)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Parameter/compute precision. bf16 keeps fp32 master weights (deepspeed engine: zero_stage >= 1)."""
    resume: bool = True
    """Resume from checkpoints/latest when the run directory has one."""
    log_every: int = 1
    """Print a log line every N steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
    """tqdm bar: auto = only when stdout is a terminal."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (linear warmup, then cosine or constant)."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    decay: Literal["cosine", "constant"] = "cosine"
    """Shape after warmup (cosine decays to min_lr at max_steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""


@dataclass
class AlignConfig:
    """The alignment stages (`stage: cca` and `stage: dpo`): a policy trained against a frozen reference on
    pairs of sequences, with a contrastive loss over their summed log-probs (megacca.losses)."""

    beta: float = 0.02
    """β: scale of the implicit reward β·(log p_policy − log p_ref). CCA paper (LlamaGen): 0.02; DPO: ~0.1."""
    lam: float = 1000.0
    """CCA λ: weight of the negative term; the loss is divided by max(λ, 1). Paper: 1000 (B, XL, XXL), 300 (L),
    500 (3B)."""
    uncond_ratio: float = 0.1
    """CCA: share of rows given the `<null>` condition in both the positive and the negative (positive-like
    rows), which keeps the unconditional model usable for CFG after CCA."""
    negatives: Literal["roll", "derangement"] = "roll"
    """CCA: how a row gets another row's condition inside the micro-batch: `roll` by one (the reference
    implementation) or a seeded random derangement."""
    same_label_positive: bool = True
    """CCA: a negative whose condition shares the row's class label (two captions of the same digit, say) is
    positive-like rather than a true negative; rows whose rolled condition is identical always are."""
    reference: Literal["model", "precomputed"] = "model"
    """`model`: run the frozen reference (loaded from train.init_from) on the fly; `precomputed`: read its
    log-probs from pair shards written by tools/precompute_ref_logps.py (no reference model in memory)."""
    loss: Literal["sigmoid", "ipo", "hinge", "nca", "simpo"] = "sigmoid"
    """DPO: loss kind (TRL's definitions; `simpo` is reference-free)."""
    label_smoothing: float = 0.0
    """DPO (sigmoid, simpo): conservative-DPO label smoothing ε in [0, 0.5)."""
    gamma: float = 0.0
    """DPO simpo: target reward margin γ."""
    length_normalize: bool = False
    """DPO: divide each sequence's summed log-prob by its number of scored tokens (SimPO, TRL's IPO) before
    the loss; policy and reference alike."""
    rpo_alpha: float = 0.0
    """DPO: add α x the chosen response's negative log-likelihood (per scored token) to each pair's loss: RPO
    (Pang et al., 2024, "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`, whose NLL is the
    token mean over the whole batch: the same when responses have equal lengths). Plain DPO can raise the
    margin by lowering both responses' likelihood and move the freed mass onto outputs neither names; the NLL
    term keeps the chosen one likely. 0 = plain DPO."""


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    """Run name (the YAML file's stem by default)."""
    stage: Literal["pretrain", "cca", "dpo"] = "pretrain"
    """Which training stage runs: `pretrain` (next-token loss over packed sequences), `cca` (Condition
    Contrastive Alignment on condition→image samples) or `dpo` (preference pairs); see `align`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    # -- derived quantities (not config keys) --
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def dp_size(self) -> int:
        return self.world_size() // (self.parallel.tp * self.parallel.pp)

    def grad_accum(self) -> int:
        return self.global_batch() // (self.train.micro_batch_size * self.dp_size())

    def global_batch(self) -> int:
        return self.train.global_batch_size or self.train.micro_batch_size * self.dp_size()

    def padded_vocab_size(self) -> int:
        m = self.model.make_vocab_size_divisible_by * self.parallel.tp
        return -(-self.model.vocab_size // m) * m


# ---------------------------------------------------------------- typed construction from plain dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp, value):
    """Check `value` against annotation `tp`; return the value (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and "on" in args:  # `progress_bar: off` in a YAML file
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {tp}")


def from_dict(cls, data, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types.

    A dataclass may define `check(self)`, raising `ConfigError(field, message)` for values its types admit
    but it does not (ranges, combinations of its own fields); the field is reported under `prefix`.
    """
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}" if prefix else str(k), f"unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        try:
            obj.check()
        except ConfigError as e:
            if not prefix:
                raise
            raise ConfigError(f"{prefix}.{e.key}", e.message) from None
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- overrides and loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a","b","c"], value parsed as a YAML scalar/list)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(text, "override must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw  # YAML 1.1 reads on/off/yes/no as booleans; on the command line they are words
    path: list = []
    for part in key.strip().split("."):  # `sources[0]` and `sources.0` both index a list
        name, _, idx = part.partition("[")
        if name:
            path.append(int(name) if name.isdigit() else name)
        if idx:
            if not idx.endswith("]") or not idx[:-1].isdigit():
                raise ConfigError(key, "list index must look like name[0]")
            path.append(int(idx[:-1]))
    return path, value


def _set_dotted(tree: dict, path: list, value) -> None:
    node = tree
    for i, part in enumerate(path):
        where = ".".join(map(str, path[: i + 1]))
        last = i == len(path) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(where, "no such list element")
        elif not isinstance(node, dict):
            raise ConfigError(where, "is not a section; cannot set a sub-key")
        if last:
            node[part] = value
            return
        nxt = node[part] if isinstance(part, int) else node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_preset(raw: dict, section: str, presets: dict[str, dict], default: Optional[str] = None,
                 keep_name: bool = True) -> None:
    """Replace `raw[section]` by the values of its named preset with the section's explicit keys on top.

    The name is the section's `preset` key, else `default` (None: no preset). `keep_name=False` drops the
    `preset` key, for dataclasses that do not record it.
    """
    sec = raw.get(section) or {}
    if not isinstance(sec, dict):
        raise ConfigError(section, "expected a mapping")
    name = sec.get("preset", default)
    if name is None:
        return
    if name not in presets:
        raise ConfigError(f"{section}.preset", f"unknown preset {name!r} (known: {', '.join(presets)})")
    merged = _deep_merge(presets[name], sec)
    if not keep_name:
        merged.pop("preset", None)
    raw[section] = merged


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file `path`; a missing file, bad YAML (with its line) or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}", f"invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "top level must be a mapping")
    return raw


def load_typed(cls, path: Optional[str | Path], overrides: Sequence[str] = (),
               resolve: Optional[Callable[[dict], None]] = None):
    """Dataclass `cls` from YAML `path` (None: defaults only) with dotted `overrides` applied on top.

    `resolve(raw)` may edit the merged plain dict before it is typed (presets, defaults derived from the
    path). Types, unknown keys and each dataclass' own `check()` are enforced by `from_dict`; every problem
    is a ConfigError naming the dotted key.
    """
    raw = read_yaml(path) if path is not None else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_dotted(raw, keys, value)
    if resolve is not None:
        resolve(raw)
    return from_dict(cls, raw)


def load_config(path: Optional[str], overrides: list[str] = (), check: bool = True) -> Config:
    """Load YAML `path` (may be None), apply dotted `overrides`, resolve the preset, validate (`check`)."""

    def resolve(raw: dict) -> None:
        from megacca.model.presets import PRESETS

        raw.setdefault("name", Path(path).stem if path is not None else "run")
        apply_preset(raw, "model", PRESETS, ModelConfig.preset)  # preset values, explicit model keys on top

    cfg = load_typed(Config, path, overrides, resolve)
    if cfg.train.run_dir is None:
        cfg.train.run_dir = str(Path("runs") / cfg.name)
    resolve_vocab(cfg)
    if check:
        validate(cfg)
    return cfg


def resolve_vocab(cfg: Config) -> None:
    """Take the vocabulary size, the <boi> id and the image grid from the data manifest when one is configured."""
    if cfg.data.vocab is None:
        return
    # Imported here: the vocabulary module brings numpy and sentencepiece, which loading a config does not need.
    from megacca.tokenizer.vocab import load_manifest

    try:
        manifest = load_manifest(cfg.data.vocab)
    except (OSError, ValueError) as e:
        raise ConfigError("data.vocab", str(e)) from None
    cfg.model.vocab_size = manifest["vocab_size"]
    cfg.model.boi_token_id = manifest["specials"]["<boi>"]
    cfg.model.image_token_offset = manifest["image_offset"]
    cfg.model.codebook_size = manifest["codebook_size"]
    grid = manifest["image_grid"]
    if grid:
        if grid[0] != grid[1] and cfg.model.rope == "2d":
            raise ConfigError("model.rope", f"2d rope needs square image grids; {cfg.data.vocab} has {grid}")
        cfg.model.image_grid = grid[0]


def validate(cfg: Config) -> None:
    """Impossible combinations, named by key. WORLD_SIZE comes from the launcher's environment."""
    m, par, tr, opt = cfg.model, cfg.parallel, cfg.train, cfg.optim
    world = cfg.world_size()
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.ffn_hidden_size": m.ffn_hidden_size,
        "model.vocab_size": m.vocab_size, "model.seq_length": m.seq_length,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "parallel.tp": par.tp, "parallel.pp": par.pp, "train.max_steps": tr.max_steps,
        "train.micro_batch_size": tr.micro_batch_size, "train.log_every": tr.log_every,
    }
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(k, f"must be >= 1, got {v}")
    for k, v in {"train.save_every": tr.save_every, "train.keep_last": tr.keep_last,
                 "optim.warmup_steps": opt.warmup_steps, "optim.lr": opt.lr, "optim.min_lr": opt.min_lr,
                 "optim.weight_decay": opt.weight_decay, "optim.grad_clip": opt.grad_clip,
                 "data.num_workers": cfg.data.num_workers}.items():
        if v < 0:
            raise ConfigError(k, f"must be >= 0, got {v}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", f"num_attention_heads={m.num_attention_heads} is not divisible by {groups}")
    if m.rope == "2d" and (m.hidden_size // m.num_attention_heads) % 4:
        raise ConfigError("model.rope", "2d rope needs a head dim divisible by 4")
    validate_layout(cfg)
    if m.num_attention_heads % par.tp:
        raise ConfigError("parallel.tp", f"num_attention_heads={m.num_attention_heads} is not divisible by tp={par.tp}")
    if groups % par.tp:
        raise ConfigError("parallel.tp", f"num_query_groups={groups} is not divisible by tp={par.tp}")
    if m.ffn_hidden_size % par.tp:
        raise ConfigError("parallel.tp", f"ffn_hidden_size={m.ffn_hidden_size} is not divisible by tp={par.tp}")
    if par.engine == "deepspeed" and par.pp > 1:
        raise ConfigError("parallel.pp", "pp>1 needs parallel.engine=megatron (the deepspeed engine has no pipeline)")
    if m.num_layers % par.pp:
        raise ConfigError("parallel.pp", f"num_layers={m.num_layers} is not divisible by pp={par.pp}")
    if world % (par.tp * par.pp):
        raise ConfigError("parallel.tp", f"world size {world} is not divisible by tp*pp={par.tp * par.pp}")
    if par.engine == "deepspeed" and par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"must be 0, 1, 2 or 3; got {par.zero_stage}")
    if par.engine == "deepspeed" and tr.precision == "bf16" and par.zero_stage == 0:
        # DeepSpeed 0.19's ZeRO-0 bf16 path updates bf16 weights without fp32 master copies (its loss drifted
        # 3e-3 from ZeRO-2 and megatron within 4 steps here); ZeRO-1 keeps fp32 master partitions.
        raise ConfigError("parallel.zero_stage", "train.precision=bf16 with the deepspeed engine needs zero_stage >= 1 "
                                                 "(ZeRO-0 bf16 has no fp32 master weights)")
    if par.engine == "megatron" and tr.precision == "bf16" and par.zero_stage == 0:
        # megatron-core 0.16.1's non-distributed bf16 optimizer (Float16OptimizerWithFloat16Params) fails to
        # describe its state for a distributed checkpoint ("Param id N does not match any model sharded param").
        raise ConfigError("parallel.zero_stage", "engine=megatron with train.precision=bf16 needs zero_stage=1 "
                                                 "(the DistributedOptimizer)")
    if par.engine == "megatron" and par.zero_stage not in (0, 1):
        raise ConfigError("parallel.zero_stage", "engine=megatron supports 0 (DDP) or 1 (DistributedOptimizer)")
    if par.sequence_parallel and par.engine != "megatron":
        # Norm weights see only a sequence shard; their grads need the tp all-reduce that megatron's grad
        # finalisation does and DeepSpeed does not.
        raise ConfigError("parallel.sequence_parallel", "needs parallel.engine=megatron")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tp > 1")
    if par.sequence_parallel and m.seq_length % par.tp:
        raise ConfigError("parallel.sequence_parallel", f"seq_length={m.seq_length} is not divisible by tp={par.tp}")
    per_step = tr.micro_batch_size * cfg.dp_size()
    if tr.global_batch_size is not None and (tr.global_batch_size < per_step or tr.global_batch_size % per_step):
        raise ConfigError("train.global_batch_size",
                          f"{tr.global_batch_size} is not a multiple of micro_batch_size x dp = {per_step}")
    if par.engine == "megatron" and par.pp > 1 and cfg.grad_accum() < 1:
        raise ConfigError("train.global_batch_size", "pipeline needs at least one micro-batch")
    if opt.min_lr > opt.lr:
        raise ConfigError("optim.min_lr", f"{opt.min_lr} is larger than optim.lr={opt.lr}")
    if cfg.data.kind == "webdataset" and not cfg.data.sources:
        raise ConfigError("data.sources", "kind=webdataset needs at least one source")
    if cfg.data.kind == "webdataset" and cfg.data.vocab is None:
        raise ConfigError("data.vocab", "kind=webdataset needs the vocabulary manifest (vocab.json)")
    for i, s in enumerate(cfg.data.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path", "is empty")
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight", f"must be > 0, got {s.weight}")
    if not 0.0 <= cfg.data.cond_dropout <= 1.0:
        raise ConfigError("data.cond_dropout", "must be in [0, 1]")
    if cfg.stage != "pretrain":
        validate_align(cfg)


def validate_layout(cfg: Config) -> None:
    """`model.layout` and `model.logprob_norm` against the rest of the config."""
    m = cfg.model
    needs_codes = [k for k, on in (("model.layout", m.layout == "llamagen"),
                                    ("model.logprob_norm", m.logprob_norm == "codebook")) if on]
    if needs_codes and (m.image_token_offset is None or m.codebook_size is None):
        raise ConfigError(needs_codes[0], "needs the image-code ids: set data.vocab (or model.image_token_offset "
                                          "and model.codebook_size)")
    if m.image_token_offset is not None and m.codebook_size is not None and (
            m.image_token_offset < 0 or m.codebook_size < 1 or m.image_token_offset + m.codebook_size > m.vocab_size):
        raise ConfigError("model.codebook_size", f"image codes [{m.image_token_offset}, "
                                                 f"{m.image_token_offset + m.codebook_size}) do not fit the "
                                                 f"vocabulary of {m.vocab_size}")
    if m.layout != "llamagen":
        return
    if m.rope != "2d":
        raise ConfigError("model.layout", "llamagen needs model.rope=2d (LlamaGen's 2D rotary)")
    if m.logprob_norm != "codebook":
        raise ConfigError("model.logprob_norm", "model.layout=llamagen needs codebook (LlamaGen's head covers the "
                                                "image codebook only)")
    if m.seq_length < m.image_grid ** 2:
        raise ConfigError("model.seq_length", f"{m.seq_length} is shorter than a llamagen sample: the condition "
                                              f"and {m.image_grid}x{m.image_grid} codes need seq_length >= "
                                              f"{m.image_grid ** 2}")
    if cfg.data.kind != "webdataset":
        raise ConfigError("data.kind", "model.layout=llamagen reads class->image code shards: set kind=webdataset")
    precomputed = cfg.stage == "cca" and cfg.align.reference == "precomputed"  # ref_pairs shards (task auto)
    for i, s in enumerate(cfg.data.sources):
        if s.task != "c2i" and not (precomputed and s.task == "auto"):
            raise ConfigError(f"data.sources[{i}].task", f"model.layout=llamagen reads class->image samples only: "
                                                         f"set task=c2i (got {s.task})")


def validate_align(cfg: Config) -> None:
    """The alignment stages' own combinations (CCA and DPO)."""
    a = cfg.align
    if not cfg.train.init_from:
        raise ConfigError("train.init_from", f"stage {cfg.stage} starts from a trained model: set it to a run "
                                             f"directory or checkpoint (the policy's start and the reference)")
    if cfg.data.kind != "webdataset":
        raise ConfigError("data.kind", f"stage {cfg.stage} reads shards: set kind=webdataset and data.sources")
    if a.beta <= 0:
        raise ConfigError("align.beta", f"must be > 0, got {a.beta}")
    if a.lam < 0:
        raise ConfigError("align.lam", f"must be >= 0, got {a.lam}")
    if not 0.0 <= a.uncond_ratio <= 1.0:
        raise ConfigError("align.uncond_ratio", f"must be in [0, 1], got {a.uncond_ratio}")
    if not 0.0 <= a.label_smoothing < 0.5:
        raise ConfigError("align.label_smoothing", f"must be in [0, 0.5), got {a.label_smoothing}")
    if cfg.stage == "dpo" and a.label_smoothing and a.loss not in ("sigmoid", "simpo"):
        raise ConfigError("align.label_smoothing", f"only the sigmoid and simpo losses have one (align.loss={a.loss})")
    if a.rpo_alpha < 0:
        raise ConfigError("align.rpo_alpha", f"must be >= 0, got {a.rpo_alpha}")
    if cfg.stage == "cca" and a.rpo_alpha:
        raise ConfigError("align.rpo_alpha", "is a DPO term (an NLL on the chosen response); the cca stage has none")
    if cfg.stage == "dpo" and a.gamma and a.loss != "simpo":
        raise ConfigError("align.gamma", f"is SimPO's target margin; align.loss is {a.loss}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
