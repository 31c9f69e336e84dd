"""VQ image tokenizer: a VQ autoencoder with the module layout of LlamaGen's VQ-16.

- `config`: `VQConfig` (architecture, the tokenizer's `config.json`), presets `vq16` / `tiny`, and the
  training-run config of `tokenizers/train_vq.py`;
- `model`: `VQModel` (encoder, vector quantizer, decoder; state-dict key layout in its docstring);
- `preprocess`: PIL image → model input, model output → uint8;
- `io`: the tokenizer directory (`save_vq` / `load_vq`, safetensors + JSON);
- `llamagen`: LlamaGen's released VQ checkpoints.
"""
from megacca.tokenizer.vq.config import PRESETS, VQConfig, preset, tiny, vq16
from megacca.tokenizer.vq.io import CONFIG_NAME, VQ_FORMAT, WEIGHTS_NAME, load_vq, load_vq_config, save_vq
from megacca.tokenizer.vq.llamagen import config_from_llamagen_state_dict, load_llamagen, read_llamagen_state_dict
from megacca.tokenizer.vq.model import Decoder, Encoder, VectorQuantizer, VQModel, entropy_loss
from megacca.tokenizer.vq.preprocess import preprocess, to_uint8

__all__ = [
    "VQConfig", "VQModel", "VectorQuantizer", "Encoder", "Decoder", "vq16", "tiny", "preset", "PRESETS",
    "preprocess", "to_uint8", "save_vq", "load_vq", "load_vq_config", "CONFIG_NAME", "WEIGHTS_NAME", "VQ_FORMAT",
    "read_llamagen_state_dict", "config_from_llamagen_state_dict", "load_llamagen", "entropy_loss",
]
