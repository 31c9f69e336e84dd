"""Worker for the multi-process parity tests (run by tests/test_parallel.py under torchrun, 1 or 2 ranks).

    python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py SCENARIO OUT_DIR TP PP SP

Scenarios:
  grads  build the model at (tp, pp, sp); load OUT_DIR/ref_ckpt if it exists, else save it there (the tp=1
         reference run); run one forward/backward of the megatron engine on two fixed micro-batches; write the
         loss, the full-vocab logits of micro-batch 0 and every gradient, gathered to the unsharded tp=1 layout
         with global layer numbers, and the grad_norm the engine's optimizer step reports (before clipping),
         to OUT_DIR/<tag>.*.safetensors. The step also updates the weights: save a distributed checkpoint to
         OUT_DIR/<tag>_ckpt and the logits after the step.
  load   load OUT_DIR/<src>_ckpt (saved at another layout) at this layout and write the logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def make_cfg(tp: int, pp: int, sp: bool):
    from megacca.config import load_config

    # 4 layers (2 per pipeline stage), GQA, 2D rotary over 4x4 image spans, a vocab that needs padding.
    return load_config(None, [
        "parallel.engine=megatron", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.sequence_parallel={'true' if sp else 'false'}",
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=500", "model.seq_length=32", "model.rope=2d",
        "model.image_grid=4", "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup_steps=0"])


def batches(cfg):
    from megacca.data.synthetic import SyntheticSource

    src = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size, 0, 1, seed=7,
                          image_grid=cfg.model.image_grid)
    return [next(src), next(src)]


def gather_tp(name: str, t: torch.Tensor) -> torch.Tensor:
    """Unshard a tensor-parallel parameter (or its grad) to the tp=1 layout."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(t, "_tp", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    if name.endswith("linear_fc1.weight"):
        # SwiGLU stacks [gate; up] on each rank: the tp=1 layout is [all gates; all ups].
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=t._partition_dim)


def global_name(name: str, cfg) -> str:
    """Local pipeline-stage layer index → global layer index."""
    from megatron.core import parallel_state as ps

    if ".layers." not in name:
        return name
    head, rest = name.split(".layers.", 1)
    idx, tail = rest.split(".", 1)
    per_stage = cfg.model.num_layers // cfg.parallel.pp
    return f"{head}.layers.{int(idx) + ps.get_pipeline_model_parallel_rank() * per_stage}.{tail}"


def full_logits(model, tokens, cfg) -> torch.Tensor | None:
    from megatron.core import parallel_state as ps

    from megacca.model.gpt import UnifiedGPT

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    with torch.no_grad():
        if cfg.parallel.pp > 1:
            return None  # (logits are compared on tp layouts; pp is checked through gradients)
        out = UnifiedGPT.forward(model, tokens)
    out._tp, out._partition_dim = True, out.dim() - 1
    return gather_tp("logits", out)[..., : cfg.model.vocab_size]


def main() -> None:
    from safetensors.torch import save_file
    from megatron.core import parallel_state as ps

    from megacca.distributed.init import init_distributed, shutdown
    from megacca.checkpoint import load_model_weights, save_dist_checkpoint
    from megacca.distributed.megatron_engine import MegatronEngine
    from megacca.model.gpt import build_model
    from megacca.stages.pretrain import NextTokenLoss

    scenario, out, tp, pp, sp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    src = sys.argv[6] if len(sys.argv) > 6 else None
    cfg = make_cfg(tp, pp, sp)
    init_distributed(tp, pp, seed=cfg.train.seed)
    tag = f"tp{tp}pp{pp}sp{int(sp)}"
    engine = MegatronEngine(cfg, build_model, NextTokenLoss())
    model = engine.model
    write = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    stage = ps.get_pipeline_model_parallel_rank()
    mbs = batches(cfg)
    if scenario == "load":
        load_model_weights(model, out / f"{src}_ckpt")
        logits = full_logits(model, mbs[0]["tokens"], cfg)
        if write and logits is not None:
            save_file({"logits": logits.contiguous()}, str(out / f"load_{src}_at_{tag}.safetensors"))
        shutdown()
        return
    ref = out / "ref_ckpt"
    if ref.exists():
        load_model_weights(model, ref)
    else:
        save_dist_checkpoint({"model": model.sharded_state_dict()}, ref)
    for p in model.parameters():
        p._tp, p._partition_dim = getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0)
    loss = engine.forward_backward(mbs)[0]["loss"]
    grads = {}
    for name, p in model.named_parameters():
        g = p.main_grad.detach().clone()
        g._tp, g._partition_dim = p._tp, p._partition_dim
        grads[global_name(name, cfg)] = gather_tp(name, g).contiguous()
    logits = full_logits(model, mbs[0]["tokens"], cfg)
    # The optimizer step returns the global pre-clipping norm that MegatronEngine.train_step logs as grad_norm
    # (reduced over the tp and pp groups, each replicated parameter counted once).
    _, grad_norm, _ = engine.optimizer.step()
    if write:
        tensors = dict(grads, loss=torch.tensor([loss], dtype=torch.float64),
                       grad_norm=torch.tensor([grad_norm], dtype=torch.float64))
        if logits is not None:
            tensors["logits"] = logits.contiguous()
        save_file(tensors, str(out / f"{tag}.stage{stage}.safetensors"))
    save_dist_checkpoint({"model": model.sharded_state_dict()}, out / f"{tag}_ckpt")
    logits = full_logits(model, mbs[0]["tokens"], cfg)
    if write and logits is not None:
        save_file({"logits": logits.contiguous()}, str(out / f"{tag}.after.safetensors"))
    shutdown()


if __name__ == "__main__":
    main()
