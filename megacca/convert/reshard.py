"""A run's checkpoint at another tensor / pipeline-parallel layout, to resume training there (`reshard`).

What needs doing: the weights of every megacca checkpoint already load at any layout (`model/` or the megatron
engine's `engine/` is a megatron distributed checkpoint: `train.init_from`, `megacca.load` and every tool read
it at any tp / pp). What does not move is the rest of a run: DeepSpeed's ZeRO files and the megatron
DistributedOptimizer's buffers are laid out for the ranks that wrote them, and the per-rank files (data-loader
positions, RNG states) exist for the old world size only. So `reshard` writes a new run directory whose
latest checkpoint a run at the new layout resumes from: same step, same weights (and fp32 master weights), same
Adam moments and step count, same data positions.

How: two passes of ranks, each a real engine of the run's kind (`megacca.trainer.build_engine`).

1. At the old layout (`extract`): the engine loads the checkpoint as a resumed run would, then writes its
   weights, master weights and Adam moments as one megatron distributed checkpoint in *model space*: every
   optimizer tensor sharded like its parameter (global shapes and offsets, `optimizer.state.exp_avg.<key>`, the
   names megatron's own non-distributed optimizer uses), which any layout can read.
2. At the new layout (`inject`): a fresh engine starts from those weights (as `train.init_from` does), reads
   its shards of the moments and masters, puts them into its optimizer (DeepSpeed's fragment API
   `safe_set_full_*` for ZeRO 1-3, the plain torch state for ZeRO-0, megatron's DistributedOptimizer's
   per-parameter shard ranges) and saves a checkpoint like training does (`CheckpointManager.save`).

The data-parallel size stays: the new world is tp x pp x (old dp), so each data-parallel rank keeps its data
position. Each new rank takes the RNG state of the old rank at the same (tp, pp, dp) coordinates when there
is one, else the fresh seeded state a new run at that layout would have (dropout masks depend on the layout
anyway; every shipped config has dropout 0). The engine kind stays (DeepSpeed's pp must be 1).

`--drop-optimizer` writes a model-only checkpoint instead (weights only, for `train.init_from`); without it a
checkpoint that holds no optimizer state (a converted one) is refused: optimizer state is carried or
explicitly dropped, never silently.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from megacca.convert import ConversionError

INTERMEDIATE = ".reshard-model-space"
META = "reshard.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- layout arithmetic (no process group) ------------------------------------------------------------------
def rank_coordinates(world: int, tp: int, pp: int) -> list[tuple[int, int, int]]:
    """(tp rank, pp rank, dp rank) of each global rank, as megatron-core's parallel_state assigns them."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    coords = [[0, 0, 0] for _ in range(world)]
    for axis, name in enumerate(("tp", "pp", "dp")):
        for group in gen.get_ranks(name):
            for index, rank in enumerate(group):
                coords[rank][axis] = index
    return [tuple(c) for c in coords]


