"""A generated data source with the same interface as the streaming loader (docs/data-format.md, Batches).

Each sample is a deterministic function of (seed, sample index): a short "caption" of text-range tokens, a
`<boi>`, an image span of `image_grid**2` code-range tokens with some structure (repeated rows) so that a model
can learn, and `<eoi>`; loss on the image span, as in caption→image pretraining. Samples are split over
data-parallel ranks by index (rank r takes indices r, r + dp, ...), so the global batch is the same set of
samples whatever the dp size, and the position (next index) is the whole resume state.
"""
from __future__ import annotations

import numpy as np
import torch

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
FIRST_REGULAR = 8


class SyntheticSource:
    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, num_samples: int = 100000, image_grid: int = 4):
        if vocab_size < FIRST_REGULAR + 16:
            raise ValueError(f"synthetic data needs vocab_size >= {FIRST_REGULAR + 16}")
        self.v, self.s, self.mb = vocab_size, seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_samples, self.grid = num_samples, image_grid
        self.next_index = 0  # per-rank count of micro-batches already yielded
        half = FIRST_REGULAR + (vocab_size - FIRST_REGULAR) // 2
        self.text_range, self.code_range = (FIRST_REGULAR, half), (half, vocab_size)

    def _sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index % self.num_samples])
        caption = rng.integers(*self.text_range, size=int(rng.integers(3, 12)))
        row = rng.integers(*self.code_range, size=self.grid)
        image = np.concatenate([np.roll(row, int(rng.integers(0, 2))) for _ in range(self.grid)])
        toks = np.concatenate([[BOS], caption, [BOI], image, [EOI, EOS]])
        mask = np.zeros(len(toks), dtype=np.float32)
        mask[len(caption) + 2: len(caption) + 2 + len(image) + 1] = 1.0  # image codes and <eoi> as targets
        return toks, mask

    def _sequence(self, seq_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack whole samples into S+1 tokens (a sample that does not fit ends the sequence, pad-filled)."""
        out = np.full(self.s + 1, PAD, dtype=np.int64)
        tgt_mask = np.zeros(self.s + 1, dtype=np.float32)
        pos, k = 0, 0
        while True:
            toks, mask = self._sample(seq_index * 64 + k)
            if pos + len(toks) > self.s + 1:
                break
            out[pos: pos + len(toks)] = toks
            tgt_mask[pos: pos + len(toks)] = mask
            pos += len(toks)
            k += 1
        # mask[t] says "token t is a target", so the loss mask of labels = seq[1:] is mask[1:].
        return out[:-1], out[1:], tgt_mask[1:]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self.next_index * self.dp_size + self.dp_rank  # global micro-batch slot
        rows = [self._sequence(g * self.mb + i) for i in range(self.mb)]
        self.next_index += 1
        return {"tokens": torch.from_numpy(np.stack([r[0] for r in rows])),
                "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
                "loss_mask": torch.from_numpy(np.stack([r[2] for r in rows]))}

    def state_dict(self) -> dict:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])

    def error_counts(self) -> dict:
        return {}

    def close(self) -> None:
        pass
