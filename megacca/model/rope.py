"""Rotary position layouts: 1D (megatron-core's own) and 2D (row, column) for image-code spans.

2D layout (LlamaGen-style, in megatron's non-interleaved "rotate half" convention): with head dim d, the d/2
rotation pairs are (i, i + d/2); pairs 0..d/4-1 rotate by the row position and pairs d/4..d/2-1 by the column
position, with inverse frequencies base^(-4j/d) for j < d/4 (LlamaGen's `precompute_freqs_cis_2d`, whose
complex pairs are interleaved (2i, 2i+1): a converter permutes q/k rows between the two conventions).

Positions in a mixed sequence: a text token at index t sits at (P, P) with P = t - (G*G - G) * (images
completed before t); the G*G codes after a `<boi>` at position P_b sit at (P_b + 1 + r, P_b + 1 + c). So an
image occupies G positions along each axis and the text after it continues at P_b + 1 + G, as in M-RoPE.
A sequence of text only gets (t, t), which 2D rotary treats like 1D rotary with the same angle on both halves.
The LlamaGen layout (`model.layout: llamagen`) places each image's grid at (0, 0) instead (`positions_llamagen`).

Positions are absolute: they are computed over a row's whole token history, never over the chunk a forward
sees, so a prefill followed by one-token steps gets exactly the angles of one full forward. A left-padded row
(a batch of prompts of different lengths) counts from its first real token, so it gets the positions it has
alone (`rotary_positions(..., start=)`).
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


def positions_llamagen(tokens: torch.Tensor, codes: tuple[int, int], grid: int) -> torch.Tensor:
    """Row/column positions [B, S, 2] in the LlamaGen layout (`model.layout: llamagen`): every token outside
    the image-code range `codes` = (first id, end id) is a condition, and the k-th code after the last one
    sits at (k // grid, k % grid), the grid at (0, 0) right after the condition, as LlamaGen's rotary table
    places it. A condition gets (0, 0); its angle is never used, its query and key being zero."""
    b, s = tokens.shape
    ar = torch.arange(s, device=tokens.device).expand(b, s)
    is_code = (tokens >= codes[0]) & (tokens < codes[1])
    last_cond = torch.cummax(torch.where(is_code, torch.full_like(ar, -1), ar), dim=1).values
    k = torch.where(is_code, ar - last_cond - 1, torch.zeros_like(ar))
    return torch.stack([torch.div(k, grid, rounding_mode="floor"), k % grid], dim=-1)


def rotary_positions(tokens: torch.Tensor, rope: str, boi_id: int, grid: int,
                     start: torch.Tensor | None = None, llamagen_codes: tuple[int, int] | None = None) -> torch.Tensor:
    """Absolute rotary positions of `tokens` [B, S]: [B, S] for 1d rope, [B, S, 2] for 2d.

    `start` [B] (left padding): row r's real tokens begin at index start[r]; its positions count from there,
    as if the padding were not there, and the padding itself gets position 0 (it is never attended to).
    `llamagen_codes` (the image-code id range): the LlamaGen layout's positions (`positions_llamagen`), which
    left padding does not move (a code's position counts from its condition).
    """
    if llamagen_codes is not None:
        return positions_llamagen(tokens, llamagen_codes, grid)
    b, s = tokens.shape
    ar = torch.arange(s, device=tokens.device).expand(b, s)
    pad = None if start is None else ar < start.to(tokens.device)[:, None]
    if rope == "1d":
        pos = ar if start is None else ar - start.to(tokens.device)[:, None]
    elif rope == "2d":
        # The padding counts as text (one position per token, never a <boi>), so a padded row's positions are
        # its unpadded ones shifted by start on both axes.
        tok = tokens if pad is None else tokens.masked_fill(pad, -1)
        pos = positions_2d(tok, boi_id, grid)
        if start is not None:
            pos = pos - start.to(tokens.device)[:, None, None]
    else:
        raise ValueError(f"rope must be '1d' or '2d', got {rope!r}")
    if pad is not None:
        pos = pos.masked_fill(pad if pos.dim() == 2 else pad[..., None], 0)
    return pos


def rotary_emb_1d(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary angles [S, B, 1, head_dim] for per-row positions [B, S], bit-identical to megatron-core's
    `RotaryEmbedding` at those positions (the same outer product with its `inv_freq`, then cat(freqs, freqs))."""
    freqs = pos.to(inv_freq.dtype)[..., None] * inv_freq.to(pos.device)  # [B, S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.transpose(0, 1).unsqueeze(2).contiguous()
