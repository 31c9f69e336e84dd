"""Train the sentencepiece text model of the unified vocabulary.

    python tokenizers/train_text.py --input FILE_OR_SHARDS [...] --vocab-size N --out PREFIX

writes ``PREFIX.model`` and ``PREFIX.vocab``.  Inputs (one or more, mixed freely):

- a shard directory (holding ``manifest.json``, see docs/data-format.md): captions of ``images``/``codes``
  shards (``KEY.json`` "captions", and the condition words ``"augment": {"text"}`` of augmented copies),
  documents of ``text`` shards (``KEY.txt``), prompt/chosen/rejected of ``pairs`` shards; only the ``--split``
  split (default ``train``, ``all`` for every split);
- a single ``.tar`` shard (same members as above);
- a ``.jsonl`` file: the string fields ``text``, ``caption``, ``captions``, ``prompt``, ``chosen``,
  ``rejected`` of every line;
- any other file: plain UTF-8 text, one sentence per line.

Multi-line documents are split into lines (sentencepiece trains on sentences).  sentencepiece's own
bos/eos/pad are disabled (``bos_id=eos_id=pad_id=-1``, ``unk_id=0``) because the unified vocabulary owns
the special tokens.  ``--vocab-size`` is a soft limit by default (``hard_vocab_limit=False``), so a tiny
corpus gives a smaller vocabulary instead of an error; the size actually reached is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from megacca.cli import UsageError  # noqa: E402
from megacca.data.shards import ShardManifestError, iter_tar, read_manifest, shard_paths  # noqa: E402

PROG = "train_text.py"
JSONL_FIELDS = ("text", "caption", "captions", "prompt", "chosen", "rejected")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, str):
                yield v


def _texts_of_sample(sample: dict, where: str):
    """Strings of one raw shard sample (any kind)."""
    if "txt" in sample:
        yield sample["txt"].decode("utf-8")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{where}: sample {sample['__key__']!r}: bad json member ({e})") from e
        if isinstance(meta, dict):
            for field in JSONL_FIELDS:
                yield from _strings(meta.get(field))
            aug = meta.get("augment")  # an augmented copy's condition words, which the loader encodes as text
            if isinstance(aug, dict):
                yield from _strings(aug.get("text"))


def iter_texts(path: str, split: str):
    """Yield the raw strings (documents, captions, ...) of one input path."""
    if os.path.isdir(path):
        try:
            m = read_manifest(path)
        except ShardManifestError as e:
            raise UsageError(f"{path}: not a shard directory ({e})") from e
        splits = sorted(m["splits"]) if split == "all" else [split]
        for s in splits:
            if s not in m["splits"]:
                raise UsageError(f"{path}: no split {s!r} (has: {', '.join(sorted(m['splits']))}); use --split")
            for tar in shard_paths(path, s, m):
                for sample in iter_tar(tar):
                    yield from _texts_of_sample(sample, tar)
    elif not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    elif path.endswith(".tar"):
        for sample in iter_tar(path):
            yield from _texts_of_sample(sample, path)
    elif path.endswith(".jsonl"):
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object")
                for field in JSONL_FIELDS:
                    yield from _strings(obj.get(field))
    else:
        with open(path, "r", encoding="utf-8") as f:
            yield from f


def write_corpus(paths: list[str], split: str, out_file: str) -> int:
    """Write one sentence per line to ``out_file``; returns the number of lines."""
    n = 0
    with open(out_file, "w", encoding="utf-8") as out:
        for p in paths:
            try:
                for text in iter_texts(p, split):
                    for line in text.splitlines():
                        line = line.strip()
                        if line:
                            out.write(line + "\n")
                            n += 1
            except UnicodeDecodeError as e:
                raise UsageError(f"{p}: not UTF-8 text ({e})") from e
    return n


def train(paths: list[str], vocab_size: int, out_prefix: str, *, split: str = "train",
          model_type: str = "unigram", character_coverage: float = 1.0, byte_fallback: bool = False,
          hard_vocab_limit: bool = False, input_sentence_size: int = 2_000_000, seed: int = 0,
          threads: int = 1, max_sentence_length: int = 16384, verbose: bool = False) -> dict:
    """Train and write ``out_prefix.model`` / ``.vocab``; returns a summary dict."""
    import sentencepiece as spm

    from megacca.tokenizer.text import TextTokenizer

    out_prefix = os.path.abspath(out_prefix)
    out_dir = os.path.dirname(out_prefix)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train_text-", dir=out_dir)
    try:
        corpus = os.path.join(tmp, "corpus.txt")
        n = write_corpus(paths, split, corpus)
        if n == 0:
            raise UsageError(f"no text found in {', '.join(paths)}")
        spm.set_random_generator_seed(seed)
        prefix = os.path.join(tmp, "spm")
        # The model file records the trainer's input and model_prefix paths: train from inside the temporary
        # folder with relative names so that the same corpus and flags give a byte-identical model.
        kwargs = dict(
            input="corpus.txt", model_prefix="spm", vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, num_threads=threads,
            minloglevel=0 if verbose else 2,
        )
        if model_type == "unigram":
            kwargs["hard_vocab_limit"] = hard_vocab_limit
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            spm.SentencePieceTrainer.Train(**kwargs)
        except (RuntimeError, OSError) as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            msg = re.sub(r"^.*?\]\s*", "", msg)  # drop "INTERNAL: src/x.cc(744) [(a) == (b)] "
            hint = ""
            if "smaller than required" in msg:
                hint = " (raise --vocab-size, or lower --character-coverage)"
            elif "too high" in msg:
                hint = (f" (the corpus has {n} lines; lower --vocab-size"
                        + (", or use --model-type unigram without --hard-vocab-limit, where it is a soft limit)"
                           if model_type != "unigram" or hard_vocab_limit else ")"))
            raise UsageError(f"sentencepiece training failed: {msg}{hint}") from e
        finally:
            os.chdir(cwd)
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, out_prefix + ext)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = TextTokenizer(out_prefix + ".model")
    return {"model": out_prefix + ".model", "vocab": out_prefix + ".vocab", "lines": n,
            "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "sha256": tok.sha256}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_SHARDS",
                    help="text/jsonl files, .tar shards or shard directories")
    ap.add_argument("--vocab-size", type=int, required=True, help="number of sentencepiece pieces (incl. <unk>)")
    ap.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--split", default="train", help="split of shard directories to read ('all' for every split)")
    ap.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    ap.add_argument("--character-coverage", type=float, default=1.0)
    ap.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte pieces, not <unk>")
    ap.add_argument("--hard-vocab-limit", action="store_true",
                    help="fail instead of shrinking when the corpus cannot fill --vocab-size (unigram)")
    ap.add_argument("--input-sentence-size", type=int, default=2_000_000,
                    help="sample at most this many lines for training (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    args = ap.parse_args(argv)
    try:
        if args.vocab_size < 2:
            raise UsageError(f"--vocab-size must be >= 2, got {args.vocab_size}")
        if not 0.0 < args.character_coverage <= 1.0:
            raise UsageError(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
        summary = train(args.input, args.vocab_size, args.out, split=args.split, model_type=args.model_type,
                        character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                        hard_vocab_limit=args.hard_vocab_limit, input_sentence_size=args.input_sentence_size,
                        seed=args.seed, threads=args.threads, verbose=args.verbose)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    note = "" if summary["vocab_size"] == args.vocab_size else f" (requested {args.vocab_size}; corpus too small)"
    print(f"wrote {summary['model']} and {summary['vocab']}: vocab_size {summary['vocab_size']}{note}, "
          f"{summary['lines']} training lines, sha256 {summary['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
