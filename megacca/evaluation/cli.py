"""`megacca eval {digits,captions,loss,adm}`: evaluate a checkpoint (README, "Evaluation").

The functions the commands run are public, for scripts and the demo: `digits_reference` (judge + held-out
digits + reference figures), `evaluate_digits` (sample → decode → metrics), `evaluate_captions`
(image → caption on held-out images) and `heldout.heldout_report`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megacca.cli import UsageError, _Parser, _user_errors, positive_int, run_tool
from megacca.fileio import atomic_write_json

PROG = "megacca eval"
DEFAULT_DATA = "data/digits"

DESCRIPTION = """\
Evaluate a checkpoint (CKPT: a run directory, meaning its latest checkpoint, or one checkpoint directory, of
either engine and any layout; loaded into this process by megacca.load).

  digits    sample --per-class images of each digit (class prompts, or caption prompts with --text-prompt),
            decode them with the run's VQ tokenizer, map them back to the digits' 8x8 0..16 pixels and score
            them: accuracy (the judge, an RBF SVC fit on DATA/images train, assigns the prompted digit), fd
            (Frechet distance of PCA-20 pixel features against the real held-out digits) and diversity (mean
            pairwise L2 distance within a digit, averaged over digits); with the reference figures of real
            digits and tokens/s
  captions  caption the held-out images (DATA/codes, prompt <bos> <boi> codes <eoi>, greedy by default) and
            report the share of captions that name the right digit (by word or numeral, and no other)
  loss      mean per-token NLL on a split of the code shards, per task, with the training loader's layout
  adm       class-conditional samples as the ADM evaluation suite's .npz batch (arr_0 uint8 [N,H,W,3], arr_1
            labels); FID / IS in-process only when torch-fidelity and local Inception weights are present
"""

EPILOG = """\
examples:
  megacca eval digits runs/demo                                 # 100 per digit, guidance-free
  megacca eval digits runs/demo --cfg-scale 2 --seed 1 --out results.json --npz samples.npz
  megacca eval digits runs/demo --text-prompt "the digit {d}"   # caption -> image ({d} 7, {word} seven)
  megacca eval captions runs/dpo_digits --out captions.json
  megacca eval loss runs/demo --split heldout                   # the tasks of the run's data sources
  megacca eval loss runs/demo --codes data/digits/codes --task c2i
  megacca eval adm runs/llamagen_b_c2i --num-classes 1000 --per-class 50 --cfg-scale 2 --out samples.npz

