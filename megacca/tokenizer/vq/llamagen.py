"""LlamaGen VQ checkpoints (`.safetensors`, or a training `.pt` read with `weights_only=True`) into a `VQModel`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import torch

from megacca.tokenizer.vq.config import VQConfig, vq16
from megacca.tokenizer.vq.model import USAGE_BUFFER_LEN, VQModel

_STRIP_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj, where, key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of the state dict inside a loaded LlamaGen checkpoint: `obj[key]` if given, else
    `obj["model"]` when present (LlamaGen's training checkpoints), else `obj` itself; `module.` / `_orig_mod.`
    prefixes (DDP / torch.compile) stripped. ValueError / KeyError naming `where` for anything else."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise KeyError(f"{where}: no {key!r} entry (has {sorted(obj)[:10]})")
        obj = obj[key]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        sd[k] = v
    return sd


def read_llamagen_state_dict(path: Union[str, Path], key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read a LlamaGen-layout VQ state dict from `.safetensors` or a torch `.pt`/`.pth`/`.bin`.

    `.pt` files are read with `torch.load(weights_only=True)` (argparse.Namespace, which LlamaGen's training
    checkpoints store under "args", is the only extra class allowed). The weights are taken from `key` if
    given, else from "model" when present (LlamaGen's checkpoints: {"model": state_dict, ...}), else the
    top-level dict. `module.` / `_orig_mod.` prefixes (DDP / torch.compile) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LlamaGen checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = unwrap_state_dict(obj, path, key)
    if "quantize.embedding.weight" not in sd:
        raise ValueError(f"{path}: not a LlamaGen VQ state dict (no quantize.embedding.weight)")
    return sd


def config_from_llamagen_state_dict(sd: dict[str, torch.Tensor], **overrides) -> VQConfig:
    """Infer the architecture fields of a LlamaGen-layout state dict (K, D, ch, ch_mult, num_res_blocks,
    z_channels, in_channels, whether `codebook_used` is present). Fields that cannot be inferred
    (codebook_l2_norm, image_size, losses) come from the vq16 preset unless overridden."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
    nres = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
    ch_mult = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    K, D = sd["quantize.embedding.weight"].shape
    fields = dict(codebook_size=int(K), codebook_embed_dim=int(D), ch=int(ch), ch_mult=ch_mult,
                  num_res_blocks=nres, z_channels=int(sd["encoder.conv_out.weight"].shape[0]),
                  in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                  codebook_show_usage="quantize.codebook_used" in sd)
    fields.update(overrides)
    return vq16(**fields)


def load_llamagen(path: Union[str, Path], config: Optional[VQConfig] = None, key: Optional[str] = None) -> VQModel:
    """Build a VQModel from a LlamaGen checkpoint and load it with strict=True (eval mode).

    `config` defaults to the architecture inferred from the weights (`config_from_llamagen_state_dict`).
    The optional `quantize.codebook_used` statistics buffer is reconciled with the config (dropped when the
    model has no such buffer, zero-filled when the checkpoint lacks it); every other key must match exactly.
    """
    sd = read_llamagen_state_dict(path, key)
    if config is None:
        config = config_from_llamagen_state_dict(sd)
    model = VQModel(config)
    used = "quantize.codebook_used"
    if config.codebook_show_usage and used not in sd:
        sd[used] = torch.zeros(USAGE_BUFFER_LEN)
    elif not config.codebook_show_usage:
        sd.pop(used, None)
    model.load_state_dict(sd, strict=True)
    return model.eval()
