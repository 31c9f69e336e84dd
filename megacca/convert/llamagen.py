"""LlamaGen's class-conditional GPT ↔ megacca's model in the LlamaGen layout (`model.layout: llamagen`).

LlamaGen (FoundationVision/LlamaGen, `autoregressive/models/gpt.py`, `Transformer` with `model_type='c2i'`)
and megacca's `UnifiedGPT` with `layout: llamagen, rope: 2d, logprob_norm: codebook` compute the same function;
only the parameters are arranged differently. Per layer N (`d` the head dim, `h` the query heads, `g` the key /
value heads):

| LlamaGen | megacca (the tp=1 model's `state_dict()` names) |
|---|---|
| `tok_embeddings.weight` [K, dim] | rows `image_offset + k` of `embedding.word_embeddings.weight` |
| `cls_embedding.embedding_table.weight` [C+1, dim] | rows `class_offset + c` (c < C) and row `<null>` (the last, null row) of the same table |
| `layers.N.attention_norm.weight` | `decoder.layers.N.input_layernorm.weight` |
| `layers.N.attention.wqkv.weight` [(h+2g)d, dim]: all q, all k, all v | `decoder.layers.N.self_attention.linear_qkv.weight`: per kv group [its h/g q heads, k, v] |
| `layers.N.attention.wo.weight` | `decoder.layers.N.self_attention.linear_proj.weight` |
| `layers.N.ffn_norm.weight` | `decoder.layers.N.pre_mlp_layernorm.weight` |
| `layers.N.feed_forward.w1` (gate) / `w3` (up) | `decoder.layers.N.mlp.linear_fc1.weight` = [w1; w3] |
| `layers.N.feed_forward.w2` | `decoder.layers.N.mlp.linear_fc2.weight` |
| `norm.weight` | `decoder.final_layernorm.weight` |
| `output.weight` [K, dim] | rows `image_offset + k` of `output_layer.weight` |

Rotary: LlamaGen rotates interleaved pairs (2i, 2i+1) of each head, megatron rotates (i, i + d/2) with the
same angle table (pairs 0..d/4-1 by the row, d/4..d/2-1 by the column, `megacca.model.rope`). Permuting each
q and k head's rows by [0, 2, 4, ..., d-2, 1, 3, ..., d-1] turns one into the other exactly (a query-key dot
product is invariant under permuting both alike); v, wo and everything else are untouched.

Rows LlamaGen has no counterpart for are zero: the embeddings of `<pad>`, `<bos>`, `<eos>`, `<boi>`, `<eoi>`,
`<sep>`, the reserved id and the padded rows (the layout never feeds them to the model), and every output row
that is not an image code (under `logprob_norm: codebook` an image position never sees them, and a zero row
gets no gradient there, so it stays zero through CCA). `to-llamagen` drops them again, so a round trip is
bit-exact.

The vocabulary written with the checkpoint holds the specials, the C classes (names from `--classes-from` a
shard directory, else "0".."C-1"), no text and the K codes, with the image grid of the checkpoint
(LlamaGen's checkpoints do not record it: 16 for the 256-px models, 24 for the 384-px ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from megacca.convert import ConversionError
from megacca.convert.canonical import check_shapes, expected_shapes, fuse_qkv, split_qkv

__all__ = ["LlamaGenShape", "LLAMAGEN_SIZES", "infer_shape", "rotary_permutation", "to_megacca_state_dict",
           "to_llamagen_state_dict", "model_fields", "clean_gpt_state_dict", "from_llamagen", "to_llamagen"]

# The published sizes (autoregressive/models/gpt.py, GPT_*): (dim, layers) → (name, heads). The head count
# cannot be read off the fused wqkv of a multi-head model, so it comes from here (or --num-heads).
LLAMAGEN_SIZES = {(768, 12): ("B", 12), (1024, 24): ("L", 16), (1280, 36): ("XL", 20), (1536, 48): ("XXL", 24),
                  (2560, 48): ("XXXL", 40), (2048, 22): ("1B", 32), (3200, 24): ("3B", 32), (4096, 32): ("7B", 32)}
_PRESETS = {"B": "llamagen-B", "L": "llamagen-L", "XL": "llamagen-XL", "XXL": "llamagen-XXL", "3B": "llamagen-3B"}
_TOP_KEYS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "norm.weight", "output.weight")
VQ_DIR = "vq"  # where from-llamagen --vq puts the tokenizer inside the checkpoint (megacca.load looks there)


@dataclasses.dataclass(frozen=True)
class LlamaGenShape:
    """A LlamaGen c2i GPT's architecture, as read from its state dict."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn: int
    codebook_size: int
    num_classes: int  # without the null row
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def name(self) -> Optional[str]:
        size = LLAMAGEN_SIZES.get((self.dim, self.n_layer))
        return size[0] if size is not None and size[1] == self.n_head else None


