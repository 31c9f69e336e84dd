"""VQ image tokenizer: a VQ autoencoder with the module layout of LlamaGen's VQ-16.

Architecture (LlamaGen, `tokenizer/tokenizer_image/vq_model.py`, itself derived from taming-transformers):
convolutional `Encoder` → 1x1 `quant_conv` (z_channels → codebook_embed_dim) → `VectorQuantizer`
(nearest code, optionally on the unit sphere) → 1x1 `post_quant_conv` → convolutional `Decoder`.
The spatial downsampling factor is `2 ** (len(ch_mult) - 1)`; an image of `image_size` becomes a grid of
`image_size // 2 ** (len(ch_mult) - 1)` codes per side (VQ-16 at 256 px: 16x16 codes).

This file is an independent implementation; only the state-dict key names and shapes follow LlamaGen, so that
LlamaGen checkpoints load with `strict=True` (see `load_llamagen`).

State-dict keys (L = len(ch_mult), R = num_res_blocks, c_i = ch * ch_mult[i], c_-1 = ch):

    encoder.conv_in.{weight,bias}                          Conv2d(in_channels → ch, 3x3)
    encoder.conv_blocks.{i}.res.{j}.*      i < L, j < R    ResnetBlock(c_{i-1} or c_i → c_i)
    encoder.conv_blocks.{L-1}.attn.{j}.*   j < R           AttnBlock(c_{L-1}) — only at the lowest resolution
    encoder.conv_blocks.{i}.downsample.conv.*   i < L-1    Conv2d(c_i → c_i, 3x3, stride 2, pad right/bottom)
    encoder.mid.0.* / encoder.mid.1.* / encoder.mid.2.*    ResnetBlock / AttnBlock / ResnetBlock at c_{L-1}
    encoder.norm_out.{weight,bias}                         GroupNorm(c_{L-1})
    encoder.conv_out.{weight,bias}                         Conv2d(c_{L-1} → z_channels, 3x3)
    quant_conv.{weight,bias}                               Conv2d(z_channels → codebook_embed_dim, 1x1)
    quantize.embedding.weight                              [codebook_size, codebook_embed_dim]
    quantize.codebook_used                                 float [65536] ring buffer of recently used code
                                                           ids (present only with codebook_show_usage=True,
                                                           as in LlamaGen's released checkpoints)
    post_quant_conv.{weight,bias}                          Conv2d(codebook_embed_dim → z_channels, 1x1)
    decoder.conv_in.{weight,bias}                          Conv2d(z_channels → c_{L-1}, 3x3)
    decoder.mid.{0,1,2}.*                                  as in the encoder
    decoder.conv_blocks.{k}.res.{j}.*      k < L, j < R+1  level i = L-1-k (lowest resolution first),
                                                           ResnetBlock(prev → c_i)
    decoder.conv_blocks.0.attn.{j}.*       j < R+1         AttnBlock(c_{L-1})
    decoder.conv_blocks.{k}.upsample.conv.*   k < L-1      nearest x2 then Conv2d(c_i → c_i, 3x3)
    decoder.norm_out.{weight,bias}, decoder.conv_out.{weight,bias}   GroupNorm(ch), Conv2d(ch → 3, 3x3)

    ResnetBlock: norm1.{weight,bias}, conv1.{weight,bias}, norm2.{weight,bias}, conv2.{weight,bias},
                 nin_shortcut.{weight,bias} (1x1, only when in != out)
    AttnBlock:   norm.{weight,bias}, q.*, k.*, v.*, proj_out.* (all 1x1 convs)

Tokenizer directory (`save_vq` / `load_vq`): `config.json` (the `VQConfig` fields plus
`"format": "megacca-vq/1"`) and `model.safetensors` (the state dict above). Nothing is pickled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacca.fileio import atomic_write_bytes, sha256_file  # noqa: F401  (sha256_file is part of this API)

VQ_FORMAT = "megacca-vq/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
USAGE_BUFFER_LEN = 65536  # LlamaGen's `codebook_used` length; fixed so its checkpoints load strictly


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VQConfig:
    """Architecture and loss settings of a VQ tokenizer (saved as `config.json` in the tokenizer directory)."""

    codebook_size: int = 16384
    """Number of codes K; codes are integers in [0, K)."""
    codebook_embed_dim: int = 8
    """Dimension of each code vector (the quantised latent has this many channels)."""
    codebook_l2_norm: bool = True
    """Quantise on the unit sphere: latents and code vectors are l2-normalised before the nearest-code
    search (LlamaGen's default); False = plain Euclidean VQ."""
    codebook_show_usage: bool = False
    """Keep LlamaGen's `quantize.codebook_used` buffer (float [65536] ring buffer of recently used codes,
    updated in training mode). Needed for strict loading of LlamaGen checkpoints, which carry it."""
    commit_loss_beta: float = 0.25
    """Weight of the commitment loss `mean((sg[z_q] - z)^2)` (pulls encoder outputs towards their codes)."""
    codebook_loss_weight: float = 1.0
    """Weight of the codebook loss `mean((z_q - sg[z])^2)` (pulls codes towards encoder outputs)."""
    entropy_loss_ratio: float = 0.0
    """Weight of the codebook entropy loss (per-sample entropy minus batch-average entropy of the soft
    code assignment); 0 disables it."""
    entropy_temperature: float = 0.01
    """Softmax temperature of the entropy loss' soft assignment."""
    recon_loss: Literal["l2", "l1"] = "l2"
    """Pixel reconstruction loss: mean squared (`l2`) or mean absolute (`l1`) error."""
    in_channels: int = 3
    """Image channels (RGB)."""
    ch: int = 128
    """Base channel width; level i has ch * ch_mult[i] channels."""
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """Channel multiplier per resolution level; downsampling factor is 2 ** (len(ch_mult) - 1)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has num_res_blocks + 1 per level)."""
    z_channels: int = 256
    """Channels of the encoder output / decoder input (before quant_conv / after post_quant_conv)."""
    dropout_p: float = 0.0
    """Dropout inside the residual blocks."""
    norm_groups: int = 32
    """GroupNorm groups (LlamaGen: 32); every level's channel count must be divisible by it."""
    image_size: int = 256
    """Side of the square images the tokenizer is trained on; inputs are resized to it (see `preprocess`)."""
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic"
    """PIL filter used by `preprocess` to resize source images to image_size."""

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        """Spatial downsampling factor between image and code grid."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Code grid [h, w] for an image of image_size."""
        g = self.image_size // self.downsample
        return (g, g)

    def validate(self) -> "VQConfig":
        """Raise ValueError naming the first bad field."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"VQConfig: {msg}")
        for name in ("codebook_size", "codebook_embed_dim", "in_channels", "ch", "num_res_blocks",
                     "z_channels", "norm_groups", "image_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive int, got {v!r}")
        for name in ("codebook_l2_norm", "codebook_show_usage"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true/false, got {getattr(self, name)!r}")
        for name in ("commit_loss_beta", "codebook_loss_weight", "entropy_loss_ratio", "dropout_p"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a number >= 0, got {v!r}")
        need(isinstance(self.entropy_temperature, (int, float)) and self.entropy_temperature > 0,
             f"entropy_temperature must be > 0, got {self.entropy_temperature!r}")
        need(self.dropout_p < 1, f"dropout_p must be < 1, got {self.dropout_p!r}")
        need(self.recon_loss in ("l2", "l1"), f"recon_loss must be 'l2' or 'l1', got {self.recon_loss!r}")
        need(self.resample in ("nearest", "bilinear", "bicubic", "lanczos"),
             f"resample must be nearest|bilinear|bicubic|lanczos, got {self.resample!r}")
        need(isinstance(self.ch_mult, (list, tuple)) and len(self.ch_mult) >= 1
             and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.ch_mult),
             f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult!r}")
        for c in [self.ch] + [self.ch * m for m in self.ch_mult]:
            need(c % self.norm_groups == 0,
                 f"channel count {c} (ch * ch_mult) not divisible by norm_groups={self.norm_groups}")
        need(self.image_size % self.downsample == 0,
             f"image_size {self.image_size} not divisible by the downsampling factor {self.downsample}")
        need(self.codebook_size <= 2 ** 31 - 1, "codebook_size too large")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(d["ch_mult"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        """Build from a dict (e.g. config.json or a YAML section); unknown keys are an error."""
        d = dict(d)
        d.pop("format", None)
        if "preset" in d:
            base = preset(d.pop("preset")).to_dict()
            base.update(d)
            d = base
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"VQConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        if "ch_mult" in d and isinstance(d["ch_mult"], tuple):
            d["ch_mult"] = list(d["ch_mult"])
        return cls(**d).validate()


def vq16(**overrides) -> VQConfig:
    """LlamaGen's VQ-16 (downsample 16, 16384 codes of dim 8, l2-normalised, 256 px → 16x16 codes)."""
    cfg = VQConfig(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                   commit_loss_beta=0.25, entropy_loss_ratio=0.0, ch=128, ch_mult=[1, 1, 2, 2, 4],
                   num_res_blocks=2, z_channels=256, dropout_p=0.0, norm_groups=32, image_size=256)
    return dataclasses.replace(cfg, **overrides).validate()


def tiny(**overrides) -> VQConfig:
    """A small CPU-trainable tokenizer for 16x16 images (e.g. upscaled 8x8 digits) → 4x4 codes of 512."""
    cfg = VQConfig(codebook_size=512, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=False,
                   commit_loss_beta=0.25, entropy_loss_ratio=0.0, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                   z_channels=64, dropout_p=0.0, norm_groups=8, image_size=16)
    return dataclasses.replace(cfg, **overrides).validate()


PRESETS = {"vq16": vq16, "tiny": tiny}


def preset(name: str, **overrides) -> VQConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown VQ preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# --------------------------------------------------------------------------------------------------------------
# Building blocks (names follow LlamaGen so state dicts line up)
# --------------------------------------------------------------------------------------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """pre-norm residual block: GN → SiLU → conv3x3 → GN → SiLU → dropout → conv3x3, 1x1 shortcut if widths differ."""

    def __init__(self, cin: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        n = self.norm(x)
        # [b, 1, hw, c] token sequences; scaled_dot_product_attention scales by c**-0.5 like the reference
        q, k, v = (p(n).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one pixel on the right and bottom (halves H and W exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `res` (ModuleList), `attn` (ModuleList, maybe empty), optional down/upsample."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


def _mid(c: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, dropout, groups), AttnBlock(c, groups), ResnetBlock(c, c, dropout, groups)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, L = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, m in enumerate(cfg.ch_mult):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks):
                lvl.res.append(ResnetBlock(c, ch * m, cfg.dropout_p, g))
                c = ch * m
                if i == L - 1:
                    lvl.attn.append(AttnBlock(c, g))
            if i != L - 1:
                lvl.downsample = Downsample(c)
            self.conv_blocks.append(lvl)
        self.mid = _mid(c, cfg.dropout_p, g)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.conv_blocks:
            for j, res in enumerate(lvl.res):
                h = res(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, L = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        c = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg.dropout_p, g)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(L)):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                lvl.res.append(ResnetBlock(c, ch * cfg.ch_mult[i], cfg.dropout_p, g))
                c = ch * cfg.ch_mult[i]
                if i == L - 1:
                    lvl.attn.append(AttnBlock(c, g))
            if i != 0:
                lvl.upsample = Upsample(c)
            self.conv_blocks.append(lvl)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for lvl in self.conv_blocks:
            for j, res in enumerate(lvl.res):
                h = res(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with straight-through gradients.

    `embedding.weight` [K, D] is the codebook. With `l2_norm`, both latents and codes are projected onto the unit
    sphere before the search and the normalised code is what the decoder sees.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.l2_norm = cfg.codebook_l2_norm
        self.beta = cfg.commit_loss_beta
        self.codebook_weight = cfg.codebook_loss_weight
        self.entropy_ratio = cfg.entropy_loss_ratio
        self.entropy_temperature = cfg.entropy_temperature
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_BUFFER_LEN))
        else:
            self.codebook_used = None

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] → [B*h*w, D] (normalised if l2_norm)."""
        zf = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        return F.normalize(zf, dim=-1) if self.l2_norm else zf

    def distances(self, zf: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances [N, K] between flat latents and (normalised) codes."""
        e = self.codebook()
        return zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * zf @ e.t()

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code ids [B, h, w] for latents [B, D, h, w]."""
        b, _, h, w = z.shape
        return self.distances(self._flat(z)).argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] → quantised latents [B, D, h, w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """Returns (z_q with straight-through gradient [B,D,h,w], codes [B,h,w], losses dict)."""
        b, _, h, w = z.shape
        zf = self._flat(z)
        d = self.distances(zf)
        idx = d.argmin(1)
        zq = self.codebook()[idx]
        losses = {
            "codebook": self.codebook_weight * F.mse_loss(zq, zf.detach()),
            "commit": self.beta * F.mse_loss(zq.detach(), zf),
        }
        if self.entropy_ratio > 0:
            losses["entropy"] = self.entropy_ratio * entropy_loss(-d, self.entropy_temperature)
        if self.training and self.codebook_used is not None:
            with torch.no_grad():
                n = min(idx.numel(), USAGE_BUFFER_LEN)
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], idx[-n:].to(self.codebook_used.dtype)]))
        zq = zf + (zq - zf).detach()
        zq = zq.view(b, h, w, self.e_dim).permute(0, 3, 1, 2).contiguous()
        return zq, idx.view(b, h, w), losses

    # ---- codebook maintenance (used by the trainer) -----------------------------------------------------------
    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10, generator: Optional[torch.Generator] = None):
        """Set the codebook by k-means over latents z ([B, D, h, w] or [N, D]); spherical if l2_norm."""
        zf = self._flat(z) if z.dim() == 4 else (F.normalize(z, dim=-1) if self.l2_norm else z)
        zf = zf.float()
        n = zf.shape[0]
        pick = torch.randint(0, n, (self.n_e,), generator=generator) if n < self.n_e else \
            torch.randperm(n, generator=generator)[: self.n_e]
        c = zf[pick].clone()
        for _ in range(iters):
            a = (zf.pow(2).sum(1, keepdim=True) - 2 * zf @ c.t() + c.pow(2).sum(1)).argmin(1)
            s = torch.zeros_like(c).index_add_(0, a, zf)
            cnt = torch.bincount(a, minlength=self.n_e).to(zf.dtype)
            filled = cnt > 0
            c[filled] = s[filled] / cnt[filled, None]
            if self.l2_norm:
                c = F.normalize(c, dim=-1)
            empty = (~filled).nonzero().flatten()  # restart empty clusters at random latents
            if len(empty):
                c[empty] = zf[torch.randint(0, n, (len(empty),), generator=generator)]
        self.embedding.weight.copy_(c)

    @torch.no_grad()
    def reinit_codes(self, which: torch.Tensor, z: torch.Tensor, noise: float = 0.01,
                     generator: Optional[torch.Generator] = None) -> int:
        """Re-initialise the codes selected by bool mask `which` [K] to random latents from z (+ small noise)."""
        ids = which.nonzero().flatten()
        if len(ids) == 0:
            return 0
        zf = self._flat(z) if z.dim() == 4 else z
        pick = torch.randint(0, zf.shape[0], (len(ids),), generator=generator)
        new = zf[pick] + noise * torch.randn(len(ids), self.e_dim, generator=generator)
        if self.l2_norm:
            new = F.normalize(new, dim=-1)
        self.embedding.weight[ids] = new.to(self.embedding.weight.dtype)
        return len(ids)


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-sample entropy minus entropy of the mean of softmax(affinity / T) (low = confident + diverse)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    p = logits.softmax(-1)
    logp = logits.log_softmax(-1)
    sample_ent = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    avg_ent = -(avg * torch.log(avg + 1e-5)).sum()
    return sample_ent - avg_ent


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
class VQModel(nn.Module):
    """VQ autoencoder. Images are float [B, 3, H, W] in [-1, 1]; codes are int64 [B, H/ds, W/ds] in [0, K)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    # ---- building blocks of the API -------------------------------------------------------------------------
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, D, h, w]."""
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    def _check_images(self, images: torch.Tensor):
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        ds = self.config.downsample
        if images.shape[2] % ds or images.shape[3] % ds:
            raise ValueError(f"image size {tuple(images.shape[2:])} not divisible by the downsampling factor {ds}")

    # ---- public API -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [-1, 1] → LongTensor codes [B, H/ds, W/ds]."""
        self._check_images(images)
        return self.quantize.indices(self.latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (integers in [0, K)) → images [B, 3, h*ds, w*ds] clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, h, w], got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes outside [0, {self.config.codebook_size})")
        return self.decode_latents(self.quantize.lookup(codes)).clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor, return_codes: bool = False):
        """images → (reconstruction [B,3,H,W] (unclamped), losses dict) [+ codes [B,h,w] if return_codes].

        losses (scalar tensors): `recon` (L2 or L1 per config), `codebook`, `commit` (both already weighted),
        `entropy` (only if entropy_loss_ratio > 0), `loss` (their sum, what to minimise).
        """
        self._check_images(images)
        zq, codes, losses = self.quantize(self.latents(images))
        recon = self.decode_latents(zq)
        if self.config.recon_loss == "l1":
            losses["recon"] = F.l1_loss(recon, images)
        else:
            losses["recon"] = F.mse_loss(recon, images)
        losses["loss"] = sum(losses.values())
        return (recon, losses, codes) if return_codes else (recon, losses)


# --------------------------------------------------------------------------------------------------------------
# Image preprocessing (shared by the trainer and tools/vq_encode.py so both see identical inputs)
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------
def save_vq(model: VQModel, directory: Union[str, Path]) -> Path:
    """Write `directory/config.json` and `directory/model.safetensors` (atomic per file)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, save(sd, metadata={"format": "pt", "megacca": VQ_FORMAT}))
    cfg = {"format": VQ_FORMAT, **model.config.to_dict()}
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
    return VQConfig.from_dict(d)


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


# --------------------------------------------------------------------------------------------------------------
# LlamaGen checkpoints
# --------------------------------------------------------------------------------------------------------------
_STRIP_PREFIXES = ("module.", "_orig_mod.")


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
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except AttributeError:  # very old torch without safe_globals
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise KeyError(f"{path}: no {key!r} entry (has {sorted(obj)[:10]})")
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


__all__ = [
    "VQConfig", "VQModel", "VectorQuantizer", "Encoder", "Decoder", "vq16", "tiny", "preset", "PRESETS",
    "preprocess", "to_uint8", "save_vq", "load_vq", "load_vq_config", "sha256_file",
    "read_llamagen_state_dict", "config_from_llamagen_state_dict", "load_llamagen", "entropy_loss",
]
