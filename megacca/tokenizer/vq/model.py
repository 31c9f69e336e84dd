"""The VQ autoencoder, with the module layout of LlamaGen's VQ-16.

Architecture (LlamaGen, `tokenizer/tokenizer_image/vq_model.py`, itself derived from taming-transformers):
convolutional `Encoder` → 1x1 `quant_conv` (z_channels → codebook_embed_dim) → `VectorQuantizer`
(nearest code, optionally on the unit sphere) → 1x1 `post_quant_conv` → convolutional `Decoder`.
The spatial downsampling factor is `2 ** (len(ch_mult) - 1)`; an image of `image_size` becomes a grid of
`image_size // 2 ** (len(ch_mult) - 1)` codes per side (VQ-16 at 256 px: 16x16 codes).

This is an independent implementation; only the state-dict key names and shapes follow LlamaGen, so that
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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacca.tokenizer.vq.config import VQConfig

USAGE_BUFFER_LEN = 65536  # LlamaGen's `codebook_used` length; fixed so its checkpoints load strictly


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
    """One resolution level: `res` (ModuleList), `attn` (ModuleList, maybe empty), then an optional
    `downsample` (encoder) or `upsample` (decoder), attribute names as in LlamaGen's state dict."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h):
        for j, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[j](h)
        for resample in ("downsample", "upsample"):
            if hasattr(self, resample):
                h = getattr(self, resample)(h)
        return h


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
            h = lvl(h)
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
            h = lvl(h)
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
        config.check()
        self.config = config
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