# ---- one optimizer interface over the engines ------------------------------------------------------------------
def _materialise_adam_state(opt: torch.optim.Optimizer) -> None:
    """Give every parameter of a torch Adam(W) its state (torch creates it lazily at the first step): one step
    on zero gradients at lr 0, which leaves the parameters as they are; the state is overwritten next."""
    lrs = [g["lr"] for g in opt.param_groups]
    made = []
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                made.append(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for p in made:
        p.grad = None


def _materialise_zero3_state(ds_opt) -> None:
    """ZeRO-3 keeps its torch optimizer's parameter groups empty and puts each sub-group's flat fp32 partition
    in only for its step (`DeepSpeedZeroOptimizer_Stage3._optimizer_step`): do the same for the lr-0 step."""
    base = ds_opt.optimizer
    for i, flat in enumerate(ds_opt.fp32_partitioned_groups_flat):
        group = base.param_groups[ds_opt.sub_group_to_group_id[i]]
        group["params"] = [flat]
        try:
            _materialise_adam_state(base)
        finally:
            group["params"] = []


class EngineAdam:
    """The Adam state of one of megacca's engines, per model parameter, as full tensors of that parameter's
    local (tensor-parallel) shape: `get(p)` / `set(p, tensors)` with keys `exp_avg`, `exp_avg_sq` and, when
    the optimizer keeps master weights of another dtype, `fp32_param`; `step()` / `set_step(n)`. Every rank
    calls `get` / `set` for its parameters in the same order (ZeRO and the DistributedOptimizer gather over the
    data-parallel group)."""

    def __init__(self, engine, cfg):
        self.cfg = cfg
        self.deepspeed = cfg.parallel.engine == "deepspeed"
        self.zero = cfg.parallel.zero_stage
        if self.deepspeed:
            self.bases = [engine.optimizer.optimizer if self.zero else engine.optimizer]
            self.inner = []
        else:
            self.inner = list(getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]))
            self.bases = [opt.optimizer for opt in self.inner]
        self.engine = engine
        self.masters = cfg.train.precision != "fp32"

    def prepare_fresh(self) -> None:
        """Create the state of a freshly built engine, so that `set` has tensors to fill."""
        ds_opt = self.engine.optimizer
        if self.deepspeed and self.zero == 3:
            _materialise_zero3_state(ds_opt)
        else:
            for base in self.bases:
                _materialise_adam_state(base)
        if self.deepspeed and hasattr(ds_opt, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO 1/2 point each parameter at its fragment of the Adam state once that state exists
            ds_opt._hp_optimizer_states_linked = False
            ds_opt._lazy_init_hp_params_optimizer_state()

    def prepare_loaded(self) -> None:
        """After `engine.load`: ZeRO 1/2 link the fragments of the loaded state lazily, at the first step."""
        ds_opt = self.engine.optimizer
        if self.deepspeed and hasattr(ds_opt, "_lazy_init_hp_params_optimizer_state"):
            ds_opt._hp_optimizer_states_linked = False
            ds_opt._lazy_init_hp_params_optimizer_state()

    def _states(self):
        for base in self.bases:
            yield from base.state.values()

    def step(self) -> int:
        steps = {int(st["step"]) for st in self._states() if "step" in st}
        if len(steps) > 1:
            raise ConversionError(f"the optimizer's step count differs between parameters: {sorted(steps)}")
        return steps.pop() if steps else 0

    def set_step(self, step: int) -> None:
        for st in self._states():
            old = st.get("step")
            st["step"] = torch.tensor(float(step), dtype=old.dtype) if torch.is_tensor(old) else step

    # -- per parameter ---------------------------------------------------------------------------------------
    def _dist_opt(self, p):
        for opt in self.inner:
            if hasattr(opt, "model_param_gbuf_map") and p in opt.model_param_gbuf_map:
                return opt
        return None

    def get(self, p) -> dict[str, torch.Tensor]:
        keys = MOMENTS + (("fp32_param",) if self.masters else ())
        if self.deepspeed and self.zero:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            out = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
            if self.masters:
                out["fp32_param"] = safe_get_full_fp32_param(p)
            return {k: v.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).cpu()
                    for k, v in out.items()}
        opt = self._dist_opt(p)
        if opt is not None:  # megatron's DistributedOptimizer: each dp rank holds a range of the flat param
            import torch.distributed as dist

            full = {k: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for k in keys}
            if p in opt.model_param_group_index_map:
                shard = opt._get_main_param_and_optimizer_states(p)
                r = opt._get_model_param_range_map(p)["param"]
                for k in keys:
                    full[k][r.start:r.end] = shard["param" if k == "fp32_param" else k].detach().float().view(-1)
            for k in keys:
                dist.all_reduce(full[k], group=opt.data_parallel_group)  # ranges are disjoint: a sum joins them
            return {k: v.view(p.shape).cpu() for k, v in full.items()}
        if self.masters:
            raise ConversionError(f"{self.cfg.train.precision} training without master weights in a place reshard "
                                  f"knows (engine {self.cfg.parallel.engine}, zero_stage {self.zero})")
        st = next(base.state[p] for base in self.bases if p in base.state) if self._has_state(p) else {}
        return {k: (st[k].detach().float().clone() if k in st else torch.zeros(p.shape)) for k in MOMENTS}

    def _has_state(self, p) -> bool:
        return any(p in base.state for base in self.bases)

    @torch.no_grad()  # the optimizer's tensors are leaves (fp32 shards of parameters) that require grad
    def set(self, p, tensors: dict[str, torch.Tensor]) -> None:
        if self.deepspeed and self.zero:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            for k in MOMENTS:
                safe_set_full_optimizer_state(p, tensors[k], k)
            if "fp32_param" in tensors:
                safe_set_full_fp32_param(p, tensors["fp32_param"])
            return
        opt = self._dist_opt(p)
        if opt is not None:
            if p not in opt.model_param_group_index_map:
                return  # no range of this parameter on this data-parallel rank
            shard = opt._get_main_param_and_optimizer_states(p)
            r = opt._get_model_param_range_map(p)["param"]
            values = {k: tensors[k].reshape(-1)[r.start:r.end] for k in MOMENTS}
            values["param"] = (tensors["fp32_param"] if "fp32_param" in tensors else p.detach().float()
                               ).reshape(-1)[r.start:r.end]
            if "step" in shard:
                values["step"] = shard["step"]
            opt._set_main_param_and_optimizer_states(p, values)
            return
        base = next(b for b in self.bases if p in b.state)
        for k in MOMENTS:
            base.state[p][k].copy_(tensors[k])


