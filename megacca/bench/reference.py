"""A plain-PyTorch Llama of the same shape as a megacca preset: the baseline the benchmarks compare against.

Same parameter shapes and count as `megacca.model.gpt.UnifiedGPT` for the config (padded vocabulary, GQA,
SwiGLU with gate and up stacked, RMSNorm, 1D rotary, causal SDPA, untied output), the same loss (token-mean
NLL over the loss mask), AdamW with the same decay groups and gradient clipping. No megatron-core, no
DeepSpeed: what the step would cost with nothing but torch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacca.config import Config
from megacca.optim import param_groups


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, h: int, heads: int, groups: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.groups, self.d = heads, groups, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=eps), nn.RMSNorm(h, eps=eps)
        self.qkv = nn.Linear(h, (heads + 2 * groups) * self.d, bias=False)
        self.proj = nn.Linear(heads * self.d, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.d, self.groups * self.d, self.groups * self.d], -1)
        q = _rope(q.view(b, s, self.heads, self.d).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, s, self.groups, self.d).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.groups, self.d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class ReferenceLlama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        v, h = cfg.padded_vocab_size(), m.hidden_size
        self.embed = nn.Embedding(v, h)
        self.blocks = nn.ModuleList(Block(h, m.num_attention_heads, m.num_query_groups or m.num_attention_heads,
                                          m.ffn_hidden_size, m.norm_epsilon) for _ in range(m.num_layers))
        self.norm = nn.RMSNorm(h, eps=m.norm_epsilon)
        self.out = nn.Linear(h, v, bias=False)
        d = h // m.num_attention_heads
        inv = 1.0 / (m.rotary_base ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(m.seq_length).float(), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            nn.init.normal_(p, std=m.init_method_std) if p.dim() > 1 else nn.init.ones_(p)

    def forward(self, tokens, labels, loss_mask):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = self.out(self.norm(x))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        return (nll * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1)


class ReferenceTrainer:
    """One optimizer step per call over a list of micro-batches, like the engines' `train_step`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = ReferenceLlama(cfg)
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps)

    def train_step(self, micro_batches: list[dict]) -> float:
        total = 0.0
        for mb in micro_batches:
            loss = self.model(mb["tokens"], mb["labels"], mb["loss_mask"]) / len(micro_batches)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total
