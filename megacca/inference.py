"""`megacca.load`: any megacca checkpoint in one process, for notebooks, scripts and `megacca sample`.

    import megacca
    m = megacca.load("runs/demo")                      # a run directory, or one checkpoint directory
    codes, tok_s = m.sample_images([m.class_prompt(7)] * 8, cfg_scale=3.0, seed=0)
    images = m.decode_images(codes)                    # float [8, 3, 16, 16] in [-1, 1]

The checkpoint may come from either engine at any tp / pp / ZeRO layout: its weights are read whole by
`megacca.checkpoint.read_full_state_dict` and loaded (strictly) into the model its `trainer.json` describes,
rebuilt at tp = pp = 1. The process needs a torch.distributed group and megatron-core's parallel state; when
there is none, `load` starts a world of one (gloo, an in-memory store: no port, no environment variables)
and the last `InferenceModel.close()` ends it. A caller that already has a group keeps it, and must have
tp = pp = 1 in its parallel state.

Paths in a checkpoint's config (data.vocab, data.text_model, shard directories) are as the training command
saw them, usually relative to the repository it ran in; they are looked up from the current directory, then
from each directory above the checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megacca.checkpoint import CheckpointNotFound, read_full_state_dict, read_trainer_state, resolve_checkpoint
from megacca.config import Config, ConfigError, from_dict
from megacca.fileio import atomic_write_bytes, sha256_file
from megacca.tokenizer.vocab import UnifiedVocab, VocabMismatchError

__all__ = ["load", "InferenceModel", "VQNotFound", "write_image_grid", "image_grid"]

log = logging.getLogger(__name__)


class VQNotFound(FileNotFoundError):
    """No VQ tokenizer to decode this checkpoint's image codes (none named by its data, or not on disk)."""


# ---- the process group a model of one process needs ------------------------------------------------------
_OWNED_GROUP = {"users": 0, "ours": False}  # did `load` start the group, and how many models still use it


def _ensure_single_process_group() -> None:
    """A torch.distributed group and megatron parallel state at tp = pp = 1, started here when there is none.

    The caller's RNG is left as it was: megatron's seeding (its RNG tracker, mandatory even without dropout)
    and nothing else touches the global generators here."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megacca import cpu_compat

    cpu_compat.install()
    if not dist.is_initialized():
        # A HashStore needs no rendezvous: a world of one that neither takes a port nor sets RANK/WORLD_SIZE
        # variables a later launcher would inherit.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWNED_GROUP["ours"] = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise RuntimeError(f"megacca.load builds the whole model in this process, but this process's megatron "
                           f"parallel state has tp={tp}, pp={pp}; call it where tp = pp = 1")
    if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
        with torch.random.fork_rng(devices=[]):
            tensor_parallel.model_parallel_cuda_manual_seed(0)
    _OWNED_GROUP["users"] += 1


def _release_single_process_group() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    _OWNED_GROUP["users"] = max(0, _OWNED_GROUP["users"] - 1)
    if _OWNED_GROUP["users"] == 0 and _OWNED_GROUP["ours"] and dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        _OWNED_GROUP["ours"] = False


# ---- finding the files a checkpoint's config names ----------------------------------------------------------
def _find(path: Optional[str], ckpt: Path) -> Optional[Path]:
    """`path` as the training command saw it: absolute, else from the current directory, else from each
    directory above the checkpoint (a run directory usually sits inside the repository it was launched from)."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), *ckpt.resolve().parents):
        if (base / p).exists():
            return base / p
    return None


def _vq_sha256(vq_dir: Path) -> str:
    """What vocabularies and code manifests record for a VQ tokenizer: the sha256 of its weights file
    (tools/vq_encode.py)."""
    from megacca.tokenizer.vq import WEIGHTS_NAME

    weights = vq_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise VQNotFound(f"{vq_dir}: not a VQ tokenizer directory (no {WEIGHTS_NAME})")
    return sha256_file(weights)


def _text_model_for(cfg: Config, manifest: dict, ckpt: Path) -> Optional[Path]:
    """The sentencepiece model of a checkpoint: data.text_model, else the manifest's file name beside
    data.vocab (where UnifiedVocab.load looks)."""
    found = _find(cfg.data.text_model, ckpt)
    if found is not None:
        return found
    vocab_path = _find(cfg.data.vocab, ckpt)
    if vocab_path is not None and manifest.get("text_model"):
        beside = vocab_path.parent / os.path.basename(manifest["text_model"])
        if beside.is_file():
            return beside
    return None


