"""One full-precision safetensors file from any megacca checkpoint (`consolidate`).

Where the full-precision weights are depends on the engine:

- DeepSpeed, ZeRO 1-3: the fp32 master weights are split over the data-parallel ranks' optimizer files.
  DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`) reassembles them, once per tensor-parallel
  rank (it does not merge tp shards), its `torch.load` calls going through megacca's allow-list
  (`megacca.safe_load.safe_torch_load`) instead of a full unpickle; `canonical.merge_tp` joins the tp ranks.
  With bf16 training these masters are more precise than the model's weights.
- DeepSpeed, ZeRO 0: the weights are whole in `mp_rank_XX_model_states.pt` (fp32: DeepSpeed's ZeRO-0 trains
  fp32 only, `megacca.config.validate`).
- megatron: the model's tensors of the distributed checkpoint (`megacca.checkpoint.read_full_state_dict`); its
  fp32 runs keep no other copy. A bf16 megatron run (DistributedOptimizer) holds its fp32 masters in
  buffers laid out for its tp / pp / dp ranks: `--bf16-weights` writes the model's bf16 weights (upcast,
  exact) or the tool refuses, saying so.

The file holds the canonical state dict (`megacca.convert.canonical`, padded vocabulary rows included) in
float32; its safetensors metadata record the step, the source and the megacca config and vocabulary (JSON), so
the file describes itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from megacca.convert import ConversionError
from megacca.convert.canonical import merge_tp, to_canonical


class _TorchReadingSafely:
    """`torch` as DeepSpeed's consolidation module sees it: `load` is megacca's allow-listed `safe_torch_load`
    (it asks for weights_only=False; the `mmap` it asks for is dropped, the files are read whole)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        from megacca.safe_load import safe_torch_load

        return safe_torch_load(f, map_location=map_location or "cpu")


@contextlib.contextmanager
def deepspeed_reads_safely():
    """Inside: `deepspeed.utils.zero_to_fp32` unpickles nothing beyond megacca's allow-list (its own module
    namespace is patched, not torch itself)."""
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchReadingSafely()
    try:
        yield
    finally:
        zero_to_fp32.torch = original


def _mp_ranks(ds_dir: Path) -> list[int]:
    ranks = sorted({int(p.name.split("mp_rank_")[1][:2]) for p in ds_dir.glob("*mp_rank_*_model_states.pt")})
    if not ranks:
        raise ConversionError(f"{ds_dir}: no DeepSpeed model states files (*mp_rank_XX_model_states.pt)")
    return ranks


def deepspeed_fp32_state_dict(engine_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The fp32 canonical state dict of a DeepSpeed engine directory (`<ckpt>/engine`, tag `deepspeed`)."""
    from megacca.safe_load import safe_torch_load

    ds_dir = engine_dir / "deepspeed"
    shards = []
    for r in _mp_ranks(ds_dir):
        if zero_stage == 0:
            module = safe_torch_load(ds_dir / f"mp_rank_{r:02d}_model_states.pt")["module"]
            sd = {k: v.float() for k, v in module.items() if isinstance(v, torch.Tensor)}
        else:
            sd = _zero_to_fp32(ds_dir, r)
        shards.append(to_canonical(sd))
    return merge_tp(shards)


def _zero_to_fp32(ds_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation of one tensor-parallel rank: it reads every `*_model_states.pt` and
    `*_optim_states.pt` of a tag directory, so it gets a view holding only this rank's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mine = [p for p in ds_dir.iterdir() if f"mp_rank_{mp_rank:02d}_" in p.name]
    with tempfile.TemporaryDirectory(prefix="megacca-zero-") as view:
        (Path(view) / "deepspeed").mkdir()
        for p in mine:
            os.symlink(p.resolve(), Path(view) / "deepspeed" / p.name)
        with deepspeed_reads_safely():
            sd = get_fp32_state_dict_from_zero_checkpoint(view, tag="deepspeed")
    return {k: v.float().contiguous() for k, v in sd.items()}


def consolidated_state_dict(src, *, bf16_weights: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(the fp32 canonical state dict, what it is) of the megacca checkpoint `src` (see module docstring)."""
    from megacca.checkpoint import read_full_state_dict
    from megacca.convert.files import megacca_checkpoint

    ckpt, saved, cfg = megacca_checkpoint(src)
    par, precision = cfg.parallel, cfg.train.precision
    engine_dir = ckpt / "engine"
    if par.engine == "deepspeed" and (engine_dir / "deepspeed").is_dir():
        sd = deepspeed_fp32_state_dict(engine_dir, par.zero_stage)
        how = "fp32 master weights (DeepSpeed's ZeRO consolidation)" if par.zero_stage else "fp32 weights (ZeRO-0)"
    else:
        if precision != "fp32" and not bf16_weights:
            raise ConversionError(f"{ckpt}: a {precision} megatron checkpoint keeps its fp32 master weights in the "
                                  f"DistributedOptimizer's buffers, laid out for its tp / pp / dp ranks; pass "
                                  f"--bf16-weights to write the model's {precision} weights in float32")
        sd = {k: v.float() for k, v in read_full_state_dict(ckpt).items()}
        how = "fp32 weights" if precision == "fp32" else f"{precision} model weights in float32"
    info = {"source": str(ckpt), "step": saved.get("step"), "weights": how}
    return sd, {**info, "config": saved["config"], "vocab": saved.get("vocab")}


def consolidate(src, dst, *, bf16_weights: bool = False) -> dict:
    """Write `src`'s consolidated fp32 state dict to the safetensors file `dst` (atomically)."""
    from safetensors.torch import save_file

    from megacca.convert.files import staged_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ConversionError(f"--dst {dst}: the output is a safetensors file (name it *.safetensors)")
    sd, info = consolidated_state_dict(src, bf16_weights=bf16_weights)
    metadata = {"format": "pt", "megacca_step": str(info["step"]), "megacca_source": info["source"],
                "megacca_weights": info["weights"], "megacca_config": json.dumps(info["config"]),
                "megacca_vocab": json.dumps(info["vocab"])}
    with staged_file(dst) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    return {"src": info["source"], "dst": str(dst), "tensors": len(sd), "weights": info["weights"]}


EPILOG = """\
The checkpoint may be a run directory (its latest checkpoint) or one checkpoint, of either engine, saved at any
tp / pp / ZeRO layout. The file holds the canonical state dict (docs/checkpoint-format.md) in float32: for
DeepSpeed ZeRO 1-3 the optimizer's fp32 master weights, through DeepSpeed's own consolidation; its metadata
record the step, the source, the config and the vocabulary.

examples:
  python tools/convert_checkpoint.py consolidate --src runs/x --dst x.safetensors
  python tools/convert_checkpoint.py consolidate --src runs/x/checkpoints/step_00000300 --dst x300.safetensors
"""


def add_commands(sub, formatter) -> None:
    p = sub.add_parser("consolidate", help="any megacca checkpoint -> one fp32 safetensors file",
                       description="Write a checkpoint's full-precision weights as one safetensors file.",
                       epilog=EPILOG, formatter_class=formatter)
    p.add_argument("--src", required=True, metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--dst", required=True, metavar="FILE.safetensors", help="the file to create")
    p.add_argument("--bf16-weights", action="store_true",
                   help="bf16 megatron runs: write the model's bf16 weights (their fp32 masters are layout-bound)")
    p.set_defaults(run=lambda a: consolidate(a.src, a.dst, bf16_weights=a.bf16_weights))
