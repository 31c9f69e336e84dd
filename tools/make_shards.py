"""Write WebDataset shard directories (docs/data-format.md, "Shards").

    python tools/make_shards.py digits      --out DIR [--augment-shifts]
    python tools/make_shards.py imagefolder --images DIR --captions FILE.jsonl --out OUT
    python tools/make_shards.py imagenet    --root DIR --out OUT [--max-per-class N] [--size S]
    python tools/make_shards.py text        --input FILE.jsonl [...] --out OUT
    python tools/make_shards.py pairs       --input FILE.jsonl [...] --out OUT
    python tools/make_shards.py caption-pairs --src IMAGES_DIR --out OUT

Every subcommand writes ``OUT/<split>-NNNNNN.tar`` and, last, ``OUT/manifest.json``.  Splits: ``train``
(or ``--split``) and, with ``--heldout-fraction F > 0``, ``heldout``: exactly ``round(F * N)`` samples,
stratified by class where there are labels (digits, imagenet), chosen with ``--seed``.  Samples are written
in a seeded random order (``--no-shuffle`` keeps the input order), so the output is a pure function of the
input and the flags: two runs give byte-identical shards (same sha256s).

digits
    The real handwritten digits bundled with scikit-learn (``sklearn.datasets.load_digits``: 1,797 8x8
    images, values 0..16 stored as grayscale PNG 0..255), labels 0..9, class names "0".."9", six caption
    templates per class; 10% per class held out by default. ``--augment-shifts`` adds, for every training
    image, its 8 copies shifted by one pixel (vacated pixels 0), each with json ``"augment": {"shift": [dx, dy],
    "text": "up left"}``, which the loader puts into the condition (docs/data-format.md, "Augmented
    samples"); the held-out split is the same, byte for byte, as without the flag.
imagefolder
    ``--captions`` jsonl lines ``{"file": "a.jpg", "caption": "..."}`` or ``{"file": ..., "captions": [...]}``
    (optional ``"label": int``); ``file`` is relative to ``--images``.
imagenet
    Class folders ``ROOT/<class>/*.JPEG`` (also .jpg/.jpeg/.png), classes sorted by folder name; captions
    only with ``--class-names`` (ImageNet's ``LOC_synset_mapping.txt`` "wnid name, synonym" lines, or a JSON
    object folder → name).
text
    jsonl lines ``{"text": "..."}`` → ``KEY.txt`` (empty documents are skipped and counted).
pairs
    jsonl lines ``{"prompt", "chosen", "rejected"}`` (+ optional ``"prompt_image": path`` relative to
    ``--images``, default the jsonl's folder) → ``KEY.json`` (+ ``KEY.prompt.png``).
caption-pairs
    Image→caption preference pairs from a labelled, captioned ``images`` directory (e.g. ``digits``): per
    image, the prompt is the image (no text), chosen one of its captions, rejected a caption of another
    class (seeded); keys and splits as in ``--src``; augmented copies (json ``augment``) are left out. For DPO
    on captioning (configs/dpo/digits_captions.yaml).

Images are stored as PNG; ``--size S`` resizes the shorter side to S (bicubic) and center-crops S x S.
Bad input (missing file, malformed jsonl line, unreadable image) is one line naming the file (and line)
on stderr and exit code 2, and leaves no shards and no manifest behind (inputs are validated before
anything is written; an image that fails to decode while writing removes this run's shards).  An output
directory that already holds shards or a manifest is refused unless ``--overwrite``; old shards are only
removed once the input has been validated.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402

from megacca.cli import UsageError, positive_int, run_tool  # noqa: E402
from megacca.data.augment import FILL, SHIFTS, is_augmented, shift_image, shift_record  # noqa: E402
from megacca.data.shards import MANIFEST_NAME, SHARD_NAME_RE, TMP_NAME_RE, ShardWriter, write_manifest  # noqa: E402

PROG = "make_shards.py"
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten {word}",
    "the digit {d}",
    "a scanned image of the number {word}",
    "a handwritten digit {d}",
    "a small grayscale picture of the number {word}",
    "the number {word}, written by hand",
]


# -- helpers -----------------------------------------------------------------------------------------------
def parse_bytes(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad byte size {s!r} (e.g. 1000000, 512M, 1G)")
    n = int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if n < 1:
        raise argparse.ArgumentTypeError("byte size must be >= 1")
    return n


def fraction(s: str) -> float:
    try:
        f = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {f}")
    return f


def _old_outputs(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return [n for n in os.listdir(out)
            if n == MANIFEST_NAME or SHARD_NAME_RE.match(n) or TMP_NAME_RE.match(n)]


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or that already holds shards (unless ``overwrite``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    old = _old_outputs(out)
    if old and not overwrite:
        raise UsageError(f"--out {out} already holds shards ({sorted(old)[0]}, ...); pass --overwrite to replace them")


def clear_out(out: str) -> None:
    """Create ``out`` and remove old shards/manifest (called once the input has been validated)."""
    os.makedirs(out, exist_ok=True)
    for n in sorted(_old_outputs(out), key=lambda n: n != MANIFEST_NAME):  # the manifest goes first
        os.unlink(os.path.join(out, n))


def heldout_mask(n: int, frac: float, seed: int) -> np.ndarray:
    """Exactly ``round(frac * n)`` True entries, chosen by ``seed``."""
    mask = np.zeros(n, dtype=bool)
    k = int(round(frac * n))
    if k:
        mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


def stratified_heldout_mask(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Hold out ``round(frac * N)`` samples in total, spread over classes by largest remainder."""
    labels = np.asarray(labels)
    n = labels.size
    mask = np.zeros(n, dtype=bool)
    total = int(round(frac * n))
    if not total:
        return mask
    classes, counts = np.unique(labels, return_counts=True)
    quota = frac * counts
    take = np.floor(quota).astype(int)
    rem = quota - take
    order = sorted(range(len(classes)), key=lambda i: (-rem[i], i))
    for i in order[: total - int(take.sum())]:
        take[i] += 1
    take = np.minimum(take, counts)
    rng = np.random.default_rng(seed)
    for c, t in zip(classes, take):
        idx = np.nonzero(labels == c)[0]
        mask[idx[rng.permutation(idx.size)[:t]]] = True
    return mask


