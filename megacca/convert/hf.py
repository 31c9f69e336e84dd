"""Hugging Face `LlamaForCausalLM` folders out of and into megacca checkpoints (`to-hf`, `from-hf`).

megacca's model is a Llama: RMSNorm, SwiGLU, rotary in the rotate-half convention (Hugging Face's too, so no
permutation), no biases, untied embeddings. Per layer N (canonical names, `megacca.convert.canonical`):

| megacca | Hugging Face |
|---|---|
| `embedding.word_embeddings.weight` [Vp, H] | `model.embed_tokens.weight` (all Vp rows, padding included) |
| `decoder.layers.N.input_layernorm.weight` | `model.layers.N.input_layernorm.weight` |
| `decoder.layers.N.self_attention.linear_qkv.weight` | `...self_attn.q_proj` / `k_proj` / `v_proj` (per kv group) |
| `decoder.layers.N.self_attention.linear_proj.weight` | `...self_attn.o_proj.weight` |
| `decoder.layers.N.pre_mlp_layernorm.weight` | `...post_attention_layernorm.weight` |
| `decoder.layers.N.mlp.linear_fc1.weight` = [gate; up] | `...mlp.gate_proj.weight`, `...mlp.up_proj.weight` |
| `decoder.layers.N.mlp.linear_fc2.weight` | `...mlp.down_proj.weight` |
| `decoder.final_layernorm.weight` | `model.norm.weight` |
| `output_layer.weight` [Vp, H] | `lm_head.weight` |

`to-hf` keeps the padded vocabulary rows (`vocab_size` in config.json is the padded size), so the exported
model's logits are megacca's logits, every row, and `from-hf` gets the same tensors back: a round trip is
bit-exact. Beside the weights and config.json it writes `megacca.json` (the megacca config and step, which
`from-hf` restores), `megacca_vocab.json` (the unified vocabulary manifest, with the text model beside it) and,
with `transformers` installed, `tokenizer.json`: the sentencepiece text model with its ids moved to the unified
vocabulary's text range and every special, class and image code a token of its own, so a Hugging Face
tokenizer gives exactly `UnifiedVocab.encode_text`'s ids. 2D rotary cannot be exported: Hugging Face's Llama
rotates by the token index, megacca's 2D rotary by (row, column) inside image spans.

`from-hf` of a plain Hugging Face Llama (no `megacca.json`) builds a unified vocabulary around its
sentencepiece `tokenizer.model`: the 8 specials, the model's text pieces (sentencepiece id p → 8 + p) and
`--add-image-codebook N` image codes, plus the padding rows. The text rows are the model's own; the new rows
are initialised so that logits over the original vocabulary are unchanged (a logit depends only on its own
output row) and the new tokens start as average ones: `<bos>`, `<eos>` (and `<pad>` when the model names a pad
token) copy the rows of the model's own bos / eos / pad tokens, so megacca's documents `<bos> ... <eos>` read to
it like its own; every other new row, of the input embedding and of the output layer alike, is the mean of the
model's rows (Hewitt 2021, "Initializing new word embeddings", what `transformers`' `resize_token_embeddings`
does by default up to a 1e-9-scaled sample). docs/checkpoint-format.md has the details.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from shutil import copyfile
from typing import Optional

import torch

from megacca.convert import ConversionError
from megacca.convert.canonical import check_shapes, expected_shapes, fuse_qkv, split_qkv

META = "megacca.json"
VOCAB = "megacca_vocab.json"
META_FORMAT = "megacca-hf/1"
TEXT_MODEL = "tokenizer.model"  # where a Hugging Face folder keeps its sentencepiece model
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# ---- tensors -------------------------------------------------------------------------------------------------
def _layer_pairs(n: int) -> dict[str, str]:
    """canonical → Hugging Face names of layer n's tensors that map one to one."""
    c, h = f"decoder.layers.{n}.", f"model.layers.{n}."
    return {c + "input_layernorm.weight": h + "input_layernorm.weight",
            c + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight",
            c + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight",
            c + "mlp.linear_fc2.weight": h + "mlp.down_proj.weight"}


_TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}


