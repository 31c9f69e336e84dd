"""Checkpoint conversion: what `tools/convert_checkpoint.py` runs, one module per subcommand family.

- `canonical`: the one state-dict naming every flat state dict megacca reads or writes uses, whichever
  attention backend (local spec / Transformer Engine) made it, and the tensor-parallel layout of each tensor.
- `files`: reading input checkpoints without running code from them, and writing outputs atomically.
- `write`: a model-only megacca checkpoint from a full state dict (what the importers produce).
- `hf`: `to-hf` / `from-hf`, Hugging Face `LlamaForCausalLM` folders.
- `reshard`: a run's checkpoint at another tp / pp layout, optimizer state and data positions carried.
- `consolidate`: one full-precision safetensors file from any megacca checkpoint.

The format itself (names, qkv order, fc1 order, padded vocabulary rows) is in docs/checkpoint-format.md.
"""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; the message names the file or key, the shapes and why.
    The tool prints it as one line and exits with code 2."""
