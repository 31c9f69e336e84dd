"""Core attention backends for the megatron-core layer spec, and the choice between them.

`SDPAttention` subclasses megatron-core's `DotProductAttention` (same constructor, same [s, b, h, d] in /
[s, b, h*d] out contract) and only replaces the math: `flash_attn_func` when flash-attn is installed and the
tensors are CUDA fp16/bf16, else `torch.nn.functional.scaled_dot_product_attention` (which itself picks
flash/mem-efficient kernels on GPU and a fused kernel on CPU). Our models are always causal without padding
(packing never needs a mask), so the mask argument is ignored, which is exactly what lets these kernels run.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

try:  # GPU-only extra
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    flash_attn_func = None


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: str) -> str:
    """auto → flash (CUDA + flash-attn) → te (CUDA + Transformer Engine) → sdpa."""
    if requested != "auto":
        if requested == "flash" and flash_attn_func is None:
            raise RuntimeError("model.attention_backend=flash but flash-attn is not installed")
        if requested == "te" and not have_te():
            raise RuntimeError("model.attention_backend=te but transformer-engine is not installed")
        return requested
    if torch.cuda.is_available() and flash_attn_func is not None:
        return "flash"
    if torch.cuda.is_available() and have_te():
        return "te"
    return "sdpa"


class SDPAttention(DotProductAttention):
    """Causal attention through flash-attn or torch SDPA (see module docstring)."""

    use_flash: bool = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPAttention"
        sq, b, np_, hn = query.shape
        p = self.attention_dropout.p if self.training else 0.0
        if self.use_flash and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            # flash-attn wants [b, s, h, d] and repeats GQA heads itself.
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = flash_attn_func(q, k, v, dropout_p=p, softmax_scale=self.softmax_scale, causal=True)
            return out.transpose(0, 1).reshape(sq, b, np_ * hn)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class FlashAttention(SDPAttention):
    use_flash = True