def write_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).permutation(n) if shuffle else np.arange(n)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # PIL's PNG encoder is deterministic for the same pixels
    return buf.getvalue()


def load_image(path: str, size: Optional[int], mode: str, where: str):
    """PNG bytes and (h, w) of an image file, converted to ``mode``, optionally resized + center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert(mode)
    except FileNotFoundError:
        raise UsageError(f"{where}: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot read image {path}: {e}") from None
    if size:
        w, h = img.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return png_bytes(img), (img.size[1], img.size[0])


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` in order, on ``workers`` threads with a bounded window (PIL releases the GIL)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers) as ex:
        for it in items:
            window.append(ex.submit(fn, it))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def iter_jsonl(path: str) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset, object) of each non-blank line; a malformed line is a UsageError naming
    file:line."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, start, obj


def field_str(obj: dict, name: str, where: str, allow_empty: bool = False) -> str:
    v = obj.get(name)
    if not isinstance(v, str):
        raise UsageError(f"{where}: field {name!r} must be a string, got {'nothing' if v is None else type(v).__name__}")
    if not allow_empty and not v.strip():
        raise UsageError(f"{where}: field {name!r} is empty")
    return v


def captions_of(obj: dict, where: str, required: bool = True) -> list[str]:
    if "captions" in obj:
        caps = obj["captions"]
        if not isinstance(caps, list) or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UsageError(f"{where}: 'captions' must be a list of non-empty strings")
    elif "caption" in obj:
        caps = [field_str(obj, "caption", where)]
    else:
        caps = []
    if required and not caps:
        raise UsageError(f"{where}: needs 'caption' or 'captions'")
    return list(caps)


def write_splits(out: str, args, samples: Iterator[tuple[str, dict]]) -> dict:
    """Route ``(split, sample)`` pairs to one ShardWriter per split; returns the manifest's splits."""
    writers: dict[str, ShardWriter] = {}
    clear_out(out)
    with contextlib.ExitStack() as stack:
        for split, sample in samples:
            w = writers.get(split)
            if w is None:
                w = writers[split] = stack.enter_context(
                    ShardWriter(out, split, args.shard_size, args.max_shard_bytes))
            w.write(sample)
    return {name: w.close() for name, w in sorted(writers.items(), key=lambda kv: kv[0] != args.split)}


