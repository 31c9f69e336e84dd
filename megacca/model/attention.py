"""Core attention backends for the megatron-core layer spec, and the choice between them.

`SDPAttention` subclasses megatron-core's `DotProductAttention` (same constructor, same [s, b, h, d] in /
[s, b, h*d] out contract) and only replaces the math: `flash_attn_func` when flash-attn is installed and the
tensors are CUDA fp16/bf16, else `torch.nn.functional.scaled_dot_product_attention` (which itself picks
flash/mem-efficient kernels on GPU and a fused kernel on CPU).

Masks. Training never passes a mask (packed causal sequences), and that path is exactly the fused causal
kernel (`is_causal=True` / flash `causal=True`). Inference passes what megatron's static KV cache and our
sampler give it, and each case is honoured:
  - `attention_mask` (bool, True = masked out, broadcastable to [b, heads, sq, sk], megatron's convention) is
    always applied when given;
  - `causal` (and `causal_bottom_right`) adds the causal constraint aligned so that the last query is the
    last key: query i sits at absolute position sk - sq + i and sees keys 0..sk-sq+i. That is the decode
    case (sq < sk: new tokens after a cache); torch's `is_causal` aligns top-left, which is only right for
    sq == sk, so it is used only then;
  - `no_mask` (what megatron's KV cache switches to after the prefill) applies the mask alone, if any;
  - `padding`, `arbitrary`, `padding_causal` need a mask and refuse to run without one.
Anything else (sliding windows, softmax variants, attention bias, packed sequences) raises.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

try:  # GPU-only extra
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    flash_attn_func = None

_CAUSAL = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)
_NEEDS_MASK = (AttnMaskType.padding, AttnMaskType.arbitrary, AttnMaskType.padding_causal)


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


def sdpa_mask(mask_type: AttnMaskType, attention_mask: Optional[torch.Tensor], sq: int, sk: int,
              device) -> tuple[bool, Optional[torch.Tensor]]:
    """(is_causal, keep) for torch SDPA: keep is a bool tensor, True = may attend (the opposite of megatron's
    mask), or None. is_causal is True only for the unmasked square causal case (the fused training path)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"SDPAttention: attention_mask must be bool (True = masked out), got {attention_mask.dtype}")
    causal = mask_type in _CAUSAL or mask_type == AttnMaskType.padding_causal
    if mask_type in _NEEDS_MASK and attention_mask is None:
        raise ValueError(f"SDPAttention: attn_mask_type={mask_type.name} needs an attention_mask, got None")
    if not causal and mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary):
        raise NotImplementedError(f"SDPAttention: attn_mask_type={mask_type.name} is not supported")
    if not causal or sq == 1:  # a single query at the end sees every key: causal adds nothing
        return False, None if attention_mask is None else ~attention_mask
    if attention_mask is None and sq == sk:
        return True, None
    if sq > sk:
        raise ValueError(f"SDPAttention: causal attention with more queries ({sq}) than keys ({sk})")
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    return False, keep if attention_mask is None else keep & ~attention_mask


class SDPAttention(DotProductAttention):
    """Attention through flash-attn or torch SDPA, honouring mask types and masks (see module docstring)."""

    use_flash: bool = False

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("SDPAttention: sliding-window attention is not supported "
                                      "(use model.attention_backend=local or te)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"SDPAttention: softmax_type={config.softmax_type} is not supported")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are not supported "
                                      "(use model.attention_backend=te)")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal, keep = sdpa_mask(mask_type, attention_mask, sq, sk, query.device)
        p = self.attention_dropout.p if self.training else 0.0
        # The rng fork only matters when dropout draws; skipping it otherwise saves two RNG-state copies per
        # layer per decoding step and changes no random stream.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext()
        if (self.use_flash and keep is None and query.is_cuda
                and query.dtype in (torch.float16, torch.bfloat16)):
            # flash-attn wants [b, s, h, d] and repeats GQA heads itself.
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            with rng:
                out = flash_attn_func(q, k, v, dropout_p=p, softmax_scale=self.softmax_scale, causal=is_causal)
            return out.transpose(0, 1).reshape(sq, b, np_ * hn)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, is_causal=is_causal,
                                                 scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class FlashAttention(SDPAttention):
    use_flash = True
