"""Named model sizes. A preset fills `model.*`; keys set in YAML or on the command line override it.

LlamaGen sizes follow FoundationVision/LlamaGen `autoregressive/models/gpt.py` (GPT_B ... GPT_3B: layers,
heads, width; SwiGLU width = 2/3 * 4 * dim rounded up to a multiple of 256), with the class-conditional
vocabulary of a VQ-16 tokenizer (16,384 codes) plus 1,000 ImageNet class tokens and our 8 specials in one
embedding. Parameter counts (`megacca.model.flops.param_count`) match the published 111M/343M/775M/1.4B/3.1B.
"""
from __future__ import annotations

_C2I_VOCAB = 8 + 1000 + 16384  # specials + ImageNet classes + VQ-16 codebook (docs/data-format.md)
_C2I_SEQ = 264  # <bos> <class> <boi> 16x16 codes <eoi> <eos> = 261, rounded up to a multiple of 8


def _llamagen(layers: int, heads: int, dim: int, ffn: int) -> dict:
    return dict(num_layers=layers, num_attention_heads=heads, hidden_size=dim, ffn_hidden_size=ffn,
                vocab_size=_C2I_VOCAB, seq_length=_C2I_SEQ, rope="2d", image_grid=16, norm_epsilon=1e-5)


PRESETS: dict[str, dict] = {
    # Runs a training step on a 2-core CPU in milliseconds; what tests and CI use.
    "debug": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                  vocab_size=512, seq_length=128),
    # ~1M parameters, 2D rotary over a 4x4 code grid: the digits demo's unified model (launch/demo.sh); a
    # training step of 16 x 96 tokens takes about 0.1 s on 2 CPU cores.
    "digits": dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352,
                   seq_length=96, rope="2d"),
    # ~20M parameters: the second benchmark point, still CPU-trainable.
    "small": dict(num_layers=8, hidden_size=384, num_attention_heads=6, ffn_hidden_size=1024,
                  vocab_size=8192, seq_length=256),
    "llamagen-B": _llamagen(12, 12, 768, 2048),
    "llamagen-L": _llamagen(24, 16, 1024, 2816),
    "llamagen-XL": _llamagen(36, 20, 1280, 3584),
    "llamagen-XXL": _llamagen(48, 24, 1536, 4096),
    "llamagen-3B": _llamagen(24, 32, 3200, 8704),
    # Llama-2-7B body over a unified vocabulary: 32k text pieces + 16,384 image codes + specials.
    "unified-7B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                       vocab_size=8 + 32000 + 16384, seq_length=4096, rope="1d"),
}
