"""Tokenizer directory: `config.json` (the `VQConfig` fields plus `"format": "megacca-vq/1"`) and
`model.safetensors` (the state dict, key layout in `megacca.tokenizer.vq.model`). Nothing is pickled."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from megacca.config import from_dict, to_dict
from megacca.fileio import atomic_write_bytes
from megacca.tokenizer.vq.config import VQConfig
from megacca.tokenizer.vq.model import VQModel

VQ_FORMAT = "megacca-vq/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_vq(model: VQModel, directory: Union[str, Path]) -> Path:
    """Write `directory/config.json` and `directory/model.safetensors` (atomic per file)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors keeps metadata in a hash map, so two keys are written in a per-process
    # random order and identical weights would get a different file sha256 (which code manifests record).
    # The format tag lives in config.json.
    atomic_write_bytes(d / WEIGHTS_NAME, save(sd, metadata={"format": "pt"}))
    cfg = {"format": VQ_FORMAT, **to_dict(model.config)}
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return d


def load_vq_config(directory: Union[str, Path]) -> VQConfig:
    p = Path(directory) / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"VQ tokenizer config not found: {p}")
    d = json.loads(p.read_text())
    fmt = d.get("format", VQ_FORMAT)
    if fmt != VQ_FORMAT:
        raise ValueError(f"{p}: unsupported format {fmt!r} (expected {VQ_FORMAT!r})")
    d.pop("format", None)
    return from_dict(VQConfig, d)


def load_vq(directory: Union[str, Path], map_location: str = "cpu") -> VQModel:
    """Load a tokenizer directory written by `save_vq`; the model is returned in eval mode."""
    from safetensors.torch import load_file

    cfg = load_vq_config(directory)
    w = Path(directory) / WEIGHTS_NAME
    if not w.is_file():
        raise FileNotFoundError(f"VQ tokenizer weights not found: {w}")
    model = VQModel(cfg)
    model.load_state_dict(load_file(str(w), device=map_location), strict=True)
    return model.to(map_location).eval()
