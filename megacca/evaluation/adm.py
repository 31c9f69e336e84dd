"""Samples for the ADM evaluation suite, and FID / Inception Score in-process when Inception weights are local.

The suite (openai/guided-diffusion, ``evaluations/evaluator.py``) reads a sample batch ``.npz`` whose ``arr_0``
is uint8 [N, H, W, 3] (RGB, 0..255, C order); class-conditional batches carry the labels as ``arr_1`` (int
[N]), as guided-diffusion's own sampling scripts write them. It computes FID, sFID, Inception Score, precision
and recall against a reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``), with TensorFlow's Inception
graph, which it downloads itself.

In this process, FID and IS are computed only when torch-fidelity is installed *and* its Inception weights
(``weights-inception-2015-12-05-6726825d.pth``, the TF graph's weights ported to torch) are already on disk:
``--inception PATH``, ``$MEGACCA_INCEPTION_WEIGHTS``, or torch hub's cache where torch-fidelity keeps them.
Nothing is downloaded: otherwise `InceptionUnavailable` says how to get them and how to run the ADM suite.
FID here uses the reference batch's stored ``mu`` / ``sigma`` when it has them (the ADM reference batches do)
and its ``arr_0`` images otherwise; IS follows the evaluator (softmax of the unbiased logits, splits of 5,000).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megacca.fileio import atomic_writer

__all__ = ["write_adm_npz", "read_adm_npz", "to_adm_images", "find_inception_weights", "InceptionUnavailable",
           "inception_metrics", "inception_score", "how_to_evaluate", "unavailable_reason", "INCEPTION_FILE",
           "INCEPTION_URL"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
ADM_SUITE = "https://github.com/openai/guided-diffusion/tree/main/evaluations"
ADM_REF_256 = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/" \
              "VIRTUAL_imagenet256_labeled.npz"


class InceptionUnavailable(RuntimeError):
    """FID / IS cannot run in this process (no torch-fidelity, or no local weights); the message says what to
    install or download and how to run the ADM suite instead."""


def to_adm_images(decoded) -> np.ndarray:
    """Decoded images float [N, C, H, W] in [-1, 1] → uint8 [N, H, W, 3] (a one-channel image is repeated)."""
    import torch

    from megacca.tokenizer.vq.preprocess import to_uint8

    t = decoded if isinstance(decoded, torch.Tensor) else torch.as_tensor(np.asarray(decoded))
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected decoded images [N, 1 or 3, H, W], got shape {tuple(t.shape)}")
    return to_uint8(t.float().expand(-1, 3, -1, -1))


def write_adm_npz(path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """Write the ADM sample batch: ``arr_0`` uint8 [N, H, W, 3] and, with ``labels``, ``arr_1`` int64 [N].

    Written to a temporary file next to ``path``, fsynced and renamed (a batch of 50,000 ImageNet samples is
    ~10 GB: it is not built in memory first)."""
    a = np.ascontiguousarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"ADM samples must be uint8 [N, H, W, 3], got {a.dtype} {list(a.shape)}")
    arrays = {"arr_0": a}
    if labels is not None:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(a):
            raise ValueError(f"{len(a)} images but {len(lab)} labels")
        arrays["arr_1"] = lab
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: the ADM suite reads .npz files")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return path


def read_adm_npz(path) -> dict:
    """The arrays of an ADM batch (never unpickled): ``arr_0`` and whatever else it holds (``arr_1``, ``mu``,
    ``sigma``...). ValueError naming the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if "arr_0" not in out and "mu" not in out:
        raise ValueError(f"{path}: no arr_0 (images) and no mu/sigma statistics")
    return out


