"""`megacca` command line: train, config (print the resolved config), sample, eval, sweep, bench.

A user's mistake (a bad config key, a missing data path, a vocabulary that does not fit the shards, a corrupt
shard under `data.on_error=raise`) ends as one line on stderr and exit code 2, in the launcher process and in
every rank; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from megacca.config import ConfigError, load_config, to_dict

DOCS = """\
configs:
  configs/pretrain/*.yaml   shipped configs (debug: synthetic data, digits: the demo's code shards, ...)
  configs/cca/*.yaml, configs/dpo/*.yaml
                            the alignment stages (stage: cca | dpo, the align: section, train.init_from)
  megacca/config.py, megacca/data/config.py
                            the config tree: every key with its default and a docstring
  docs/data-format.md       shards, the unified vocabulary, batches;  docs/decisions.md  design log
  README.md                 quick start, launchers and clusters, checkpoints, benchmarks
"""

OVERRIDES = """\
overrides:
  KEY=VALUE, KEY a dotted path into the config tree, VALUE read as YAML. Later layers win:
  dataclass defaults < model.preset < the YAML file < overrides.
    train.max_steps=20  optim.lr=1e-3  parallel.tp=2  train.run_dir=runs/x
    data.sources[0].path=data/digits/codes          one element of a list
    'data.sources=[{path: data/codes, task: c2i}]'  a whole list (YAML flow syntax)
"""

TRAIN_EPILOG = OVERRIDES + """
Before anything starts, the config and the files it names (data.vocab, data.text_model, every
data.sources[i].path and the vocabulary against their manifests) are checked; a problem exits with code 2
and one line naming the key. Without a launcher, a layout that needs several ranks (parallel.tp x
parallel.pp, or NPROC=N) starts them with torchrun. Rerunning a run directory resumes from its latest
checkpoint; a run already at train.max_steps says so and exits 0.

examples:
  megacca train configs/pretrain/debug.yaml train.max_steps=20
  megacca train configs/pretrain/debug.yaml parallel.tp=2          # starts 2 ranks itself
  NPROC=2 bash launch/pretrain.sh configs/pretrain/debug.yaml      # the launcher script (deepspeed, torchrun)
  megacca train configs/pretrain/digits.yaml data.vocab=data/digits/vocab.json train.run_dir=runs/d
  megacca train configs/cca/digits.yaml train.init_from=runs/demo    # the config's stage: cca
  bash launch/cca_stage.sh configs/cca/digits.yaml                  # the same, through the stage launcher

exit status: 0 trained (or already complete), 2 a config or data error, other: a crash (traceback).
"""

CONFIG_EPILOG = OVERRIDES + """
The printed YAML is what `megacca train` would run with (and what it writes to <run_dir>/config.yaml).
The files the config names are checked as for `train`; WORLD_SIZE=N validates the layout for N ranks.

examples:
  megacca config configs/pretrain/debug.yaml parallel.zero_stage=3
  WORLD_SIZE=8 megacca config configs/pretrain/llamagen_b_c2i.yaml parallel.tp=2
"""

SAMPLE_EPILOG = """\
CKPT is a run directory (its latest checkpoint) or one checkpoint directory, of either engine, saved at any
tp / pp / ZeRO layout; it is loaded into this one process (megacca.load). Each image is the prompt
<bos> <class_N> <boi> (--class) or <bos> caption-pieces <boi> (--prompt) followed by exactly HxW sampled
image codes (a LlamaGen-layout model, model.layout=llamagen: <class_N> alone, then HxW codes). Guidance-free
by default; --cfg-scale S > 1 samples uncond + S*(cond - uncond), the unconditional prompt being
<bos> <null> <boi> (<null>). The codes are decoded by the run's VQ tokenizer, found in the checkpoint's vq/
(from-llamagen --vq), from the shard manifests its config names, or given with --vq DIR, and checked against
the vocabulary's vq_sha256.
The grid has ceil(sqrt(K)) columns (--cols), images in sampling order.

examples:
  megacca sample runs/demo --class 7 --num-images 16 --out seven.png                # guidance-free
  megacca sample runs/demo --class 7 --cfg-scale 3 --seed 1 --out seven_cfg.png     # classifier-free guidance
  megacca sample runs/demo --prompt "the digit 7" --out t2i.png                      # caption -> image
  megacca sample runs/cca_digits/checkpoints/step_00000100 --class 3 --vq data/digits/vq --out three.png

exit status: 0 written, 2 a usage error (a missing checkpoint or VQ tokenizer, a class index out of range, a
text prompt for a run without a text model), other: a crash (traceback).
"""

BENCH = {"train": "tokens/s of training steps next to a plain-PyTorch loop of the same model",
         "align": "a CCA step (reference model / precomputed) next to a pretraining step over the same sequences",
         "data": "can the streaming loader (and the VQ encoder) feed training?",
         "sample": "tokens/s of guidance-free sampling next to CFG, and KV cache next to recomputation"}

# Commands whose options belong to another module: `megacca NAME ARGS...` runs `MODULE.main(ARGS)`.
DELEGATED = {"eval": ("megacca.evaluation.cli", "evaluate samples: digits (judge accuracy, FD, diversity), "
                                                "captions, ADM .npz, held-out loss (megacca eval --help)"),
             "sweep": ("megacca.evaluation.sweep", "CFG-scale and CCA-lambda sweeps: a table and a "
                                                   "fidelity/diversity plot (megacca sweep --help)")}


class UsageError(Exception):
    """A mistake in a command's arguments or input, for the tools (tools/, tokenizers/) to raise: their mains
    print it as one line, ``PROG: error: MESSAGE``, and exit with code 2, as `megacca` does for its own."""


def positive_int(s: str) -> int:
    """argparse `type=` for counts (samples, workers, batch sizes): an integer >= 1."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def run_tool(prog: str, work, *errors: type) -> int:
    """A tool's main body: run `work()`, exit 0. A user error (UsageError, ConfigError or one of `errors`) is one
    line on stderr, ``PROG: error: MESSAGE`` (``config error`` for a ConfigError), and exit code 2."""
    try:
        work()
    except (UsageError, ConfigError, *errors) as e:
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{prog}: {kind}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage mistake is one line (exit 2), like every other user error."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog="megacca", formatter_class=fmt, epilog=DOCS,
                 description="Pretraining, alignment (CCA, DPO), sampling and evaluation of unified "
                             "text/image-token autoregressive transformers (megatron-core + DeepSpeed).")
    sub = ap.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True,
                            parser_class=_Parser)
    for name, summary, epilog in (("train", "train the model the config describes", TRAIN_EPILOG),
                                  ("config", "print the resolved, checked config and exit", CONFIG_EPILOG)):
        p = sub.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=fmt)
        p.add_argument("config", metavar="CONFIG.yaml", help="YAML file mirroring the config tree")
        p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help="dotted overrides (see below)")
    _add_sample_parser(sub, fmt)
    for name, (_, summary) in DELEGATED.items():  # listed here; main() hands their arguments over unparsed
        d = sub.add_parser(name, help=summary, description=summary, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER, metavar="...")
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCH)}",
                           description="Benchmarks; each has its own options: megacca bench WHICH --help",
                           formatter_class=fmt,
                           epilog="benchmarks:\n" + "".join(f"  {k:<6} {v}\n" for k, v in BENCH.items())
                           + "\nexamples:\n  megacca bench train --presets debug,small --steps 10\n"
                             "  megacca bench data --vq data/digits/vq\n  megacca bench sample --presets debug\n")
    bench.add_argument("which", choices=list(BENCH), nargs="?", metavar="WHICH", help=" | ".join(BENCH))
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="options of that benchmark")
    return ap


def _add_sample_parser(sub, fmt) -> None:
    summary = "sample images from a checkpoint and write them as a PNG grid"
    p = sub.add_parser("sample", help=summary, description=summary, epilog=SAMPLE_EPILOG, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT", help="run directory or checkpoint directory")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--class", dest="class_index", type=int, metavar="N", help="class index, 0 .. classes-1")
    cond.add_argument("--prompt", metavar="TEXT", help="a caption (needs the run's text model)")
    p.add_argument("--out", required=True, metavar="grid.png", help="PNG file to write (atomically)")
    p.add_argument("--num-images", type=int, default=16, metavar="K", help="images to sample (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale (default: none, guidance-free)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help="guide only image positions i with A <= i/(H*W) < B")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0: greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely codes")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--vq", metavar="DIR", help="VQ tokenizer directory (default: the one the run's shards name)")
    p.add_argument("--cols", type=int, default=None, help="grid columns (default: ceil(sqrt(K)))")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")


def _sample(args) -> int:
    """`megacca sample`: load, sample, decode, write the grid; user errors raise UsageError (or the loader's)."""
    checks = [(args.num_images >= 1, "--num-images must be >= 1"), (args.temperature >= 0, "--temperature must be >= 0"),
              (args.top_k is None or args.top_k >= 1, "--top-k must be >= 1"),
              (args.top_p is None or 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
              (args.cfg_scale is None or args.cfg_scale >= 0, "--cfg-scale must be >= 0"),
              (args.batch_size >= 1, "--batch-size must be >= 1"), (args.cols is None or args.cols >= 1, "--cols must be >= 1"),
              (args.cfg_interval is None or 0 <= args.cfg_interval[0] < args.cfg_interval[1] <= 1,
               "--cfg-interval A B needs 0 <= A < B <= 1")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    _setup_logging()
    hide_known_harmless_warnings()
    import torch

    from megacca.inference import load, write_image_grid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = load(args.checkpoint, vq=args.vq, device=device)
    try:
        try:
            prompt = m.class_prompt(args.class_index) if args.prompt is None else m.text_prompt(args.prompt)
        except ValueError as e:
            which = f"--class {args.class_index}" if args.prompt is None else "--prompt"
            raise UsageError(f"{which}: {e}") from None
        m.vq_dir  # noqa: B018 - find (and check) the decoder before spending time on sampling
        codes, tokens_per_s = m.sample_images([prompt] * args.num_images, cfg_scale=args.cfg_scale, seed=args.seed,
                                              batch_size=args.batch_size, temperature=args.temperature,
                                              top_k=args.top_k, top_p=args.top_p,
                                              cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None)
        images = m.decode_images(codes)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        width, height = write_image_grid(args.out, images, args.cols)
    finally:
        m.close()
    guidance = f"CFG scale {args.cfg_scale:g}" if args.cfg_scale not in (None, 1.0) else "guidance-free"
    print(f"megacca sample: wrote {args.out} ({width}x{height} px: {args.num_images} images of "
          f"{images.shape[2]}x{images.shape[3]}, {guidance}, {tokens_per_s:,.0f} tokens/s)", flush=True)
    return 0


def _setup_logging() -> None:
    from megacca.distributed.init import is_rank0

    logging.basicConfig(level=logging.INFO if is_rank0() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # megatron-core and DeepSpeed are chatty at INFO; our own loggers keep INFO.
    for name in ("megatron", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hide_known_harmless_warnings() -> None:
    """Hide the library warnings every run prints that ask nothing of the user: exact messages only (a reworded
    or new warning still shows), each only where it is harmless. Call before megatron-core or DeepSpeed is
    imported: some of them are raised at import."""
    import re
    import warnings

    import torch

    def hide(message: str, module: str) -> None:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", module=module)

    # The optional GPU extras (README, "Installing by hand"): without them megatron-core uses torch's norms,
    # optimizers and multi-tensor ops, which is what megacca is tested with; the model logs its attention path.
    for message in ("Apex is not installed. Falling back to Torch Norm",
                    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                    "multi_tensor_applier and multi_tensor_scale",
                    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                    "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"):
        hide(message, r"megatron\.core\.")
    # megatron-core 0.16.1's own default `TransformerConfig.cuda_graph_scope="full"` warns on every config and
    # is converted to its replacement on the spot; megacca enables no CUDA graphs.
    hide("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
         r"megatron\.core\.transformer\.transformer_config\Z")
    if torch.cuda.is_available():
        return
    # CUDA_DEVICE_MAX_CONNECTIONS orders kernel launches on CUDA streams, for overlapping tp communication; a
    # CPU run has no streams, so the advice has nothing to act on. On a GPU it stays visible.
    for what in ("sequence parallelism", "async grad allreduce"):
        hide(f"When using {what} it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS "
             f"to 1 for maximum speedup", r"megatron\.core\.tensor_parallel\.layers\Z")
    # DeepSpeed reports (as a warning) that it found no GPU and uses its CPU accelerator, which is what a CPU
    # machine should get; megacca says the same once, at INFO ("CUDA not available: ...", cpu_compat).
    accelerator = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.getMessage() != accelerator)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes --local_rank=N (LOCAL_RANK in the environment says the same); this is
    the one place that drops it, whichever script the launcher started."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank"):
            skip = a == "--local_rank"
            continue
        out.append(a)
    return out


def _spawn(nproc: int, argv: list[str]) -> int:
    """Run ``megacca ARGV`` on ``nproc`` local ranks with torchrun (in this process) and return their exit code.

    torchrun's own report of a failed rank is a traceback of its agent plus a table, and exit code 1; the
    ranks have already said what went wrong, so a failure here is the first failed rank's code, with one line
    only when that rank died without saying (a signal, an exit code other than 2).
    """
    import signal

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from megacca.distributed.init import free_port

    os.environ.pop("WORLD_SIZE", None)
    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = os.environ.get("MASTER_PORT") or str(free_port())
    print(f"megacca: starting {nproc} ranks with torchrun", file=sys.stderr, flush=True)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report: see above
    try:
        run(get_args_parser().parse_args(["--nproc_per_node", str(nproc), "--master_port", port,
                                          "-m", "megacca", *argv]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f"megacca: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr, flush=True)
            return 128 - code
        if code != 2:
            print(f"megacca: rank {rank} failed with exit code {code}", file=sys.stderr, flush=True)
        return code
    return 0


def _user_errors() -> tuple[type, ...]:
    """The error types that are the user's to fix (their messages name the file, shard and key)."""
    from megacca.data.packing import BadSample
    from megacca.data.shards import ShardManifestError
    from megacca.safe_load import UnsafeCheckpointError
    from megacca.tokenizer.vocab import VocabMismatchError

    from megacca.checkpoint import CheckpointNotFound
    from megacca.inference import VQNotFound

    return (BadSample, ShardManifestError, UnsafeCheckpointError, VocabMismatchError, CheckpointNotFound,
            VQNotFound, UsageError)


def _train_or_config(args, argv: list[str]) -> int:
    if "=" in args.config and not os.path.exists(args.config):
        raise ConfigError("CONFIG.yaml", f"the first argument must be the YAML config file, got {args.config!r}")
    if args.command == "train" and "RANK" not in os.environ:
        # No launcher: a layout that needs tp*pp ranks gets them from torchrun (as if run under it).
        par = load_config(args.config, args.overrides, check=False).parallel
        n = int(os.environ.get("NPROC") or par.tp * par.pp)
        if n > 1:
            os.environ["WORLD_SIZE"] = str(n)
            preflight(load_config(args.config, args.overrides))  # at that world size, before any rank
            return _spawn(n, argv)
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _setup_logging()
    hide_known_harmless_warnings()
    if cfg.stage == "pretrain":
        from megacca.stages.pretrain import run
    else:
        from megacca.stages.align import run
    run(cfg)
    return 0


def preflight(cfg) -> None:
    """What can be checked on disk before any rank starts: the stage its launcher runs, data paths and shards,
    the starting checkpoint."""
    from megacca.data.config import check_files

    def script(stage: str) -> str:
        return "launch/pretrain.sh" if stage == "pretrain" else f"launch/{stage}_stage.sh"

    expected = os.environ.get("MEGACCA_STAGE")  # set by launch/<stage>.sh
    if expected and cfg.stage != expected:
        raise ConfigError("stage", f"{script(expected)} runs stage {expected}, but the config has stage: "
                                   f"{cfg.stage} (use {script(cfg.stage)})")
    check_files(cfg.data, cfg.stage, cfg.align.reference)
    if cfg.train.init_from:  # (megacca.checkpoint imports torch: only when there is a checkpoint to read)
        from megacca.checkpoint import check_init_from

        check_init_from(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in DELEGATED:  # their own parser answers --help and names their mistakes
        return _guarded(lambda: _delegate(argv[0], argv[1:]))
    ap = build_parser()
    args = ap.parse_args(argv)  # --help exits 0, a usage mistake exits 2
    if args.command == "bench":
        if args.which is None:
            ap.exit(2, f"megacca bench: error: name a benchmark: {', '.join(BENCH)} (see megacca bench --help)\n")
        _setup_logging()
        hide_known_harmless_warnings()
        if args.which == "train":
            from megacca.bench.train import main as bench_main
        elif args.which == "align":
            from megacca.bench.align import main as bench_main
        elif args.which == "sample":
            from megacca.bench.sample import main as bench_main
        else:
            from megacca.bench.data import main as bench_main
        return bench_main(args.args) or 0
    return _guarded(lambda: _sample(args) if args.command == "sample" else _train_or_config(args, argv))


def _delegate(command: str, argv: list[str]) -> int:
    import importlib

    _setup_logging()
    hide_known_harmless_warnings()
    return importlib.import_module(DELEGATED[command][0]).main(argv) or 0


def _guarded(work) -> int:
    """`work()`'s exit code; a user's error (a config key, a missing file, bad data) is one line and code 2."""
    try:
        return work()
    except ConfigError as e:
        print(f"megacca: config error: {e}", file=sys.stderr, flush=True)
        return _leave(2)
    except Exception as e:  # noqa: BLE001 - only the user's errors become one line; the rest re-raises
        from megacca.distributed.init import RankStopped

        if isinstance(e, RankStopped):  # the rank that hit the error has printed it
            return _leave(2)
        if not isinstance(e, _user_errors()):
            raise
        print(f"megacca: error: {e}", file=sys.stderr, flush=True)
        return _leave(2)


def _leave(code: int) -> int:
    """Exit code for a user error; inside a rank of a live process group, exit at once.

    The other ranks may be waiting in a collective: a clean shutdown's barrier would wait for them forever, and
    interpreter teardown with live gloo groups can abort (exit 134, a second message). The launcher sees this
    rank's code and ends the others.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
