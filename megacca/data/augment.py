"""Augmentation conditioning (docs/data-format.md, "Augmented samples").

An augmented copy of a training image carries, in its json, ``"augment": {"text": str, ...}``. The loader
appends the pieces of ``text`` to the sample's condition (``<bos> <class_k> AUG <boi> ...``), so the model
learns the augmentation as part of the condition instead of as part of the image distribution: a prompt
without augmentation words (``<bos> <class_k> <boi>``) asks for the un-augmented images, as in EDM's
augmentation conditioning (Karras et al. 2022). Plain augmentation, without the condition, makes the model
generate augmented images (shifted digits in the digits demo).

The shifts of `tools/make_shards.py digits --augment-shifts` live here too: the 8 one-pixel neighbour shifts,
vacated pixels filled with the background value 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["SHIFTS", "FILL", "shift_image", "shift_text", "shift_record", "augment_text", "is_augmented"]

# All 8 neighbours, not only the 4 axis shifts: a writer's offset is as likely diagonal as straight, and the
# plain-PyTorch miniature that showed shift conditioning working used these 8 (+ no shift).
SHIFTS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0))
# The digits' background value (0 of 0..16, stored as 0 of 0..255). The 8x8 digits use all 8 rows, so a
# vertical shift always drops a row of ink (12% of it on average; a horizontal one rarely drops any): such copies
# are partial digits, which is harmless because they are marked by their condition and never sampled.
FILL = 0
_HORIZONTAL = {-1: "left", 0: None, 1: "right"}
_VERTICAL = {-1: "up", 0: None, 1: "down"}


def shift_image(img: np.ndarray, dx: int, dy: int, fill: int = FILL) -> np.ndarray:
    """``img`` [h, w] moved ``dx`` pixels right and ``dy`` down (negative: left / up); pixels moved out are
    dropped, vacated ones get ``fill``."""
    img = np.asarray(img)
    h, w = img.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        raise ValueError(f"shift ({dx}, {dy}) moves the whole {h}x{w} image out")
    out = np.full_like(img, fill)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def shift_text(dx: int, dy: int) -> str:
    """The condition words of a one-pixel shift: ``up left``, ``up``, ..., ``down right`` (vertical first).
    No leading "shift": the digits' 128-piece sentencepiece model then spends its merges on the direction
    words (3.4 pieces per shift on average instead of 5.5), and none of these words occurs in a caption."""
    if (dx, dy) not in SHIFTS:
        raise ValueError(f"not a one-pixel shift: ({dx}, {dy})")
    return " ".join(w for w in (_VERTICAL[dy], _HORIZONTAL[dx]) if w)


def shift_record(dx: int, dy: int) -> dict:
    """The json ``augment`` object of a shifted copy: ``shift`` [dx, dy] (right / down positive, pixels of the
    stored image) and the condition ``text``."""
    return {"shift": [int(dx), int(dy)], "text": shift_text(dx, dy)}


def is_augmented(meta: dict) -> bool:
    """Whether a sample's json marks it as an augmented copy (readers that want the real images skip these)."""
    return isinstance(meta, dict) and meta.get("augment") is not None


def augment_text(meta: dict) -> Optional[str]:
    """The condition words of a sample's augmentation, or None for an un-augmented sample; ValueError when
    ``augment`` is not an object with a non-empty string ``text``."""
    aug = meta.get("augment") if isinstance(meta, dict) else None
    if aug is None:
        return None
    text = aug.get("text") if isinstance(aug, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"json 'augment' must be an object with a non-empty string 'text', got {aug!r}")
    return text