def clean_gpt_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    """The GPT state dict inside a loaded LlamaGen checkpoint: `{"model": sd}` (B / L / XL, and CCA's
    fine-tuned ones) or the bare state dict (XXL / 3B); DDP / torch.compile prefixes stripped, the stale
    `freqs_cis` buffer some checkpoints carry dropped (megacca computes its rotary table)."""
    from megacca.tokenizer.vq.llamagen import unwrap_state_dict

    try:
        sd = unwrap_state_dict(obj, where)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    sd.pop("freqs_cis", None)
    if "cls_embedding.embedding_table.weight" not in sd:
        t2i = "cls_embedding.cap_proj.fc1.weight" in sd
        raise ConversionError(f"{where}: not a LlamaGen class-conditional GPT (no cls_embedding.embedding_table."
                              f"weight{'; this is a text-to-image model, which conditions on T5 features' if t2i else ''})")
    return sd


def infer_shape(sd: dict[str, torch.Tensor], num_heads: Optional[int] = None, where: str = "checkpoint") -> LlamaGenShape:
    """The architecture of a LlamaGen c2i state dict; every key and shape is checked (ConversionError naming
    the key and both shapes). `num_heads`: needed only for sizes outside `LLAMAGEN_SIZES`."""
    missing = [k for k in _TOP_KEYS if k not in sd]
    if missing:
        raise ConversionError(f"{where}: missing key {missing[0]!r}")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    n_layer = len(layers)
    if layers != list(range(n_layer)) or n_layer == 0:
        raise ConversionError(f"{where}: layers are not numbered 0..N-1 (found {layers[:5]}...)")
    codebook, dim = sd["tok_embeddings.weight"].shape
    classes_plus_null = sd["cls_embedding.embedding_table.weight"].shape[0]
    ffn = sd["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in sd else None
    if num_heads is None:
        known = LLAMAGEN_SIZES.get((int(dim), n_layer))
        if known is None:
            raise ConversionError(f"{where}: dim {dim} x {n_layer} layers is not a published LlamaGen size; pass "
                                  f"--num-heads")
        num_heads = known[1]
    if dim % num_heads:
        raise ConversionError(f"{where}: dim {dim} is not divisible by {num_heads} heads")
    head_dim = dim // num_heads
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0] if "layers.0.attention.wqkv.weight" in sd else 0
    kv = (qkv_rows - dim) // (2 * head_dim)
    if kv < 1 or num_heads % kv or dim + 2 * kv * head_dim != qkv_rows:
        raise ConversionError(f"{where}: layers.0.attention.wqkv.weight has {qkv_rows} rows, which no number of "
                              f"key/value heads of dim {head_dim} gives with {num_heads} query heads")
    if head_dim % 4:
        raise ConversionError(f"{where}: head dim {head_dim} is not divisible by 4 (2D rotary)")
    if classes_plus_null < 2:
        raise ConversionError(f"{where}: cls_embedding.embedding_table.weight has {classes_plus_null} rows; a c2i "
                              f"model has its classes plus the null row")
    shape = LlamaGenShape(int(dim), n_layer, int(num_heads), int(kv), int(ffn or 0), int(codebook),
                          int(classes_plus_null) - 1)
    check_shapes(_expected_shapes(shape), sd, where)
    return shape


def _expected_shapes(s: LlamaGenShape) -> dict[str, tuple]:
    out = {"tok_embeddings.weight": (s.codebook_size, s.dim),
           "cls_embedding.embedding_table.weight": (s.num_classes + 1, s.dim),
           "norm.weight": (s.dim,), "output.weight": (s.codebook_size, s.dim)}
    qkv = (s.n_head + 2 * s.n_kv_head) * s.head_dim
    per_layer = {"attention.wqkv.weight": (qkv, s.dim), "attention.wo.weight": (s.dim, s.dim),
                 "feed_forward.w1.weight": (s.ffn, s.dim), "feed_forward.w3.weight": (s.ffn, s.dim),
                 "feed_forward.w2.weight": (s.dim, s.ffn), "attention_norm.weight": (s.dim,),
                 "ffn_norm.weight": (s.dim,)}
    for n in range(s.n_layer):
        out.update({f"layers.{n}.{k}": v for k, v in per_layer.items()})
    return out