# ---- the two passes (run on every rank) ------------------------------------------------------------------------
def _gathered(engine, cfg):
    """Under ZeRO-3 the module's parameters are partitioned: gather them while the model's sharded state dict
    is written (as the DeepSpeed engine's own save does)."""
    import contextlib

    if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.model.parameters()))
    return contextlib.nullcontext()


def _optimizer_sharded(model_sd, tensors_by_param: dict, prefix_keys) -> dict:
    """Sharded tensors of per-parameter optimizer tensors, each sharded like its parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    by_param = {id(sh.data): sh for sh in nested_values(model_sd)
                if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    out = {}
    for n, (p, tensors) in enumerate(tensors_by_param.items()):
        sh = by_param.get(id(p))
        if sh is None:
            raise RuntimeError(f"reshard: parameter {n} has no sharded tensor in the model's sharded state dict")
        for k in prefix_keys:
            if k in tensors:
                out[f"{k}.{n}"] = make_sharded_optimizer_tensor(sh, tensors[k], prefix=f"optimizer.state.{k}")
    return out


def _build(cfg, init_from=None):
    from megacca.distributed.init import init_distributed
    from megacca.trainer import build_engine

    par = cfg.parallel
    init_distributed(par.tp, par.pp, cfg.train.seed, par.backend, use_deepspeed=par.engine == "deepspeed")
    return build_engine(cfg, loss=None, init_from=init_from)


def extract(ckpt: str, out: str) -> None:
    """Pass 1, at the checkpoint's own layout: write its weights and Adam state in model space to `out`."""
    from megacca.checkpoint import read_trainer_state, save_dist_checkpoint
    from megacca.config import Config, from_dict
    from megacca.distributed.init import is_rank0, shutdown
    from megacca.fileio import atomic_write_json

    ckpt = Path(ckpt)
    cfg = from_dict(Config, read_trainer_state(ckpt)["config"])
    engine = _build(cfg)
    engine.load(ckpt)
    adam = EngineAdam(engine, cfg)
    adam.prepare_loaded()
    params = [p for p in engine.model.parameters()]
    states = {p: adam.get(p) for p in params}
    step = adam.step()
    with _gathered(engine, cfg):
        model_sd = engine.model.sharded_state_dict()
        sharded = {"model": model_sd,
                   "optimizer": _optimizer_sharded(model_sd, states, MOMENTS + ("fp32_param",))}
        save_dist_checkpoint(sharded, Path(out))
    if is_rank0():
        atomic_write_json(Path(out) / META, {"adam_step": step, "masters": adam.masters})
    shutdown()


