"""The digits judge: a classifier fit on the real training split, and the features of the Fréchet distance.

The judge is scikit-learn's RBF support-vector classifier (``SVC(kernel="rbf", gamma=0.001, C=10)``) on the
64 raw pixels in the digits' own 0..16 range: the classic setting for these digits (0.99 held-out accuracy,
fit in a fraction of a second, no randomness). Once fit, it predicts with numpy from its support vectors,
dual coefficients and intercepts (one-vs-one votes, exactly libsvm's rule), so a saved judge is plain arrays:
``judge.safetensors`` + ``judge.json``, nothing pickled.

The Fréchet-distance features are PCA-20 of the pixels, the PCA fit on the same training split (deterministic
full SVD): a fixed, label-free embedding in which the held-out digits and generated samples are compared.

The real digits come from an ``images`` shard directory (``tools/make_shards.py digits``): 8x8 grayscale PNGs
holding ``rint(v * 255 / 16)`` for the original values v in 0..16, which ``load_digit_split`` inverts exactly.
Augmented copies (json ``augment``) are skipped: the judge and the references are the real digits only.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from megacca.fileio import atomic_write_bytes, atomic_write_json

__all__ = ["DigitsJudge", "load_digit_split", "DIGIT_MAX", "DIGIT_SIZE", "JUDGE_PARAMS", "PCA_DIM"]

DIGIT_MAX = 16          # the digits' pixel range is 0..16 (sklearn.datasets.load_digits)
DIGIT_SIZE = (8, 8)
JUDGE_PARAMS = {"kernel": "rbf", "gamma": 0.001, "C": 10.0}
PCA_DIM = 20
FORMAT = "megacca-digits-judge/1"
_WEIGHTS, _META = "judge.safetensors", "judge.json"


def _check_images(images, what: str = "images") -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 3 or tuple(a.shape[1:]) != DIGIT_SIZE:
        raise ValueError(f"{what} must be [N, 8, 8] digits, got shape {tuple(a.shape)}")
    if a.size and (a.min() < 0 or a.max() > DIGIT_MAX):
        raise ValueError(f"{what} must lie in the digits' range 0..{DIGIT_MAX}, got [{a.min()}, {a.max()}]")
    return a


def _flat(images) -> np.ndarray:
    a = _check_images(images)
    return a.reshape(len(a), -1).astype(np.float64)


def load_digit_split(images_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The real digits of one split of an ``images`` shard directory: ``(images uint8 [N, 8, 8] in 0..16,
    labels int64 [N])`` in shard order, augmented copies skipped.

    Each PNG holds ``rint(v * 255 / 16)`` (tools/make_shards.py); ``rint(p * 16 / 255)`` recovers v exactly
    because the 17 stored levels are 15.9 apart. A pixel off those levels, an image that is not 8x8, or a
    sample without a label means the directory is not the digits: ValueError naming the shard and key."""
    from PIL import Image

    from megacca.data.augment import is_augmented
    from megacca.data.shards import iter_samples, read_manifest

    m = read_manifest(images_dir)
    if m["kind"] != "images":
        raise ValueError(f"{images_dir}: a {m['kind']!r} shard directory; the digits judge needs the 'images' "
                         f"shards (tools/make_shards.py digits)")
    levels = np.rint(np.arange(DIGIT_MAX + 1) * 255.0 / DIGIT_MAX)
    xs, ys = [], []
    for s in iter_samples(str(images_dir), split, m):
        where = f"{s.get('__url__')}: sample key {s['__key__']!r}"
        if "png" not in s or "json" not in s:
            raise ValueError(f"{where}: needs png and json members")
        meta = json.loads(s["json"])
        if is_augmented(meta):
            continue
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{where}: json has no integer 'label'")
        with Image.open(io.BytesIO(s["png"])) as im:
            px = np.asarray(im.convert("L"), dtype=np.float64)
        if px.shape != DIGIT_SIZE:
            raise ValueError(f"{where}: image is {px.shape[1]}x{px.shape[0]}, the digits are 8x8")
        v = np.rint(px * DIGIT_MAX / 255.0)
        if not np.array_equal(levels[v.astype(np.int64)], px):
            raise ValueError(f"{where}: pixel values are not the digits' 0..16 scaled to 0..255")
        xs.append(v.astype(np.uint8))
        ys.append(label)
    if not xs:
        raise ValueError(f"{images_dir}: split {split!r} holds no un-augmented digits")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


