"""Train a VQ image tokenizer on an `images` shard directory (docs/data-format.md).

    python tokenizers/train_vq.py tokenizers/configs/vq_digits.yaml [KEY=VALUE ...] --data DIR --out VQDIR

Reads `DIR/train-*.tar` (all images are decoded into memory: meant for small datasets such as digits),
trains `megacca.tokenizer.vq.VQModel` with pixel reconstruction + commitment + codebook losses, keeps the
codebook alive with k-means initialisation and dead-code re-seeding, and writes to VQDIR:
`config.json`, `model.safetensors` (the tokenizer, loadable with `megacca.tokenizer.vq.load_vq`),
`train_report.json` (held-out reconstruction MSE and codebook usage, loss log) and `recon_heldout.png`
(originals above reconstructions).

The config (`megacca.tokenizer.vq.config.VQRunConfig`) is loaded, overridden with dotted KEY=VALUE arguments
and checked like the training config: a bad key is one line on stderr naming the dotted key, bad or missing
data one line naming the path; exit code 2. Training stops after `train.steps` steps, never by a clock: the
same command and thread count give the same weights on a fast or a busy machine.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.cli import UsageError, run_tool  # noqa: E402
from megacca.config import to_dict  # noqa: E402
from megacca.data.shards import ShardReadError, iter_tar  # noqa: E402
from megacca.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from megacca.tokenizer.vq.config import VQRunConfig, load_run_config  # noqa: E402


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
            raise UsageError(f"--data {data_dir}: no `{split}-*.tar` shards")
        return None
    imgs = []
    for sh in shards:
        for s in iter_tar(str(sh)):  # a damaged tar is a ShardReadError naming shard and key (one line, exit 2)
            if "png" not in s:
                raise UsageError(f"{sh}: sample {s['__key__']!r} has no .png (is {data_dir} an `images` "
                                 "shard directory?)")
            try:
                imgs.append(preprocess(Image.open(io.BytesIO(s["png"])), vq_cfg))
            except Exception as e:  # noqa: BLE001 - name the bad sample
                raise UsageError(f"{sh}: sample {s['__key__']!r}: cannot decode png ({e})")
    if not imgs:
        raise UsageError(f"--data {data_dir}: the `{split}-*.tar` shards hold no samples")
    return torch.stack(imgs)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
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
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def train(config_path: str, data_dir: str, out_dir: str, overrides=(), log=print) -> dict:
    """Train the tokenizer of YAML `config_path` (+ dotted `overrides`) on `data_dir`; write it to `out_dir`."""
    run: VQRunConfig = load_run_config(config_path, overrides)
    vq_cfg, t, ev = run.model, run.train, run.eval
    data = Path(data_dir)
    if not data.is_dir():
        raise UsageError(f"--data {data}: data directory not found")

    import torch

    from megacca.config import OptimConfig
    from megacca.optim import lr_at
    from megacca.tokenizer.vq import VQModel, save_vq

    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
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
    # fused: one kernel per step for all parameters instead of a dozen small ops per tensor
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=True)
    # the LM trainer's schedule: linear warmup, cosine to lr * min_lr_ratio at the last step
    schedule = OptimConfig(lr=t.lr, min_lr=t.lr * t.min_lr_ratio, warmup_steps=t.warmup_steps, decay="cosine")
    q = model.quantize
    K, N, bs = vq_cfg.codebook_size, len(train_x), min(t.batch_size, len(train_x))

    def random_latents(n):
        idx = torch.randperm(N, generator=gen)[: min(n, N)]
        with torch.no_grad():
            return torch.cat([model.latents(train_x[idx[i: i + 256]]) for i in range(0, len(idx), 256)])

    if t.kmeans_init:
        model.eval()
        q.kmeans_init(random_latents(t.kmeans_images), iters=t.kmeans_iters, generator=gen)
    model.train()

    window = torch.zeros(K, dtype=torch.long)
    perm, pos = torch.randperm(N, generator=gen), 0
    hist, acc, acc_n, reseeded, lr = [], {}, 0, 0, 0.0
    start = time.time()
    for step in range(t.steps):
        if pos + bs > N:
            perm, pos = torch.randperm(N, generator=gen), 0
        x = train_x[perm[pos: pos + bs]]
        pos += bs
        lr = lr_at(step, schedule, t.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        _, losses, codes = model(x, return_codes=True)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        window += torch.bincount(codes.flatten(), minlength=K)
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + v.item()
        acc_n += 1

        if t.dead_code_every > 0 and (step + 1) % t.dead_code_every == 0:
            decayed = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)  # share of the cosine done
            if decayed <= t.dead_code_until:
                reseeded += q.reinit_codes(window == 0, random_latents(t.dead_code_images), generator=gen)
            window.zero_()
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            el = time.time() - start
            rec = {"step": step + 1, **{k: v / acc_n for k, v in acc.items()}, "lr": lr, "elapsed_s": round(el, 1)}
            hist.append(rec)
            log(f"step {step + 1:5d}/{t.steps}  loss {rec['loss']:.4f}  recon {rec['recon']:.4f}  "
                f"commit {rec['commit']:.4f}  codebook {rec['codebook']:.4f}  lr {lr:.2e}  "
                f"reseeded {reseeded}  {(step + 1) / el:.1f} it/s  {el:.0f}s")
            acc, acc_n = {}, 0
    train_time = time.time() - start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_vq(model, out)
    model.eval()
    res = evaluate(model, held_x, ev.batch_size)
    if ev.sample_images > 0:
        save_grid(model, held_x, out / "recon_heldout.png", ev.sample_images)
    report = {
        "format": "megacca-vq-train/1", "config_path": str(config_path), "overrides": list(overrides),
        "data": str(data), "eval_split": eval_split,
        "recon_mse": res["recon_mse"], "codebook_usage": res["codebook_usage"], "eval": res,
        "steps": t.steps, "train_time_s": round(train_time, 2), "params": n_params, "codes_reseeded": reseeded,
        "initial_loss": hist[0]["loss"], "final_loss": hist[-1]["loss"], "log": hist,
        "vq": to_dict(vq_cfg), "train": to_dict(t), "eval_config": to_dict(ev), "grid": list(vq_cfg.grid),
        "train_images": len(train_x),
    }
    atomic_write_json(out / "train_report.json", report, indent=2)
    log(f"done: {t.steps} steps in {train_time:.1f}s; {eval_split} recon MSE {res['recon_mse']:.5f} "
        f"(PSNR {res['psnr_db']:.2f} dB, images in [-1,1]); codebook usage {res['codebook_usage']:.3f} "
        f"({res['codes_used']}/{K} codes, perplexity {res['perplexity']:.1f}); wrote {out}")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Config keys: megacca/tokenizer/vq/config.py (VQRunConfig and its sections).")
    ap.add_argument("config", help="YAML config (sections model/train/eval)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides applied on top of the YAML, e.g. train.steps=600 model.ch=16")
    ap.add_argument("--data", required=True, help="`images` shard directory with train-*.tar (+ heldout-*.tar)")
    ap.add_argument("--out", required=True, help="output tokenizer directory")
    args = ap.parse_intermixed_args(argv)
    return run_tool("train_vq", lambda: train(args.config, args.data, args.out, args.overrides,
                                              log=lambda s: print(s, flush=True)), ShardReadError)


if __name__ == "__main__":
    sys.exit(main())