DATA (--data, default data/digits) holds images/ (the real digits: judge and references) and codes/ (the
held-out codes). Every command prints its figures and, with --out, writes them as JSON.
exit status: 0 done, 2 a usage or data error (one line on stderr), other: a crash (traceback).
"""


# ---------------------------------------------------------------------------------------------------------
# The evaluations
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DigitsReference:
    """The judge (fit on the real training digits), the real held-out digits, and the figures real digits get."""

    judge: object
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    figures: dict


def digits_reference(data_dir=DEFAULT_DATA) -> DigitsReference:
    """Fit the judge on ``DATA/images`` split ``train``; the held-out split is the Fréchet-distance reference."""
    from megacca.evaluation.judge import DigitsJudge, load_digit_split
    from megacca.evaluation.metrics import reference_figures

    images = Path(data_dir) / "images"
    train_x, train_y = load_digit_split(images, "train")
    held_x, held_y = load_digit_split(images, "heldout")
    judge = DigitsJudge.fit(train_x, train_y)
    figures = reference_figures(judge, train_x, held_x, held_y)
    judge.heldout_accuracy = figures["judge_heldout_accuracy"]
    return DigitsReference(judge, held_x, held_y, figures)


def digit_prompts(m, per_class: int, num_classes: int = 10, text_prompt: Optional[str] = None):
    """``per_class`` prompts of each digit 0..num_classes-1 in class order, and their labels: class prompts,
    or caption prompts from ``text_prompt`` (``{d}`` the numeral, ``{word}`` the word)."""
    from megacca.evaluation.metrics import NUMBER_WORDS

    labels = np.repeat(np.arange(num_classes), per_class)
    if text_prompt is None:
        one = {k: m.class_prompt(k) for k in range(num_classes)}
    else:
        one = {k: m.text_prompt(text_prompt.format(d=k, word=NUMBER_WORDS[k % 10])) for k in range(num_classes)}
    return [one[int(k)] for k in labels], labels


def evaluate_digits(m, ref: DigitsReference, *, cfg_scale: Optional[float] = None, per_class: int = 100,
                    seed: int = 0, text_prompt: Optional[str] = None, batch_size: int = 500,
                    **sampling) -> tuple[dict, np.ndarray, np.ndarray]:
    """Sample, decode and score one setting: ``(entry, pixels uint8 [N, 8, 8], labels [N])``, the entry
    holding accuracy, fd, diversity, cfg_scale (1.0: guidance-free), num_samples, tokens_per_s, seconds.
    ``sampling``: temperature, top_k, top_p, cfg_interval (`InferenceModel.generate`)."""
    from megacca.evaluation.metrics import digit_metrics, to_digit_pixels
    from megacca.tokenizer.vq import load_vq_config

    prompts, labels = digit_prompts(m, per_class, text_prompt=text_prompt)
    t0 = time.perf_counter()
    codes, tokens_per_s = m.sample_images(prompts, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, **sampling)
    pixels = to_digit_pixels(m.decode_images(codes), resample=load_vq_config(m.vq_dir).resample)
    entry = digit_metrics(ref.judge, pixels, labels, ref.heldout_images)
    entry.update(cfg_scale=float(cfg_scale) if cfg_scale is not None else 1.0, num_samples=int(len(labels)),
                 tokens_per_s=float(tokens_per_s), seconds=time.perf_counter() - t0, seed=int(seed),
                 prompt="class" if text_prompt is None else f"text: {text_prompt}")
    return entry, pixels, labels


def caption_of(vocab, ids) -> str:
    """The text of generated ids: the text pieces before ``<eos>`` (the sampler emits nothing else outside an
    image span)."""
    out = []
    for i in ids:
        if int(i) == vocab.eos_id:
            break
        if vocab.is_text(i):
            out.append(int(i))
    return vocab.decode_text(out)


def evaluate_captions(m, codes, labels, *, max_new_tokens: int = 24, temperature: float = 0.0, seed: int = 0,
                      batch_size: int = 256) -> dict:
    """Caption each image (``codes`` [N, h, w], e.g. `heldout.heldout_codes`; prompt ``<bos> <boi> codes <eoi>``)
    and score the captions against ``labels``: ``{accuracy, num_samples, tokens_per_s, temperature, examples}``
    (examples: the first ten ``[label, caption]``)."""
    from megacca.evaluation.metrics import caption_accuracy

    prompts = [m.caption_prompt(c) for c in codes]
    outs, t0 = [], time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        outs += m.generate(prompts[b:b + batch_size], max_new_tokens, temperature=temperature,
                           seed=seed + b // batch_size)
    dt = time.perf_counter() - t0
    caps = [caption_of(m.vocab, o) for o in outs]
    return {"accuracy": caption_accuracy(caps, labels), "num_samples": len(caps),
            "tokens_per_s": sum(len(o) for o in outs) / dt if dt > 0 else 0.0, "temperature": temperature,
            "examples": [[int(y), c] for y, c in zip(labels[:10], caps[:10])]}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _scale(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def add_model_args(p) -> None:
    p.add_argument("--vq", metavar="DIR", help="VQ tokenizer (default: the one the run's code shards name)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")


def add_sampling_args(p, per_class: int) -> None:
    p.add_argument("--cfg-scale", type=_scale, default=None, metavar="S",
                   help="classifier-free guidance scale (default: none, guidance-free)")
    p.add_argument("--per-class", type=positive_int, default=per_class, metavar="K",
                   help="samples per class (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="prompts per sampling batch (default: "
                                                                     "%(default)s; batch i uses seed + i)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    sub = ap.add_subparsers(dest="what", metavar="{digits,captions,loss,adm}", required=True, parser_class=_Parser)

    p = sub.add_parser("digits", help="judge accuracy, FD and diversity of sampled digits", epilog=EPILOG,
                       formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT")
    add_sampling_args(p, 100)
    p.add_argument("--text-prompt", metavar="TEMPLATE", default=None,
                   help='caption prompts instead of class prompts, e.g. "the digit {d}" ({word}: seven)')
    p.add_argument("--data", default=DEFAULT_DATA, help="digits data directory (default: %(default)s)")
    p.add_argument("--out", metavar="results.json", help="write the figures as JSON")
    p.add_argument("--npz", metavar="samples.npz", help="write the samples: images uint8 [N,8,8] 0..16, labels")
    add_model_args(p)

    p = sub.add_parser("captions", help="caption accuracy on held-out images", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", default=DEFAULT_DATA, help="digits data directory (default: %(default)s)")
    p.add_argument("--split", default="heldout", help="split of DATA/codes (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="caption length cap (default: %(default)s)")
    p.add_argument("--temperature", type=_scale, default=0.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument("--out", metavar="results.json", help="write the figures as JSON")
    add_model_args(p)

    p = sub.add_parser("loss", help="held-out loss (mean per-token NLL)", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--split", default="heldout", help="shard split (default: %(default)s)")
    p.add_argument("--codes", metavar="DIR", help="code shard directory (default: each of the run's data sources)")
    p.add_argument("--task", choices=["c2i", "t2i", "i2t"], action="append",
                   help="task(s) to score (default: the run's sources' tasks; c2i with --codes)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per forward (default: %(default)s)")
    p.add_argument("--out", metavar="results.json", help="write the figures as JSON")
    add_model_args(p)

    p = sub.add_parser("adm", help="class-conditional samples as an ADM-suite .npz (+ FID/IS if possible)",
                       epilog=EPILOG, formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classes 0..N-1 (default: all of the "
                                                                       "vocabulary's)")
    add_sampling_args(p, 50)
    p.add_argument("--out", required=True, metavar="samples.npz", help="the sample batch to write")
    p.add_argument("--ref", metavar="REF.npz", help="ADM reference batch for an in-process FID")
    p.add_argument("--inception", metavar="PATH", help="local Inception weights (torch-fidelity's)")
    add_model_args(p)
    return ap


def check_checkpoint(path: str, label: Optional[str] = None) -> None:
    """Before anything slow: a checkpoint path that does not exist is the user's mistake."""
    if not os.path.exists(path):
        raise UsageError(f"{label or 'CKPT ' + path}: no such run or checkpoint directory")