def inference_config(saved: dict, device: torch.device) -> Config:
    """The checkpoint's config rebuilt for one process: tp = pp = 1 with the same padded vocabulary (the
    embedding's rows are padded to make_vocab_size_divisible_by x tp), the local layer spec's names (what
    read_full_state_dict gives), fp32 unless the model runs on a GPU."""
    cfg = from_dict(Config, copy.deepcopy(saved))
    par = cfg.parallel
    cfg.model.make_vocab_size_divisible_by *= par.tp
    cfg.parallel = dataclasses.replace(par, tp=1, pp=1, sequence_parallel=False, zero_stage=0)
    m = cfg.model
    if device.type != "cuda":
        cfg.train.precision = "fp32"  # bf16 matmuls are slower than fp32 on CPUs
        if m.attention_backend != "local":
            m.attention_backend = "sdpa"  # flash-attn and Transformer Engine need a GPU
    else:
        from megacca.model.attention import resolve_backend

        if m.attention_backend == "te" or (m.attention_backend == "auto" and resolve_backend("auto") == "te"):
            m.attention_backend = "sdpa"  # TE's layer spec names the norms otherwise than the state dict read
    return cfg


# ---- the model ---------------------------------------------------------------------------------------------
class InferenceModel:
    """A checkpoint's model in this process (eval mode, no gradients), its vocabulary and its VQ decoder."""

    vocab: Optional[UnifiedVocab]
    """The checkpoint's unified vocabulary (None for a run on synthetic data, which has none)."""
    cfg: Config
    """The checkpoint's config as rebuilt for this process (tp = pp = 1)."""
    model: torch.nn.Module
    """The megatron-core `UnifiedGPT`, whole."""
    step: int
    """The training step the checkpoint holds."""
    checkpoint: Path
    """The checkpoint directory that was read."""
    device: torch.device
    """Where the model and the VQ decoder run."""

    def __init__(self, model, cfg: Config, vocab: Optional[UnifiedVocab], step: int, checkpoint: Path,
                 vq_dir: Optional[Path], text_note: str = ""):
        self.model, self.cfg, self.vocab, self.step, self.checkpoint = model, cfg, vocab, step, checkpoint
        self._vq_dir, self._vq = vq_dir, None
        self._text_note = text_note
        self._closed = False
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        return (f"InferenceModel({self.checkpoint}, step {self.step}, {self.cfg.model.num_layers} layers x "
                f"{self.cfg.model.hidden_size}, vocab {self.vocab!r})")

    def _need_vocab(self) -> UnifiedVocab:
        if self.vocab is None:
            raise ValueError(f"{self.checkpoint} has no vocabulary manifest (a run on synthetic data): it can "
                             f"give logits, but prompts and generation need a vocabulary")
        return self.vocab

    # -- scoring ----------------------------------------------------------------------------------------
    def logits(self, input_ids) -> torch.Tensor:
        """Logits of every position, float [B, S, V] (V: the unpadded vocabulary). `input_ids`: a LongTensor
        [B, S] or B lists of S ids (equal lengths: a shorter row would need a padding convention)."""
        from megacca.generation.sampler import full_logits

        tokens = _as_batch(input_ids)
        v = self.cfg.model.vocab_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= v):
            raise ValueError(f"input ids must lie in [0, {v}), got [{int(tokens.min())}, {int(tokens.max())}]")
        with torch.no_grad():
            return full_logits(self.model, tokens.to(self.device)).float()

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: Optional[int] = None, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
                 seed: Optional[int] = None, cfg_interval: Optional[tuple[float, float]] = None) -> list[list[int]]:
        """The new ids of each prompt (megacca.generation.sampler.generate, KV cache, constraints on): a prompt
        ending in `<boi>` gets exactly H*W image codes and `<eoi>`; otherwise text until `<eos>` or
        `max_new_tokens`. In the LlamaGen layout (`model.layout: llamagen`) a prompt is `[class]` (or `[<null>]`)
        and gets exactly H*W codes. `temperature=0` is greedy; `cfg_scale` s > 1 samples u + s*(c - u) with `<null>` as
        the unconditional prompt, optionally only for image positions inside `cfg_interval`."""
        from megacca.generation.sampler import generate

        vocab = self._need_vocab()
        with torch.no_grad():
            return generate(self.model, vocab, [list(map(int, p)) for p in prompts], max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                            cfg_interval=cfg_interval, seed=seed, use_cache=True)

    def sample_images(self, prompts: Sequence[Sequence[int]], *, cfg_scale: Optional[float] = None,
                      seed: Optional[int] = None, batch_size: int = 256, **kw) -> tuple[np.ndarray, float]:
        """Image codes int64 [N, h, w] for N prompts that each end in `<boi>` (in the LlamaGen layout: `[class]`),
        and the generated tokens per second (every new id, codes and `<eoi>`, over the wall time of generation).
        Batches of `batch_size` prompts; batch i draws with seed `seed + i`, so a call is reproducible for a
        given batch size.
        `kw`: temperature, top_k, top_p, cfg_interval (as in `generate`)."""
        vocab = self._need_vocab()
        if vocab.image_grid is None:
            raise ValueError(f"{self.checkpoint}: the vocabulary has no image_grid; it cannot sample images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for n, p in enumerate(prompts):
            if self.cfg.model.layout == "llamagen":
                if len(p) != 1 or vocab.is_image(int(p[0])):
                    raise ValueError(f"prompt {n} is not one condition ([class] or [<null>], the LlamaGen layout's "
                                     f"prompt); use class_prompt")
            elif not p or int(p[-1]) != vocab.boi_id:
                raise ValueError(f"prompt {n} does not end in <boi> (id {vocab.boi_id}); use class_prompt or "
                                 f"text_prompt")
        h, w = vocab.image_grid
        codes, generated, seconds = [], 0, 0.0
        for i in range(0, len(prompts), batch_size):
            batch = [list(map(int, p)) for p in prompts[i:i + batch_size]]
            t0 = time.perf_counter()
            out = self.generate(batch, cfg_scale=cfg_scale, seed=None if seed is None else seed + i // batch_size,
                                **kw)
            seconds += time.perf_counter() - t0
            generated += sum(len(o) for o in out)
            codes.extend(vocab.codes_from_tokens(o[:h * w]) for o in out)
        arr = np.stack(codes).astype(np.int64) if codes else np.zeros((0, h, w), np.int64)
        return arr, (generated / seconds if seconds > 0 else 0.0)

    # -- prompts ----------------------------------------------------------------------------------------
    def class_prompt(self, k: int) -> list[int]:
        """`<bos> <class_k> <boi>`: the class→image prompt of class index k (`[<class_k>]` in the LlamaGen
        layout)."""
        v = self._need_vocab()
        if self.cfg.model.layout == "llamagen":
            return [v.class_token(k)]
        return [v.bos_id, v.class_token(k), v.boi_id]

    def _unified_only(self, what: str) -> None:
        if self.cfg.model.layout == "llamagen":
            raise ValueError(f"{self.checkpoint}: a {what} prompt has no place in the LlamaGen layout "
                             f"(model.layout=llamagen is class->image only); use class_prompt")

    def text_prompt(self, text: str) -> list[int]:
        """`<bos> pieces <boi>`: the caption→image prompt of `text`."""
        self._unified_only("text")
        v = self._need_vocab()
        if v.text is None:
            reason = "its vocabulary has no text pieces" if v.text_size == 0 else self._text_note
            raise ValueError(f"{self.checkpoint}: a text prompt needs the run's text model; {reason}")
        return [v.bos_id, *v.encode_text(text), v.boi_id]

    def caption_prompt(self, codes) -> list[int]:
        """`<bos> <boi> codes <eoi>`: the image→caption prompt of one image's codes [h, w]."""
        self._unified_only("caption")
        v = self._need_vocab()
        return [v.bos_id, v.boi_id, *v.image_tokens(np.asarray(codes)), v.eoi_id]

    # -- images -----------------------------------------------------------------------------------------
    @property
    def vq_dir(self) -> Path:
        """The run's VQ tokenizer directory (the `vq=` given, else `vq/` in the checkpoint, the config's code
        shards, or `vq/` in the checkpoint it started from: `_find_vq`)."""
        if self._vq_dir is None:
            self._vq_dir = _find_vq(self.cfg, self.checkpoint, self._need_vocab())
        return self._vq_dir

    def decode_images(self, codes, batch_size: int = 256) -> torch.Tensor:
        """Image codes [N, h, w] (ints in [0, K)) → the VQ decoder's images, float [N, C, H, W] in [-1, 1], on
        the CPU (decoded on the model's device, `batch_size` images at a time)."""
        from megacca.tokenizer.vq import load_vq

        if self._vq is None:
            self._vq = load_vq(self.vq_dir, map_location=str(self.device))
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long()
        if c.dim() != 3:
            raise ValueError(f"expected codes [N, h, w], got shape {tuple(c.shape)}")
        if c.shape[0] == 0:
            ds, ch = self._vq.config.downsample, self._vq.config.in_channels
            return torch.zeros(0, ch, c.shape[1] * ds, c.shape[2] * ds)
        with torch.no_grad():
            return torch.cat([self._vq.decode(c[i:i + batch_size].to(self.device)).float().cpu()
                              for i in range(0, c.shape[0], batch_size)])

    def __enter__(self) -> "InferenceModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the model; the last model of a process group that `load` started ends that group."""
        if not self._closed:
            self._closed = True
            self.model = None
            _release_single_process_group()


def _as_batch(input_ids) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        t = input_ids
    else:
        rows = [list(map(int, r)) for r in input_ids]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"input_ids rows have different lengths {sorted(lengths)}; pass rows of one length")
        t = torch.tensor(rows, dtype=torch.long)
    if t.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(t.shape)}")
    return t.long()