class DigitsJudge:
    """RBF-SVC classifier and PCA feature map of the 8x8 digits (values 0..16); see the module docstring.

    ``fit`` (classmethod) trains it; ``predict``, ``accuracy_on``, ``features``; ``save`` / ``load`` a
    directory. ``heldout_accuracy`` is whatever the caller recorded (``save`` keeps it)."""

    def __init__(self, arrays: dict, meta: dict):
        self.support_vectors = np.asarray(arrays["support_vectors"], np.float64)   # [S, 64]
        self.dual_coef = np.asarray(arrays["dual_coef"], np.float64)               # [K-1, S]
        self.intercept = np.asarray(arrays["intercept"], np.float64)               # [K(K-1)/2]
        self.n_support = np.asarray(arrays["n_support"], np.int64)                 # [K]
        self.classes = np.asarray(arrays["classes"], np.int64)                     # [K]
        self.pca_mean = np.asarray(arrays["pca_mean"], np.float64)                 # [64]
        self.pca_components = np.asarray(arrays["pca_components"], np.float64)     # [F, 64]
        self.gamma = float(meta["gamma"])
        self.meta = dict(meta)
        k = len(self.classes)
        if self.dual_coef.shape != (k - 1, len(self.support_vectors)) or len(self.intercept) != k * (k - 1) // 2 \
                or int(self.n_support.sum()) != len(self.support_vectors):
            raise ValueError("judge arrays are inconsistent (support vectors, dual coefficients, intercepts)")
        self._starts = np.concatenate([[0], np.cumsum(self.n_support)])

    @property
    def heldout_accuracy(self) -> Optional[float]:
        return self.meta.get("heldout_accuracy")

    @heldout_accuracy.setter
    def heldout_accuracy(self, value: float) -> None:
        self.meta["heldout_accuracy"] = float(value)

    # -- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, images, labels) -> "DigitsJudge":
        """Fit on real digits ``images`` [N, 8, 8] (0..16) with ``labels`` [N]."""
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        x = _flat(images)
        y = np.asarray(labels, dtype=np.int64)
        if len(y) != len(x) or len(np.unique(y)) < 2:
            raise ValueError(f"need one label per image and at least two classes (got {len(x)} images, "
                             f"{len(y)} labels, {len(np.unique(y))} classes)")
        svc = SVC(**JUDGE_PARAMS).fit(x, y)
        pca = PCA(n_components=min(PCA_DIM, x.shape[1], len(x)), svd_solver="full").fit(x)
        arrays = {"support_vectors": svc.support_vectors_, "dual_coef": svc.dual_coef_,
                  "intercept": svc.intercept_, "n_support": svc.n_support_, "classes": svc.classes_,
                  "pca_mean": pca.mean_, "pca_components": pca.components_}
        return cls(arrays, {"format": FORMAT, **JUDGE_PARAMS, "train_samples": int(len(x))})

    # -- use -------------------------------------------------------------------------------------------
    def decision_votes(self, images) -> np.ndarray:
        """One-vs-one votes [N, K]: libsvm's rule, classes i < j in order, decision > 0 votes for i."""
        x = _flat(images)
        sq = (x * x).sum(1)[:, None] + (self.support_vectors ** 2).sum(1)[None, :] - 2.0 * x @ self.support_vectors.T
        kern = np.exp(-self.gamma * np.maximum(sq, 0.0))                             # [N, S]
        k = len(self.classes)
        votes = np.zeros((len(x), k), np.int64)
        p = 0
        for i in range(k):
            si = slice(self._starts[i], self._starts[i + 1])
            for j in range(i + 1, k):
                sj = slice(self._starts[j], self._starts[j + 1])
                dec = kern[:, si] @ self.dual_coef[j - 1, si] + kern[:, sj] @ self.dual_coef[i, sj] + self.intercept[p]
                votes[:, i] += dec > 0
                votes[:, j] += dec <= 0
                p += 1
        return votes

    def predict(self, images) -> np.ndarray:
        """Predicted labels int64 [N] (ties go to the lower class, as in libsvm)."""
        if len(np.asarray(images)) == 0:
            return np.zeros(0, np.int64)
        return self.classes[np.argmax(self.decision_votes(images), axis=1)]

    def accuracy_on(self, images, labels) -> float:
        """Share of ``images`` the judge assigns to ``labels``."""
        y = np.asarray(labels, dtype=np.int64)
        if len(y) != len(np.asarray(images)):
            raise ValueError(f"{len(np.asarray(images))} images but {len(y)} labels")
        return float(np.mean(self.predict(images) == y)) if len(y) else float("nan")

    def features(self, images) -> np.ndarray:
        """The Fréchet-distance features: PCA-20 of the pixels (PCA fit on the judge's training split), [N, 20]."""
        return (_flat(images) - self.pca_mean) @ self.pca_components.T

    # -- files -----------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write ``judge.safetensors`` (the arrays) and ``judge.json`` (format, parameters, notes) atomically."""
        from safetensors.numpy import save

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"support_vectors": self.support_vectors, "dual_coef": self.dual_coef,
                  "intercept": self.intercept, "n_support": self.n_support, "classes": self.classes,
                  "pca_mean": self.pca_mean, "pca_components": self.pca_components}
        atomic_write_bytes(d / _WEIGHTS, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
        atomic_write_json(d / _META, self.meta)
        return d

    @classmethod
    def load(cls, directory) -> "DigitsJudge":
        """Read a directory written by ``save`` (safetensors + JSON only)."""
        from safetensors.numpy import load_file

        d = Path(directory)
        for name in (_WEIGHTS, _META):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: no saved digits judge here (DigitsJudge.save writes it)")
        meta = json.loads((d / _META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{d / _META}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        return cls(load_file(os.fspath(d / _WEIGHTS)), meta)
