"""The unified decoder: megatron-core's GPTModel over one vocabulary of text pieces, image codes and specials.

Llama-style (RMSNorm, SwiGLU, rotary, no biases, untied embeddings). We compose megatron-core pieces and
fork none: the layer spec is megatron's local spec (or the Transformer Engine spec when TE runs the
attention) with only the core-attention submodule swapped for SDPA / flash-attn. Tensor, sequence and
pipeline parallelism come from the same megatron-core modules; `build_model` only needs `parallel_state`
initialised. The one addition is 2D rotary for image spans (`megacca.model.rope`).

State-dict names are megatron-core's (`embedding.word_embeddings.weight`, `decoder.layers.N.self_attention.
linear_qkv.weight`, `...mlp.linear_fc1.weight` (gate and up stacked), `decoder.final_layernorm.weight`,
`output_layer.weight`); checkpoint converters map from these.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megacca.config import Config
from megacca.model.attention import FlashAttention, SDPAttention, resolve_backend
from megacca.model.rope import positions_2d, rotary_emb_2d

log = logging.getLogger(__name__)
_LOGGED_BACKEND = False


def transformer_config(cfg: Config) -> TransformerConfig:
    m, par = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        sequence_parallel=par.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # CPU init draws the full weight with one generator and slices it, so every tp layout starts from the
        # same weights (what the tp parity tests rely on). Pipeline stages build only their own layers, so they
        # draw in another order: a pp>1 run starts from other weights unless it loads them (train.init_from).
        # On GPU it is only slower.
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA (and apex / TE); torch paths on CPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,  # 2D rotary passes per-sample angles, which the fused kernel does not take
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=False,
    )


class TorchRMSNorm:
    """torch RMSNorm whose weight carries `sequence_parallel`, so megatron's grad finalisation all-reduces it
    over the tp group. megatron's WrappedTorchNorm refuses sequence parallelism only because nothing marks
    the weight; this is the same module with the mark (the TE/apex norms do the same internally)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(backend: str, num_layers: int, sequence_parallel: bool):
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if backend in ("sdpa", "flash"):
        attn = spec.submodules.self_attention.submodules
        attn.core_attention = FlashAttention if backend == "flash" else SDPAttention
    if not sequence_parallel:
        return spec
    spec.submodules.input_layernorm = TorchRMSNorm
    spec.submodules.pre_mlp_layernorm = TorchRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=TorchRMSNorm)


class UnifiedGPT(GPTModel):
    """GPTModel plus 2D rotary: `forward(tokens, labels=None)` returns logits [B, S, V/tp] or NLL [B, S]."""

    def __init__(self, cfg: Config, pre_process: bool = True, post_process: bool = True, vp_stage=None):
        global _LOGGED_BACKEND
        backend = resolve_backend(cfg.model.attention_backend)
        if not _LOGGED_BACKEND:
            log.info("attention backend: %s", backend)
            _LOGGED_BACKEND = True
        self.attention_backend = backend
        super().__init__(
            config=transformer_config(cfg),
            transformer_layer_spec=layer_spec(backend, cfg.model.num_layers, cfg.parallel.sequence_parallel),
            vocab_size=cfg.padded_vocab_size(),
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp_stage,
        )
        self.rope_mode = cfg.model.rope
        self.boi_token_id = cfg.model.boi_token_id
        self.image_grid = cfg.model.image_grid
        self.head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
        self._pos2d = None

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if self.rope_mode == "2d" and self._pos2d is not None:
            emb = rotary_emb_2d(self._pos2d, self.head_dim, self.rotary_base)
            out = (out[0], emb.to(out[1].device), *out[2:])
        return out

    def forward(self, input_ids, position_ids=None, attention_mask=None, *args, labels=None, **kwargs):
        # Every pipeline stage receives the token ids (our schedule feeds them to all stages), so even stages
        # without the embedding can compute the 2D positions their rotary needs.
        if self.rope_mode == "2d":
            self._pos2d = positions_2d(input_ids, self.boi_token_id, self.image_grid)
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, labels=labels, **kwargs)
        finally:
            self._pos2d = None


def build_model(cfg: Config, vp_stage=None) -> UnifiedGPT:
    """Build this rank's part of the model (parallel_state must be initialised)."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return UnifiedGPT(cfg, pre_process=pre, post_process=post, vp_stage=vp_stage)


def summed_logprobs(per_token_nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of log-probs over `mask` [B, S] from the model's per-token NLL [B, S]."""
    return -(per_token_nll.float() * mask.float()).sum(dim=-1)


def sequence_logprobs(model: UnifiedGPT, tokens: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Summed log p(labels | tokens) over `mask` per sequence [B].

    Computed from megatron-core's vocab-parallel cross-entropy (each tp rank holds V/tp logits; only a max,
    a sum and the target logit are all-reduced), so the full-vocab logits are never gathered. This is the
    building block of the DPO and CCA stages. Pipeline: call on the last stage (other stages return hidden
    states).
    """
    nll = model(tokens, None, None, labels=labels)
    return summed_logprobs(nll, mask)


def describe(cfg: Config) -> dict:
    """Static facts about the configured model, for logs."""
    return {"layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size, "heads": cfg.model.num_attention_heads,
            "vocab": cfg.model.vocab_size, "padded_vocab": cfg.padded_vocab_size(), "seq": cfg.model.seq_length,
            "rope": cfg.model.rope, **{k: v for k, v in dataclasses.asdict(cfg.parallel).items()}}
