"""Config of the `data:` section (part of the one config tree in `megacca.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SourceConfig:
    """One shard directory fed to the streaming loader."""

    path: str = ""
    """Shard directory holding `manifest.json` and `<split>-NNNNNN.tar` (see docs/data-format.md)."""
    task: Literal["auto", "c2i", "t2i", "i2t", "text", "interleaved"] = "auto"
    """How samples become tokens; `auto` picks from the manifest: codes with captions → t2i,
    codes with labels only → c2i, text → text."""
    weight: float = 1.0
    """Relative mixing weight among the sources (normalised over all sources)."""
    split: str = "train"
    """Which split of the shard directory to read."""


@dataclass
class DataConfig:
    """Where training sequences come from."""

    kind: Literal["synthetic", "webdataset"] = "synthetic"
    """`synthetic`: generated interleaved text/image-token sequences (tests, benchmarks);
    `webdataset`: the streaming loader over `sources`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Shard directories and their mixing weights (kind=webdataset)."""
    vocab: Optional[str] = None
    """Path to the unified vocabulary manifest `vocab.json`; its size sets `model.vocab_size`."""
    text_model: Optional[str] = None
    """sentencepiece `.model` used to tokenize captions and text (needed for t2i, i2t, text)."""
    num_workers: int = 2
    """DataLoader worker processes per data-parallel rank (0 = read in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer of each worker."""
    cond_dropout: float = 0.1
    """Share of conditional samples (c2i, t2i) whose condition is replaced by `<null>` (for CFG)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad sample policy: `raise` stops naming shard and key; `skip` drops, counts and logs it."""
    synthetic_samples: int = 100000
    """Number of distinct samples the synthetic source cycles through (kind=synthetic)."""