def _find_vq(cfg: Config, ckpt: Path, vocab: UnifiedVocab) -> Path:
    """The VQ tokenizer of the checkpoint's image codes, the first on disk whose weights are the vocabulary's
    `vq_sha256`: `vq/` inside the checkpoint (`from-llamagen --vq` puts it there), the `vq` block (`path`,
    `sha256`) of each data source's shard manifest, then `vq/` inside the checkpoint `train.init_from` names."""
    from megacca.data.shards import ShardManifestError, read_manifest

    tried = []
    own = ckpt / "vq"
    if own.is_dir():
        try:
            return check_vq(own, vocab, ckpt)
        except (VocabMismatchError, VQNotFound) as e:
            tried.append(str(e))
    for src in cfg.data.sources:
        where = _find(src.path, ckpt)
        if where is None:
            tried.append(f"{src.path} (not found)")
            continue
        try:
            vq = read_manifest(str(where)).get("vq")
        except ShardManifestError as e:
            tried.append(f"{src.path} ({e})")
            continue
        if not isinstance(vq, dict) or not vq.get("path"):
            tried.append(f"{src.path} (its manifest names no VQ path)")
            continue
        vq_dir = _find(vq["path"], ckpt)
        if vq_dir is None:
            tried.append(f"{vq['path']} (named by {src.path}, not found)")
            continue
        try:
            return check_vq(vq_dir, vocab, ckpt)
        except VocabMismatchError as e:
            tried.append(str(e))
    start = _find(cfg.train.init_from, ckpt)
    if start is not None:
        try:
            start_vq = resolve_checkpoint(start) / "vq"
        except CheckpointNotFound:
            start_vq = None
        if start_vq is not None and start_vq.is_dir():
            try:
                return check_vq(start_vq, vocab, ckpt)
            except (VocabMismatchError, VQNotFound) as e:
                tried.append(str(e))
    detail = "; ".join(dict.fromkeys(tried)) or "its config names no shard directories"
    raise VQNotFound(f"{ckpt}: no VQ tokenizer found for its image codes ({detail}); pass vq=DIR (--vq DIR)")