def report(out: str, manifest: dict, extra: str = "") -> None:
    parts = []
    for name, s in manifest["splits"].items():
        size = sum(sh.get("bytes", 0) for sh in s["shards"])
        parts.append(f"{name} {s['count']} samples in {len(s['shards'])} shard(s), {size} bytes")
    print(f"wrote {out}: kind {manifest['kind']}, " + "; ".join(parts) + (f"; {extra}" if extra else ""))


def finish(out: str, args, kind: str, splits: dict, extra_msg: str = "", **extra) -> dict:
    if not splits or sum(s["count"] for s in splits.values()) == 0:
        raise UsageError("no samples: nothing to write")
    m = write_manifest(out, kind, splits, **extra)
    report(out, m, extra_msg)
    return m


# -- subcommands -------------------------------------------------------------------------------------------
def cmd_digits(args) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: no download
    images = np.asarray(d.images)
    labels = np.asarray(d.target, dtype=np.int64)
    px = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    names = [str(k) for k in range(10)]
    captions = [[t.format(d=k, word=NUMBER_WORDS[k]) for t in DIGIT_TEMPLATES] for k in range(10)]
    held = stratified_heldout_mask(labels, args.heldout_fraction, args.seed)
    records = [(int(i), None) for i in write_order(len(labels), args.shuffle, args.seed)]  # (index, shift)
    extra, msg = {}, ""
    if args.augment_shifts:
        # Held-out records keep the order (and so the bytes) they have without augmentation; the training
        # split gets each image's shifted copies, shuffled in among the originals.
        train = [(i, s) for i, _ in records if not held[i] for s in (None, *SHIFTS)]
        if args.shuffle:
            train = [train[j] for j in np.random.default_rng(args.seed + 2).permutation(len(train))]
        records = [r for r in records if held[r[0]]] + train
        n_orig = int((~held).sum())
        extra["augment"] = {"shifts": [list(s) for s in SHIFTS], "fill": FILL, "split": args.split,
                            "originals": n_orig}
        msg = f"{args.split}: {n_orig} images + {n_orig * len(SHIFTS)} shifted copies"

    def gen():
        for i, shift in records:
            k = int(labels[i])
            meta = {"label": k, "captions": captions[k], "index": i}
            img, key = px[i], f"digit{i:04d}"
            if shift is not None:
                meta["augment"] = shift_record(*shift)
                img, key = shift_image(img, *shift), key + "_" + meta["augment"]["text"].replace(" ", "_")
            yield ("heldout" if held[i] else args.split), {
                "__key__": key, "png": png_bytes(Image.fromarray(img, mode="L")), "json": meta}

    splits = write_splits(args.out, args, gen())
    return finish(args.out, args, "images", splits, msg, classes=names, image_size=[8, 8], source="digits",
                  image_mode="L", captions=True, labels=True,
                  source_detail="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits), "
                                "values 0..16 scaled to 0..255", **extra)


def cmd_imagefolder(args) -> dict:
    if not os.path.isdir(args.images):
        raise UsageError(f"--images {args.images}: no such directory")
    records = []
    for lineno, _, obj in iter_jsonl(args.captions):
        where = f"{args.captions}:{lineno}"
        f = field_str(obj, "file", where)
        path = os.path.join(args.images, f)
        if not os.path.isfile(path):
            raise UsageError(f"{where}: image {path} does not exist")
        label = obj.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise UsageError(f"{where}: 'label' must be a non-negative integer or null")
        records.append((where, f, path, captions_of(obj, where), label))
    if not records:
        raise UsageError(f"{args.captions}: no samples")
    held = heldout_mask(len(records), args.heldout_fraction, args.seed)
    order = write_order(len(records), args.shuffle, args.seed)
    sizes = set()

    def job(i):
        where, f, path, caps, label = records[i]
        png, hw = load_image(path, args.size, args.mode, where)
        return i, png, hw

    def gen():
        for i, png, hw in ordered_map(job, order, args.workers):
            sizes.add(hw)
            _, f, _, caps, label = records[i]
            yield ("heldout" if held[i] else args.split), {
                "__key__": f"{i:08d}", "png": png, "json": {"label": label, "captions": caps, "file": f}}

    splits = write_splits(args.out, args, gen())
    has_labels = any(r[4] is not None for r in records)
    return finish(args.out, args, "images", splits, source="imagefolder",
                  image_size=list(next(iter(sizes))) if len(sizes) == 1 else None, image_mode=args.mode,
                  captions=True, labels=has_labels)


