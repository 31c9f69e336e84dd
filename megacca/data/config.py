"""Config of the `data:` section (part of the one config tree in `megacca.config`), and its check against
the files it names.

`check_files` runs before any rank starts (the CLI calls it after `load_config`): the vocabulary, the text
model and every shard directory must exist and fit together, or a `ConfigError` names the key. The loader
resolves each source through the same `resolve_source`, so the two cannot disagree. The imports of the file
readers sit inside the functions: `megacca.config` imports this module, and loading a config stays free of
numpy and sentencepiece.
"""
from __future__ import annotations

import contextlib
import json
import os
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
    augmented: bool = True
    """Read the augmented copies (json `augment`, e.g. `make_shards.py digits --augment-shifts`) as well;
    false: only the un-augmented samples (pretraining; the alignment stages never read augmented copies)."""


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


# Which shard kinds each task reads.
TASK_KINDS = {"text": ("text",), "c2i": ("codes",), "t2i": ("codes",), "i2t": ("codes",),
              "interleaved": ("codes", "text")}


def check_files(data: DataConfig, stage: str = "pretrain", reference: str = "model") -> None:
    """``data.text_model``, ``data.vocab`` and (kind=webdataset) every source against the files: they exist,
    load, and the vocabulary can express the shards; ``stage`` (``cca``/``dpo``: the alignment loader) and
    ``reference`` (``align.reference``) say which shard kinds fit. Raises `ConfigError` naming the key."""
    from megacca.config import ConfigError
    from megacca.tokenizer.vocab import UnifiedVocab, VocabMismatchError

    if data.text_model is not None and not os.path.isfile(data.text_model):
        raise ConfigError("data.text_model", f"no sentencepiece model at {data.text_model}")
    if data.vocab is None:
        return
    try:
        vocab = UnifiedVocab.load(data.vocab, text_model=data.text_model)
    except VocabMismatchError as e:  # the text model is not the one the vocabulary was built from
        raise ConfigError("data.text_model", str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError("data.vocab", str(e)) from None
    if data.kind == "webdataset":
        for i, src in enumerate(data.sources):
            resolve_source(i, src, vocab, stage, reference)


def resolve_source(i: int, src: SourceConfig, vocab, stage: str = "pretrain",
                   reference: str = "model") -> tuple[dict, str]:
    """Source ``i`` against its shard directory: ``(shard manifest, task)``, the task checked against ``vocab``.

    Pretraining reads code and text shards. The alignment stages (``stage`` ``cca`` / ``dpo``) read: CCA code
    shards as ``c2i`` / ``t2i``, DPO ``pairs`` shards (task ``pairs``), both ``ref_pairs`` shards written for
    their stage (task ``ref_pairs``), which are all that ``reference="precomputed"`` accepts.

    Raises `ConfigError` naming the key: ``data.sources[i].path`` (no or a bad manifest, the wrong kind of
    shards, no shards), ``.split`` (no such split), ``.task`` (a task these shards cannot give, or ``auto``
    that cannot tell), ``data.vocab`` (the vocabulary cannot express the samples).
    """
    from megacca.config import ConfigError
    from megacca.data.shards import ShardManifestError, read_manifest
    from megacca.tokenizer.vocab import VocabMismatchError, check_fits_shards

    key = f"data.sources[{i}]"
    try:
        manifest = read_manifest(src.path)
    except ShardManifestError as e:
        raise ConfigError(f"{key}.path", str(e)) from None
    if src.split not in manifest["splits"]:
        raise ConfigError(f"{key}.split", f"{src.path} has no split {src.split!r} "
                                          f"(has: {', '.join(sorted(manifest['splits'])) or 'none'})")
    names = [s["name"] for s in manifest["splits"][src.split]["shards"]]
    if not names:
        raise ConfigError(f"{key}.path", f"{src.path}: split {src.split!r} lists no shards")
    where = f"{src.path}, split {src.split!r}"
    kind = manifest["kind"]
    if kind == "images":
        raise ConfigError(f"{key}.path", f"{where} holds raw images; encode them to codes first "
                                         f"(tools/vq_encode.py) and point the source at the codes directory")
    if stage != "pretrain" and (kind in ("pairs", "ref_pairs") or reference == "precomputed"):
        return manifest, _resolve_pairs(key, src, vocab, manifest, where, stage, reference)
    if kind in ("pairs", "ref_pairs"):
        stages = "dpo" if kind == "pairs" else "cca or dpo"
        raise ConfigError(f"{key}.path", f"{where} holds {KIND_WORDS[kind]}, which pretraining does not read "
                                         f"(they feed the alignment stages, stage: {stages})")
    if stage != "pretrain" and (stage != "cca" or kind != "codes"):
        raise ConfigError(f"{key}.path", f"stage {stage} reads {ALIGN_WANTS[stage]}; {where} holds "
                                         f"{KIND_WORDS.get(kind, kind)}")
    task = src.task
    if task != "auto" and kind not in TASK_KINDS[task]:
        raise ConfigError(f"{key}.task", f"{task!r} cannot read the {kind!r} shards of {where}")
    if task == "auto":
        task = _auto_task(manifest, os.path.join(src.path, names[0]))
        if task is None:
            raise ConfigError(f"{key}.task", f"auto cannot tell the task of {where} from its manifest or first "
                                             f"sample; set it (c2i, t2i, i2t, text or interleaved)")
    if stage == "cca" and task not in ("c2i", "t2i"):
        raise ConfigError(f"{key}.task", f"stage cca aligns condition -> image samples (c2i or t2i); {where} "
                                         f"reads as {task}")
    try:
        check_fits_shards(vocab, task, manifest, f"{key} ({where})")
    except VocabMismatchError as e:
        raise ConfigError("data.vocab", str(e)) from None
    if (stage == "pretrain" and task == "c2i" and src.augmented and manifest.get("augment")
            and (not getattr(vocab, "text_size", 0) or getattr(vocab, "text", True) is None)):
        raise ConfigError("data.vocab", f"{key} ({where}) holds augmented copies, whose condition carries text "
                                        f"pieces, but the vocabulary has no text model; set {key}.augmented=false "
                                        f"or give the vocabulary a text model")
    return manifest, task


ALIGN_WANTS = {"cca": "code shards (c2i or t2i) or ref_pairs", "dpo": "pairs or ref_pairs shards"}
KIND_WORDS = {"pairs": "preference pairs", "ref_pairs": "precomputed reference pairs", "codes": "image codes",
              "text": "text"}


def _resolve_pairs(key: str, src: SourceConfig, vocab, manifest: dict, where: str, stage: str,
                   reference: str) -> str:
    """`resolve_source` for the pair shards of an alignment stage: the task, or `ConfigError` naming the key."""
    from megacca.config import ConfigError
    from megacca.tokenizer.vocab import VocabMismatchError, check_fits_shards

    kind = manifest["kind"]
    if reference == "precomputed" and kind != "ref_pairs":
        raise ConfigError(f"{key}.path", f"align.reference=precomputed reads the pair shards of "
                                         f"tools/precompute_ref_logps.py (kind ref_pairs); {where} holds "
                                         f"{KIND_WORDS.get(kind, kind)}")
    if src.task != "auto":
        raise ConfigError(f"{key}.task", f"{src.task!r} cannot read the {kind!r} shards of {where} (use auto)")
    if kind == "pairs" and stage != "dpo":
        raise ConfigError(f"{key}.path", f"stage {stage} reads {ALIGN_WANTS[stage]}; {where} holds preference pairs")
    if kind == "ref_pairs" and manifest.get("stage") != stage:
        raise ConfigError(f"{key}.path", f"{where} holds reference pairs for stage {manifest.get('stage')!r}, "
                                         f"this is stage {stage!r}")
    if kind == "pairs" and manifest.get("image_mode") and manifest.get("vq") is None:
        raise ConfigError(f"{key}.path", f"{where} has prompt images that are not VQ-encoded; run "
                                         f"tools/vq_encode.py --src {src.path} --out DIR and read DIR")
    try:
        if kind == "ref_pairs" and hasattr(vocab, "check_compatible"):  # test stand-ins have no manifest
            vocab.check_compatible(manifest.get("vocab"), f"{key} ({where})")
        if kind == "pairs":
            check_fits_shards(vocab, "i2t", manifest, f"{key} ({where})")  # text pieces and image codes
    except VocabMismatchError as e:
        raise ConfigError("data.vocab", str(e)) from None
    return kind


def _auto_task(manifest: dict, first_shard: str) -> Optional[str]:
    """``task: auto``: text shards → text; codes with captions → t2i, with labels only → c2i, from the
    manifest's hints when it has them, else from the first sample."""
    if manifest["kind"] == "text":
        return "text"
    if manifest.get("captions") is True:
        return "t2i"
    if manifest.get("captions") is False and (manifest.get("labels") is True or manifest.get("classes")):
        return "c2i"
    meta = _first_meta(first_shard)
    if isinstance(meta.get("captions"), list) and meta["captions"]:
        return "t2i"
    if manifest.get("classes") or meta.get("label") is not None:
        return "c2i"
    return None


def _first_meta(shard: str) -> dict:
    """The json member of a shard's first sample ({} when there is none; a damaged shard is the loader's to
    report, naming the sample)."""
    from megacca.data.shards import ShardReadError, iter_tar

    try:
        with contextlib.closing(iter_tar(shard)) as samples:
            first = next(samples, None)
        meta = json.loads(first["json"].decode("utf-8")) if first is not None and "json" in first else {}
    except (ShardReadError, OSError, ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}
