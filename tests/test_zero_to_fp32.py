"""Consolidating a ZeRO-3 checkpoint into one fp32 state dict, the two ways the README gives.

1. the `zero_to_fp32.py` that DeepSpeed copies into every checkpoint, run as a user would (a plain subprocess,
   outside the repository): it needs huggingface_hub, which setup.py now installs;
2. DeepSpeed's API, `get_fp32_state_dict_from_zero_checkpoint`.

Both must give the same tensors, and those must be the trained model: the same run at ZeRO-0 (whole, unsharded
weights in its checkpoint) is the reference.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import PY, clean_env, train

GB = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=2", "train.save_every=0"]
ENGINE = Path("checkpoints") / "step_00000002" / "engine"


def test_zero3_checkpoint_consolidates_to_the_trained_weights(tmp_path):
    z3, z0 = tmp_path / "zero3", tmp_path / "zero0"
    train(z3, *GB, "parallel.zero_stage=3", nproc=2)  # two ranks: each holds half of every parameter
    train(z0, *GB, "parallel.zero_stage=0")

    engine = z3 / ENGINE
    out = tmp_path / "consolidated"
    # The script from the checkpoint, as a user runs it: the venv's python, outside the repository. With its
    # default --max_shard_size it imports huggingface_hub (it failed with "No module named" before).
    p = subprocess.run([PY, str(engine / "zero_to_fp32.py"), str(engine), str(out), "--tag", "deepspeed",
                        "--safe_serialization"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    script = load_file(str(out / "model.safetensors"))

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    api = get_fp32_state_dict_from_zero_checkpoint(str(engine), tag="deepspeed")
    assert script.keys() == api.keys()
    for k in script:  # the same reader underneath: identical tensors
        assert torch.equal(script[k], api[k]), k

    from megacca.safe_load import safe_torch_load

    reference = safe_torch_load(z0 / ENGINE / "deepspeed" / "mp_rank_00_model_states.pt")["module"]
    params = {k for k, v in reference.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
              and not k.endswith("_extra_state")}
    assert params and script.keys() == params  # every parameter, nothing else (`_extra_state` is not a weight)
    for k in params:
        # ZeRO-3 reduce-scatters the gradients over 2 ranks where ZeRO-0 with accumulation sums them in one
        # process: the summation order differs at float32 rounding (~1e-7 relative), and two Adam steps of
        # lr <= 1.2e-3 carry it into the weights (3.3e-7 at most, measured). 1e-5 absolute is far below one Adam
        # step (~1e-3), which a missing shard, a stale partition or a wrong key mapping would move weights by.
        assert script[k].shape == reference[k].shape, k
        assert torch.allclose(script[k], reference[k].float(), rtol=0, atol=1e-5), (
            k, (script[k] - reference[k]).abs().max().item())

