"""Train a VQ image tokenizer on an `images` shard directory (docs/data-format.md).

    python tokenizers/train_vq.py tokenizers/configs/vq_digits.yaml --data DIR --out VQDIR

Reads `DIR/train-*.tar` (all images are decoded into memory: meant for small datasets such as digits),
trains `megacca.tokenizer.vq.VQModel` with pixel reconstruction + commitment + codebook losses, keeps the
codebook alive with k-means initialisation and dead-code re-seeding, and writes to VQDIR:
`config.json`, `model.safetensors` (the tokenizer, loadable with `megacca.tokenizer.vq.load_vq`),
`train_report.json` (held-out reconstruction MSE and codebook usage, loss log) and `recon_heldout.png`
(originals above reconstructions). Bad config or missing data → one-line error on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.data.shards import iter_tar  # noqa: E402

TRAIN_DEFAULTS = {
    "steps": 1500, "batch_size": 64, "lr": 2e-3, "min_lr_ratio": 0.05, "warmup_steps": 50,
    "weight_decay": 0.0, "betas": [0.9, 0.99], "grad_clip": 1.0, "seed": 0, "threads": 1, "max_time_s": 0.0,
    "log_every": 100, "kmeans_init": True, "kmeans_images": 1024, "kmeans_iters": 10,
    "dead_code_every": 50, "dead_code_until": 0.8,
}
EVAL_DEFAULTS = {"batch_size": 256, "sample_images": 32}


class UsageError(Exception):
    """Bad config or data: reported as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