def rotary_permutation(head_dim: int) -> torch.Tensor:
    """`megatron_rows = llamagen_rows[perm]` within one head: megatron's pair (i, i + d/2) is LlamaGen's
    interleaved pair (2i, 2i + 1)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _qkv_to_megatron(w: torch.Tensor, s: LlamaGenShape) -> torch.Tensor:
    d, perm = s.head_dim, rotary_permutation(s.head_dim)
    q, k, v = w.split([s.n_head * d, s.n_kv_head * d, s.n_kv_head * d])
    q = q.reshape(s.n_head, d, -1)[:, perm].reshape(q.shape)
    k = k.reshape(s.n_kv_head, d, -1)[:, perm].reshape(k.shape)
    return fuse_qkv(q, k, v, s.n_head, s.n_kv_head)


def _qkv_to_llamagen(w: torch.Tensor, s: LlamaGenShape) -> torch.Tensor:
    d, inv = s.head_dim, torch.argsort(rotary_permutation(s.head_dim))
    q, k, v = split_qkv(w, s.n_head, s.n_kv_head)
    q = q.reshape(s.n_head, d, -1)[:, inv].reshape(q.shape)
    k = k.reshape(s.n_kv_head, d, -1)[:, inv].reshape(k.shape)
    return torch.cat([q, k, v]).contiguous()


def _layer_map(n: int) -> dict[str, str]:
    """LlamaGen → megacca names of layer n's tensors that convert one to one."""
    return {f"layers.{n}.attention_norm.weight": f"decoder.layers.{n}.input_layernorm.weight",
            f"layers.{n}.attention.wo.weight": f"decoder.layers.{n}.self_attention.linear_proj.weight",
            f"layers.{n}.ffn_norm.weight": f"decoder.layers.{n}.pre_mlp_layernorm.weight",
            f"layers.{n}.feed_forward.w2.weight": f"decoder.layers.{n}.mlp.linear_fc2.weight"}


