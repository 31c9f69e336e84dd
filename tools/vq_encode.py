"""Turn an `images` shard directory into a `codes` shard directory with a trained VQ tokenizer (and a `pairs`
directory with prompt images into one with prompt codes).

    python tools/vq_encode.py --vq VQDIR --src DIR --out CODEDIR --workers 2

For every source shard `<split>-NNNNNN.tar` (as listed in `DIR/manifest.json`) one output shard of the same
name is written, each sample becoming `KEY.codes.npy` (int16 array [h, w] when K <= 32768, else int32) and
`KEY.json` (the source metadata: label, captions, ...), see docs/data-format.md. A `pairs` source keeps its
kind: a sample's `KEY.prompt.png` becomes `KEY.prompt.codes.npy`, its `KEY.json` is copied, and samples
without a prompt image pass through unchanged. `CODEDIR/manifest.json` has kind "codes" (or "pairs"),
per-split counts, per-shard sha256, the source's classes (and its other descriptive fields such as
the `captions`/`labels` hints), `image_size` = the VQ's (what decoding the codes gives), `source_image_size`, and
a `vq` block (codebook_size, grid [h, w], image_size, sha256 of model.safetensors and of config.json, path).
Shards and manifests are read and written by `megacca.data.shards`, like every other shard directory.

Workers are spawned processes; each loads the VQ once and runs with one torch thread. Resumable: a shard is
written under a hidden temporary name and renamed when complete (`write_shard`), then a completion record
`CODEDIR/.vq_encode/NAME.json` (VQ hashes, source shard sha256, output sha256) is written; a re-run skips
shards whose record matches the same VQ, the same source shard and the file on disk, so an interrupted run
continues where it stopped. Output tars are byte-deterministic (fixed member metadata), so a resumed run gives
the same sha256s as a clean one. Bad arguments or input (including a corrupt source shard, named with the sample
key) → one-line error, exit code 2.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.cli import UsageError, run_tool  # noqa: E402
from megacca.data.shards import (  # noqa: E402
    TMP_NAME_RE, ShardManifestError, ShardReadError, iter_tar, read_manifest, write_manifest, write_shard)
from megacca.fileio import atomic_write_text, sha256_file  # noqa: E402

PROGRESS_DIR = ".vq_encode"
_NOT_COPIED = {"image_mode"}  # source-manifest fields that describe the pixels, not the codes


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
    """Encode one source shard into `out_dir/name` (atomically, by `write_shard`) and write its completion record."""
    import numpy as np
    import torch
    from PIL import Image

    from megacca.tokenizer.vq import preprocess

    model = _MODEL
    cfg = model.config
    src, out_dir, name = Path(task["src"]), Path(task["out_dir"]), task["name"]
    dtype = np.int16 if cfg.codebook_size <= 32768 else np.int32
    t0 = time.time()

    pairs = task["kind"] == "pairs"
    png, out_member = ("prompt.png", "prompt.codes.npy") if pairs else ("png", "codes.npy")

    def batches():  # lists of (key, image tensor or None, json bytes), in the source's order; a batch holds
        pending, n_img = [], 0  # at most batch_size images
        for s in iter_tar(str(src), task["count"]):
            key = s["__key__"]
            if png not in s and not pairs:
                raise UsageError(f"{src.name}: sample {key!r} has no .png member")
            img = None
            if png in s:
                try:
                    img = preprocess(Image.open(io.BytesIO(s[png])), cfg)
                except Exception as e:  # noqa: BLE001 - name the bad sample
                    raise UsageError(f"{src.name}: sample {key!r}: cannot decode {png} ({e})")
            meta = s.get("json")
            if meta is None and pairs:
                raise UsageError(f"{src.name}: sample {key!r} has no .json member (prompt, chosen, rejected)")
            if meta is None:
                meta = json.dumps({"label": None, "captions": []}).encode()
            else:
                try:
                    json.loads(meta)
                except ValueError as e:
                    raise UsageError(f"{src.name}: sample {key!r}: bad json ({e})")
            pending.append((key, img, meta))
            n_img += img is not None
            if n_img >= task["batch_size"]:
                yield pending
                pending, n_img = [], 0
        if pending:
            yield pending

    n_images = 0

    def samples():
        nonlocal n_images
        for batch in batches():
            imgs = [p[1] for p in batch if p[1] is not None]
            n_images += len(imgs)
            if imgs:
                with torch.no_grad():
                    codes = iter(model.encode(torch.stack(imgs)).numpy())
            for key, img, meta in batch:
                sample = {"__key__": key, "json": meta}
                if img is not None:
                    sample[out_member] = next(codes).astype(dtype)
                yield sample

    try:
        entry = write_shard(str(out_dir / name), samples())
    except ShardReadError as e:
        raise UsageError(str(e)) from None
    rec = {"name": name, "count": entry["count"], "sha256": entry["sha256"], "src_sha256": task["src_sha256"],
           "vq_sha256": task["vq_sha256"], "vq_config_sha256": task["vq_config_sha256"]}
    atomic_write_text(out_dir / PROGRESS_DIR / (name + ".json"), json.dumps(rec) + "\n")
    return {**rec, "split": task["split"], "images": n_images, "seconds": time.time() - t0}


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
    try:
        sman = read_manifest(str(src))
    except ShardManifestError as e:
        raise UsageError(str(e)) from None
    mpath = src / "manifest.json"
    if sman["kind"] not in ("images", "pairs"):
        raise UsageError(f"{mpath}: kind is {sman['kind']!r}, expected 'images' (or 'pairs' with prompt images)")
    if not sman["splits"]:
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
        for sh in info["shards"]:  # read_manifest checked that each exists
            name, src_sha = sh["name"], sh["sha256"]
            plan.append((split, name))
            rec = _done_record(out, name, src_sha, vq_sha, vq_cfg_sha)
            if rec is not None:
                done[name] = rec
            else:
                todo.append({"src": str(src / name), "out_dir": str(out), "name": name, "split": split,
                             "kind": sman["kind"],
                             "count": sh["count"], "batch_size": batch_size, "src_sha256": src_sha, "vq_sha256": vq_sha,
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
            n_images += res["images"]
            log(f"  {res['name']}: {res['images']} images in {res['seconds']:.1f}s")

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
    for stale in out.iterdir():  # leftovers of an interrupted run (also `NAME.tmp` of older versions of this tool)
        if TMP_NAME_RE.match(stale.name) or stale.name.endswith(".tmp"):
            stale.unlink()

    extra = {k: v for k, v in sman.items()  # descriptive fields (e.g. the `captions`/`labels` hints) still hold
             if k not in ("format", "kind", "splits") and k not in _NOT_COPIED}
    extra.update(image_size=[cfg.image_size, cfg.image_size],  # what decode() of these codes produces
                 vq={"codebook_size": cfg.codebook_size, "grid": list(cfg.grid), "image_size": [cfg.image_size] * 2,
                     "sha256": vq_sha, "config_sha256": vq_cfg_sha, "path": str(vq.resolve())},
                 source_image_size=sman.get("image_size"))
    splits = {}
    for split, name in plan:
        rec = done[name]
        s = splits.setdefault(split, {"count": 0, "shards": []})
        s["shards"].append({"name": name, "count": rec["count"], "sha256": rec["sha256"],
                            "bytes": (out / name).stat().st_size})
        s["count"] += rec["count"]
    man = write_manifest(str(out), "codes" if sman["kind"] == "images" else "pairs", splits, **extra)
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
    return run_tool("vq_encode", lambda: run(args.vq, args.src, args.out, args.workers, args.batch_size, splits,
                                             log=lambda s: print(s, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
