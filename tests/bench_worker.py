"""Worker for tests/test_bench.py: runs `megacca bench train`'s own pieces in a fresh process and writes what it
saw to OUT_JSON (the test asserts). A subprocess, because the DeepSpeed engine installs the CPU compatibility
layer process-wide (megacca.cpu_compat), which the rest of the pytest process must not inherit.

    python tests/bench_worker.py OUT_JSON

1. `same_step`: the trainers the benchmark builds (`build_trainers("debug", "fp32")`), with the megacca
   model's weights made distinctive and copied into the reference: loss and pre-clipping gradient norm of two
   consecutive steps of each on the same batches (the reference given the engine's LR for that step).
2. `accounting`: `bench_preset` with `_time` replaced by one that runs the given step function for real and
   returns scripted durations keyed by which trainer that function actually drove; the result dict and every
   batch each trainer was handed.
3. `printed`: the lines `main` prints for canned `bench_preset` results.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

import torch

SCRIPTED = {"megacca": [[0.30, 0.10, 0.20], [0.25, 0.15, 0.90]], "reference": [[0.05, 0.20, 0.10], [0.08, 0.12, 0.70]]}
CANNED = {"debug": dict(preset="debug", params=200_000, tokens=1024, ours_ms=30.0, ref_ms=25.0, ours_tps=34133.3,
                        ref_tps=40960.0, ratio=1.2),
          "small": dict(preset="small", params=20_500_000, tokens=1024, ours_ms=862.0, ref_ms=807.5,
                        ours_tps=1187.9, ref_tps=1268.1, ratio=1.0681)}


def megatron_to_reference(sd: dict, cfg) -> dict:
    """megacca's (megatron-core local spec, tp=1) state dict in `ReferenceLlama`'s names and layouts."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d, per_group = m.hidden_size // heads, heads // groups
    out = {"embed.weight": sd["embedding.word_embeddings.weight"], "norm.weight": sd["decoder.final_layernorm.weight"],
           "out.weight": sd["output_layer.weight"]}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        # megatron stacks q/k/v per query group: [q of the group's heads; k; v] x groups. The reference wants
        # all q heads, then all k, then all v (SDPA's GQA maps query head j to group j // per_group).
        qkv = sd[p + "self_attention.linear_qkv.weight"].view(groups, (per_group + 2) * d, -1)
        q, k, v = qkv.split([per_group * d, d, d], dim=1)
        out.update({
            f"blocks.{i}.norm1.weight": sd[p + "input_layernorm.weight"],
            f"blocks.{i}.qkv.weight": torch.cat([q.reshape(heads * d, -1), k.reshape(groups * d, -1),
                                                 v.reshape(groups * d, -1)]),
            f"blocks.{i}.proj.weight": sd[p + "self_attention.linear_proj.weight"],
            f"blocks.{i}.norm2.weight": sd[p + "pre_mlp_layernorm.weight"],
            f"blocks.{i}.fc1.weight": sd[p + "mlp.linear_fc1.weight"],  # [gate; up] in both
            f"blocks.{i}.fc2.weight": sd[p + "mlp.linear_fc2.weight"],
        })
    return out


def same_step(bench) -> dict:
    from megacca.optim import lr_at

    cfg, engine, ref, batches = bench.build_trainers("debug", "fp32")
    # Init-scale weights (std 0.02) give near-uniform logits, a loss of ~ln(V) whatever the architecture does;
    # std 0.15 matrices and norms around 1 make the loss depend on every part of the model.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in engine.model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if p.dim() == 1 else 0.15 * noise)
    sd = {k: v for k, v in engine.model.state_dict().items() if torch.is_tensor(v)}
    ref.model.load_state_dict(megatron_to_reference(sd, cfg))

    ref_norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        ref_norms.append(float(clip(params, max_norm, *a, **k)))
        return ref_norms[-1]

    torch.nn.utils.clip_grad_norm_ = recording_clip  # the reference clips (and so measures) through this
    out = {"megacca": [], "reference": []}
    for step in range(2):
        res = engine.train_step([batches[step]], step=step)
        out["megacca"].append({"loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr})
        for group in ref.opt.param_groups:  # the reference has no schedule; give it the engine's LR
            group["lr"] = lr_at(step, cfg.optim, cfg.train.max_steps)
        loss = ref.train_step([batches[step]])
        out["reference"].append({"loss": loss, "grad_norm": ref_norms[-1]})
    torch.nn.utils.clip_grad_norm_ = clip
    return out


def accounting(bench) -> dict:
    built = bench.build_trainers("debug", "fp32")
    cfg, engine, ref, batches = built
    handed = {"megacca": [], "reference": []}
    last = []

    def recorder(name, fn):
        def step(micro_batches, *a, **k):
            last.append(name)
            handed[name].append([int(mb["tokens"].numel()) for mb in micro_batches])
            return fn(micro_batches, *a, **k)
        return step

    engine.train_step = recorder("megacca", engine.train_step)
    ref.train_step = recorder("reference", ref.train_step)
    scripted = {k: [list(r) for r in v] for k, v in SCRIPTED.items()}
    calls = []

    def fake_time(step_fn, steps, warmup):
        for _ in range(warmup):
            step_fn()
        step_fn()
        who = last[-1]
        for _ in range(steps - 1):
            step_fn()
        calls.append({"who": who, "steps": steps, "warmup": warmup})
        return scripted[who].pop(0)

    bench._time = fake_time
    bench.build_trainers = lambda preset, precision: built
    result = bench.bench_preset("debug", steps=3, warmup=2, precision="fp32", rounds=2)
    return {"result": result, "calls": calls, "handed": handed,
            "batch_tokens": [int(b["tokens"].numel()) for b in batches],
            "seq_length": cfg.model.seq_length}


def printed(bench) -> list[str]:
    import megacca.distributed.init as dinit

    bench.bench_preset = lambda preset, steps, warmup, precision, rounds: dict(CANNED[preset])
    dinit.init_distributed = lambda *a, **k: None
    dinit.shutdown = lambda: None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(["--presets", "debug,small", "--steps", "1", "--rounds", "1"])
    assert rc == 0
    return buf.getvalue().splitlines()


def main() -> None:
    import megacca.bench.train as bench
    from megacca.distributed.init import init_distributed, shutdown

    init_distributed(1, 1, seed=0, use_deepspeed=True)
    try:
        report = {"same_step": same_step(bench), "accounting": accounting(bench)}
    finally:
        shutdown()
    report["printed"] = printed(bench)
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
