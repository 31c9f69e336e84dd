"""Text tokenizer: a thin wrapper over a sentencepiece ``.model``.

Ids here are *sentencepiece* ids ``0 .. vocab_size-1`` (0 is ``<unk>``); the unified vocabulary
(``megacca.tokenizer.vocab.UnifiedVocab``) shifts them by its ``text_offset``.  The model is trained by
``tokenizers/train_text.py`` with sentencepiece's own bos/eos/pad disabled, because ``<bos>``, ``<eos>`` and
``<pad>`` belong to the unified vocabulary.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import sentencepiece as spm

__all__ = ["TextTokenizer"]


class TextTokenizer:
    """``encode(str) -> list[int]`` / ``decode(ids) -> str`` over a sentencepiece model file."""

    def __init__(self, model_path: str):
        self.path = os.fspath(model_path)
        try:
            with open(self.path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise FileNotFoundError(f"{self.path}: cannot read sentencepiece model: {e.strerror}") from e
        # sha256 of exactly the bytes that were loaded.
        self.sha256: str = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError depending on version
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from e
        self.vocab_size: int = int(self._sp.GetPieceSize())
        self.unk_id: int = int(self._sp.unk_id())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…)"

    def encode(self, s: str) -> list[int]:
        """Sentencepiece ids of ``s`` (no bos/eos are added)."""
        if not isinstance(s, str):
            raise TypeError(f"TextTokenizer.encode expects str, got {type(s).__name__}")
        return list(self._sp.EncodeAsIds(s))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of sentencepiece ids; raises ValueError for an id outside ``[0, vocab_size)``."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"text id {i} out of range [0, {self.vocab_size}) for {self.path}")
        return self._sp.DecodeIds(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))
