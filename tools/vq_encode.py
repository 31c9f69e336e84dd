"""Turn an `images` shard directory into a `codes` shard directory with a trained VQ tokenizer.

    python tools/vq_encode.py --vq VQDIR --src DIR --out CODEDIR --workers 2

For every source shard `<split>-NNNNNN.tar` (as listed in `DIR/manifest.json`) one output shard of the same
name is written, each sample becoming `KEY.codes.npy` (int16 array [h, w] when K <= 32768, else int32) and
`KEY.json` (the source metadata: label, captions, ...), see docs/data-format.md. `CODEDIR/manifest.json` has
kind "codes", per-split counts, per-shard sha256, the source's classes (and its other descriptive fields such as
the `captions`/`labels` hints), `image_size` = the VQ's (what decoding the codes gives), `source_image_size`, and
a `vq` block (codebook_size, grid [h, w], image_size, sha256 of model.safetensors and of config.json, path).

Workers are spawned processes; each loads the VQ once and runs with one torch thread. Resumable: a shard is
written to `NAME.tmp` and renamed when complete, then a completion record `CODEDIR/.vq_encode/NAME.json`
(VQ hashes, source shard sha256, output sha256) is written; a re-run skips shards whose record matches the
same VQ, the same source shard and the file on disk, so an interrupted run continues where it stopped. Output
tars are byte-deterministic (fixed member metadata), so a resumed run gives the same sha256s as a clean one.
Bad arguments or input → one-line error, exit code 2.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.data.shards import iter_tar  # noqa: E402
from megacca.fileio import atomic_write_text, sha256_file  # noqa: E402

PROGRESS_DIR = ".vq_encode"
_NOT_COPIED = {"image_mode"}  # source-manifest fields that describe the pixels, not the codes
SHARDS_FORMAT = "megacca-shards/1"


class UsageError(Exception):
    """Bad arguments or input: one line on stderr, exit code 2."""


def _add_member(tf: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


# --------------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------------
_MODEL = None


def _init_worker(vq_dir: str):
    global _MODEL
    import torch

    from megacca.tokenizer.vq import load_vq

    torch.set_num_threads(1)
    _MODEL = load_vq(vq_dir)


def encode_shard(task: dict) -> dict:
    """Encode one source shard into `out_dir/name` (via `name.tmp`) and write its completion record."""
    import numpy as np
    import torch
    from PIL import Image

    from megacca.tokenizer.vq import preprocess

    model = _MODEL
    cfg = model.config
    src, out_dir, name = Path(task["src"]), Path(task["out_dir"]), task["name"]
    dtype = np.int16 if cfg.codebook_size <= 32768 else np.int32
    t0 = time.time()
    final, tmp = out_dir / name, out_dir / (name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        pending = []  # (key, image tensor, json bytes)

        def flush():
            nonlocal count
            if not pending:
                return
            with torch.no_grad():
                codes = model.encode(torch.stack([p[1] for p in pending])).numpy()
            for (key, _, meta), c in zip(pending, codes):
                buf = io.BytesIO()
                np.save(buf, c.astype(dtype), allow_pickle=False)
                _add_member(tf, f"{key}.codes.npy", buf.getvalue())
                _add_member(tf, f"{key}.json", meta)
            count += len(pending)
            pending.clear()

        for s in iter_tar(str(src)):
            key = s["__key__"]
            if "png" not in s:
                raise UsageError(f"{src.name}: sample {key!r} has no .png member")
            try:
                img = preprocess(Image.open(io.BytesIO(s["png"])), cfg)
            except Exception as e:  # noqa: BLE001 - name the bad sample
                raise UsageError(f"{src.name}: sample {key!r}: cannot decode png ({e})")
            meta = s.get("json")
            if meta is None:
                meta = json.dumps({"label": None, "captions": []}).encode()
            else:
                try:
                    json.loads(meta)
                except ValueError as e:
                    raise UsageError(f"{src.name}: sample {key!r}: bad json ({e})")
            pending.append((key, img, meta))
            if len(pending) >= task["batch_size"]:
                flush()
        flush()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    rec = {"name": name, "count": count, "sha256": sha256_file(final), "src_sha256": task["src_sha256"],
           "vq_sha256": task["vq_sha256"], "vq_config_sha256": task["vq_config_sha256"]}
    atomic_write_text(out_dir / PROGRESS_DIR / (name + ".json"), json.dumps(rec) + "\n")
    return {**rec, "split": task["split"], "seconds": time.time() - t0}


def _run_task(task):
    """Pool entry point: UsageError does not survive pickling with its type intact, so tag it."""
    try:
        return encode_shard(task)
    except UsageError as e:
        return {"error": str(e)}


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
def _done_record(out_dir: Path, name: str, src_sha: str, vq_sha: str, vq_cfg_sha: str):
    """The completion record if `name` is complete for this VQ and source shard, else None."""
    rp, final = out_dir / PROGRESS_DIR / (name + ".json"), out_dir / name
    if not (rp.is_file() and final.is_file()):
        return None
    try:
        rec = json.loads(rp.read_text())
    except ValueError:
        return None
    if (rec.get("vq_sha256"), rec.get("vq_config_sha256"), rec.get("src_sha256")) != (vq_sha, vq_cfg_sha, src_sha):
        return None
    if rec.get("sha256") != sha256_file(final):
        return None
    return rec


def run(vq_dir: str, src_dir: str, out_dir: str, workers: int = 2, batch_size: int = 256, splits=None,
        log=print) -> dict:
    from megacca.tokenizer.vq import CONFIG_NAME, WEIGHTS_NAME, load_vq_config

    vq, src, out = Path(vq_dir), Path(src_dir), Path(out_dir)
    if not vq.is_dir():
        raise UsageError(f"VQ directory not found: {vq}")
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (vq / f).is_file():
            raise UsageError(f"VQ directory {vq} has no {f}")
    try:
        cfg = load_vq_config(vq)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{vq / CONFIG_NAME}: {e}")
    if not src.is_dir():
        raise UsageError(f"source shard directory not found: {src}")
    mpath = src / "manifest.json"
    if not mpath.is_file():
        raise UsageError(f"source shard directory {src} has no manifest.json")
    try:
        sman = json.loads(mpath.read_text())
    except ValueError as e:
        raise UsageError(f"{mpath}: invalid JSON ({e})")
    if sman.get("kind") != "images":
        raise UsageError(f"{mpath}: kind is {sman.get('kind')!r}, expected 'images'")
    if not isinstance(sman.get("splits"), dict) or not sman["splits"]:
        raise UsageError(f"{mpath}: no splits")
    if splits:
        missing = [s for s in splits if s not in sman["splits"]]
        if missing:
            raise UsageError(f"{mpath}: no split(s) {missing}; has {sorted(sman['splits'])}")
    if workers < 1 or batch_size < 1:
        raise UsageError("--workers and --batch-size must be >= 1")
    if out.resolve() == src.resolve():
        raise UsageError("--out must differ from --src")

    vq_sha, vq_cfg_sha = sha256_file(vq / WEIGHTS_NAME), sha256_file(vq / CONFIG_NAME)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)

    plan, done, todo = [], {}, []
    for split, info in sman["splits"].items():
        if splits and split not in splits:
            continue
        for sh in info.get("shards", []):
            name = sh["name"]
            if not (src / name).is_file():
                raise UsageError(f"{mpath} lists {name}, which is missing from {src}")
            src_sha = sh.get("sha256") or sha256_file(src / name)
            plan.append((split, name))
            rec = _done_record(out, name, src_sha, vq_sha, vq_cfg_sha)
            if rec is not None:
                done[name] = rec
            else:
                todo.append({"src": str(src / name), "out_dir": str(out), "name": name, "split": split,
                             "batch_size": batch_size, "src_sha256": src_sha, "vq_sha256": vq_sha,
                             "vq_config_sha256": vq_cfg_sha})
    log(f"vq_encode: {len(plan)} shard(s), {len(done)} already complete, {len(todo)} to encode "
        f"(grid {list(cfg.grid)}, K={cfg.codebook_size}, {min(workers, len(todo))} worker(s))")

    t0 = time.time()
    n_images = 0
    if todo:
        def handle(res):
            nonlocal n_images
            if "error" in res:
                raise UsageError(res["error"])
            done[res["name"]] = res
            n_images += res["count"]
            log(f"  {res['name']}: {res['count']} images in {res['seconds']:.1f}s")

        nw = min(workers, len(todo))
        if nw == 1:
            _init_worker(str(vq))
            for task in todo:
                handle(_run_task(task))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(nw, initializer=_init_worker, initargs=(str(vq),)) as pool:
                for res in pool.imap_unordered(_run_task, todo):
                    handle(res)
    elapsed = time.time() - t0
    for stale in out.glob("*.tmp"):  # leftovers of an interrupted run; every shard is complete now
        stale.unlink()

    man = {"format": SHARDS_FORMAT, "kind": "codes", "splits": {}, "classes": sman.get("classes"),
           "image_size": [cfg.image_size, cfg.image_size],  # what decode() of these codes produces
           "vq": {"codebook_size": cfg.codebook_size, "grid": list(cfg.grid), "image_size": [cfg.image_size] * 2,
                  "sha256": vq_sha, "config_sha256": vq_cfg_sha, "path": str(vq.resolve())},
           "source": sman.get("source"), "source_image_size": sman.get("image_size")}
    for k, v in sman.items():  # other descriptive fields (e.g. the `captions`/`labels` hints) still hold
        if k not in man and k not in _NOT_COPIED:
            man[k] = v
    for split, name in plan:
        rec = done[name]
        s = man["splits"].setdefault(split, {"count": 0, "shards": []})
        s["shards"].append({"name": name, "count": rec["count"], "sha256": rec["sha256"]})
        s["count"] += rec["count"]
    atomic_write_text(out / "manifest.json", json.dumps(man, indent=2) + "\n")
    rate = n_images / elapsed if elapsed > 0 and n_images else 0.0
    log(f"vq_encode: encoded {n_images} images in {elapsed:.1f}s ({rate:.1f} images/s); "
        f"skipped {len(plan) - len(todo)} complete shard(s); wrote {out / 'manifest.json'}")
    return {"manifest": man, "encoded_images": n_images, "encoded_shards": len(todo),
            "skipped_shards": len(plan) - len(todo), "seconds": elapsed, "images_per_s": rate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vq", required=True, help="tokenizer directory (config.json + model.safetensors)")
    ap.add_argument("--src", required=True, help="`images` shard directory (with manifest.json)")
    ap.add_argument("--out", required=True, help="output `codes` shard directory")
    ap.add_argument("--workers", type=int, default=2, help="encoding processes (spawned; 1 = in this process)")
    ap.add_argument("--batch-size", type=int, default=256, help="images per encoder call")
    ap.add_argument("--splits", default=None, help="comma-separated splits to encode (default: all)")
    args = ap.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    try:
        run(args.vq, args.src, args.out, args.workers, args.batch_size, splits, log=lambda s: print(s, flush=True))
    except UsageError as e:
        print(f"vq_encode: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
