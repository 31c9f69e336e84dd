"""Image preprocessing of the VQ tokenizer, shared by its trainer and tools/vq_encode.py so that both see
identical inputs."""
from __future__ import annotations

import numpy as np
import torch

from megacca.tokenizer.vq.config import VQConfig


def preprocess(img, cfg: VQConfig) -> torch.Tensor:
    """PIL image (any mode) → float tensor [3, S, S] in [-1, 1], resized to cfg.image_size with cfg.resample."""
    from PIL import Image

    img = img.convert("RGB")
    s = cfg.image_size
    if img.size != (s, s):
        filt = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}[cfg.resample]
        img = img.resize((s, s), filt)
    a = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
