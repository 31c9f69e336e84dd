"""`megacca` command line: train, config (print the resolved config), bench."""
from __future__ import annotations

import logging
import os
import sys

from megacca.config import ConfigError, load_config, to_dict

USAGE = """megacca train CONFIG.yaml [key.sub=value ...]     train (stage from the config)
megacca config CONFIG.yaml [key.sub=value ...]    print the resolved config and exit
megacca bench train [--presets debug,small] [--steps N]
megacca bench data [...]"""


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # megatron-core and DeepSpeed are chatty at INFO; our own loggers keep INFO.
    for name in ("megatron", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same."""
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
    import socket
    import subprocess

    import torch

    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"megacca: no launcher; starting {nproc} ranks with torchrun", file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_port", str(port), "-m", "megacca", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in ("train", "config"):
            if not rest or "=" in rest[0]:
                raise ConfigError("CONFIG", "first argument must be a YAML config file")
            if cmd == "train" and "RANK" not in os.environ:
                # No launcher: a layout that needs tp*pp ranks gets them from torchrun (as if run under it).
                par = load_config(rest[0], rest[1:], check=False).parallel
                n = int(os.environ.get("NPROC") or par.tp * par.pp)
                if n > 1:
                    os.environ["WORLD_SIZE"] = str(n)
                    load_config(rest[0], rest[1:])  # validate at that world size before spawning anything
                    return _spawn(n, argv)
            cfg = load_config(rest[0], rest[1:])
            if cmd == "config":
                import yaml

                print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
                return 0
            _setup_logging()
            import warnings

            warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
            from megacca.stages import pretrain

            pretrain.run(cfg)
            return 0
        if cmd == "bench":
            sub = rest[0] if rest else ""
            _setup_logging()
            if sub == "train":
                from megacca.bench.train import main as bench_main
            elif sub == "data":
                from megacca.bench.data import main as bench_main
            else:
                raise ConfigError("bench", "usage: megacca bench train|data [options]")
            return bench_main(rest[1:]) or 0
    except ConfigError as e:
        print(f"megacca: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only the usage-type errors below are turned into one line
        from megacca.data.shards import ShardManifestError
        from megacca.tokenizer.vocab import VocabMismatchError

        if isinstance(e, (VocabMismatchError, ShardManifestError, FileNotFoundError)):
            print(f"megacca: error: {e}", file=sys.stderr)
            return 2
        raise
    print(f"megacca: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