def to_hf_state_dict(sd: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """A canonical state dict → `LlamaForCausalLM.state_dict()` names and layouts (same rows)."""
    m = model_cfg
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    out = {hf: sd[c].contiguous() for c, hf in _TOP.items()}
    for n in range(m.num_layers):
        out.update({hf: sd[c].contiguous() for c, hf in _layer_pairs(n).items()})
        q, k, v = split_qkv(sd[f"decoder.layers.{n}.self_attention.linear_qkv.weight"], heads, groups)
        gate, up = sd[f"decoder.layers.{n}.mlp.linear_fc1.weight"].chunk(2)
        h = f"model.layers.{n}."
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v, h + "mlp.gate_proj.weight": gate.contiguous(),
                    h + "mlp.up_proj.weight": up.contiguous()})
    return out


def _hf_shapes(model_cfg, rows: int) -> dict[str, tuple]:
    m = model_cfg
    heads, hidden, ffn = m.num_attention_heads, m.hidden_size, m.ffn_hidden_size
    groups, d = m.num_query_groups or heads, hidden // heads
    out = {"model.embed_tokens.weight": (rows, hidden), "model.norm.weight": (hidden,),
           "lm_head.weight": (rows, hidden)}
    per_layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 "self_attn.q_proj.weight": (heads * d, hidden), "self_attn.k_proj.weight": (groups * d, hidden),
                 "self_attn.v_proj.weight": (groups * d, hidden), "self_attn.o_proj.weight": (hidden, heads * d),
                 "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                 "mlp.down_proj.weight": (hidden, ffn)}
    for n in range(m.num_layers):
        out.update({f"model.layers.{n}.{k}": v for k, v in per_layer.items()})
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], model_cfg, where: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict` (same rows); keys and shapes checked first, naming both shapes."""
    m = model_cfg
    check_shapes(_hf_shapes(m, hf["model.embed_tokens.weight"].shape[0]), hf, where)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    out = {c: hf[name] for c, name in _TOP.items()}
    for n in range(m.num_layers):
        out.update({c: hf[name] for c, name in _layer_pairs(n).items()})
        h = f"model.layers.{n}."
        out[f"decoder.layers.{n}.self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"], hf[h + "self_attn.v_proj.weight"],
            heads, groups)
        out[f"decoder.layers.{n}.mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"],
                                                                     hf[h + "mlp.up_proj.weight"]])
    return out


# ---- config.json ---------------------------------------------------------------------------------------------
def hf_config(cfg, rows: int, dtype: torch.dtype, vocab: Optional[dict]) -> dict:
    m = cfg.model
    theta = float(m.rotary_base)
    specials = (vocab or {}).get("specials", {})
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads, "hidden_act": "silu",
        "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_epsilon,
        # transformers >= 5 reads rope_parameters, older versions rope_theta; both say the same.
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": rows, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": m.init_method_std, "use_cache": True,
        "bos_token_id": specials.get("<bos>"), "eos_token_id": specials.get("<eos>"),
        "pad_token_id": specials.get("<pad>"),
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }


def _rope_theta(c: dict, where: str) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    kind = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind not in (None, "default"):
        raise ConversionError(f"{where}: rotary scaling {kind!r}: megacca's rotary is the plain one (rope_type "
                              f"'default'); the logits would differ")
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"{where}: rope_theta {theta} is not an integer (megacca's model.rotary_base is)")
    return float(theta)


def model_fields(c: dict, where: str) -> dict:
    """The `model:` fields of a megacca config equal to a Hugging Face Llama config.json; a config megacca's
    model cannot express is refused, saying which field and why."""
    kind = c.get("model_type")
    if kind != "llama":
        raise ConversionError(f"{where}: model_type {kind!r}; from-hf reads Llama models (model_type 'llama', "
                              f"LlamaForCausalLM)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise ConversionError(f"{where}: {key} is {c[key]!r}; megacca's model has {want!r}")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for key in need:
        if not isinstance(c.get(key), int):
            raise ConversionError(f"{where}: {key} missing or not an integer")
    heads = c["num_attention_heads"]
    groups = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if head_dim * heads != c["hidden_size"]:
        raise ConversionError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {c['hidden_size']}; "
                              f"megacca's heads are hidden_size / num_attention_heads wide")
    return dict(preset=None, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                num_attention_heads=heads, num_query_groups=None if groups == heads else groups,
                ffn_hidden_size=c["intermediate_size"], seq_length=int(c.get("max_position_embeddings") or 4096),
                rotary_base=int(_rope_theta(c, where)), rope="1d", norm_epsilon=float(c.get("rms_norm_eps", 1e-6)),
                init_method_std=float(c.get("initializer_range", 0.02)))


# ---- reading a folder ----------------------------------------------------------------------------------------
def _plain_name(name, index: Path) -> str:
    if not (isinstance(name, str) and re.fullmatch(r"[\w.\-]+", name) and name not in (".", "..")):
        raise ConversionError(f"{index}: names the weights file {name!r}, which is not a file name inside the folder")
    return name


def read_hf_weights(folder: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face folder: model.safetensors, its sharded index, or (through the safe
    unpickler) pytorch_model.bin and its index."""
    from megacca.convert.files import read_tensor_file

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            files = [folder / single]
        elif (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{folder / index}: not a weights index ({e})") from None
            files = [folder / _plain_name(n, folder / index) for n in sorted(set(weight_map.values()))]
        else:
            continue
        out: dict[str, torch.Tensor] = {}
        for f in files:
            part = read_tensor_file(f, trust_pickle)
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise ConversionError(f"{f}: expected a state dict (names to tensors)")
            out.update(part)
        return out
    raise ConversionError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return value


# ---- to-hf ---------------------------------------------------------------------------------------------------
def _text_model_for(ckpt: Path, vocab: dict, cfg, given: Optional[str]) -> Optional[Path]:
    """The sentencepiece model whose sha256 the manifest records: `--text-model`, the file beside the
    checkpoint's vocab.json, or the run's data.text_model / the file beside its data.vocab."""
    from megacca.tokenizer.text import TextTokenizer

    want = vocab.get("text_model_sha256")
    if not want:
        return None
    name = Path(vocab.get("text_model") or "text.model").name
    candidates = [Path(given)] if given else [ckpt / name]
    if not given:
        if cfg.data.text_model:
            candidates.append(Path(cfg.data.text_model))
        if cfg.data.vocab:
            candidates.append(Path(cfg.data.vocab).parent / name)
    for path in candidates:
        if path.is_file():
            sha = TextTokenizer(str(path)).sha256
            if sha == want:
                return path
            if given:
                raise ConversionError(f"--text-model {path}: sha256 {sha[:12]}... is not the vocabulary's text "
                                      f"model ({want[:12]}...)")
    return None


def _token_names(vocab: dict) -> dict[int, str]:
    """Unified id → token name of everything that is not a text piece (as `UnifiedVocab.token_name` spells it)."""
    names = {int(i): s for s, i in vocab["specials"].items()}
    for k, c in enumerate(vocab["class_names"]):
        names[vocab["class_offset"] + k] = f"<class:{c}>"
    for k in range(vocab["codebook_size"]):
        names[vocab["image_offset"] + k] = f"<code:{k}>"
    return names


def build_tokenizer_json(vocab: dict, text_model: Path) -> str:
    """tokenizer.json (the `tokenizers` format) of the unified vocabulary: transformers' sentencepiece converter
    builds the text part (it encodes like SentencePieceProcessor), whose ids then move to the text range; each
    special, class and image code is an added token at its unified id."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(text_model.read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    bpe = proto.trainer_spec.model_type == 2
    if proto.trainer_spec.model_type not in (1, 2):
        raise ConversionError(f"{text_model}: sentencepiece model type {proto.trainer_spec.model_type}; the Hugging "
                              f"Face tokenizer is written for unigram and BPE models")
    text = SpmConverter.build_tokenizer_from_spm_proto(
        proto, {p: i for i, (p, _) in enumerate(pieces)} if bpe else pieces, legacy=True)
    spec = json.loads(text.to_str())
    offset, others = vocab["text_offset"], _token_names(vocab)
    if bpe:
        table = {p: offset + i for i, (p, _) in enumerate(pieces)}
        clash = [n for n in others.values() if n in table]
        if clash:
            raise ConversionError(f"{text_model}: the text piece {clash[0]!r} has the name of a unified token")
        table.update({n: i for i, n in others.items()})
        spec["model"]["vocab"] = table
    else:
        floor = min(s for _, s in pieces) - 100.0  # never chosen inside text; added tokens match them first
        entries = [[others[i], floor] for i in range(offset)] + [list(p) for p in pieces]
        entries += [[others[i], floor] for i in range(offset + len(pieces), vocab["vocab_size"])]
        spec["model"]["vocab"] = entries
        spec["model"]["unk_id"] = proto.trainer_spec.unk_id + offset
    for t in spec.get("added_tokens") or []:
        t["id"] += offset
    spec["added_tokens"] = (spec.get("added_tokens") or []) + [
        {"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, n in sorted(others.items())]
    spec["post_processor"] = None  # like UnifiedVocab.encode_text: no <bos> / <eos> added
    return Tokenizer.from_str(json.dumps(spec)).to_str()


def _write_tokenizer(tmp: Path, vocab: dict, text_model: Optional[Path], cfg) -> list[str]:
    if text_model is None:
        if vocab.get("text_size"):
            note(f"the vocabulary's text model (sha256 {vocab['text_model_sha256'][:12]}...) was not found: no "
                 f"tokenizer files written; pass --text-model PATH")
        else:
            note("the vocabulary has no text model: no tokenizer files written (megacca_vocab.json gives the ids)")
        return []
    name = Path(vocab.get("text_model") or "text.model").name
    copyfile(text_model, tmp / name)
    written = [name]
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        note("transformers is not installed: tokenizer.json not written (its sentencepiece converter builds it)")
        return written
    (tmp / "tokenizer.json").write_text(build_tokenizer_json(vocab, text_model))
    specials = vocab["specials"]
    by_id = {i: s for s, i in specials.items()}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": by_id[specials["<bos>"]],
               "eos_token": by_id[specials["<eos>"]], "pad_token": by_id[specials["<pad>"]],
               "model_max_length": cfg.model.seq_length, "clean_up_tokenization_spaces": False}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n")
    return written + ["tokenizer.json", "tokenizer_config.json"]


def write_safetensors(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size) -> list[str]:
    """Hugging Face's layout: model.safetensors, or model-0000i-of-0000n.safetensors and the index when the
    tensors exceed `max_shard_size` (huggingface_hub's own splitter names and fills the shards)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size()
                                                                  for t in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        files.append("model.safetensors.index.json")
    return files


def to_hf(src, dst, *, max_shard_size="5GB", dtype: Optional[str] = None, text_model: Optional[str] = None) -> dict:
    """A megacca checkpoint (run directory or checkpoint, either engine, any layout) with 1D rotary → a Hugging
    Face LlamaForCausalLM folder at `dst` (see module docstring). Returns a summary."""
    from megacca.checkpoint import read_full_state_dict
    from megacca.convert.files import megacca_checkpoint, staged_dir
    from megacca.convert.write import single_rank_config

    ckpt, saved, cfg = megacca_checkpoint(src)
    if cfg.model.rope != "1d":
        raise ConversionError(f"{ckpt}: model.rope={cfg.model.rope}: its image codes rotate by (row, column) "
                              f"inside each image span, Hugging Face's LlamaForCausalLM only by the token index, "
                              f"so the exported model would compute other logits (only 1D-rotary models export)")
    sd = read_full_state_dict(ckpt)
    rows = single_rank_config(cfg).padded_vocab_size()
    check_shapes(expected_shapes(cfg.model, rows), sd, str(ckpt))
    hf = to_hf_state_dict(sd, cfg.model)
    out_dtype = _DTYPES[dtype] if dtype else hf["lm_head.weight"].dtype
    hf = {k: v.to(out_dtype) for k, v in hf.items()}
    vocab = saved.get("vocab")
    with staged_dir(dst) as tmp:
        files = write_safetensors(hf, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, rows, out_dtype, vocab), indent=1) + "\n")
        meta = {"format": META_FORMAT, "step": saved.get("step", 0), "config": saved["config"], "source": str(ckpt)}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        files += ["config.json", META]
        if vocab is not None:
            (tmp / VOCAB).write_text(json.dumps(vocab, indent=1) + "\n")
            files += [VOCAB] + _write_tokenizer(tmp, vocab, _text_model_for(ckpt, vocab, cfg, text_model), cfg)
        else:
            note(f"{ckpt} has no vocabulary manifest (synthetic data): ids are written as they are, no tokenizer")
    return {"src": str(ckpt), "dst": str(dst), "files": sorted(files), "rows": rows, "dtype": str(out_dtype)}


# ---- from-hf -------------------------------------------------------------------------------------------------
def _mean_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.double().mean(dim=0, keepdim=True).to(t.dtype).expand(n, -1)


def _unified_rows(hf_rows: torch.Tensor, vocab: dict, padded: int, copies: dict[int, int]) -> torch.Tensor:
    """[padded, H]: the text range holds the Hugging Face rows, `copies` (unified id → Hugging Face id) copy
    rows, everything else is the mean of the Hugging Face rows."""
    t0, n = vocab["text_offset"], vocab["text_size"]
    out = _mean_rows(hf_rows[:n], padded).clone()
    out[t0:t0 + n] = hf_rows[:n]
    for unified, theirs in copies.items():
        out[unified] = hf_rows[theirs]
    return out


def _special_ids(c: dict, n: int, where: str) -> dict[str, int]:
    """The model's own bos / eos / pad token ids (those that are set and inside its text vocabulary)."""
    out = {}
    for name, key in (("<bos>", "bos_token_id"), ("<eos>", "eos_token_id"), ("<pad>", "pad_token_id")):
        value = c.get(key)
        if isinstance(value, list):  # several eos ids: the first is the one the model ends documents with
            value = value[0] if value else None
        if value is None:
            continue
        if not isinstance(value, int) or not 0 <= value < n:
            raise ConversionError(f"{where}: {key} {value!r} is outside the {n} text pieces")
        out[name] = value
    return out


def from_hf(src, dst, *, add_image_codebook: int = 0, image_grid: Optional[tuple[int, int]] = None,
            trust_pickle: bool = False) -> dict:
    """A Hugging Face Llama folder → a model-only megacca checkpoint at `dst` (see module docstring)."""
    from megacca.config import Config, ModelConfig, from_dict
    from megacca.convert.write import single_rank_config, write_model_checkpoint
    from megacca.tokenizer.vocab import UnifiedVocab, load_manifest

    folder = Path(src)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a directory (a Hugging Face model folder)")
    config = _read_json(folder / "config.json")
    fields = model_fields(config, str(folder / "config.json"))
    hf = read_hf_weights(folder, trust_pickle)
    if "lm_head.weight" not in hf and config.get("tie_word_embeddings") and "model.embed_tokens.weight" in hf:
        # megacca's output layer is its own tensor: a copy computes the same logits
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    files: dict[str, Path] = {}
    if (folder / META).is_file():  # a megacca export: restore it as it was
        meta = _read_json(folder / META)
        if meta.get("format") != META_FORMAT:
            raise ConversionError(f"{folder / META}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
        if add_image_codebook or image_grid:
            raise ConversionError(f"{folder} was exported from megacca and already has its unified vocabulary; "
                                  f"--add-image-codebook / --image-grid are for plain Hugging Face models")
        cfg = from_dict(Config, meta["config"])
        for key, value in fields.items():
            if key not in ("preset", "init_method_std", "seq_length") and getattr(cfg.model, key) != value:
                raise ConversionError(f"{folder}: config.json gives model.{key}={value!r}, {META} "
                                      f"model.{key}={getattr(cfg.model, key)!r}")
        vocab = load_manifest(str(folder / VOCAB)) if (folder / VOCAB).is_file() else None
        if vocab is not None and vocab.get("text_model"):
            beside = folder / Path(vocab["text_model"]).name
            if beside.is_file():
                files[beside.name] = beside
        sd = from_hf_state_dict(hf, cfg.model, str(folder))
        step, how = int(meta.get("step", 0)), "megacca export"
    else:
        if add_image_codebook < 1:
            raise ConversionError("--add-image-codebook N is required: a megacca vocabulary has an image codebook "
                                  "(N: the VQ tokenizer's codebook size)")
        sp = folder / TEXT_MODEL
        if not sp.is_file():
            raise ConversionError(f"{folder}: no {TEXT_MODEL}; megacca's text tokenizer is sentencepiece, so a model "
                                  f"whose tokenizer exists only as tokenizer.json cannot keep its text vocabulary")
        vocab = UnifiedVocab.build(str(sp), add_image_codebook, image_grid).to_manifest()
        n = vocab["text_size"]
        rows = hf["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in hf else 0
        if rows < n:
            raise ConversionError(f"{folder}: model.embed_tokens.weight has {rows} rows but {TEXT_MODEL} has {n} "
                                  f"pieces")
        if rows > n:
            note(f"{folder}: rows {n}..{rows - 1} of the embedding and lm_head are beyond the {n} pieces of "
                 f"{TEXT_MODEL} (padding: no text maps to them) and are not carried over")
        model = ModelConfig(**{**fields, "vocab_size": vocab["vocab_size"], "boi_token_id": vocab["specials"]["<boi>"],
                               "image_grid": image_grid[0] if image_grid else ModelConfig.image_grid})
        cfg = Config(name=folder.name, model=model)
        padded = single_rank_config(cfg).padded_vocab_size()
        copies = {vocab["specials"][s]: i for s, i in _special_ids(config, n, str(folder / "config.json")).items()}
        canonical_rows = dict(hf)
        canonical_rows["model.embed_tokens.weight"] = _unified_rows(hf["model.embed_tokens.weight"], vocab, padded,
                                                                    copies)
        if "lm_head.weight" in hf:
            canonical_rows["lm_head.weight"] = _unified_rows(hf["lm_head.weight"], vocab, padded, copies)
        sd = from_hf_state_dict(canonical_rows, cfg.model, str(folder))
        files[TEXT_MODEL] = sp
        step, how = 0, "Hugging Face Llama"
    if vocab is None:
        note(f"{folder} has no {VOCAB}: the checkpoint has no vocabulary manifest (ids as they are)")
    write_model_checkpoint(dst, cfg, sd, vocab=vocab, step=step, files=files, where=str(folder),
                           converted_from={"tool": "from-hf", "src": str(folder), "kind": how,
                                           "add_image_codebook": add_image_codebook or None})
    return {"src": str(folder), "dst": str(dst), "kind": how, "vocab_size": (vocab or {}).get("vocab_size")}


# ---- command line ----------------------------------------------------------------------------------------------
TO_HF_EPILOG = """\
The checkpoint may be a run directory (its latest checkpoint) or one checkpoint, of either engine, saved at any
tp / pp / ZeRO layout; its model must use 1D rotary (model.rope=1d). DST is created (it must not exist) with
config.json, model.safetensors (sharded above --max-shard-size, with model.safetensors.index.json),
megacca.json, megacca_vocab.json and the tokenizer files (tokenizer.json, tokenizer_config.json, the
sentencepiece model). It loads with transformers' AutoModelForCausalLM / LlamaForCausalLM, offline.

examples:
  python tools/convert_checkpoint.py to-hf --src runs/text1d --dst exports/text1d-hf
  python tools/convert_checkpoint.py to-hf --src runs/x/checkpoints/step_00000300 --dst out --dtype bfloat16
"""

FROM_HF_EPILOG = """\
SRC is a Hugging Face Llama folder (config.json and model.safetensors / its index / pytorch_model.bin). A folder
that to-hf wrote comes back as it was (bit-exact). A plain text LLM needs its sentencepiece tokenizer.model and
--add-image-codebook N: the unified vocabulary is the 8 specials, its text pieces and N image codes; the new
rows are initialised so logits over its own vocabulary are unchanged (docs/checkpoint-format.md). DST is a
model-only checkpoint: start a run from it with train.init_from=DST and data.vocab=DST/vocab.json.

examples:
  python tools/convert_checkpoint.py from-hf --src exports/text1d-hf --dst ckpts/text1d
  python tools/convert_checkpoint.py from-hf --src Llama-2-7b-hf --dst ckpts/llama2-unified \\
      --add-image-codebook 16384 --image-grid 16 16
"""


def add_commands(sub, formatter) -> None:
    p = sub.add_parser("to-hf", help="megacca checkpoint (1D rotary) -> Hugging Face LlamaForCausalLM folder",
                       description="Export a megacca checkpoint as a Hugging Face LlamaForCausalLM folder.",
                       epilog=TO_HF_EPILOG, formatter_class=formatter)
    p.add_argument("--src", required=True, metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--dst", required=True, metavar="DIR", help="the folder to create")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest weights file (default 5GB)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weights dtype (default: as stored)")
    p.add_argument("--text-model", metavar="FILE", help="the sentencepiece model of the vocabulary, when it is "
                                                        "not beside the checkpoint or at the run's data.text_model")
    p.set_defaults(run=lambda a: to_hf(a.src, a.dst, max_shard_size=a.max_shard_size, dtype=a.dtype,
                                       text_model=a.text_model))
    p = sub.add_parser("from-hf", help="Hugging Face Llama folder -> megacca checkpoint",
                       description="Import a Hugging Face Llama folder as a model-only megacca checkpoint.",
                       epilog=FROM_HF_EPILOG, formatter_class=formatter)
    p.add_argument("--src", required=True, metavar="DIR", help="Hugging Face model folder")
    p.add_argument("--dst", required=True, metavar="CKPT", help="the checkpoint directory to create")
    p.add_argument("--add-image-codebook", type=int, default=0, metavar="N",
                   help="image codes to append after the text pieces (a plain text LLM needs it)")
    p.add_argument("--image-grid", type=int, nargs=2, metavar=("H", "W"), help="codes per image (vocabulary field)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle pytorch_model.bin fully even when it holds more than tensors (trusted files only)")
    p.set_defaults(run=lambda a: from_hf(a.src, a.dst, add_image_codebook=a.add_image_codebook,
                                         image_grid=tuple(a.image_grid) if a.image_grid else None,
                                         trust_pickle=a.trust_pickle))
