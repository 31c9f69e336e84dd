"""Worker for the alignment parity tests (tests/test_align_engine.py), under torchrun with 1 or 2 ranks.

    python -m torch.distributed.run --nproc_per_node N tests/align_worker.py ENGINE OUT TP PP ZERO REF

Runs two optimizer steps of the CCA loss through the real engine seam (`megacca.trainer.build_engine`) on one
fixed global batch of 4 pairs: the frozen reference is OUT/ref_ckpt (the model at its seeded init), the policy
starts from OUT/policy_ckpt (the same weights plus seeded noise, so Δ ≠ 0 from the first step). The first run
(1 rank, tp=1) writes both checkpoints. REF=model runs the reference model in the engine; REF=precomputed takes
the reference log-probs written by the `model` run at the same layout as `mb["ref_logps"]` instead. Writes the
per-step loss, metrics and grad norm, and the reference log-probs, to OUT/<tag>.json (rank 0).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def make_cfg(engine: str, tp: int, pp: int, zero: int):
    from megacca.config import load_config

    # 4 layers (2 per pipeline stage), GQA, 2D rotary over 4x4 image spans, a vocab that needs padding.
    return load_config(None, [
        f"parallel.engine={engine}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}",
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=500", "model.seq_length=32", "model.rope=2d",
        "model.image_grid=4", "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup_steps=0",
        "optim.lr=1e-3", "optim.decay=constant", "optim.grad_clip=0", "stage=cca", "align.beta=0.5",
        "align.lam=3", "train.init_from=unused", "data.kind=webdataset",
        "data.sources=[{path: unused}]"], check=False)


def global_pairs(cfg) -> list[dict]:
    """4 pairs as two micro-batches of 2: positives are synthetic image-token rows, negatives the same rows
    with their first three tokens (the 'condition') taken from the other row; mask off those tokens."""
    from megacca.data.synthetic import SyntheticSource

    src = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, 2, 0, 1, seed=7,
                          image_grid=cfg.model.image_grid)
    out = []
    for pos_like in ([True, False], [False, False]):
        mb = next(src)
        neg = {k: v.clone() for k, v in mb.items()}
        neg["tokens"][:, 1:4] = mb["tokens"].roll(1, dims=0)[:, 1:4]
        neg["labels"][:, 0:3] = neg["tokens"][:, 1:4]
        mask = mb["loss_mask"].clone()
        mask[:, :4] = 0
        out.append({"tokens": torch.cat([mb["tokens"], neg["tokens"]]),
                    "labels": torch.cat([mb["labels"], neg["labels"]]),
                    "loss_mask": torch.cat([mask, mask]), "pos_like": torch.tensor(pos_like)})
    return out


def main() -> None:
    from megatron.core import parallel_state as ps

    from megacca.checkpoint import save_model_weights
    from megacca.distributed.init import init_distributed, shutdown
    from megacca.model.gpt import build_model
    from megacca.stages.align import CCALoss
    from megacca.trainer import build_engine

    engine_name, out, tp, pp, zero, ref_mode = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
    cfg = make_cfg(engine_name, tp, pp, zero)
    init_distributed(tp, pp, seed=cfg.train.seed, use_deepspeed=engine_name == "deepspeed")
    tag = f"{engine_name}_tp{tp}pp{pp}z{zero}dp{ps.get_data_parallel_world_size()}_{ref_mode}"
    if not (out / "policy_ckpt").exists():
        model = build_model(cfg)
        save_model_weights(model, out / "ref_ckpt")
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        save_model_weights(model, out / "policy_ckpt")
    loss = CCALoss(cfg.align)
    engine = build_engine(cfg, loss, init_from=out / "policy_ckpt",
                          reference_from=out / "ref_ckpt" if ref_mode == "model" else None)
    pairs = global_pairs(cfg)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = pairs[r::dp]  # dp=1: both micro-batches (accumulation 2); dp=2: one each
    layout = f"{engine_name}_tp{tp}pp{pp}z{zero}dp{dp}"
    if ref_mode == "precomputed":
        saved = json.loads((out / f"{layout}_model.json").read_text())["ref_logps"]
        for mb, lp in zip(mine, saved[r::dp]):
            mb["ref_logps"] = torch.tensor(lp, dtype=torch.float32)
    steps = []
    for step in range(2):
        res = engine.train_step([dict(mb) for mb in mine], step)
        steps.append({"loss": res.loss, "grad_norm": res.grad_norm, "units": res.tokens, **res.metrics})
    ref_logps = None
    if ref_mode == "model" and engine.reference is not None:
        from megacca.distributed.engine import batch_to, device

        # the reference's log-probs of every micro-batch, gathered in global order (last stage holds them)
        if engine_name == "deepspeed":
            local = [engine.reference_logps(batch_to(mb, device())).tolist() for mb in mine]
        else:
            mbs = [batch_to(dict(mb), device()) for mb in mine]
            engine._fill_reference_logps(mbs)
            local = [mb["ref_logps"].tolist() if "ref_logps" in mb else None for mb in mbs]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (r, ps.is_pipeline_last_stage(ignore_virtual=True), local))
        by_rank = {rank: lps for rank, last, lps in gathered if last}
        ref_logps = [by_rank[i % dp][i // dp] for i in range(len(pairs))]
    if dist.get_rank() == 0:
        (out / f"{tag}.json").write_text(json.dumps({"steps": steps, "ref_logps": ref_logps}))
    shutdown()


if __name__ == "__main__":
    main()
