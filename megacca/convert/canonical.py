"""The canonical state dict: one naming and one tensor layout for every full (single-process) state dict.

megatron-core names a parameter after the module that holds it, so the same model has two spellings: the
local spec (CPU, SDPA, flash-attn) keeps separate norm modules, `decoder.layers.N.input_layernorm.weight`
and `...pre_mlp_layernorm.weight`, while the Transformer Engine spec fuses each norm into the next linear,
`...self_attention.linear_qkv.layer_norm_weight` and `...mlp.linear_fc1.layer_norm_weight`, and both add
`_extra_state` entries (TE's fp8 scaling metadata; `None` placeholders in the local spec) that hold no
weights. The canonical naming is the local spec's, without `_extra_state`, per layer N:

    embedding.word_embeddings.weight                    [Vp, H]
    decoder.layers.N.input_layernorm.weight             [H]
    decoder.layers.N.self_attention.linear_qkv.weight   [(h + 2g) d, H]  per kv group: its h/g q heads, k, v
    decoder.layers.N.self_attention.linear_proj.weight  [H, h d]
    decoder.layers.N.pre_mlp_layernorm.weight           [H]
    decoder.layers.N.mlp.linear_fc1.weight              [2F, H]          [gate; up]
    decoder.layers.N.mlp.linear_fc2.weight              [H, F]
    decoder.final_layernorm.weight                      [H]
    output_layer.weight                                 [Vp, H]

(h query heads, g kv groups, d = H / h, F the SwiGLU width, Vp the padded vocabulary: docs/checkpoint-format.md.)
`to_canonical` accepts either spelling and returns this one; `load_canonical` puts a canonical dict into a
model of either spec. The distributed checkpoints megacca writes need no mapping: there megatron stores the
local spec's norms under the TE names already (the local layer spec's `sharded_state_dict_keys_map`), so both
specs write and read the same keys; `from_stored` turns those layer-stacked keys into canonical ones.
"""
from __future__ import annotations

import re

import torch

from megacca.convert import ConversionError

# Transformer Engine's per-layer names → the canonical (local spec) ones.
TE_TO_CANONICAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                   "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
CANONICAL_TO_TE = {v: k for k, v in TE_TO_CANONICAL.items()}
LAYER_KEYS = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
              "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
# The dimension megatron splits each tensor along under tensor parallelism (absent: replicated on every rank).
# fc1 is split like the others but holds [gate_r; up_r] on each rank r (see `merge_tp`).
TP_DIM = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0, "self_attention.linear_qkv.weight": 0,
          "self_attention.linear_proj.weight": 1, "mlp.linear_fc1.weight": 0, "mlp.linear_fc2.weight": 1}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def is_extra_state(key: str) -> bool:
    return key.endswith("._extra_state") or key == "_extra_state"


def _layer_suffix(key: str) -> str:
    m = _LAYER.match(key)
    return m.group(2) if m else key


def to_canonical(state_dict: dict) -> dict[str, torch.Tensor]:
    """A full state dict of either spec (TE or local names, with or without `_extra_state`) → canonical names.
    Values are not copied."""
    out = {}
    for key, value in state_dict.items():
        if is_extra_state(key):
            continue
        m = _LAYER.match(key)
        if m and m.group(2) in TE_TO_CANONICAL:
            key = f"decoder.layers.{m.group(1)}.{TE_TO_CANONICAL[m.group(2)]}"
        if key in out:
            raise ConversionError(f"state dict holds {key!r} twice (under its local and its Transformer Engine "
                                  f"name)")
        out[key] = value
    return out


