"""Worker for tests/test_convert.py: things that need a model (and so a process group) in a fresh process.

    python tests/convert_worker.py logits CKPT IDS OUT   full logits [B, S, Vp] (every padded row) of the token
                                                         ids in IDS (safetensors, "ids") at tp = 1 from the
                                                         checkpoint's canonical state dict, to OUT
    python tests/convert_worker.py te CKPT OUT_DIR       the Transformer Engine spellings of CKPT's weights
                                                         loaded into the local-spec model (see test_convert.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _model(ckpt):
    from megacca.checkpoint import read_trainer_state
    from megacca.config import Config, from_dict
    from megacca.convert.write import single_rank_config
    from megacca.model.gpt import build_model

    cfg = single_rank_config(from_dict(Config, read_trainer_state(ckpt)["config"]))
    cfg.model.attention_backend = "sdpa"
    return build_model(cfg).eval(), cfg


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    from megacca.model.gpt import UnifiedGPT

    with torch.no_grad():
        return UnifiedGPT.forward(model, ids).float()


def logits(ckpt: str, ids_file: str, out: str) -> None:
    from megacca.checkpoint import load_full_state_dict, read_full_state_dict

    model, _ = _model(ckpt)
    load_full_state_dict(model, read_full_state_dict(ckpt), ckpt)
    save_file({"logits": _logits(model, load_file(ids_file)["ids"]).contiguous()}, out)


def te(ckpt: str, out_dir: str) -> None:
    """A Transformer Engine model's weights, made without TE (which needs CUDA) by spelling the local model's
    weights as TE does, loaded into the local spec through the real load paths:
    1. the flat state dict (`state_dict()` of a TE model: norms fused into linear_qkv / linear_fc1, fp8
       `_extra_state` blobs, core_attention's `_extra_state`) through `load_full_state_dict`;
    2. a distributed checkpoint with a TE model's extra objects (core_attention._extra_state, fp8 metadata
       in the linears' `_extra_state`) through `load_model_weights`, the path of train.init_from.
    Writes the reference logits and both loads' logits to OUT_DIR/te.safetensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megacca.checkpoint import (load_full_state_dict, load_model_weights, read_full_state_dict,
                                    save_dist_checkpoint)
    from megacca.convert.canonical import CANONICAL_TO_TE, is_extra_state

    out = Path(out_dir)
    model, cfg = _model(ckpt)
    load_full_state_dict(model, read_full_state_dict(ckpt), ckpt)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    reference = _logits(model, ids)

    # TE's get_extra_state: its fp8 scaling metadata serialised into a uint8 tensor (a plain tensor, so that
    # weights_only loads take it)
    fp8_meta = torch.frombuffer(bytearray(b"fp8 scaling factors"), dtype=torch.uint8).clone()
    te_flat = {}
    for key, value in model.state_dict().items():
        head, _, suffix = key.partition(".layers.")
        n, _, rest = suffix.partition(".")
        if rest in CANONICAL_TO_TE:
            key = f"{head}.layers.{n}.{CANONICAL_TO_TE[rest]}"
        te_flat[key] = fp8_meta if is_extra_state(key) else value.clone()
    for n in range(cfg.model.num_layers):
        te_flat[f"decoder.layers.{n}.self_attention.core_attention._extra_state"] = fp8_meta
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in te_flat)

    flat_model, _ = _model(ckpt)
    fresh = _logits(flat_model, ids)  # (the freshly initialised model: loading must change it)
    try:  # what loading it without the canonical mapping does
        flat_model.load_state_dict(te_flat)
        plain_load_fails = False
    except RuntimeError:
        plain_load_fails = True
    load_full_state_dict(flat_model, te_flat, "TE state dict")

    sharded = model.sharded_state_dict()
    for value in sharded.values():
        if isinstance(value, ShardedObject):
            value.data = fp8_meta
    for n in range(cfg.model.num_layers):
        sharded[f"decoder.layers.{n}.self_attention.core_attention._extra_state"] = ShardedObject(
            "decoder.layers.self_attention.core_attention._extra_state", fp8_meta, (cfg.model.num_layers,), (n,),
            replica_id=0)
    save_dist_checkpoint({"model": sharded}, out / "te_ckpt")
    dist_model, _ = _model(ckpt)
    load_model_weights(dist_model, out / "te_ckpt")
    save_file({"reference": reference, "fresh": fresh, "flat": _logits(flat_model, ids),
               "dist": _logits(dist_model, ids), "plain_load_fails": torch.tensor(plain_load_fails)},
              str(out / "te.safetensors"))


def main() -> None:
    from megacca.convert.write import single_process

    with single_process():
        {"logits": logits, "te": te}[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
