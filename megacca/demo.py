"""The demo's pipeline after the data (`bash launch/demo.sh`): pretrain → pick the base by held-out loss →
sample without guidance and with CFG → CCA → the matched MLE control → DPO on captions → results.

Every training phase runs the real stage launchers (`launch/pretrain.sh`, `launch/cca_stage.sh`,
`launch/dpo_stage.sh`) as a user would; every evaluation runs in this process through `megacca.load` and
`megacca.evaluation`, closing each model when done with it. The recipe (model size, steps, learning rates,
λ, β) was chosen on the training split (docs/decisions.md, "The digits recipe"); the held-out split is only
used to pick the pretraining checkpoint (early stopping) and as the Fréchet-distance reference.

    python -m megacca.demo --data data/digits --out runs/demo [--seeds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megacca.fileio import atomic_write_json, atomic_write_text, atomic_writer

ROOT = Path(__file__).resolve().parents[1]

# Generation entries of results.json, in table order: (name, model, task, guidance).
ENTRIES = [
    ("no_guidance", "base", "c2i", "none"), ("cfg", "base", "c2i", "cfg"),
    ("cca", "cca", "c2i", "none"), ("cca_cfg", "cca", "c2i", "cfg"),
    ("finetune_mle", "mle", "c2i", "none"), ("finetune_mle_cfg", "mle", "c2i", "cfg"),
    ("t2i_no_guidance", "base", "t2i", "none"), ("t2i_cfg", "base", "t2i", "cfg"),
    ("t2i_cca", "cca", "t2i", "none"),
]
T2I_PROMPT = "the digit {d}"  # one of the captions the digits shards carry (tools/make_shards.py)
HEADLINE = ["no_guidance", "cfg", "cca", "finetune_mle", "t2i_no_guidance", "t2i_cfg", "t2i_cca"]


@dataclass
class Recipe:
    """The digits recipe. Step counts are fixed (results never depend on the machine's speed)."""

    pretrain_steps: int = 1000
    """Pretraining steps; checkpoints every `save_every`, the one with the lowest held-out loss is the base."""
    save_every: int = 200
    cca_steps: int = 200
    """CCA steps; the MLE control trains exactly as many, on the same data, at the same learning rate."""
    dpo_steps: int = 100
    cfg_scales: list = field(default_factory=lambda: [1.5, 2.0, 3.0])
    """CFG scales tried on the base; the best by conditional accuracy is the `cfg` row."""
    per_class: int = 100
    """Samples per class and entry (1,000 for the ten digits)."""
    sample_batch: int = 500


QUICK = Recipe(pretrain_steps=20, save_every=10, cca_steps=4, dpo_steps=4, cfg_scales=[2.0], per_class=10,
               sample_batch=100)


def say(msg: str) -> None:
    print(msg, flush=True)


def _data_overrides(data: Path, tasks: int) -> list[str]:
    return [f"data.vocab={data}/vocab.json", *[f"data.sources[{i}].path={data}/codes" for i in range(tasks)]]


def stage(script: str, config: str, run_dir: Path, overrides: list[str], seed: int) -> None:
    """One training phase through its launcher; its log lines stream to our stdout (visible progress).

    A separate process, not `megacca train` called here: that would save each stage ~10 s of importing
    megatron-core and DeepSpeed, but the loader's forked workers of a second in-process stage crashed
    (segmentation fault after the first stage's process group ended; docs/decisions.md)."""
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = ["bash", script, config, f"train.run_dir={run_dir}", f"train.seed={seed}", "train.progress_bar=off",
           "train.tensorboard=false", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("MEGACCA_PYTHON", sys.executable)
    p = subprocess.run(cmd, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"demo: {script} {config} failed (exit {p.returncode}); command: {' '.join(cmd)}")


class Evaluator:
    """The judge, the held-out references and the sampling → metrics path shared by every entry
    (`megacca.evaluation.cli`, the same code as `megacca eval digits` / `megacca eval captions`)."""

    def __init__(self, data: Path, recipe: Recipe):
        from megacca.evaluation.cli import digits_reference
        from megacca.evaluation.heldout import heldout_codes

        self.data, self.recipe = data, recipe
        self.ref = digits_reference(data)
        self.judge_accuracy = float(self.ref.judge.heldout_accuracy)
        self.caption_codes, self.caption_labels = heldout_codes(data / "codes", "heldout")

    def images(self, m, task: str, cfg_scale, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
        from megacca.evaluation.cli import evaluate_digits

        return evaluate_digits(m, self.ref, cfg_scale=cfg_scale, per_class=self.recipe.per_class, seed=seed,
                               text_prompt=None if task == "c2i" else T2I_PROMPT,
                               batch_size=self.recipe.sample_batch)

    def captions(self, m) -> dict:
        from megacca.evaluation.cli import evaluate_captions

        return evaluate_captions(m, self.caption_codes, self.caption_labels)


def heldout_loss(m, data: Path) -> float:
    from megacca.evaluation.heldout import heldout_loss as loss

    return float(loss(m, data / "codes", split="heldout", task="c2i"))


def pair_seq_length(data: Path) -> int:
    """`model.seq_length` for the CCA and DPO stages: the longest caption->image row of the data (the
    image->caption pair rows are as long), rounded up to a multiple of 8. Alignment rows are never packed, so
    padding them to the pretraining length (96) would triple each step's work for nothing; the shipped digits
    configs say 32, which is what this gives for the demo's own text model (at most 8 pieces per caption)."""
    from megacca.evaluation.heldout import heldout_rows
    from megacca.tokenizer.vocab import UnifiedVocab

    vocab = UnifiedVocab.load(str(data / "vocab.json"), str(data / "text.model"))
    longest = max(len(ids) for ids, _ in heldout_rows(vocab, data / "codes", "heldout", "t2i"))
    return -(-(longest - 1) // 8) * 8


def run_seed(seed: int, out: Path, data: Path, recipe: Recipe, ev: Evaluator, write_samples: bool) -> dict:
    from megacca.checkpoint import CheckpointManager
    from megacca.inference import load

    res: dict = {}
    t_seed = time.perf_counter()
    runs = out if seed == 0 else out / f"seed{seed}"  # seed 0 at the top: runs/demo/cca, ...
    sample_seed = 100 + seed

    say(f"\n== [seed {seed}] pretraining: {recipe.pretrain_steps} steps, class->image, caption->image, "
        f"image->caption (checkpoint every {recipe.save_every})")
    stage("launch/pretrain.sh", "configs/pretrain/digits.yaml", runs / "pretrain",
          [*_data_overrides(data, 3), f"train.max_steps={recipe.pretrain_steps}",
           f"train.save_every={recipe.save_every}", "train.keep_last=0",
           f"train.log_every={max(1, recipe.pretrain_steps // 10)}"], seed)

    say(f"\n== [seed {seed}] early stopping: held-out loss (class->image) of each checkpoint")
    curve = []
    for ckpt in sorted((runs / "pretrain" / "checkpoints").glob("step_*")):
        with load(ckpt) as m:
            loss = heldout_loss(m, data)
        curve.append((int(ckpt.name.split("_")[1]), loss, ckpt))
        say(f"  step {curve[-1][0]:>6}: held-out loss {loss:.4f}")
    best_step, best_loss, base_ckpt = min(curve, key=lambda t: t[1])
    res["heldout_loss"] = {"step": best_step, "loss": best_loss, "curve": [[s, l] for s, l, _ in curve]}
    say(f"  base = step {best_step} (held-out loss {best_loss:.4f})")

    def report(name: str, entry: dict, pixels: np.ndarray, labels: np.ndarray) -> dict:
        if write_samples:
            _save_npz(out / f"samples_{name}.npz", pixels, labels)
        say(f"  {name:<18} acc {entry['accuracy']:.3f}  FD {entry['fd']:7.2f}  div {entry['diversity']:6.2f}  "
            f"s={entry['cfg_scale']:<4} {entry['tokens_per_s']:,.0f} tok/s")
        return entry

    def evaluate(name: str, m, task: str, scale) -> dict:
        return report(name, *ev.images(m, task, scale, sample_seed))

    say(f"\n== [seed {seed}] evaluate the base: no guidance, CFG at {recipe.cfg_scales}")
    base = load(base_ckpt)
    res["no_guidance"] = evaluate("no_guidance", base, "c2i", None)
    sweep, swept = {1.0: res["no_guidance"]}, {}
    for s in recipe.cfg_scales:
        sweep[s], *swept[s] = ev.images(base, "c2i", s, sample_seed)
        say(f"  cfg s={s:<4} acc {sweep[s]['accuracy']:.3f}  FD {sweep[s]['fd']:7.2f}  "
            f"div {sweep[s]['diversity']:6.2f}")
    best_scale = max(recipe.cfg_scales, key=lambda s: sweep[s]["accuracy"])
    res["cfg"] = report("cfg", sweep[best_scale], *swept[best_scale])  # the sweep's samples at that scale
    res["t2i_no_guidance"] = evaluate("t2i_no_guidance", base, "t2i", None)
    res["t2i_cfg"] = evaluate("t2i_cfg", base, "t2i", best_scale)
    res["captioning"] = {"before_dpo": ev.captions(base)}
    res["sweep"] = {"base": {str(s): e for s, e in sweep.items()}}
    base.close()

    say(f"\n== [seed {seed}] CCA: {recipe.cca_steps} steps on class->image and caption->image pairs")
    stage("launch/cca_stage.sh", "configs/cca/digits.yaml", runs / "cca",
          [*_data_overrides(data, 2), f"model.seq_length={pair_seq_length(data)}", f"train.init_from={base_ckpt}", f"train.max_steps={recipe.cca_steps}",
           "train.save_every=0", f"train.log_every={max(1, recipe.cca_steps // 5)}"], seed)
    cca = load(runs / "cca")
    res["cca"] = evaluate("cca", cca, "c2i", None)
    res["cca_cfg"] = evaluate("cca_cfg", cca, "c2i", best_scale)
    res["t2i_cca"] = evaluate("t2i_cca", cca, "t2i", None)
    cca.close()

    say(f"\n== [seed {seed}] control: the base fine-tuned {recipe.cca_steps} steps with the plain next-token loss "
        f"(the CCA stage's data and learning rate)")
    stage("launch/pretrain.sh", "configs/pretrain/digits_finetune_mle.yaml", runs / "finetune_mle",
          [*_data_overrides(data, 2), f"train.init_from={base_ckpt}", f"train.max_steps={recipe.cca_steps}",
           "train.save_every=0", f"train.log_every={max(1, recipe.cca_steps // 5)}"], seed)
    mle = load(runs / "finetune_mle")
    res["finetune_mle"] = evaluate("finetune_mle", mle, "c2i", None)
    res["finetune_mle_cfg"] = evaluate("finetune_mle_cfg", mle, "c2i", best_scale)
    mle.close()
    res["sweep"]["cca"] = {"1.0": res["cca"], str(best_scale): res["cca_cfg"]}
    res["sweep"]["finetune_mle"] = {"1.0": res["finetune_mle"], str(best_scale): res["finetune_mle_cfg"]}

    say(f"\n== [seed {seed}] DPO: {recipe.dpo_steps} steps on image->caption preference pairs")
    stage("launch/dpo_stage.sh", "configs/dpo/digits_captions.yaml", runs / "dpo",
          [f"data.vocab={data}/vocab.json", f"data.text_model={data}/text.model",
           f"model.seq_length={pair_seq_length(data)}",
           f"data.sources[0].path={data}/caption_pairs", f"train.init_from={base_ckpt}",
           f"train.max_steps={recipe.dpo_steps}", "train.save_every=0",
           f"train.log_every={max(1, recipe.dpo_steps // 5)}"], seed)
    with load(runs / "dpo") as dpo:
        res["captioning"]["after_dpo"] = ev.captions(dpo)
    res["dpo"] = _dpo_settings(runs / "dpo" / "config.yaml")
    for k in ("before_dpo", "after_dpo"):
        say(f"  captioning {k}: accuracy {res['captioning'][k]['accuracy']:.3f}")
    res["seed_seconds"] = time.perf_counter() - t_seed
    if write_samples:
        _sample_grid(out / "samples.png", {n: np.load(out / f"samples_{n}.npz") for n in ("no_guidance", "cfg", "cca")},
                     {"no_guidance": "no guidance", "cfg": f"CFG s={best_scale}", "cca": "CCA, no guidance"})
        from megacca.evaluation.sweep import plot_tradeoff

        plot_tradeoff(out / "tradeoff.png", {k: {float(sc): e for sc, e in v.items()} for k, v in res["sweep"].items()})
    return res


def _dpo_settings(config_yaml: Path) -> dict:
    """What the DPO run optimised, from the config it saved (results.md names it beside the figures)."""
    from megacca.config import load_config

    cfg = load_config(str(config_yaml), check=False)
    a = cfg.align
    return {"loss": a.loss, "beta": a.beta, "rpo_alpha": a.rpo_alpha, "lr": cfg.optim.lr,
            "steps": cfg.train.max_steps}


def _save_npz(path: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.savez_compressed(f, images=pixels.astype(np.uint8), labels=labels.astype(np.int64))


def _sample_grid(path: Path, sets: dict, titles: dict, per_group: int = 8) -> None:
    """Rows = classes, column groups = the sample sets (first `per_group` samples of each class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(sets)
    fig, axes = plt.subplots(10, len(groups), figsize=(3.2 * len(groups), 8.5))
    for g, name in enumerate(groups):
        imgs, labels = sets[name]["images"], sets[name]["labels"]
        for c in range(10):
            row = imgs[labels == c][:per_group]
            strip = np.concatenate([np.pad(im, 1, constant_values=0) for im in row], axis=1)
            ax = axes[c, g]
            ax.imshow(strip, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if g == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=10)
        axes[0, g].set_title(titles[name])
    fig.tight_layout()
    try:
        with atomic_writer(path) as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for name, *_ in ENTRIES:
        out[name] = {k: dict(zip(("mean", "sd"), _mean_sd([r[name][k] for r in per_seed])))
                     for k in ("accuracy", "fd", "diversity")}
    for k in ("before_dpo", "after_dpo"):
        out[f"captioning_{k}"] = {"accuracy": dict(zip(("mean", "sd"),
                                                       _mean_sd([r["captioning"][k]["accuracy"] for r in per_seed])))}
    return out


def results_md(results: dict) -> str:
    r = results
    lines = [f"Digits demo ({r['recipe']['per_class'] * 10} samples per row; judge held-out accuracy "
             f"{r['judge_accuracy']:.3f}; base = pretraining step {r['heldout_loss']['step']}, held-out loss "
             f"{r['heldout_loss']['loss']:.4f}; wall {r['wall_seconds'] / 60:.1f} min)", "",
             "| entry | model | prompt | guidance | accuracy | FD | diversity | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, model, task, guide in ENTRIES:
        e = r[name]
        g = "none" if guide == "none" else f"CFG s={e['cfg_scale']:g}"
        lines.append(f"| {name} | {model} | {'class' if task == 'c2i' else 'caption'} | {g} | {e['accuracy']:.3f} | "
                     f"{e['fd']:.2f} | {e['diversity']:.2f} | {e['tokens_per_s']:,.0f} |")
    c = r["captioning"]
    d = r.get("dpo") or {}
    how = (f" ({d['steps']} steps of {d['loss']} DPO, β {d['beta']:g}, lr {d['lr']:g}"
           f"{', + %g x NLL of the chosen caption (RPO)' % d['rpo_alpha'] if d.get('rpo_alpha') else ''})") if d else ""
    lines += ["", f"| captioning (held-out images, greedy){how} | accuracy |", "|---|---|",
              f"| before DPO | {c['before_dpo']['accuracy']:.3f} |", f"| after DPO | {c['after_dpo']['accuracy']:.3f} |"]
    if "seeds" in r and r["seeds"]["n"] > 1:
        s = r["seeds"]["summary"]
        lines += ["", f"Over {r['seeds']['n']} seeds (mean ± sd):", "",
                  "| entry | accuracy | FD | diversity |", "|---|---|---|---|"]
        for name in HEADLINE:
            a, f, d = (s[name][k] for k in ("accuracy", "fd", "diversity"))
            lines.append(f"| {name} | {a['mean']:.3f} ± {a['sd']:.3f} | {f['mean']:.2f} ± {f['sd']:.2f} | "
                         f"{d['mean']:.2f} ± {d['sd']:.2f} |")
        for k in ("before_dpo", "after_dpo"):
            a = s[f"captioning_{k}"]["accuracy"]
            lines.append(f"| captioning {k} | {a['mean']:.3f} ± {a['sd']:.3f} | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m megacca.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/digits", help="prepared digits data (launch/prepare_digits.sh)")
    ap.add_argument("--out", default="runs/demo", help="output directory (results.json, results.md, ...)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat training and evaluation for seeds 0..N-1")
    ap.add_argument("--quick", action="store_true", help="tiny step and sample counts: a smoke test of the pipeline")
    ap.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)  # demo.sh's start time
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = args.started or time.time()
    data, out = Path(args.data), Path(args.out)
    if not (data / "vocab.json").is_file():
        print(f"demo: error: {data}/vocab.json not found: run bash launch/prepare_digits.sh {data}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("demo: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    recipe = QUICK if args.quick else Recipe()
    from megacca.cli import hide_known_harmless_warnings

    hide_known_harmless_warnings()  # as `megacca` does: before megatron-core is imported (some warn at import)
    out.mkdir(parents=True, exist_ok=True)
    say("\n== judge: a classifier on the training split's real digits")
    ev = Evaluator(data, recipe)
    say(f"  held-out accuracy {ev.judge_accuracy:.3f}")
    per_seed = [run_seed(s, out, data, recipe, ev, write_samples=(s == 0)) for s in range(args.seeds)]
    results = {"judge_accuracy": ev.judge_accuracy, **per_seed[0], "recipe": asdict(recipe)}
    results["seeds"] = {"n": args.seeds, "per_seed": per_seed if args.seeds > 1 else None,
                        "summary": summarise(per_seed) if args.seeds > 1 else None}
    results["wall_seconds"] = time.time() - t0
    atomic_write_json(out / "results.json", results)
    md = results_md(results)
    atomic_write_text(out / "results.md", md)
    say("\n== results (" + str(out / "results.md") + ")\n")
    say(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