def find_inception_weights(explicit=None) -> Optional[Path]:
    """The local Inception weights file: ``explicit`` if given (it must exist), else
    ``$MEGACCA_INCEPTION_WEIGHTS``, else torch hub's checkpoint cache (where torch-fidelity downloads it);
    None when there is none."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"--inception {p}: no such file")
        return p
    env = os.environ.get("MEGACCA_INCEPTION_WEIGHTS")
    if env:
        return Path(env) if Path(env).is_file() else None
    import torch.hub

    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return p if p.is_file() else None


def unavailable_reason(weights: Optional[Path]) -> Optional[str]:
    """Why FID / IS cannot run in this process (``weights``: `find_inception_weights`'s answer), or None."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append("torch-fidelity is not installed")
    if weights is None:
        missing.append(f"no Inception weights ({INCEPTION_FILE}) on this machine")
    return "; ".join(missing) or None


def how_to_evaluate(npz_path, reason: str) -> str:
    """What to do when FID / IS cannot run here: get the weights, or run the ADM suite on the batch."""
    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (f"FID/IS not computed in-process: {reason}.\n"
            f"  To compute them here: pip install torch-fidelity, and put {INCEPTION_URL}\n"
            f"  at {cache} (or pass --inception PATH, or set MEGACCA_INCEPTION_WEIGHTS).\n"
            f"  Or run the ADM suite ({ADM_SUITE}) on the batch:\n"
            f"    git clone https://github.com/openai/guided-diffusion\n"
            f"    pip install -r guided-diffusion/evaluations/requirements.txt\n"
            f"    wget {ADM_REF_256}   # the reference batch (ImageNet 256)\n"
            f"    python guided-diffusion/evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz {npz_path}")


def _torch_fidelity_extractor(weights: Path) -> Callable:
    """torch-fidelity's TF-compatible InceptionV3 on ``weights``: uint8 NHWC batch → (pool 2048, unbiased
    logits 1008). The file is first read with ``torch.load(weights_only=True)`` (refused if it needs more than
    tensors), before torch-fidelity reads it itself."""
    import torch

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not plain weights
        raise ValueError(f"{weights}: not a weights-only torch file ({type(e).__name__}: {e})") from None
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights))

    def run(batch: np.ndarray):
        with torch.no_grad():
            pool, logits = net(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))
        return pool.double().numpy(), logits.double().numpy()

    return run


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """The ADM evaluator's Inception Score: exp(mean KL(p(y|x) || p(y))) per split of ``split_size``, averaged."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(np.maximum(part, 1e-30)) - np.log(np.maximum(part.mean(0, keepdims=True), 1e-30)))
        scores.append(float(np.exp(kl.sum(1).mean())))
    return float(np.mean(scores))


def inception_metrics(images: np.ndarray, reference_npz=None, *, weights=None, batch_size: int = 100,
                      extractor: Optional[Callable] = None) -> dict:
    """``{"inception_score"[, "fid"]}`` of uint8 [N, H, W, 3] ``images`` (FID against ``reference_npz``).

    ``extractor`` (uint8 NHWC batch → (pool features, unbiased logits)) defaults to torch-fidelity's
    InceptionV3 on the local weights (`find_inception_weights`); `InceptionUnavailable` when there are none
    or torch-fidelity is missing."""
    from megacca.evaluation.metrics import feature_stats, frechet_distance

    if extractor is None:
        w = find_inception_weights(weights)
        reason = unavailable_reason(w)
        if reason:
            raise InceptionUnavailable(reason)
        extractor = _torch_fidelity_extractor(w)

    def features(x: np.ndarray):
        pools, logits = [], []
        for i in range(0, len(x), batch_size):
            pl, lg = extractor(x[i:i + batch_size])
            pools.append(pl)
            logits.append(lg)
        return np.concatenate(pools), np.concatenate(logits)

    pool, logits = features(images)
    out = {"inception_score": inception_score(logits), "num_samples": int(len(images))}
    if reference_npz is not None:
        ref = read_adm_npz(reference_npz)
        if "mu" in ref and "sigma" in ref:
            mu2, s2 = ref["mu"], ref["sigma"]
        else:
            mu2, s2 = feature_stats(features(ref["arr_0"])[0])
        mu1, s1 = feature_stats(pool)
        out["fid"] = frechet_distance(mu1, s1, mu2, s2)
    return out