def from_stored(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a megatron distributed checkpoint, read whole (`decoder.layers.X` stacked over layers
    along dim 0, norms under the TE names) → the canonical state dict, sorted by name."""
    out: dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            rest = TE_TO_CANONICAL.get(rest, rest)
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i].clone()
        else:
            out[key] = t
    return dict(sorted(out.items()))


def expected_shapes(model_cfg, padded_vocab_size: int) -> dict[str, tuple]:
    """The canonical names and shapes of the model a `ModelConfig` describes (tp = 1)."""
    m = model_cfg
    h, hidden, ffn = m.num_attention_heads, m.hidden_size, m.ffn_hidden_size
    g, d = m.num_query_groups or h, hidden // h
    out = {"embedding.word_embeddings.weight": (padded_vocab_size, hidden), "decoder.final_layernorm.weight": (hidden,),
           "output_layer.weight": (padded_vocab_size, hidden)}
    per_layer = {"input_layernorm.weight": (hidden,), "self_attention.linear_qkv.weight": ((h + 2 * g) * d, hidden),
                 "self_attention.linear_proj.weight": (hidden, h * d), "pre_mlp_layernorm.weight": (hidden,),
                 "mlp.linear_fc1.weight": (2 * ffn, hidden), "mlp.linear_fc2.weight": (hidden, ffn)}
    for n in range(m.num_layers):
        out.update({f"decoder.layers.{n}.{k}": v for k, v in per_layer.items()})
    return out


def check_shapes(expected: dict[str, tuple], state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Every expected key present with its shape and nothing else; ConversionError naming the key and both
    shapes otherwise."""
    for key, shape in expected.items():
        if key not in state_dict:
            raise ConversionError(f"{where}: missing key {key!r} (expected shape {tuple(shape)})")
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise ConversionError(f"{where}: key {key!r} has shape {got}, the model expects {tuple(shape)}")
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise ConversionError(f"{where}: unexpected key {extra[0]!r} {tuple(state_dict[extra[0]].shape)}"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")


def load_canonical(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """Load a full state dict of either spelling into a tp=1, pp=1 model of either spec, strictly: every
    weight of the model set, keys and shapes checked first (ConversionError naming the key and both shapes)."""
    canonical = to_canonical(state_dict)
    own = {k: v for k, v in model.state_dict().items() if not is_extra_state(k)}
    to_own = {}  # canonical name → the model's own name
    for key in own:
        m = _LAYER.match(key)
        if m and m.group(2) in TE_TO_CANONICAL:
            to_own[f"decoder.layers.{m.group(1)}.{TE_TO_CANONICAL[m.group(2)]}"] = key
        else:
            to_own[key] = key
    check_shapes({c: tuple(own[k].shape) for c, k in to_own.items()}, canonical, where)
    missing, unexpected = model.load_state_dict({to_own[k]: v for k, v in canonical.items()}, strict=False)
    missing = [k for k in missing if not is_extra_state(k)]
    if missing or unexpected:  # check_shapes covered both: this would be a bug in the name mapping
        raise RuntimeError(f"load_canonical: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ---- tensor-parallel layout --------------------------------------------------------------------------------------
def merge_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The canonical full state dict from the canonical-named state dicts of the tp ranks, in rank order (each
    holds its slice of the split tensors and a copy of the replicated ones)."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != keys:
            raise ConversionError(f"tensor-parallel rank {r} holds other tensors than rank 0: "
                                  f"{sorted(set(s) ^ keys)[:3]}")
    out = {}
    for key in sorted(keys):
        parts = [s[key] for s in shards]
        suffix = _layer_suffix(key)
        if suffix == "mlp.linear_fc1.weight":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        elif suffix in TP_DIM:
            out[key] = torch.cat(parts, dim=TP_DIM[suffix])
        else:
            for r, p in enumerate(parts[1:], 1):
                if not torch.equal(p, parts[0]):
                    raise ConversionError(f"{key!r} is replicated under tensor parallelism, but rank {r}'s copy "
                                          f"differs from rank 0's")
            out[key] = parts[0]
    return out


# ---- per-head layouts -------------------------------------------------------------------------------------------
def split_qkv(w: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused `linear_qkv.weight` (per kv group: its heads/groups q heads, then k, then v) →
    (q [heads d, H], k [groups d, H], v [groups d, H]) with heads in order; query head i belongs to group
    i // (heads / groups), as in Hugging Face's `repeat_kv`."""
    per = heads // groups
    d = w.shape[0] // (heads + 2 * groups)
    g = w.reshape(groups, per + 2, d, w.shape[-1])
    return (g[:, :per].reshape(heads * d, -1).clone(), g[:, per].reshape(groups * d, -1).clone(),
            g[:, per + 1].reshape(groups * d, -1).clone())


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    per = heads // groups
    d = q.shape[0] // heads
    hidden = q.shape[-1]
    return torch.cat([q.reshape(groups, per, d, hidden), k.reshape(groups, 1, d, hidden),
                      v.reshape(groups, 1, d, hidden)], dim=1).reshape(-1, hidden).contiguous()
