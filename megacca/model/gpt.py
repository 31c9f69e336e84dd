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
from megacca.model.rope import positions_2d, positions_llamagen, rotary_emb_1d, rotary_emb_2d, rotary_positions

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
    """GPTModel plus 2D rotary: `forward(tokens, labels=None)` returns logits [B, S, V/tp] or NLL [B, S].

    Rotary positions are absolute. Training passes nothing: 1D rotary is megatron's own (0..S-1) and 2D rotary
    is `positions_2d` of the tokens. Inference (megacca.generation) passes `rotary_positions`: the positions of
    every key the attention sees, computed over each row's whole history (and counted from the first real
    token of a left-padded row). With megatron's static KV cache (`inference_context`) that is the cached
    prefix plus this chunk, [B, offset + S(, 2)], because that cache stores keys before rotary and rotates all
    of them at every step (megatron/core/transformer/attention.py, `_adjust_key_value_for_inference`).

    `model.layout: llamagen` (LlamaGen's class-conditional GPT): a token outside the image-code range is a
    condition whose query and key are zero in every layer. LlamaGen gets that from all-zero rows of its rotary
    table, which no rotation angle gives, so a hook on each layer's fused qkv projection zeroes those rows of
    the condition positions (before rotary, so before megatron's KV cache stores the key: a cached condition
    key stays zero). `model.logprob_norm: codebook`: the loss (per-token NLL) of a position whose label is an
    image code is normalised over the codebook only; each tp rank masks the non-code logits of its own slice.
    """

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
        self.unpadded_vocab_size = cfg.model.vocab_size  # logits beyond it are the padding rows
        self.layout, self.logprob_norm = cfg.model.layout, cfg.model.logprob_norm
        m = cfg.model
        self.code_range = None if m.image_token_offset is None or m.codebook_size is None else \
            (m.image_token_offset, m.image_token_offset + m.codebook_size)
        self._rotary = None
        self._keep_qk = None  # LlamaGen layout: [S, B, 1, 1], False at the condition positions of this forward
        if self.layout == "llamagen":
            for layer in self.decoder.layers:
                layer.self_attention.linear_qkv.register_forward_hook(self._zero_condition_qk)

    def _zero_condition_qk(self, module, args, output):
        """Forward hook on `linear_qkv` (LlamaGen layout): zero the query and key of the condition positions.
        Its output is [S, B, groups_local * (heads/groups + 2) * d], each group holding its query heads, its
        key and its value: the first heads/groups + 1 head slots are zeroed, the value kept."""
        mixed, bias = output
        c = self.config
        per = c.num_attention_heads // (c.num_query_groups or c.num_attention_heads)
        s, b, width = mixed.shape
        grouped = mixed.view(s, b, width // ((per + 2) * self.head_dim), (per + 2) * self.head_dim)
        qk, v = grouped.split([(per + 1) * self.head_dim, self.head_dim], dim=-1)
        qk = qk.masked_fill(~self._keep_qk, 0.0)
        return torch.cat([qk, v], dim=-1).view(s, b, width), bias

    def history_positions(self, tokens: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Absolute rotary positions of a token history [B, S] (what `rotary_positions` takes): see
        `megacca.model.rope.rotary_positions`; `start` [B]: the first real token of left-padded rows."""
        return rotary_positions(tokens, self.rope_mode, self.boi_token_id, self.image_grid, start,
                                self.code_range if self.layout == "llamagen" else None)

    def rotary_emb(self, positions: torch.Tensor) -> torch.Tensor:
        """Per-row rotary angles [S, B, 1, head_dim] for absolute positions [B, S] (1d) or [B, S, 2] (2d)."""
        if self.rope_mode == "2d":
            return rotary_emb_2d(positions, self.head_dim, self.rotary_base)
        return rotary_emb_1d(positions, self.rotary_pos_emb.inv_freq)

    def _rotary_for(self, input_ids, rotary_positions, inference_context):
        """The angles this forward uses, or None for megatron's own 1D rotary."""
        offset = inference_context.sequence_len_offset if inference_context is not None else 0
        if rotary_positions is not None:
            b, s = rotary_positions.shape[:2]
            ndim = 3 if self.rope_mode == "2d" else 2
            if b not in (1, input_ids.shape[0]) or s != offset + input_ids.shape[1] or rotary_positions.dim() != ndim:
                raise ValueError(f"rotary_positions has shape {tuple(rotary_positions.shape)}; {self.rope_mode} "
                                 f"rotary over {offset} cached + {input_ids.shape[1]} new positions needs "
                                 f"({input_ids.shape[0]} or 1, {offset + input_ids.shape[1]}"
                                 f"{', 2' if ndim == 3 else ''})")
            return self.rotary_emb(rotary_positions)
        if self.rope_mode != "2d":
            return None
        if offset:
            raise ValueError("2D rotary after a KV-cache prefill needs rotary_positions: the <boi> locations "
                             "that place this chunk are in the cached prefix (megacca.model.rope.rotary_positions)")
        if self.layout == "llamagen":
            return rotary_emb_2d(positions_llamagen(input_ids, self.code_range, self.image_grid), self.head_dim,
                                 self.rotary_base)
        return rotary_emb_2d(positions_2d(input_ids, self.boi_token_id, self.image_grid), self.head_dim,
                             self.rotary_base)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """megatron's vocab-parallel NLL [B, S]; with `logprob_norm: codebook` over the codebook alone at the
        positions whose label is an image code (logits [S, B, V/tp]: this rank's slice of the vocabulary)."""
        if self.logprob_norm == "codebook":
            lo, hi = self.code_range
            n = logits.shape[-1]
            first = parallel_state.get_tensor_model_parallel_rank() * n
            ids = torch.arange(first, first + n, device=logits.device)
            not_code = (ids < lo) | (ids >= hi)
            code_label = ((labels >= lo) & (labels < hi)).transpose(0, 1)
            logits = logits.masked_fill(code_label[..., None] & not_code, float("-inf"))
        return super().compute_language_model_loss(labels, logits)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if self._rotary is not None:
            out = (out[0], self._rotary.to(out[1].device), *out[2:])
        return out

    def forward(self, input_ids, position_ids=None, attention_mask=None, *args, labels=None,
                rotary_positions=None, **kwargs):
        """megatron's GPTModel.forward, plus `rotary_positions`: None (training: see the class docstring) or
        absolute positions [B or 1, cached + S] (1d) / [B or 1, cached + S, 2] (2d); a batch dimension of 1
        is shared by every row (its angles are computed once, not per row)."""
        # Every pipeline stage receives the token ids (our schedule feeds them to all stages), so even stages
        # without the embedding can compute the 2D positions their rotary needs.
        self._rotary = self._rotary_for(input_ids, rotary_positions, kwargs.get("inference_context"))
        if self.layout == "llamagen":
            lo, hi = self.code_range
            self._keep_qk = ((input_ids >= lo) & (input_ids < hi)).transpose(0, 1)[..., None, None]
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, labels=labels, **kwargs)
        finally:
            self._rotary = None
            self._keep_qk = None


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
