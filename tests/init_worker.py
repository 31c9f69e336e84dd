"""Worker for tests/test_init_from.py: load a checkpoint's weights at this layout, write the full logits.

    python -m torch.distributed.run --nproc_per_node N tests/init_worker.py CKPT OUT_FILE TP [full]

Builds the debug model at (tp, pp=1) with `megacca.checkpoint.load_model_weights` (the path `train.init_from`
and the reference model take), or, with `full`, at tp=1 from `read_full_state_dict` (the single-process
reader), and writes the full-vocabulary logits of fixed token ids to OUT_FILE (safetensors, rank 0).
"""
from __future__ import annotations

import sys

import torch


def main() -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from megacca.checkpoint import load_model_weights, read_full_state_dict, read_trainer_state
    from megacca.config import from_dict, Config
    from megacca.distributed.init import init_distributed, shutdown
    from megacca.model.gpt import build_model
    from dist_worker import full_logits

    ckpt, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = from_dict(Config, read_trainer_state(ckpt)["config"])
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, 1, 0
    init_distributed(tp, 1, seed=0)
    model = build_model(cfg)
    if len(sys.argv) > 4 and sys.argv[4] == "full":
        model.load_state_dict(read_full_state_dict(ckpt))
    else:
        load_model_weights(model, ckpt)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    logits = full_logits(model, tokens, cfg)
    if ps.get_tensor_model_parallel_rank() == 0:
        save_file({"logits": logits.contiguous()}, out)
    shutdown()


if __name__ == "__main__":
    main()