def load_checkpoint(args):
    """`megacca.load` of ``args.checkpoint`` (``--vq``, ``--device``), refusing a run without a vocabulary."""
    import torch

    from megacca.inference import load

    check_checkpoint(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = load(args.checkpoint, vq=args.vq, device=device)
    if m.vocab is None:
        m.close()
        raise UsageError(f"CKPT {args.checkpoint}: a run on synthetic data (no vocabulary) cannot be evaluated")
    return m


def _data_error(what: str, e: Exception) -> UsageError:
    return UsageError(f"{what}: {e}")


def _write(path: Optional[str], obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)
        print(f"wrote {path}", flush=True)


def _fmt_entry(e: dict) -> str:
    return (f"accuracy {e['accuracy']:.3f}  fd {e['fd']:.2f}  diversity {e['diversity']:.2f}  "
            f"({e['num_samples']} samples, cfg scale {e['cfg_scale']:g}, {e['tokens_per_s']:,.0f} tokens/s)")


def _digits(args) -> None:
    from megacca.evaluation.metrics import NUMBER_WORDS
    from megacca.fileio import atomic_write_bytes

    if args.text_prompt is not None:
        try:
            args.text_prompt.format(d=0, word=NUMBER_WORDS[0])
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"--text-prompt {args.text_prompt!r}: a template with {{d}} and/or {{word}} only "
                             f"({type(e).__name__}: {e})") from None
    try:
        ref = digits_reference(args.data)
    except (OSError, ValueError) as e:
        raise _data_error(f"--data {args.data}", e) from None
    fig = ref.figures
    print(f"judge: held-out accuracy {fig['judge_heldout_accuracy']:.3f}; real digits: FD(train vs held-out) "
          f"{fig['fd_train_vs_heldout']:.2f}, held-out diversity {fig['diversity_heldout']:.2f}", flush=True)
    m = load_checkpoint(args)
    try:
        try:  # a prompt the checkpoint cannot take (no text model, fewer than 10 classes) is the user's
            digit_prompts(m, 1, text_prompt=args.text_prompt)
        except ValueError as e:
            raise UsageError(f"CKPT {args.checkpoint}: {e}") from None
        entry, pixels, labels = evaluate_digits(m, ref, cfg_scale=args.cfg_scale, per_class=args.per_class,
                                                seed=args.seed, text_prompt=args.text_prompt,
                                                batch_size=args.batch_size)
    finally:
        m.close()
    print(f"samples: {_fmt_entry(entry)}", flush=True)
    _write(args.out, {"checkpoint": args.checkpoint, "step": m.step, "reference": fig, **entry})
    if args.npz:
        import io

        buf = io.BytesIO()
        np.savez(buf, images=pixels.astype(np.uint8), labels=labels.astype(np.int64))
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.npz, buf.getvalue())
        print(f"wrote {args.npz} (images uint8 {list(pixels.shape)} in 0..16, labels)", flush=True)


