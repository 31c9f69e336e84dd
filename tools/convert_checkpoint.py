"""Convert megacca checkpoints: to and from Hugging Face and LlamaGen, to another parallel layout, into one file.

    python tools/convert_checkpoint.py SUBCOMMAND --help

Every conversion is exact (the same tensors, so the same logits) or refused with the reason. Inputs are read
without running code from them: safetensors, megatron's distributed checkpoints through megacca's allow-list,
`torch.load(weights_only=True)` for pickles (a pickle that needs more is refused unless `--trust-pickle`).
Outputs are written under a temporary name beside the destination and renamed into place when complete; an
existing destination is never overwritten. A user error (a missing file, a mismatched key or shape, a model the
target format cannot express) is one line on stderr and exit code 2. The formats: docs/checkpoint-format.md.

Each subcommand lives in its module of `megacca.convert` (`add_commands(subparsers, formatter)`); adding one
is adding its module to SUBCOMMAND_MODULES.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.cli import _Parser, run_tool  # noqa: E402  (one-line usage errors, as megacca's)

PROG = "convert_checkpoint.py"
# Modules whose `add_commands` add subcommands, in the order --help lists them.
SUBCOMMAND_MODULES = ("megacca.convert.hf", "megacca.convert.llamagen", "megacca.convert.reshard",
                      "megacca.convert.consolidate")

EPILOG = """\
examples:
  python tools/convert_checkpoint.py to-hf --src runs/text1d --dst exports/text1d-hf
  python tools/convert_checkpoint.py from-hf --src Llama-2-7b-hf --dst ckpts/llama2 --add-image-codebook 16384
  python tools/convert_checkpoint.py from-llamagen --gpt c2i_L_384.pt --vq vq_ds16_c2i.pt --image-grid 24 \
      --classes-from data/imagenet384/images --dst ckpts/llamagen_l_384
  python tools/convert_checkpoint.py to-llamagen --src runs/llamagen_l_c2i --dst c2i_L_384_cca.pt
  python tools/convert_checkpoint.py reshard --src runs/x --dst runs/x-tp1 --tp 1 --pp 1
  python tools/convert_checkpoint.py consolidate --src runs/x --dst x.safetensors

exit status: 0 converted, 2 a user error (one line on stderr), other: a crash (traceback).
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=fmt)
    sub = ap.add_subparsers(title="subcommands", dest="command", metavar="SUBCOMMAND", required=True,
                            parser_class=_Parser)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, fmt)
    return ap


def _user_errors() -> tuple[type, ...]:
    from megacca.checkpoint import CheckpointNotFound
    from megacca.convert import ConversionError
    from megacca.safe_load import UnsafeCheckpointError
    from megacca.tokenizer.vocab import VocabMismatchError

    return ConversionError, UnsafeCheckpointError, VocabMismatchError, CheckpointNotFound


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        summary = args.run(args)
        if summary:
            print(" | ".join(f"{k} {v}" for k, v in summary.items()), flush=True)

    return run_tool(PROG, work, *_user_errors())


if __name__ == "__main__":
    sys.exit(main())