def inject(ckpt: str, space: str, run_dir: str, tp: str, pp: str, adam_step: str, masters: str) -> None:
    """Pass 2, at the new layout: a fresh engine from `space`'s weights, its Adam state (step `adam_step`, fp32
    masters when `masters` is "1") from `space`, saved as the latest checkpoint of `run_dir` with the old ranks'
    data positions and RNG states."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megacca.checkpoint import CheckpointManager, read_trainer_state, set_rng_state
    from megacca.config import Config, from_dict, to_dict
    from megacca.distributed.init import shutdown
    from megacca.safe_load import restricted_pickle

    ckpt, space = Path(ckpt), Path(space)
    saved = read_trainer_state(ckpt)
    old = from_dict(Config, saved["config"])
    cfg = _target_config(old, int(tp), int(pp), run_dir)
    engine = _build(cfg, init_from=space)
    adam = EngineAdam(engine, cfg)
    adam.prepare_fresh()
    keys = MOMENTS + (("fp32_param",) if masters == "1" else ())
    params = list(engine.model.parameters())
    templates = {p: {k: torch.zeros(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32) for k in keys}
                 for p in params}
    with _gathered(engine, cfg):
        sharded = _optimizer_sharded(engine.model.sharded_state_dict(), templates, keys)
    with restricted_pickle():
        loaded = dist_checkpointing.load(sharded, str(space))
    for n, p in enumerate(params):
        adam.set(p, {k: loaded[f"{k}.{n}"] for k in keys})
    adam.set_step(int(adam_step))

    # The old ranks' per-rank state, by (tp, pp, dp) coordinates.
    old_world = int(saved.get("world_size") or 1)
    old_coords = rank_coordinates(old_world, old.parallel.tp, old.parallel.pp)
    here = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    same_dp = [r for r, c in enumerate(old_coords) if c[2] == here[2]]
    data_state = json.loads((ckpt / f"rank_{same_dp[0]:05d}.json").read_text())["data"]
    if here in old_coords:
        r = old_coords.index(here)
        set_rng_state(load_file(str(ckpt / f"rank_{r:05d}.safetensors")),
                      json.loads((ckpt / f"rank_{r:05d}.json").read_text())["rng"])
    trainer_state = {**saved, "config": to_dict(cfg), "world_size": dist.get_world_size(),
                     "resharded_from": {"src": str(ckpt), "tp": old.parallel.tp, "pp": old.parallel.pp}}
    CheckpointManager(run_dir, keep_last=0).save(int(saved["step"]), engine, trainer_state, data_state)
    shutdown()


def _target_config(old, tp: int, pp: int, run_dir: str):
    cfg = copy.deepcopy(old)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    if tp == 1:
        cfg.parallel.sequence_parallel = False
    cfg.train.run_dir = str(run_dir)
    return cfg


# ---- orchestration (the tool's process) ------------------------------------------------------------------------
def _run_ranks(nproc: int, argv: list[str], what: str) -> None:
    """`python -m megacca.convert.reshard ARGV` on `nproc` local ranks (torchrun); a rank's one-line user
    error becomes this process's ConversionError, anything else a RuntimeError with the ranks' output."""
    from megacca.distributed.init import free_port

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "megacca.convert.reshard", *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode == 0:
        return
    said = [line for line in p.stderr.splitlines() if line.startswith("reshard: error: ")]
    if said:
        raise ConversionError(said[0][len("reshard: error: "):])
    raise RuntimeError(f"reshard: {what} on {nproc} ranks failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                       f"{p.stderr[-6000:]}")


def reshard(src, dst, *, tp: int, pp: int, drop_optimizer: bool = False) -> dict:
    """Write `src` (a run directory or checkpoint) at tp x pp as the run directory `dst` (module docstring);
    with `drop_optimizer`, as the model-only checkpoint `dst`."""
    from megacca.checkpoint import read_full_state_dict
    from megacca.config import ConfigError, save_config, validate
    from megacca.convert.files import megacca_checkpoint, staged_dir
    from megacca.convert.write import write_model_checkpoint

    ckpt, saved, old = megacca_checkpoint(src)
    world = int(saved.get("world_size") or 1)
    dp = world // (old.parallel.tp * old.parallel.pp)
    cfg = _target_config(old, tp, pp, dst)
    new_world = tp * pp * dp
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(new_world)  # validate() reads the world size from the launcher's variable
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"--tp {tp} --pp {pp} (world size {new_world}, dp {dp} as in {ckpt}): {e}") from None
    finally:
        if before is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = before
    summary = {"src": str(ckpt), "dst": str(dst), "step": saved["step"],
               "layout": f"tp {old.parallel.tp} pp {old.parallel.pp} -> tp {tp} pp {pp} (dp {dp})"}
    if drop_optimizer:
        vocab = saved.get("vocab")
        files = {}
        if vocab and vocab.get("text_model") and (ckpt / Path(vocab["text_model"]).name).is_file():
            files[Path(vocab["text_model"]).name] = ckpt / Path(vocab["text_model"]).name
        write_model_checkpoint(dst, cfg, read_full_state_dict(ckpt), vocab=vocab, step=saved["step"], files=files,
                               converted_from={"tool": "reshard --drop-optimizer", "src": str(ckpt)},
                               where=str(ckpt))
        return {**summary, "optimizer": "dropped (model-only checkpoint)"}
    if not (ckpt / "engine").is_dir() or not (ckpt / "rank_00000.json").is_file():
        raise ConversionError(f"{ckpt} holds no optimizer state or per-rank state (a converted, model-only "
                              f"checkpoint): nothing to resume; its weights load at any layout with "
                              f"train.init_from, or pass --drop-optimizer to copy them")
    missing = [r for r in range(world) if not (ckpt / f"rank_{r:05d}.json").is_file()]
    if missing:
        raise ConversionError(f"{ckpt}: trainer.json says {world} ranks but rank_{missing[0]:05d}.json is missing")
    with staged_dir(dst) as tmp:
        if old.parallel.engine == "megatron" and old.parallel.zero_stage == 0:
            # megatron's non-distributed optimizer already saves in model space: its engine/ is pass 1's output
            space, adam_step, masters = ckpt / "engine", _common_step(ckpt / "engine"), False
        else:
            space = tmp / INTERMEDIATE
            _run_ranks(world, ["extract", str(ckpt), str(space)], f"reading {ckpt} at tp {old.parallel.tp} pp "
                                                                   f"{old.parallel.pp}")
            meta = json.loads((space / META).read_text())
            adam_step, masters = meta["adam_step"], meta["masters"]
        _run_ranks(new_world, ["inject", str(ckpt), str(space), str(tmp), str(tp), str(pp), str(adam_step),
                               "1" if masters else "0"], f"writing tp {tp} pp {pp}")
        if space.parent == tmp:
            shutil.rmtree(space)
        save_config(_target_config(old, tp, pp, dst), tmp / "config.yaml")
    return {**summary, "optimizer": "carried"}


def _common_step(engine_dir: Path) -> int:
    """The Adam step count megatron's non-distributed optimizer saves (`common_step`, in common.pt)."""
    from megatron.core import dist_checkpointing

    from megacca.safe_load import restricted_pickle

    with restricted_pickle():
        common = dist_checkpointing.load_common_state_dict(str(engine_dir))
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "common_step":
                    found.append(int(v))
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(common.get("optimizer"))
    if len(set(found)) > 1:
        raise ConversionError(f"{engine_dir}: the optimizer's step count differs between parameter groups: {found}")
    return found[0] if found else 0