def check_vq(vq_dir: Path, vocab: UnifiedVocab, ckpt: Path) -> Path:
    """`vq_dir` if its weights are the ones the vocabulary's codes came from (`vq_sha256`; unknown matches)."""
    vq_dir = Path(vq_dir)
    if not vq_dir.is_dir():
        raise VQNotFound(f"{vq_dir}: VQ tokenizer directory not found")
    sha = _vq_sha256(vq_dir)
    if vocab.vq_sha256 is not None and sha != vocab.vq_sha256:
        raise VocabMismatchError(f"VQ tokenizer {vq_dir} has weights sha256 {sha[:12]}..., but the vocabulary of "
                                 f"{ckpt} was built for VQ weights {vocab.vq_sha256[:12]}...")
    from megacca.tokenizer.vq import load_vq_config

    vq_cfg = load_vq_config(vq_dir)
    if vq_cfg.codebook_size != vocab.codebook_size:
        raise VocabMismatchError(f"VQ tokenizer {vq_dir} has {vq_cfg.codebook_size} codes, the vocabulary of "
                                 f"{ckpt} {vocab.codebook_size}")
    return vq_dir


# ---- loading -----------------------------------------------------------------------------------------------
def load(path, *, vq=None, device="cpu") -> InferenceModel:
    """Load a megacca checkpoint into this process: `path` is a run directory (its latest checkpoint) or one
    checkpoint directory, of either engine, saved at any tp / pp / ZeRO layout. `vq`: the VQ tokenizer
    directory for `decode_images` (default: the one the run's code shards name), checked against the
    vocabulary's `vq_sha256`. `device`: where the model runs.

    Raises CheckpointNotFound (not a checkpoint), VQNotFound / VocabMismatchError (a `vq` that is missing or
    not the vocabulary's) with one-line messages naming the files."""
    from megacca.model.gpt import build_model

    ckpt = resolve_checkpoint(path)
    try:
        state = read_trainer_state(ckpt)
        saved_cfg = state["config"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointNotFound(f"{ckpt}/trainer.json: not a megacca trainer state ({e})") from None
    device = torch.device(device)
    try:
        cfg = inference_config(saved_cfg, device)
    except ConfigError as e:
        raise CheckpointNotFound(f"{ckpt}/trainer.json: config does not load: {e}") from None
    manifest = state.get("vocab")
    if manifest is None and (ckpt / "vocab.json").is_file():
        manifest = json.loads((ckpt / "vocab.json").read_text())
    vocab, text_note = None, ""
    if manifest is not None:
        vocab = UnifiedVocab(manifest, source=str(ckpt))
        if vocab.vocab_size != cfg.model.vocab_size:
            raise CheckpointNotFound(f"{ckpt}: its vocabulary manifest has {vocab.vocab_size} ids but its model "
                                     f"model.vocab_size={cfg.model.vocab_size}")
        text_note = _attach_text(vocab, cfg, manifest, ckpt)
    vq_dir = None
    if vq is not None:  # checked now: a wrong tokenizer is refused before the weights are read
        vq_dir = check_vq(Path(vq), vocab, ckpt) if vocab is not None else Path(vq)

    weights = read_full_state_dict(ckpt)
    _ensure_single_process_group()
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
            model = build_model(cfg)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # megatron's modules keep an `_extra_state` entry (FP8 metadata) that dist checkpoints do not store.
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointNotFound(f"{ckpt}: weights do not fit the model its config describes (missing "
                                     f"{missing[:3]}, unexpected {unexpected[:3]})")
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    except BaseException:
        _release_single_process_group()
        raise
    return InferenceModel(model, cfg, vocab, int(state.get("step", 0)), ckpt, vq_dir, text_note)


def _attach_text(vocab: UnifiedVocab, cfg: Config, manifest: dict, ckpt: Path) -> str:
    """Attach the run's sentencepiece model to `vocab` when it is found and matches; else say why not."""
    if vocab.text_size == 0:
        return "its vocabulary has no text pieces"
    from megacca.tokenizer.text import TextTokenizer

    found = _text_model_for(cfg, manifest, ckpt)
    if found is None:
        return (f"the text model (data.text_model={cfg.data.text_model!r}, or {manifest.get('text_model')!r} "
                f"beside data.vocab={cfg.data.vocab!r}) was not found")
    try:
        vocab._attach_text(TextTokenizer(str(found)), str(ckpt))
    except (VocabMismatchError, ValueError, OSError) as e:
        log.warning("%s: text model not attached: %s", ckpt, e)
        return f"the text model found does not fit: {e}"
    return ""


# ---- image grids -------------------------------------------------------------------------------------------
def image_grid(images: np.ndarray, cols: Optional[int] = None) -> np.ndarray:
    """uint8 images [N, H, W, C] → one uint8 image [rows*H, cols*W, C], row-major, unused cells black;
    `cols` defaults to ceil(sqrt(N))."""
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return grid


def write_image_grid(path, images: torch.Tensor, cols: Optional[int] = None) -> tuple[int, int]:
    """Decoded images float [N, C, H, W] in [-1, 1] → a PNG grid at `path` (atomic); returns its (width,
    height)."""
    import io

    from PIL import Image

    from megacca.tokenizer.vq import to_uint8

    arr = image_grid(to_uint8(images), cols)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return img.size