def to_megacca_state_dict(sd: dict[str, torch.Tensor], shape: LlamaGenShape, vocab,
                          padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """A LlamaGen c2i state dict (checked by `infer_shape`) → the tp=1 `UnifiedGPT.state_dict()` of the
    LlamaGen layout over `vocab` (a `UnifiedVocab` with the shape's classes and codebook), in the dtype of
    the input."""
    s = shape
    if vocab.num_classes != s.num_classes or vocab.codebook_size != s.codebook_size:
        raise ConversionError(f"vocabulary has {vocab.num_classes} classes and {vocab.codebook_size} codes; the "
                              f"checkpoint {s.num_classes} and {s.codebook_size}")
    dtype = sd["tok_embeddings.weight"].dtype
    emb = torch.zeros(padded_vocab_size, s.dim, dtype=dtype)
    out_w = torch.zeros(padded_vocab_size, s.dim, dtype=dtype)
    codes = slice(vocab.image_offset, vocab.image_offset + s.codebook_size)
    emb[codes] = sd["tok_embeddings.weight"]
    table = sd["cls_embedding.embedding_table.weight"]
    emb[vocab.class_offset:vocab.class_offset + s.num_classes] = table[:s.num_classes]
    emb[vocab.null_id] = table[s.num_classes]
    out_w[codes] = sd["output.weight"]
    out = {"embedding.word_embeddings.weight": emb, "output_layer.weight": out_w,
           "decoder.final_layernorm.weight": sd["norm.weight"].clone()}
    for n in range(s.n_layer):
        for src, dst in _layer_map(n).items():
            out[dst] = sd[src].clone()
        out[f"decoder.layers.{n}.self_attention.linear_qkv.weight"] = _qkv_to_megatron(
            sd[f"layers.{n}.attention.wqkv.weight"], s)
        out[f"decoder.layers.{n}.mlp.linear_fc1.weight"] = torch.cat(
            [sd[f"layers.{n}.feed_forward.w1.weight"], sd[f"layers.{n}.feed_forward.w3.weight"]])
    return out


def to_llamagen_state_dict(sd: dict[str, torch.Tensor], shape: LlamaGenShape, vocab) -> dict[str, torch.Tensor]:
    """Inverse of `to_megacca_state_dict`: the tp=1 state dict of a LlamaGen-layout model → LlamaGen's
    `Transformer.state_dict()` (c2i, with the null class row), in the dtype of the input."""
    s = shape
    emb, out_w = sd["embedding.word_embeddings.weight"], sd["output_layer.weight"]
    codes = slice(vocab.image_offset, vocab.image_offset + s.codebook_size)
    classes = emb[vocab.class_offset:vocab.class_offset + s.num_classes]
    out = {"tok_embeddings.weight": emb[codes].clone(),
           "cls_embedding.embedding_table.weight": torch.cat([classes, emb[vocab.null_id:vocab.null_id + 1]]),
           "norm.weight": sd["decoder.final_layernorm.weight"].clone(),
           "output.weight": out_w[codes].clone()}
    for n in range(s.n_layer):
        for dst, src in _layer_map(n).items():
            out[dst] = sd[src].clone()
        out[f"layers.{n}.attention.wqkv.weight"] = _qkv_to_llamagen(
            sd[f"decoder.layers.{n}.self_attention.linear_qkv.weight"], s)
        w1, w3 = sd[f"decoder.layers.{n}.mlp.linear_fc1.weight"].chunk(2)
        out[f"layers.{n}.feed_forward.w1.weight"] = w1.clone()
        out[f"layers.{n}.feed_forward.w3.weight"] = w3.clone()
    return out


def model_fields(shape: LlamaGenShape, image_grid: int) -> dict:
    """The `model:` section of a megacca config that is this LlamaGen model (the vocabulary fields come from
    the vocabulary, as `data.vocab` gives them to a run)."""
    s = shape
    return dict(preset=_PRESETS.get(s.name or ""), num_layers=s.n_layer, hidden_size=s.dim,
                num_attention_heads=s.n_head, num_query_groups=None if s.n_kv_head == s.n_head else s.n_kv_head,
                ffn_hidden_size=s.ffn, seq_length=image_grid * image_grid, rotary_base=int(s.rope_base),
                rope="2d", image_grid=image_grid, norm_epsilon=s.norm_eps, layout="llamagen",
                logprob_norm="codebook")


def shape_from_model(m, num_classes: int) -> LlamaGenShape:
    """The LlamaGen architecture of a megacca `ModelConfig` in the LlamaGen layout."""
    return LlamaGenShape(m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups or m.num_attention_heads,
                         m.ffn_hidden_size, int(m.codebook_size), int(num_classes), m.norm_epsilon, float(m.rotary_base))


# ---- from-llamagen -----------------------------------------------------------------------------------------------
def _class_names(classes_from: Optional[str], n: int) -> list[str]:
    if classes_from is None:
        return [str(k) for k in range(n)]
    from megacca.data.shards import ShardManifestError, read_manifest

    try:
        names = read_manifest(classes_from).get("classes")
    except ShardManifestError as e:
        raise ConversionError(f"--classes-from {classes_from}: {e}") from None
    if not names or len(names) != n:
        raise ConversionError(f"--classes-from {classes_from}: the shards have {len(names or [])} classes, the "
                              f"checkpoint's class table {n} (plus the null row)")
    return [str(c) for c in names]


def _convert_vq(path: str, grid: int, codebook_size: int, out: Path) -> str:
    """LlamaGen's VQ checkpoint → a megacca tokenizer directory at `out`; the sha256 of its weights file."""
    from megacca.fileio import sha256_file
    from megacca.tokenizer.vq import WEIGHTS_NAME, config_from_llamagen_state_dict, load_llamagen, \
        read_llamagen_state_dict, save_vq

    try:
        sd = read_llamagen_state_dict(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"--vq {path}: {e}") from None
    ch_mult = config_from_llamagen_state_dict(sd).ch_mult
    config = config_from_llamagen_state_dict(sd, image_size=grid * 2 ** (len(ch_mult) - 1))
    if config.codebook_size != codebook_size:
        raise ConversionError(f"--vq {path} has {config.codebook_size} codes, the GPT's head {codebook_size}")
    save_vq(load_llamagen(path, config), out)
    return sha256_file(out / WEIGHTS_NAME)


def from_llamagen(gpt: str, dst: str, *, image_grid: int, vq: Optional[str] = None, classes_from: Optional[str] = None,
                  num_heads: Optional[int] = None, trust_pickle: bool = False) -> dict:
    """A LlamaGen c2i GPT checkpoint (and optionally its VQ tokenizer) → a model-only megacca checkpoint in the
    LlamaGen layout at `dst`, with its vocabulary (and the tokenizer in `dst/vq`). Returns a summary."""
    from megacca.config import Config, ModelConfig
    from megacca.convert.files import read_tensor_file
    from megacca.convert.write import write_model_checkpoint
    from megacca.tokenizer.vocab import UnifiedVocab

    if image_grid is None or image_grid < 1:
        raise ConversionError("--image-grid N is required: LlamaGen checkpoints do not record their image size "
                              "(16 for the 256-px models, 24 for the 384-px ones: image size / 16)")
    # LlamaGen's train_c2i.py stores its argparse.Namespace beside the weights ("args"); building one runs no
    # code of the file's choosing (the VQ reader allows it for the same reason).
    raw = read_tensor_file(gpt, trust_pickle=trust_pickle, allowed=(argparse.Namespace,))
    sd = clean_gpt_state_dict(raw, gpt)
    shape = infer_shape(sd, num_heads, gpt)
    names = _class_names(classes_from, shape.num_classes)
    with tempfile.TemporaryDirectory() as scratch:
        files, vq_sha = {}, None
        if vq is not None:
            out = Path(scratch) / VQ_DIR
            vq_sha = _convert_vq(vq, image_grid, shape.codebook_size, out)
            files = {f"{VQ_DIR}/{f.name}": f for f in sorted(out.iterdir())}
        vocab = UnifiedVocab.build(None, shape.codebook_size, (image_grid, image_grid), names, vq_sha)
        model = ModelConfig(**model_fields(shape, image_grid), vocab_size=vocab.vocab_size, boi_token_id=vocab.boi_id,
                            image_token_offset=vocab.image_offset, codebook_size=vocab.codebook_size)
        cfg = Config(name=Path(dst).name, model=model)
        ours = to_megacca_state_dict(sd, shape, vocab, cfg.padded_vocab_size())
        write_model_checkpoint(dst, cfg, ours, vocab=vocab.to_manifest(), files=files, where=gpt,
                               converted_from={"tool": "from-llamagen", "src": str(gpt), "vq": vq,
                                               "llamagen_model": f"GPT-{shape.name}" if shape.name else None})
    return {"src": gpt, "dst": dst, "model": f"GPT-{shape.name}" if shape.name else f"{shape.n_layer} layers x {shape.dim}",
            "classes": shape.num_classes, "codes": shape.codebook_size, "grid": f"{image_grid}x{image_grid}",
            "vq": f"{dst}/{VQ_DIR}" if vq else "none"}


# ---- to-llamagen -------------------------------------------------------------------------------------------------
def to_llamagen(src: str, dst: str) -> dict:
    """A megacca checkpoint of a LlamaGen-layout model (run directory or checkpoint, either engine, any layout)
    → LlamaGen's checkpoint file `{"model": state_dict}` at `dst`, which its `sample_c2i.py` and the CCA
    authors' scripts load. Returns a summary, with the flags LlamaGen's scripts need."""
    from megacca.checkpoint import CheckpointNotFound, read_full_state_dict, read_trainer_state, resolve_checkpoint
    from megacca.config import Config, from_dict
    from megacca.convert.files import staged_file
    from megacca.convert.write import single_rank_config
    from megacca.tokenizer.vocab import UnifiedVocab

    try:
        ckpt = resolve_checkpoint(src)
    except CheckpointNotFound as e:
        raise ConversionError(str(e)) from None
    saved = read_trainer_state(ckpt)
    cfg = from_dict(Config, saved["config"])
    if cfg.model.layout != "llamagen":
        raise ConversionError(f"{ckpt}: model.layout={cfg.model.layout}: LlamaGen's GPT reads [class] codes with the "
                              f"condition's query and key zeroed, which only a model.layout=llamagen model computes "
                              f"(a unified-layout model's <bos>/<boi>/<eoi> and text rows have no place there)")
    if saved.get("vocab") is None:
        raise ConversionError(f"{ckpt}: no vocabulary manifest (which rows are the classes and codes)")
    vocab = UnifiedVocab(saved["vocab"], source=str(ckpt))
    sd = read_full_state_dict(ckpt)
    rows = single_rank_config(cfg).padded_vocab_size()
    check_shapes(expected_shapes(cfg.model, rows), sd, str(ckpt))
    shape = shape_from_model(cfg.model, vocab.num_classes)
    out = to_llamagen_state_dict(sd, shape, vocab)
    with staged_file(dst) as tmp:
        torch.save({"model": out}, tmp)
    grid = cfg.model.image_grid
    return {"src": str(ckpt), "dst": dst, "step": saved.get("step", 0),
            "llamagen": f"--gpt-model GPT-{shape.name or '?'} --image-size {grid * 16} --num-classes "
                        f"{shape.num_classes} --codebook-size {shape.codebook_size} --cls-token-num 1"}


# ---- command line ------------------------------------------------------------------------------------------------
FROM_EPILOG = """\
GPT is a LlamaGen class-conditional checkpoint (c2i_B_256.pt ... c2i_3B_384.pt, or one the CCA authors'
LlamaGen_finetune.py wrote): {"model": state_dict} or the bare state dict, .pt (read with weights_only=True) or
.safetensors; a stale freqs_cis entry is ignored. The size comes from the shapes (published sizes; others need
--num-heads). DST is a model-only megacca checkpoint in the LlamaGen layout (model.layout=llamagen): the
vocabulary is the 8 specials, the classes (with <null> for LlamaGen's null class row) and the codebook; with
--vq, LlamaGen's VQ tokenizer is converted into DST/vq, where megacca.load(DST).decode_images finds it.
Start a run from it with train.init_from=DST data.vocab=DST/vocab.json (docs/checkpoint-format.md).

examples:
  python tools/convert_checkpoint.py from-llamagen --gpt c2i_L_384.pt --vq vq_ds16_c2i.pt --image-grid 24 \\
      --classes-from data/imagenet384/codes --dst ckpts/llamagen_l_384
  python tools/convert_checkpoint.py from-llamagen --gpt c2i_B_256.pt --image-grid 16 --dst ckpts/llamagen_b
"""

TO_EPILOG = """\
SRC is a megacca run directory or checkpoint (either engine, any tp / pp / ZeRO layout) of a model.layout=llamagen
model: one from-llamagen imported, after CCA or any training. DST is a LlamaGen checkpoint file
{"model": state_dict} (fp32, as stored) for LlamaGen's autoregressive/sample/sample_c2i.py and
sample_c2i_ddp.py (the FID samples) and the CCA authors' LlamaGen_sample_ddp.py; the summary prints the flags
those scripts need. from-llamagen then to-llamagen gives back the same tensors, bit for bit.

examples:
  python tools/convert_checkpoint.py to-llamagen --src runs/llamagen_l_c2i_cca --dst c2i_L_384_cca.pt
"""


def add_commands(sub, formatter) -> None:
    p = sub.add_parser("from-llamagen", help="LlamaGen class-conditional GPT (+ VQ) -> megacca checkpoint",
                       description="Import a LlamaGen c2i GPT checkpoint as a megacca checkpoint in the LlamaGen "
                                   "layout.", epilog=FROM_EPILOG, formatter_class=formatter)
    p.add_argument("--gpt", required=True, metavar="PATH", help="LlamaGen GPT checkpoint (.pt or .safetensors)")
    p.add_argument("--vq", metavar="PATH", help="LlamaGen VQ tokenizer checkpoint, converted into DST/vq")
    p.add_argument("--dst", required=True, metavar="CKPT", help="the checkpoint directory to create")
    p.add_argument("--image-grid", type=int, metavar="N", help="codes per image side: 16 (256 px) or 24 (384 px)")
    p.add_argument("--classes-from", metavar="SHARD_DIR", help="take the class names from a shard manifest (the "
                                                                "ImageNet shards to align on); default 0..C-1")
    p.add_argument("--num-heads", type=int, metavar="N", help="attention heads (only for unpublished sizes)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the .pt fully even when it holds more than tensors (trusted files only)")
    p.set_defaults(run=lambda a: from_llamagen(a.gpt, a.dst, image_grid=a.image_grid, vq=a.vq,
                                               classes_from=a.classes_from, num_heads=a.num_heads,
                                               trust_pickle=a.trust_pickle))
    p = sub.add_parser("to-llamagen", help="megacca checkpoint (LlamaGen layout) -> LlamaGen GPT checkpoint",
                       description="Export a LlamaGen-layout megacca checkpoint as a LlamaGen GPT checkpoint file.",
                       epilog=TO_EPILOG, formatter_class=formatter)
    p.add_argument("--src", required=True, metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--dst", required=True, metavar="FILE.pt", help="the file to create")
    p.set_defaults(run=lambda a: to_llamagen(a.src, a.dst))