def read_class_names(path: str, folders: list[str]) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--class-names {path}: no such file")
    names = {}
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise UsageError(f"{path}: expected a JSON object mapping class folder to name")
        names = dict(obj)
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().split(None, 1)
                if len(parts) != 2:
                    raise UsageError(f"{path}:{lineno}: expected 'FOLDER name[, synonym...]'")
                names[parts[0]] = parts[1].split(",")[0].strip()
    missing = [c for c in folders if c not in names]
    if missing:
        raise UsageError(f"{path}: no name for class folder {missing[0]!r} ({len(missing)} missing)")
    return names


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def cmd_imagenet(args) -> dict:
    root = args.root
    if not os.path.isdir(root):
        raise UsageError(f"--root {root}: no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UsageError(f"--root {root}: no class folders")
    human = read_class_names(args.class_names, classes) if args.class_names else None
    records, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(e.name for e in os.scandir(os.path.join(root, c))
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
        if args.max_per_class:
            files = files[: args.max_per_class]
        if not files:
            raise UsageError(f"{os.path.join(root, c)}: no images ({', '.join(IMAGE_EXTS)})")
        for f in files:
            records.append((os.path.join(c, f), k))
            labels.append(k)
    labels = np.asarray(labels)
    held = stratified_heldout_mask(labels, args.heldout_fraction, args.seed)
    order = write_order(len(records), args.shuffle, args.seed)

    def caps_for(k: int) -> list[str]:
        if human is None:
            return []
        n = human[classes[k]]
        return [f"a photo of {_article(n)} {n}", f"an image of {_article(n)} {n}", f"a picture of {_article(n)} {n}", n]

    sizes = set()

    def job(i):
        rel, k = records[i]
        png, hw = load_image(os.path.join(root, rel), args.size, args.mode, root)
        return i, png, hw

    def gen():
        for i, png, hw in ordered_map(job, order, args.workers):
            sizes.add(hw)
            rel, k = records[i]
            yield ("heldout" if held[i] else args.split), {
                "__key__": f"{i:08d}", "png": png, "json": {"label": k, "captions": caps_for(k), "file": rel}}

    splits = write_splits(args.out, args, gen())
    return finish(args.out, args, "images", splits, classes=classes, source="imagenet",
                  image_size=list(next(iter(sizes))) if len(sizes) == 1 else None, image_mode=args.mode,
                  captions=human is not None, labels=True,
                  class_descriptions=[human[c] for c in classes] if human else None)


def _scan(paths: list[str], check: Callable[[dict, str, str], bool]) -> list[tuple[str, int, int]]:
    """Validate every line of every jsonl file; returns (path, line number, byte offset) per sample."""
    index = []
    for path in paths:
        for lineno, offset, obj in iter_jsonl(path):
            if check(obj, f"{path}:{lineno}", path):
                index.append((path, lineno, offset))
    return index


def _reread(index, order) -> Iterator[tuple[int, dict, str]]:
    files: dict = {}
    try:
        for i in order:
            path, lineno, offset = index[i]
            f = files.get(path) or files.setdefault(path, open(path, "rb"))
            f.seek(offset)
            yield int(i), json.loads(f.readline().decode("utf-8")), path, lineno
    finally:
        for f in files.values():
            f.close()


def cmd_text(args) -> dict:
    skipped = 0

    def check(obj, where, path):
        nonlocal skipped
        t = field_str(obj, "text", where, allow_empty=True)
        if not t.strip():
            skipped += 1
            return False
        return True

    index = _scan(args.input, check)
    if not index:
        raise UsageError(f"{', '.join(args.input)}: no non-empty 'text' lines")
    held = heldout_mask(len(index), args.heldout_fraction, args.seed)

    def gen():
        for i, obj, _, _ in _reread(index, write_order(len(index), args.shuffle, args.seed)):
            yield ("heldout" if held[i] else args.split), {"__key__": f"{i:08d}", "txt": obj["text"]}

    splits = write_splits(args.out, args, gen())
    return finish(args.out, args, "text", splits, f"{skipped} empty documents skipped", source="text")


def cmd_pairs(args) -> dict:
    def base(path):
        return args.images if args.images else os.path.dirname(os.path.abspath(path))

    def check(obj, where, path):
        for k in ("prompt", "chosen", "rejected"):
            field_str(obj, k, where, allow_empty=(k == "prompt" and "prompt_image" in obj))
        if obj.get("prompt_image") is not None:
            p = os.path.join(base(path), field_str(obj, "prompt_image", where))
            if not os.path.isfile(p):
                raise UsageError(f"{where}: prompt_image {p} does not exist")
        return True

    if args.images and not os.path.isdir(args.images):
        raise UsageError(f"--images {args.images}: no such directory")
    index = _scan(args.input, check)
    if not index:
        raise UsageError(f"{', '.join(args.input)}: no samples")
    held = heldout_mask(len(index), args.heldout_fraction, args.seed)
    n_img = 0

    def job(item):
        i, obj, path, lineno = item
        sample = {"__key__": f"{i:08d}",
                  "json": {k: obj[k] for k in ("prompt", "chosen", "rejected")}}
        if obj.get("prompt_image") is not None:
            sample["prompt.png"], _ = load_image(os.path.join(base(path), obj["prompt_image"]),
                                                 args.size, args.mode, f"{path}:{lineno}")
        return i, sample

    def gen():
        nonlocal n_img
        items = _reread(index, write_order(len(index), args.shuffle, args.seed))
        for i, sample in ordered_map(job, items, args.workers):
            n_img += "prompt.png" in sample
            yield ("heldout" if held[i] else args.split), sample

    splits = write_splits(args.out, args, gen())
    return finish(args.out, args, "pairs", splits, f"{n_img} with prompt images", source="pairs",
                  image_size=[args.size, args.size] if args.size and n_img else None,
                  image_mode=args.mode if n_img else None)


def cmd_caption_pairs(args) -> dict:
    """Caption preference pairs from a labelled, captioned `images` shard directory (an image→caption DPO set):
    each image becomes a pair with the image as the prompt (no prompt text), one of its own captions as the
    chosen response and a caption of an image of another class as the rejected one, drawn with --seed."""
    from megacca.data.shards import ShardReadError, iter_samples, read_manifest

    try:
        m = read_manifest(args.src)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if m["kind"] != "images" or not m.get("labels") or not m.get("captions"):
        raise UsageError(f"--src {args.src}: needs an images shard directory whose samples carry labels and "
                         f"captions (its manifest: kind {m['kind']}, labels {m.get('labels')}, "
                         f"captions {m.get('captions')})")
    try:  # augmented copies (json 'augment') are left out: the alignment stages train on the real images only
        by_split = {split: [smp for smp in iter_samples(args.src, split, m)
                            if not is_augmented(json.loads(smp["json"]))] for split in m["splits"]}
    except ShardReadError as e:
        raise UsageError(str(e)) from None
    captions: dict[int, list[str]] = collections.defaultdict(list)  # every caption of each class, all splits
    for samples in by_split.values():
        for smp in samples:
            meta = json.loads(smp["json"])
            captions[meta["label"]] += [c for c in meta["captions"] if c not in captions[meta["label"]]]
    if len(captions) < 2:
        raise UsageError(f"--src {args.src}: needs at least two classes to make wrong captions")
    rng = np.random.default_rng(args.seed)

    def gen():
        for split, samples in by_split.items():
            for smp in samples:
                meta = json.loads(smp["json"])
                label = meta["label"]
                others = sorted(k for k in captions if k != label)
                wrong = others[int(rng.integers(len(others)))]
                chosen = meta["captions"][int(rng.integers(len(meta["captions"])))]
                rejected = captions[wrong][int(rng.integers(len(captions[wrong])))]
                yield split, {"__key__": smp["__key__"], "prompt.png": smp["png"],
                              "json": {"prompt": "", "chosen": chosen, "rejected": rejected,
                                       "label": label, "rejected_label": wrong}}

    splits = write_splits(args.out, args, gen())
    return finish(args.out, args, "pairs", splits, "image prompts, captions as responses", source="caption-pairs",
                  source_detail=f"from {args.src}", image_size=m.get("image_size"), image_mode=m.get("image_mode"),
                  classes=m.get("classes"))


# -- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="{digits,imagefolder,imagenet,text,pairs,caption-pairs}")
    sub.required = True

    def common(p, heldout_default: float, images: bool):
        p.add_argument("--out", required=True, help="output shard directory")
        p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--max-shard-bytes", type=parse_bytes, default=parse_bytes("512M"),
                       help="start a new shard before one grows past this (default 512M)")
        p.add_argument("--heldout-fraction", type=fraction, default=heldout_default,
                       help=f"share of samples in the 'heldout' split (default {heldout_default})")
        p.add_argument("--split", default="train", help="name of the main split (default train)")
        p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and write order")
        p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="write in input order")
        p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
        if images:
            p.add_argument("--size", type=positive_int, default=None,
                           help="resize the shorter side to SIZE and center-crop SIZE x SIZE")
            p.add_argument("--mode", choices=["RGB", "L"], default="RGB", help="image mode stored (default RGB)")
            p.add_argument("--workers", type=positive_int, default=1, help="image-decoding threads")

    p = sub.add_parser("digits", help="scikit-learn's bundled 8x8 handwritten digits")
    p.add_argument("--augment-shifts", action="store_true",
                   help="add 8 copies of every training image shifted by one pixel (json 'augment'; the held-out "
                        "split is unchanged)")
    common(p, 0.1, images=False)
    p.set_defaults(fn=cmd_digits)

    p = sub.add_parser("imagefolder", help="images + a captions jsonl")
    p.add_argument("--images", required=True, help="folder the jsonl's 'file' paths are relative to")
    p.add_argument("--captions", required=True, help="jsonl: {\"file\", \"caption\" | \"captions\"}")
    common(p, 0.0, images=True)
    p.set_defaults(fn=cmd_imagefolder)

    p = sub.add_parser("imagenet", help="class-labelled folders ROOT/<class>/*.JPEG")
    p.add_argument("--root", required=True)
    p.add_argument("--max-per-class", type=positive_int, default=None, help="first N files (sorted) per class")
    p.add_argument("--class-names", default=None,
                   help="LOC_synset_mapping.txt-style 'FOLDER name, ...' lines or JSON {folder: name}; enables captions")
    common(p, 0.0, images=True)
    p.set_defaults(fn=cmd_imagenet)

    p = sub.add_parser("text", help="jsonl lines {\"text\": ...}")
    p.add_argument("--input", nargs="+", required=True)
    common(p, 0.0, images=False)
    p.set_defaults(fn=cmd_text)

    p = sub.add_parser("pairs", help="jsonl lines {\"prompt\", \"chosen\", \"rejected\"[, \"prompt_image\"]}")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--images", default=None, help="folder of prompt_image paths (default: the jsonl's folder)")
    common(p, 0.0, images=True)
    p.set_defaults(fn=cmd_pairs)

    p = sub.add_parser("caption-pairs", help="image->caption preference pairs from a labelled, captioned images "
                                             "shard directory (chosen: its caption; rejected: another class's)")
    p.add_argument("--src", required=True, help="images shard directory (e.g. from `digits`)")
    common(p, 0.0, images=False)
    p.set_defaults(fn=cmd_caption_pairs)
    return ap


def _run(args) -> None:
    if args.split == "heldout" and args.heldout_fraction > 0:
        raise UsageError("--split heldout cannot be combined with --heldout-fraction > 0")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", args.split):
        raise UsageError(f"--split {args.split!r}: use lowercase letters, digits and '_'")
    check_out(args.out, args.overwrite)
    args.fn(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
