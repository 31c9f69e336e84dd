"""Configs of the VQ image tokenizer: its architecture (`VQConfig`, saved as the tokenizer's `config.json`) and
a training run of `tokenizers/train_vq.py` (`VQRunConfig`: YAML sections model/train/eval).

They are typed, loaded, overridden (`train.steps=600`) and checked by the same code as the training config
(`megacca.config.load_typed` / `from_dict`): a bad key, type or value is a `ConfigError` naming the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from megacca.config import ConfigError, apply_preset, from_dict, load_typed


# --------------------------------------------------------------------------------------------------------------
# Architecture
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

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor between image and code grid."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Code grid [h, w] for an image of image_size."""
        g = self.image_size // self.downsample
        return (g, g)

    def check(self) -> None:
        """Values the field types admit but the architecture does not (types are checked by `from_dict`)."""
        for name in ("codebook_size", "codebook_embed_dim", "in_channels", "ch", "num_res_blocks", "z_channels",
                     "norm_groups", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.codebook_size > 2 ** 31 - 1:
            raise ConfigError("codebook_size", f"must fit an int32, got {self.codebook_size}")
        for name in ("commit_loss_beta", "codebook_loss_weight", "entropy_loss_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ConfigError("entropy_temperature", f"must be > 0, got {self.entropy_temperature}")
        if not 0 <= self.dropout_p < 1:
            raise ConfigError("dropout_p", f"must be in [0, 1), got {self.dropout_p}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError("ch_mult", f"must be a non-empty list of integers >= 1, got {self.ch_mult}")
        for c in [self.ch] + [self.ch * m for m in self.ch_mult]:
            if c % self.norm_groups:
                raise ConfigError("norm_groups", f"channel count {c} (ch x ch_mult) is not divisible by "
                                                 f"norm_groups={self.norm_groups}")
        if self.image_size % self.downsample:
            raise ConfigError("image_size", f"{self.image_size} is not divisible by the downsampling factor "
                                            f"{self.downsample} (2 ** (len(ch_mult) - 1))")


# Named architectures; a YAML `model.preset` (or `preset(name, ...)`) starts from one, explicit fields on top.
PRESETS: dict[str, dict] = {
    # LlamaGen's VQ-16: downsample 16, 16384 codes of dim 8, l2-normalised, 256 px -> 16x16 codes.
    "vq16": dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                 commit_loss_beta=0.25, entropy_loss_ratio=0.0, ch=128, ch_mult=[1, 1, 2, 2, 4],
                 num_res_blocks=2, z_channels=256, dropout_p=0.0, norm_groups=32, image_size=256),
    # A small CPU-trainable tokenizer for 16x16 images (e.g. upscaled 8x8 digits) -> 4x4 codes of 512.
    "tiny": dict(codebook_size=512, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=False,
                 commit_loss_beta=0.25, entropy_loss_ratio=0.0, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                 z_channels=64, dropout_p=0.0, norm_groups=8, image_size=16),
}


def preset(name: str, **overrides) -> VQConfig:
    """The named architecture with `overrides` on top (checked like a YAML section)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return from_dict(VQConfig, {**PRESETS[name], **overrides})


def vq16(**overrides) -> VQConfig:
    """LlamaGen's VQ-16 (downsample 16, 16384 codes of dim 8, l2-normalised, 256 px → 16x16 codes)."""
    return preset("vq16", **overrides)


def tiny(**overrides) -> VQConfig:
    """A small CPU-trainable tokenizer for 16x16 images (e.g. upscaled 8x8 digits) → 4x4 codes of 512."""
    return preset("tiny", **overrides)


# --------------------------------------------------------------------------------------------------------------
# Training run (tokenizers/train_vq.py)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VQTrainConfig:
    """The `train:` section: optimiser, schedule and codebook maintenance. Training stops after `steps`
    optimizer steps, so a config gives the same tokenizer however fast the machine is."""

    steps: int = 1500
    """Optimizer steps to train for."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2e-3
    """AdamW peak learning rate (after linear warmup; cosine decay to lr * min_lr_ratio at `steps`)."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of `lr`."""
    warmup_steps: int = 50
    """Linear warmup steps from lr / warmup_steps to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    seed: int = 0
    """Seed of the initialisation, the batch order, k-means and code re-seeding."""
    threads: int = 1
    """torch intra-op threads. Part of the recipe: the float reduction order, hence the weights, can depend
    on it."""
    log_every: int = 100
    """Print a log line (and record the averaged losses in train_report.json) every N steps."""
    kmeans_init: bool = True
    """Initialise the codebook by k-means over encoder outputs before the first step."""
    kmeans_images: int = 1024
    """Training images whose latents the k-means initialisation clusters."""
    kmeans_iters: int = 10
    """Lloyd iterations of the k-means initialisation."""
    dead_code_every: int = 50
    """Every N steps re-seed the codes unused in the last N steps at random latents (0 = never)."""
    dead_code_until: float = 0.8
    """... but only during this fraction of the cosine decay, so that the codebook can settle afterwards."""
    dead_code_images: int = 256
    """Training images whose encoder outputs re-seeded codes are drawn from (h*w latents each; 256 images of
    the digits config give 4,096 latents for at most 512 codes, at a quarter of the cost of 1,024)."""

    def check(self) -> None:
        for name in ("steps", "batch_size", "threads", "log_every", "kmeans_images", "kmeans_iters",
                     "dead_code_images"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "dead_code_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        for name in ("min_lr_ratio", "dead_code_until"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass
class VQEvalConfig:
    """The `eval:` section: the held-out figures written to train_report.json after training."""

    batch_size: int = 256
    """Images per forward pass of the evaluation."""
    sample_images: int = 32
    """Held-out images shown (originals above reconstructions) in OUT/recon_heldout.png; 0 = no picture."""

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.sample_images < 0:
            raise ConfigError("sample_images", f"must be >= 0, got {self.sample_images}")


@dataclass
class VQRunConfig:
    """A VQ tokenizer training run: the YAML file given to tokenizers/train_vq.py."""

    model: VQConfig = field(default_factory=VQConfig)
    """The tokenizer's architecture; `model.preset` (vq16, tiny) fills the fields not given."""
    train: VQTrainConfig = field(default_factory=VQTrainConfig)
    """Optimiser, schedule and codebook maintenance."""
    eval: VQEvalConfig = field(default_factory=VQEvalConfig)
    """Held-out evaluation after training."""


def load_run_config(path: Optional[Union[str, Path]], overrides: Sequence[str] = ()) -> VQRunConfig:
    """YAML `path` + dotted `overrides` (`train.steps=600`, `model.ch=16`) → checked VQRunConfig."""
    return load_typed(VQRunConfig, path, overrides,
                      resolve=lambda raw: apply_preset(raw, "model", PRESETS, keep_name=False))
