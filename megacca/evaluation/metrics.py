"""Metrics of generated digits and captions (the digits demo's evaluation; README, "Evaluation").

- ``to_digit_pixels``: decoded VQ images [N, C, H, W] in [-1, 1] → the digits' own uint8 [N, 8, 8] in 0..16;
- ``digit_metrics``: conditional accuracy (judge), Fréchet distance (judge features, against real held-out
  digits) and diversity of a labelled sample set;
- ``frechet_distance``, ``diversity``, ``caption_accuracy`` / ``digits_named``;
- ``reference_figures``: the same figures for real digits, the scale to read the others on.

Pixels: the digits' shards hold 8x8 PNGs with ``rint(v * 255 / 16)`` for v in 0..16 (tools/make_shards.py);
the VQ tokenizer sees them as RGB, resized to its ``image_size`` with PIL (``resample``, bicubic for the digits
tokenizer; megacca/tokenizer/vq/preprocess.py) and mapped to [-1, 1]. ``to_digit_pixels`` undoes both: it
finds the 0..16 image whose preprocessing is closest (least squares) to the decoded one, under an exact replica
of PIL's fixed-point resampling. On a real digit's preprocessed image that is the digit itself, pixel for pixel
(tested on all 1,797). The upsampling clips its overshoot to 0..255 at each of its two passes, so a plain
linear inverse is off by up to 1.3 levels; the inverse here first solves a least-squares problem that treats
clipped values as bounds, then, where that fit lies within ``search_rms`` of the decoded image (near an exact
preimage, where rounding can miss a level), moves single pixels, and pairs of neighbours, by one level while that
lowers the squared error. A decoded sample lies further from any 0..16 image (RMS 2.8-4.5 of 255 for the digits
tokenizer on the held-out codes, against at most 2.4 for preprocessed real digits); the search would change some
of its pixels by one level at ~50x the time, and left the judge's accuracy on 1,080 such images unchanged.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from megacca.evaluation.judge import DIGIT_MAX, DIGIT_SIZE

__all__ = ["to_digit_pixels", "pil_resize_weights", "pil_resize", "digit_metrics", "frechet_distance",
           "feature_stats", "diversity", "caption_accuracy", "digits_named", "reference_figures", "NUMBER_WORDS"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PRECISION_BITS = 32 - 8 - 2   # Pillow's 8-bit resampling: coefficients in fixed point with 22 fraction bits
_LEVELS = np.rint(np.arange(DIGIT_MAX + 1) * 255.0 / DIGIT_MAX)  # the 17 stored PNG values of 0..16


# ---------------------------------------------------------------------------------------------------------
# PIL's resampling, replicated
# ---------------------------------------------------------------------------------------------------------
def _bicubic(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


def pil_resize_weights(n_in: int, n_out: int, resample: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Pillow's 1-D resampling matrix [n_out, n_in] (``ImagingResample``'s ``precompute_coeffs``): the exact
    real weights, and the fixed-point integers its 8-bit path multiplies by (as float64, exact)."""
    if resample not in _FILTERS:
        raise ValueError(f"resample {resample!r} is not replicated (have: {', '.join(_FILTERS)})")
    fn, support = _FILTERS[resample]
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support *= fscale
    w = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        k = np.array([fn((x + lo - center + 0.5) / fscale) for x in range(hi - lo)])
        if k.sum() != 0.0:
            k = k / k.sum()
        w[xx, lo:hi] = k
    one = float(1 << _PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))
    return w, fixed


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: round the fixed-point sum (its +0.5 is added before) and clip to 0..255."""
    return np.clip(np.floor(acc / float(1 << _PRECISION_BITS)), 0.0, 255.0)


def pil_resize(x: np.ndarray, rows: Optional[np.ndarray], cols: Optional[np.ndarray]) -> np.ndarray:
    """Exactly what ``PIL.Image.resize`` gives for 8-bit images ``x`` [N, h, w] (float64 holding 0..255):
    the horizontal pass first, rounded and clipped to 8 bits, then the vertical one. ``rows`` / ``cols``: the
    fixed-point matrices of ``pil_resize_weights`` (None: that side keeps its size, as PIL skips the pass)."""
    half = float(1 << (_PRECISION_BITS - 1))
    if cols is not None:
        x = _clip8(x @ cols.T + half)
    if rows is not None:
        x = _clip8(np.matmul(rows, x) + half)
    return x


def _censored_lstsq(y: np.ndarray, w: np.ndarray, iters: int = 30) -> np.ndarray:
    """x in [0, 255] with ``clip(y ≈ x @ w.T, 0, 255)`` along the last axis, in least squares: an observation
    at a bound only says the unclipped value was beyond it, so it counts only while the fit is on its wrong
    side (alternating projections; 30 steps converge on the digits)."""
    pinv = np.linalg.pinv(w).T
    low, high = y <= 0.5, y >= 254.5
    x = np.clip(y @ pinv, 0.0, 255.0)
    for _ in range(iters):
        pred = x @ w.T
        target = np.where(low, np.minimum(pred, y), np.where(high, np.maximum(pred, y), y))
        x = np.clip(target @ pinv, 0.0, 255.0)
    return x


def _refine(levels: np.ndarray, y: np.ndarray, rows, cols, max_sweeps: int) -> np.ndarray:
    """Lower ``|pil_resize(levels) - y|²`` by one-level moves of single pixels, then of neighbour pairs (what a
    single move cannot escape: two errors of opposite sign), per image, until nothing improves."""
    n, h, w = levels.shape

    def err(lv, target):
        return ((pil_resize(_LEVELS[lv], rows, cols) - target) ** 2).sum((1, 2))

    singles = [[(r, c)] for r in range(h) for c in range(w)]
    pairs = [[(r, c), (r + dr, c + dc)] for r in range(h) for c in range(w)
             for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)) if 0 <= r + dr < h and 0 <= c + dc < w]
    # A preimage on the lattice reproduces y to float rounding (y came through float32 [-1, 1]).
    done_below = 1e-3 * h * w
    live = np.arange(n)
    for _ in range(max_sweeps):
        yy, sub = y[live], levels[live]
        e = err(sub, yy)
        keep = e > done_below
        live, sub, yy, e = live[keep], sub[keep], yy[keep], e[keep]
        if not len(live):
            break
        changed = 0
        for moves, signs in ((singles, [(-1,), (1,)]), (pairs, [(a, b) for a in (-1, 1) for b in (-1, 1)])):
            for mv in moves:
                for sg in signs:
                    cand = sub.copy()
                    for (r, c), s in zip(mv, sg):
                        cand[:, r, c] = np.clip(cand[:, r, c] + s, 0, DIGIT_MAX)
                    ce = err(cand, yy)
                    better = ce < e - 1e-9
                    if better.any():
                        sub[better], e[better] = cand[better], ce[better]
                        changed += int(better.sum())
            if changed:  # pairs only once single moves have stalled
                break
        levels[live] = sub
        if not changed:
            break
    return levels


def to_digit_pixels(decoded, *, resample: str = "bicubic", size: Sequence[int] = DIGIT_SIZE,
                    search_rms: float = 2.5, max_sweeps: int = 8) -> np.ndarray:
    """Decoded VQ images float [N, C, H, W] in [-1, 1] (torch tensor or array) → uint8 [N, 8, 8] in 0..16.

    The inverse of the digits' preprocessing (module docstring): channels averaged to gray, values mapped back
    to 0..255, then the 0..16 image whose PIL ``resample`` upsampling from ``size`` to (H, W) is closest to it
    (least squares, then a local search on the images whose fit is within ``search_rms`` on the 0..255 scale,
    at most ``max_sweeps`` sweeps). At H, W == ``size`` only the value mapping is inverted."""
    a = decoded.detach().cpu().numpy() if hasattr(decoded, "detach") else np.asarray(decoded)
    if a.ndim != 4:
        raise ValueError(f"expected decoded images [N, C, H, W], got shape {tuple(a.shape)}")
    h0, w0 = int(size[0]), int(size[1])
    n, _, hh, ww = a.shape
    if hh < h0 or ww < w0:
        raise ValueError(f"decoded images are {hh}x{ww}, smaller than the {h0}x{w0} digits")
    y = (np.clip(a.astype(np.float64).mean(1), -1.0, 1.0) + 1.0) * 127.5   # [N, H, W] in 0..255
    if n == 0:
        return np.zeros((0, h0, w0), np.uint8)
    if (hh, ww) == (h0, w0):
        return np.clip(np.rint(y * DIGIT_MAX / 255.0), 0, DIGIT_MAX).astype(np.uint8)
    rw, rows = pil_resize_weights(h0, hh, resample) if hh != h0 else (None, None)
    cw, cols = pil_resize_weights(w0, ww, resample) if ww != w0 else (None, None)
    x = y
    if rw is not None:   # undo the vertical pass (PIL's second), then the horizontal one
        x = np.swapaxes(_censored_lstsq(np.swapaxes(x, 1, 2), rw), 1, 2)
    if cw is not None:
        x = _censored_lstsq(x, cw)
    levels = np.clip(np.rint(x * DIGIT_MAX / 255.0), 0, DIGIT_MAX).astype(np.int64)
    rms = np.sqrt(((pil_resize(_LEVELS[levels], rows, cols) - y) ** 2).mean((1, 2)))
    near = np.nonzero(rms <= search_rms)[0]
    if len(near) and max_sweeps > 0:
        levels[near] = _refine(levels[near], y[near], rows, cols, max_sweeps)
    return levels.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Sample-set metrics
# ---------------------------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples; ``np.cov``'s N-1 normalisation, as the ADM evaluator)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature rows [N, F], got shape {tuple(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) (the ADM evaluator's and
    TTUR's formula; an offset ``eps`` on the diagonals when the product's square root is not finite)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        # the product of two PSD matrices has a real square root; an imaginary part is numerical noise
        covmean = covmean.real
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def diversity(images, labels) -> float:
    """Mean pairwise L2 distance (pixels 0..16) between images of the same label, averaged over the labels
    that have at least two images."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    y = np.asarray(labels)
    per_class = []
    for c in np.unique(y):
        xc = x[y == c]
        if len(xc) < 2:
            continue
        sq = (xc * xc).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * xc @ xc.T, 0.0)
        iu = np.triu_indices(len(xc), 1)
        per_class.append(float(np.sqrt(d2[iu]).mean()))
    if not per_class:
        raise ValueError("diversity needs at least two images of one label")
    return float(np.mean(per_class))


