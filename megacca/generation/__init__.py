"""Inference from a `UnifiedGPT`: KV-cache sampling with constraints and classifier-free guidance
(`generate`), and whole-sequence logits (`full_logits`). See `megacca.generation.sampler`."""
from megacca.generation.sampler import full_logits, generate

__all__ = ["generate", "full_logits"]