def _rank_main(argv: list[str]) -> int:
    from megacca.safe_load import UnsafeCheckpointError

    try:
        {"extract": extract, "inject": inject}[argv[0]](*argv[1:])
    except (ConversionError, UnsafeCheckpointError) as e:
        print(f"reshard: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # other ranks may wait in a collective; the launcher ends them
    return 0


EPILOG = """\
Every checkpoint's weights already load at any layout (train.init_from, megacca.load); reshard is for resuming a
run at another layout. SRC is a run directory (its latest checkpoint) or one checkpoint of either engine; DST is
a new run directory whose latest checkpoint holds the same step, weights, fp32 master weights, Adam moments
and data positions, laid out for tp x pp ranks (the data-parallel size stays). Resume it with the run's config:

  megacca train CONFIG train.run_dir=DST parallel.tp=N parallel.pp=M

The engine stays (DeepSpeed has no pipeline: --pp 1). --drop-optimizer writes a model-only checkpoint DST
instead (for train.init_from); without it, optimizer state is always carried.

examples:
  python tools/convert_checkpoint.py reshard --src runs/x --dst runs/x-tp1 --tp 1 --pp 1
  python tools/convert_checkpoint.py reshard --src runs/x --dst runs/x-pp2 --tp 1 --pp 2
  python tools/convert_checkpoint.py reshard --src runs/x --dst ckpts/x-weights --tp 1 --pp 1 --drop-optimizer
"""


def add_commands(sub, formatter) -> None:
    p = sub.add_parser("reshard", help="a run's checkpoint at another tp / pp layout, to resume there",
                       description="Rewrite a run's checkpoint for another tensor / pipeline-parallel layout.",
                       epilog=EPILOG, formatter_class=formatter)
    p.add_argument("--src", required=True, metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--dst", required=True, metavar="RUN_DIR", help="the run directory to create")
    p.add_argument("--tp", required=True, type=int, metavar="N", help="tensor-parallel size")
    p.add_argument("--pp", required=True, type=int, metavar="M", help="pipeline-parallel size")
    p.add_argument("--drop-optimizer", action="store_true",
                   help="write the weights only (a model-only checkpoint), without optimizer or data state")
    p.set_defaults(run=lambda a: reshard(a.src, a.dst, tp=a.tp, pp=a.pp, drop_optimizer=a.drop_optimizer))


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