def digit_metrics(judge, images, labels, reference_images) -> dict:
    """``{"accuracy", "fd", "diversity"}`` of generated digits ``images`` [N, 8, 8] (0..16) prompted with
    ``labels``: the share the judge assigns to the prompted class, the Fréchet distance between the judge
    features of the samples and of ``reference_images`` (the real held-out digits), and ``diversity``."""
    mu1, s1 = feature_stats(judge.features(images))
    mu2, s2 = feature_stats(judge.features(reference_images))
    return {"accuracy": judge.accuracy_on(images, labels), "fd": frechet_distance(mu1, s1, mu2, s2),
            "diversity": diversity(images, labels)}


def reference_figures(judge, train_images, heldout_images, heldout_labels) -> dict:
    """The figures of real digits, to read the samples' on: the judge's held-out accuracy, the Fréchet distance
    of the training split against the held-out one (roughly the floor a perfect generator reaches at these
    sample sizes) and the held-out split's diversity."""
    mu1, s1 = feature_stats(judge.features(train_images))
    mu2, s2 = feature_stats(judge.features(heldout_images))
    return {"judge_heldout_accuracy": judge.accuracy_on(heldout_images, heldout_labels),
            "fd_train_vs_heldout": frechet_distance(mu1, s1, mu2, s2),
            "diversity_heldout": diversity(heldout_images, heldout_labels),
            "train_samples": int(len(train_images)), "heldout_samples": int(len(heldout_images))}


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------
# A digit is named by its word ("seven") or numeral ("7") as a whole word: the caption templates of
# tools/make_shards.py use both ("a handwritten seven", "the digit 7"). Word boundaries keep "someone" or
# "17" from naming one.
_DIGIT_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(NUMBER_WORDS) + r"|[0-9])(?![a-z0-9])", re.IGNORECASE)


def digits_named(caption: str) -> set[int]:
    """The digits a caption names, by word or numeral."""
    out = set()
    for m in _DIGIT_RE.finditer(caption):
        t = m.group(1).lower()
        out.add(int(t) if t.isdigit() else NUMBER_WORDS.index(t))
    return out


def caption_accuracy(captions: Iterable[str], labels) -> float:
    """Share of ``captions`` that name their image's digit and no other (a caption naming none, or two, is
    wrong)."""
    caps, ys = list(captions), [int(v) for v in np.asarray(labels).reshape(-1)]
    if len(caps) != len(ys):
        raise ValueError(f"{len(caps)} captions but {len(ys)} labels")
    if not caps:
        return float("nan")
    return float(np.mean([digits_named(c) == {y} for c, y in zip(caps, ys)]))