def _typed_section(raw, defaults: dict, section: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"config section `{section}` must be a mapping")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise UsageError(f"config section `{section}`: unknown key(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in raw.items():
        d = defaults[k]
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            if isinstance(v, str):  # YAML 1.1 reads `2e-3` as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif isinstance(d, list):
            ok = isinstance(v, list) and len(v) == len(d) and all(isinstance(x, (int, float)) for x in v)
        else:
            ok = True
        if not ok:
            raise UsageError(f"config `{section}.{k}`: expected {type(d).__name__}, got {v!r}")
        out[k] = v
    return out


def load_config(path: str):
    """YAML → (VQConfig, train dict, eval dict); raises UsageError naming the problem."""
    import yaml

    from megacca.tokenizer.vq import VQConfig

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: invalid YAML ({str(e).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise UsageError(f"{p}: expected a mapping with sections model/train/eval")
    unknown = sorted(set(raw) - {"model", "train", "eval"})
    if unknown:
        raise UsageError(f"{p}: unknown section(s) {unknown}; known: ['eval', 'model', 'train']")
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise UsageError(f"{p}: section `model` must be a mapping")
    try:
        vq_cfg = VQConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{p}: model: {e}")
    train = _typed_section(raw.get("train"), TRAIN_DEFAULTS, "train")
    ev = _typed_section(raw.get("eval"), EVAL_DEFAULTS, "eval")
    for k in ("steps", "batch_size", "threads", "log_every", "kmeans_images", "kmeans_iters"):
        if train[k] < 1:
            raise UsageError(f"config `train.{k}` must be >= 1, got {train[k]}")
    if train["lr"] <= 0:
        raise UsageError(f"config `train.lr` must be > 0, got {train['lr']}")
    if ev["batch_size"] < 1:
        raise UsageError(f"config `eval.batch_size` must be >= 1, got {ev['batch_size']}")
    return vq_cfg, train, ev


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def load_split(data_dir: Path, split: str, vq_cfg, required: bool):
    """All images of `split` as a float tensor [N, 3, S, S] in [-1, 1] (None if absent and not required)."""
    import torch
    from PIL import Image

    from megacca.tokenizer.vq import preprocess

    shards = sorted(data_dir.glob(f"{split}-*.tar"))
    if not shards:
        if required:
            raise UsageError(f"no `{split}-*.tar` shards in {data_dir}")
        return None
    imgs = []
    for sh in shards:
        for s in iter_tar(str(sh)):
            if "png" not in s:
                raise UsageError(f"{sh.name}: sample {s['__key__']!r} has no .png "
                                 f"(is {data_dir} an `images` shard dir?)")
            try:
                imgs.append(preprocess(Image.open(io.BytesIO(s["png"])), vq_cfg))
            except Exception as e:  # noqa: BLE001 - name the bad sample
                raise UsageError(f"{sh.name}: sample {s['__key__']!r}: cannot decode png ({e})")
    if not imgs:
        raise UsageError(f"`{split}-*.tar` shards in {data_dir} hold no samples")
    return torch.stack(imgs)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
def lr_at(step: int, progress: float, t: dict) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio as `progress` goes 0 → 1."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    lo = t["lr"] * t["min_lr_ratio"]
    return lo + 0.5 * (t["lr"] - lo) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def evaluate(model, images, batch_size: int):
    """Held-out figures: recon MSE of decode(encode(x)) in [-1, 1] pixel units, PSNR, codebook usage."""
    import torch

    model.eval()
    K = model.config.codebook_size
    se, n, counts = 0.0, 0, torch.zeros(K, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i: i + batch_size]
            c = model.encode(x)
            r = model.decode(c)
            se += float(((r - x) ** 2).sum())
            n += x.numel()
            counts += torch.bincount(c.flatten(), minlength=K)
    mse = se / n
    p = counts.float() / counts.sum()
    ppl = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"images": len(images), "recon_mse": mse, "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),
            "codebook_usage": int((counts > 0).sum()) / K, "codes_used": int((counts > 0).sum()),
            "perplexity": ppl}


def save_grid(model, images, path: Path, n: int):
    """Pairs of rows (8 images each): originals above their reconstructions, 4x nearest upscale, gray gaps."""
    import numpy as np
    import torch
    from PIL import Image

    from megacca.tokenizer.vq import to_uint8

    x = images[:n]
    with torch.no_grad():
        r = model.decode(model.encode(x))
    a, b = to_uint8(x), to_uint8(r)
    per, gap, s = 8, 2, 4
    tile = a.shape[1] * s
    nrow = (len(a) + per - 1) // per
    g = np.full((nrow * (2 * (tile + gap) + 3 * gap), per * (tile + gap), 3), 96, np.uint8)  # gray separators
    for i in range(len(a)):
        r, c = divmod(i, per)
        y0, x0 = r * (2 * (tile + gap) + 3 * gap), c * (tile + gap)
        for j, src in enumerate((a, b)):
            big = src[i].repeat(s, 0).repeat(s, 1)
            g[y0 + j * (tile + gap): y0 + j * (tile + gap) + tile, x0: x0 + tile] = big
    Image.fromarray(g).save(path)


def train(config_path: str, data_dir: str, out_dir: str, log=print) -> dict:
    vq_cfg, t, ev = load_config(config_path)
    data = Path(data_dir)
    if not data.is_dir():
        raise UsageError(f"data directory not found: {data}")

    import torch

    from megacca.tokenizer.vq import VQModel, save_vq

    torch.set_num_threads(t["threads"])
    torch.manual_seed(t["seed"])
    gen = torch.Generator().manual_seed(t["seed"])
    t0 = time.time()
    train_x = load_split(data, "train", vq_cfg, required=True)
    held_x = load_split(data, "heldout", vq_cfg, required=False)
    eval_split = "heldout"
    if held_x is None:
        log(f"warning: no heldout-*.tar in {data}; reporting figures on the train split")
        held_x, eval_split = train_x, "train"
    log(f"data: {len(train_x)} train / {len(held_x)} {eval_split} images at {vq_cfg.image_size}px "
        f"({time.time() - t0:.1f}s); grid {list(vq_cfg.grid)}, K={vq_cfg.codebook_size}")

    model = VQModel(vq_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
    q = model.quantize
    K, N, bs = vq_cfg.codebook_size, len(train_x), min(t["batch_size"], len(train_x))

    def random_latents(n):
        idx = torch.randperm(N, generator=gen)[: min(n, N)]
        with torch.no_grad():
            return torch.cat([model.latents(train_x[idx[i: i + 256]]) for i in range(0, len(idx), 256)])

    if t["kmeans_init"]:
        model.eval()
        q.kmeans_init(random_latents(t["kmeans_images"]), iters=t["kmeans_iters"], generator=gen)
    model.train()

    window = torch.zeros(K, dtype=torch.long)
    perm, pos = torch.randperm(N, generator=gen), 0
    hist, acc, acc_n, reseeded = [], {}, 0, 0
    start, step = time.time(), 0
    stopped_early, steps_done, lr = False, 0, 0.0
    w = t["warmup_steps"]

    def flush_log():
        nonlocal acc, acc_n
        el = time.time() - start
        rec = {"step": steps_done, **{k: v / acc_n for k, v in acc.items()}, "lr": lr, "elapsed_s": round(el, 1)}
        hist.append(rec)
        log(f"step {steps_done:5d}/{t['steps']}  loss {rec['loss']:.4f}  recon {rec['recon']:.4f}  "
            f"commit {rec['commit']:.4f}  codebook {rec['codebook']:.4f}  lr {lr:.2e}  "
            f"reseeded {reseeded}  {steps_done / el:.1f} it/s  {el:.0f}s")
        acc, acc_n = {}, 0
    for step in range(t["steps"]):
        # progress through the decay: by steps, or by wall time when max_time_s is set and binds first, so a
        # slow (shared) machine still ends with a fully decayed learning rate inside the budget
        progress = (step - w) / max(1, t["steps"] - w)
        if t["max_time_s"] > 0 and step >= w:
            progress = max(progress, (time.time() - start) / t["max_time_s"])
            if progress >= 1.0:
                stopped_early = True
                log(f"time budget of {t['max_time_s']:.0f}s spent at step {step}; stopping")
                break
        if pos + bs > N:
            perm, pos = torch.randperm(N, generator=gen), 0
        x = train_x[perm[pos: pos + bs]]
        pos += bs
        lr = lr_at(step, progress, t)
        for g in opt.param_groups:
            g["lr"] = lr
        _, losses, codes = model(x, return_codes=True)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        window += torch.bincount(codes.flatten(), minlength=K)
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + v.item()
        acc_n += 1

        every = t["dead_code_every"]
        if every > 0 and (step + 1) % every == 0:
            if progress <= t["dead_code_until"]:
                reseeded += q.reinit_codes(window == 0, random_latents(max(1024, K)), generator=gen)
            window.zero_()
        steps_done = step + 1
        if steps_done % t["log_every"] == 0 or steps_done == t["steps"]:
            flush_log()
    if acc_n:  # stopped by the time budget inside a log window
        flush_log()
    train_time = time.time() - start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_vq(model, out)
    model.eval()
    res = evaluate(model, held_x, ev["batch_size"])
    if ev["sample_images"] > 0:
        save_grid(model, held_x, out / "recon_heldout.png", ev["sample_images"])
    report = {
        "format": "megacca-vq-train/1", "config_path": str(config_path), "data": str(data), "eval_split": eval_split,
        "recon_mse": res["recon_mse"], "codebook_usage": res["codebook_usage"], "eval": res,
        "steps": steps_done, "stopped_early": stopped_early, "train_time_s": round(train_time, 2),
        "params": n_params, "codes_reseeded": reseeded,
        "initial_loss": hist[0]["loss"] if hist else None, "final_loss": hist[-1]["loss"] if hist else None,
        "log": hist, "vq": vq_cfg.to_dict(), "train": t, "eval_config": ev, "grid": list(vq_cfg.grid),
        "train_images": len(train_x),
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {steps_done} steps in {train_time:.1f}s; {eval_split} recon MSE {res['recon_mse']:.5f} "
        f"(PSNR {res['psnr_db']:.2f} dB, images in [-1,1]); codebook usage {res['codebook_usage']:.3f} "
        f"({res['codes_used']}/{K} codes, perplexity {res['perplexity']:.1f}); wrote {out}")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config (sections model/train/eval)")
    ap.add_argument("--data", required=True, help="`images` shard directory with train-*.tar (+ heldout-*.tar)")
    ap.add_argument("--out", required=True, help="output tokenizer directory")
    args = ap.parse_args(argv)
    try:
        train(args.config, args.data, args.out, log=lambda s: print(s, flush=True))
    except UsageError as e:
        print(f"train_vq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