def _captions(args) -> None:
    from megacca.evaluation.heldout import heldout_codes

    codes_dir = Path(args.data) / "codes"
    try:
        codes, labels = heldout_codes(codes_dir, args.split)
    except (OSError, ValueError) as e:
        raise _data_error(f"--data {args.data}", e) from None
    m = load_checkpoint(args)
    try:
        if m.vocab.text is None:
            raise UsageError(f"CKPT {args.checkpoint}: captions need the run's text model, which was not found")
        try:
            m.caption_prompt(codes[0])
        except ValueError as e:   # codes of another tokenizer than the run's
            raise UsageError(f"{codes_dir} does not fit CKPT {args.checkpoint}: {e}") from None
        res = evaluate_captions(m, codes, labels, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed)
    finally:
        m.close()
    print(f"captions: accuracy {res['accuracy']:.3f} ({res['num_samples']} {args.split} images, "
          f"{res['tokens_per_s']:,.0f} tokens/s)", flush=True)
    for y, c in res["examples"][:5]:
        print(f"  {y}: {c}")
    _write(args.out, {"checkpoint": args.checkpoint, "step": m.step, **res})


def _loss(args) -> None:
    from megacca.evaluation.heldout import heldout_report, heldout_rows

    m = load_checkpoint(args)
    try:
        if args.codes:
            jobs = [(args.codes, t) for t in (args.task or ["c2i"])]
        else:
            from megacca.inference import _find  # a config's paths as the training command saw them

            jobs = [(str(_find(s.path, m.checkpoint) or s.path), s.task) for s in m.cfg.data.sources
                    if s.task in ("c2i", "t2i", "i2t")]
            jobs = [j for j in dict.fromkeys(jobs) if not args.task or j[1] in args.task]
            if not jobs:
                raise UsageError(f"CKPT {args.checkpoint}: its data sources have no c2i / t2i / i2t task "
                                 f"{'among ' + ', '.join(args.task) if args.task else ''}; pass --codes DIR --task T")
        reports = []
        for path, task in jobs:
            try:
                rows = heldout_rows(m.vocab, path, args.split, task, m.cfg.model.seq_length)
            except (OSError, ValueError) as e:
                raise _data_error(f"{path} (task {task}, split {args.split})", e) from None
            r = heldout_report(m, path, args.split, task, args.batch_size, rows=rows)
            print(f"held-out loss {r['loss']:.4f}  task {task}  ({r['tokens']} tokens, {r['rows']} rows of "
                  f"{path} split {args.split})", flush=True)
            reports.append(r)
    finally:
        m.close()
    tokens = sum(r["tokens"] for r in reports)
    overall = sum(r["loss"] * r["tokens"] for r in reports) / tokens
    if len(reports) > 1:
        print(f"held-out loss {overall:.4f}  all tasks ({tokens} tokens)", flush=True)
    _write(args.out, {"checkpoint": args.checkpoint, "step": m.step, "split": args.split, "loss": overall,
                      "tokens": tokens, "per_task": reports})


def _adm(args) -> None:
    from megacca.evaluation.adm import (InceptionUnavailable, find_inception_weights, how_to_evaluate,
                                        inception_metrics, to_adm_images, write_adm_npz)

    if not args.out.endswith(".npz"):
        raise UsageError(f"--out {args.out}: the ADM suite reads .npz files")
    if args.ref and not os.path.isfile(args.ref):
        raise UsageError(f"--ref {args.ref}: no such file")
    try:
        weights = find_inception_weights(args.inception)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    m = load_checkpoint(args)
    try:
        n = args.num_classes or m.vocab.num_classes
        if not 1 <= n <= m.vocab.num_classes:
            raise UsageError(f"--num-classes {n}: the vocabulary has {m.vocab.num_classes} classes")
        labels = np.repeat(np.arange(n), args.per_class)
        prompts = [m.class_prompt(int(k)) for k in labels]
        codes, tokens_per_s = m.sample_images(prompts, cfg_scale=args.cfg_scale, seed=args.seed,
                                              batch_size=args.batch_size)
        images = np.concatenate([to_adm_images(m.decode_images(codes[i:i + args.batch_size]))
                                 for i in range(0, len(codes), args.batch_size)])
    finally:
        m.close()
    write_adm_npz(args.out, images, labels)
    print(f"wrote {args.out}: arr_0 uint8 {list(images.shape)}, arr_1 labels ({n} classes x {args.per_class}); "
          f"{tokens_per_s:,.0f} tokens/s", flush=True)
    try:
        res = inception_metrics(images, args.ref, weights=weights)
    except InceptionUnavailable as e:
        print(how_to_evaluate(args.out, str(e)), flush=True)
        return
    except ValueError as e:   # a reference batch or weights file that is not one
        raise UsageError(str(e)) from None
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    run = {"digits": _digits, "captions": _captions, "loss": _loss, "adm": _adm}[args.what]

    def work():
        check_checkpoint(args.checkpoint)
        run(args)

    return run_tool(PROG, work, *_user_errors())
