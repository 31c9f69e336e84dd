"""FLOPs per token and MFU.

Training FLOPs per token = 6 * (matmul parameters) + 12 * layers * hidden * seq (PaLM appendix B; attention
scores and values counted over the full S x S square, as kernels compute them). Matmul parameters exclude the
input embedding (a lookup) and norms, and include the output layer. `tests/test_model.py` checks the formula
against torch's FlopCounterMode on the real model.
"""
from __future__ import annotations

import torch

from megacca.config import Config

# Dense bf16 peak TFLOP/s per device (vendor datasheets, SXM parts, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def matmul_params(cfg: Config) -> int:
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim
    attn = m.hidden_size * (m.hidden_size + 2 * kv) + m.hidden_size * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return m.num_layers * (attn + mlp) + cfg.padded_vocab_size() * m.hidden_size


def train_flops_per_token(cfg: Config) -> float:
    m = cfg.model
    return 6.0 * matmul_params(cfg) + 12.0 * m.num_layers * m.hidden_size * m.seq_length


def param_count(cfg: Config) -> int:
    """All parameters: matmuls + input embedding + RMSNorm weights (2 per layer + final)."""
    m = cfg.model
    return matmul_params(cfg) + cfg.padded_vocab_size() * m.hidden_size + (2 * m.num_layers + 1) * m.hidden_size


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v
    return None
