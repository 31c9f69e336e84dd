"""`megacca sweep`: CFG-scale and CCA-λ sweeps on the digits, as a table and a fidelity/diversity plot.

Every (model, CFG scale) pair is sampled with the same prompts (``--per-class`` of each digit) and seed, and
scored as `megacca eval digits` scores it. Written to ``--out DIR``: ``sweep.json`` (the reference figures and
one entry per pair), ``sweep.md`` (the table) and ``tradeoff.png`` (conditional accuracy against Fréchet
distance and against diversity: the paper's Figure 4 in miniature).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from megacca.cli import UsageError, _Parser, _user_errors, positive_int, run_tool
from megacca.evaluation.cli import (DEFAULT_DATA, _data_error, add_model_args, digit_prompts,
                                    check_checkpoint, digits_reference, evaluate_digits,
                                    load_checkpoint)
from megacca.fileio import atomic_write_json, atomic_write_text, atomic_writer

PROG = "megacca sweep"

EPILOG = """\
examples:
  megacca sweep runs/demo --cfg-scales 1,1.5,2,3 --out runs/sweep_cfg            # a CFG-scale sweep
  megacca sweep --models base=runs/demo lam1=runs/cca_l1 lam3=runs/cca_l3 --cfg-scales 1 --out runs/sweep_lam
  megacca sweep runs/demo --models cca=runs/cca_digits --cfg-scales 1,2 --per-class 50 --out runs/sweep

Scale 1 is guidance-free sampling (a batch of B); s > 1 samples u + s(c - u) (a batch of 2B). All pairs use the
same prompts and seed. Writes DIR/sweep.json, DIR/sweep.md and DIR/tradeoff.png.
exit status: 0 done, 2 a usage or data error (one line on stderr), other: a crash (traceback).
"""


def _scales(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {s!r}") from None
    if not out or any(not v >= 0 for v in out):
        raise argparse.ArgumentTypeError(f"need scales >= 0, got {s!r}")
    return out


def _named(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CKPT, got {s!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="A CFG-scale and/or CCA-lambda sweep of digits samples: judge accuracy, "
                                        "Frechet distance and diversity per (model, scale), as a table and a "
                                        "fidelity/diversity plot.",
                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", metavar="CKPT", help="one checkpoint (named after its directory)")
    ap.add_argument("--models", nargs="+", type=_named, default=[], metavar="NAME=CKPT",
                    help="named checkpoints (e.g. CCA runs at several lambdas), in plot order")
    ap.add_argument("--cfg-scales", type=_scales, default=[1.0, 1.5, 2.0, 3.0], metavar="S,S,...",
                    help="CFG scales for every model (default: 1,1.5,2,3)")
    ap.add_argument("--per-class", type=positive_int, default=100, metavar="K", help="samples per digit (default: "
                                                                                  "%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every pair")
    ap.add_argument("--batch-size", type=positive_int, default=500, help="prompts per sampling batch")
    ap.add_argument("--text-prompt", metavar="TEMPLATE", default=None,
                    help='caption prompts instead of class prompts, e.g. "the digit {d}"')
    ap.add_argument("--data", default=DEFAULT_DATA, help="digits data directory (default: %(default)s)")
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_model_args(ap)
    return ap


def sweep_table(entries: list[dict], reference: Optional[dict] = None) -> str:
    """The markdown table of sweep entries (each with ``model`` and the `evaluate_digits` fields)."""
    lines = ["| model | CFG scale | accuracy | FD | diversity | samples | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['model']} | {e['cfg_scale']:g} | {e['accuracy']:.3f} | {e['fd']:.2f} | "
                     f"{e['diversity']:.2f} | {e['num_samples']} | {e['tokens_per_s']:,.0f} |")
    if reference:
        lines += ["", f"Real digits: judge held-out accuracy {reference['judge_heldout_accuracy']:.3f}, FD of the "
                      f"training split against the held-out one {reference['fd_train_vs_heldout']:.2f}, held-out "
                      f"diversity {reference['diversity_heldout']:.2f}."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(path, sweep: dict, reference: Optional[dict] = None) -> Path:
    """``sweep``: ``{model: {cfg_scale: entry}}``. Two panels, conditional accuracy against FD and against
    diversity; one line per model over its scales, and, where several models share a scale (a λ sweep), a
    dotted line through them in the given order. Written atomically as PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by_scale: dict = {}
    for name, pts in sweep.items():
        rows = sorted(((float(s), e) for s, e in pts.items()), key=lambda t: t[0])
        for s, e in rows:
            by_scale.setdefault(s, []).append(e)
        for ax, key in zip(axes, ("fd", "diversity")):
            xs, ys = [e[key] for _, e in rows], [e["accuracy"] for _, e in rows]
            ax.plot(xs, ys, marker="o", label=name)
            for (s, _), x, y in zip(rows, xs, ys):
                ax.annotate(f"s={s:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for s, es in by_scale.items():
        if len(es) > 1:
            for ax, key in zip(axes, ("fd", "diversity")):
                ax.plot([e[key] for e in es], [e["accuracy"] for e in es], ls=":", color="0.5", lw=1)
    if reference:
        axes[0].axvline(reference["fd_train_vs_heldout"], color="0.6", ls="--", lw=1, label="real train vs held-out")
        axes[1].axvline(reference["diversity_heldout"], color="0.6", ls="--", lw=1, label="real held-out")
    axes[0].set_xlabel("Fréchet distance to held-out digits (lower is better)")
    axes[1].set_xlabel("diversity (mean within-class pixel distance)")
    for ax in axes:
        ax.set_ylabel("conditional accuracy (judge)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(path) as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def _run(args) -> None:
    models = ([(Path(args.checkpoint).name or args.checkpoint, args.checkpoint)] if args.checkpoint else []) \
        + list(args.models)
    if not models:
        raise UsageError("name a checkpoint: CKPT and/or --models NAME=CKPT ...")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must differ, got {', '.join(names)}")
    for name, path in models:
        check_checkpoint(path, f"{name}={path}")
    try:
        ref = digits_reference(args.data)
    except (OSError, ValueError) as e:
        raise _data_error(f"--data {args.data}", e) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries, sweep = [], {}
    for name, path in models:
        args.checkpoint = path
        m = load_checkpoint(args)
        try:
            try:
                digit_prompts(m, 1, text_prompt=args.text_prompt)
            except (ValueError, KeyError, IndexError) as e:
                raise UsageError(f"{name}={path}: {e}") from None
            for s in args.cfg_scales:
                e, _, _ = evaluate_digits(m, ref, cfg_scale=s, per_class=args.per_class, seed=args.seed,
                                          text_prompt=args.text_prompt, batch_size=args.batch_size)
                e = {"model": name, "checkpoint": path, "step": m.step, **e}
                entries.append(e)
                sweep.setdefault(name, {})[e["cfg_scale"]] = e
                print(f"{name:>12} s={s:<4g} accuracy {e['accuracy']:.3f}  fd {e['fd']:7.2f}  diversity "
                      f"{e['diversity']:6.2f}  {e['tokens_per_s']:,.0f} tokens/s", flush=True)
        finally:
            m.close()
    atomic_write_json(out / "sweep.json", {"reference": ref.figures, "per_class": args.per_class,
                                           "seed": args.seed, "entries": entries})
    atomic_write_text(out / "sweep.md", sweep_table(entries, ref.figures))
    plot_tradeoff(out / "tradeoff.png", sweep, ref.figures)
    print(f"wrote {out}/sweep.json, sweep.md, tradeoff.png", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_tool(PROG, lambda: _run(args), *_user_errors())
