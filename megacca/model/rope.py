"""Rotary position layouts: 1D (megatron-core's own) and 2D (row, column) for image-code spans.

2D layout (LlamaGen-style, in megatron's non-interleaved "rotate half" convention): with head dim d, the d/2
rotation pairs are (i, i + d/2); pairs 0..d/4-1 rotate by the row position and pairs d/4..d/2-1 by the column
position, with inverse frequencies base^(-4j/d) for j < d/4 (LlamaGen's `precompute_freqs_cis_2d`, whose
complex pairs are interleaved (2i, 2i+1): a converter permutes q/k rows between the two conventions).

Positions in a mixed sequence: a text token at index t sits at (P, P) with P = t - (G*G - G) * (images
completed before t); the G*G codes after a `<boi>` at position P_b sit at (P_b + 1 + r, P_b + 1 + c). So an
image occupies G positions along each axis and the text after it continues at P_b + 1 + G, as in M-RoPE.
A sequence of text only gets (t, t), which 2D rotary treats like 1D rotary with the same angle on both halves.
"""
from __future__ import annotations

import torch


def positions_2d(tokens: torch.Tensor, boi_id: int, grid: int) -> torch.Tensor:
    """Row/column positions [B, S, 2] for `tokens` [B, S] (see module docstring)."""
    b, s = tokens.shape
    ar = torch.arange(s, device=tokens.device).expand(b, s)
    last_boi = torch.cummax(torch.where(tokens == boi_id, ar, torch.full_like(ar, -1)), dim=1).values
    off = ar - last_boi - 1
    in_img = (last_boi >= 0) & (off >= 0) & (off < grid * grid)
    ends = in_img & (off == grid * grid - 1)
    completed_before = torch.cumsum(ends.long(), dim=1) - ends.long()
    p = ar - (grid * grid - grid) * completed_before
    base = torch.gather(p, 1, last_boi.clamp(min=0)) + 1
    row = torch.where(in_img, base + torch.div(off, grid, rounding_mode="floor"), p)
    col = torch.where(in_img, base + off % grid, p)
    return torch.stack([row, col], dim=-1)


def rotary_emb_2d(pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotary angles [S, B, 1, head_dim] for positions [B, S, 2], megatron's layout (cat(freqs, freqs))."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, quarter, dtype=torch.float32, device=pos.device) * 4 / head_dim))
    pos = pos.float()
    freqs = torch.cat([pos[..., 0:1] * inv_freq, pos[..., 1:2] * inv_freq], dim=-1)  # [B, S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, d]
    return emb.transpose(0, 1).unsqueeze(2).contiguous()
