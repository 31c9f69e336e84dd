"""Run an alignment stage's frozen reference once and write its pairs with their log-probs as `ref_pairs` shards.

    python tools/precompute_ref_logps.py CONFIG [key=value ...] [--out DIR] [--split SPLIT] [--shard-size N]
                                         [--overwrite]

CONFIG is the stage's own config (``stage: cca`` or ``dpo``) with its sources (code shards for CCA, ``pairs``
shards for DPO) and ``train.init_from`` (the reference's checkpoint). The tool walks one epoch of every source
in a fixed order (`megacca.data.loader.alignment_epoch`: shards in manifest order, samples in written order,
micro-batches of ``train.micro_batch_size`` for the CCA pairing RNG, which is seeded by ``train.seed``), builds
the pairs with the loader's own functions (`megacca.data.align`), scores both rows of every pair with the
reference model (`megacca.model.gpt.summed_logprobs` over the rows' loss masks) and writes one record per
pair (docs/data-format.md, "ref_pairs"): which negative condition a CCA row got and whether it is
positive-like are fixed in the record.

Then run the stage with ``align.reference=precomputed`` and ``data.sources`` pointing at the output (the tool
prints the override): it reads those shards like any others (shuffle, data-parallel split, exact resume) and
runs no reference model.

Output: ``--out DIR`` (default ``<train.run_dir>/ref_pairs``); with several sources, one directory per source,
``DIR/source<i>``. Records keep their source sample's key. The model runs in one process at tp = pp = 1 with
the stage's padded vocabulary (``make_vocab_size_divisible_by x parallel.tp``: the padded logits are part of
the softmax, so another padding would give other log-probs) and the stage's precision, on the GPU when there
is one. Reruns with the same config give byte-identical shards. Bad arguments, config or data (``data.on_error
= raise``): one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import itertools
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megacca.cli import UsageError  # noqa: E402
from megacca.config import ConfigError, load_config  # noqa: E402
from megacca.data.align import Pair, collate_pairs, ref_pair_sample  # noqa: E402
from megacca.data.packing import BadSample  # noqa: E402
from megacca.data.shards import MANIFEST_NAME, ShardManifestError, ShardWriter, write_manifest  # noqa: E402
from megacca.tokenizer.vocab import VocabMismatchError  # noqa: E402

PROG = "precompute_ref_logps.py"


_STARTED_DISTRIBUTED = False  # whether this tool started the process group (then it also ends it)


# --------------------------------------------------------------------------------------------------------------
# Writing (also what the tests use to make ref_pairs shards)
# --------------------------------------------------------------------------------------------------------------
def write_ref_pairs(out_dir: str, split: str, records: Iterable[tuple[str, Pair, tuple[float, float], str]],
                    stage: str, shard_size: int = 1000, **manifest_extra) -> dict:
    """Write ``records`` ``(key, pair, (ref_chosen, ref_rejected), source_key)`` as split ``split`` of a
    ``ref_pairs`` shard directory, then its manifest (``stage`` and ``manifest_extra`` as extra fields: the
    loader checks ``stage`` and ``vocab``). Returns the manifest."""
    with ShardWriter(out_dir, split, max_count=shard_size) as w:
        for key, pair, logps, source_key in records:
            w.write(ref_pair_sample(key, pair, logps, stage, source_key))
    return write_manifest(out_dir, "ref_pairs", {split: w.close()}, stage=stage, **manifest_extra)


# --------------------------------------------------------------------------------------------------------------
# The reference model
# --------------------------------------------------------------------------------------------------------------
def reference_config(cfg):
    """The stage's config for a one-process reference: tp = pp = 1, the same padded vocabulary."""
    ref = copy.deepcopy(cfg)
    ref.model.make_vocab_size_divisible_by *= cfg.parallel.tp
    ref.parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, sequence_parallel=False)
    return ref


def build_reference(cfg):
    """The frozen reference: `build_model` in a world of one, weights from ``train.init_from``."""
    import torch

    from megacca.checkpoint import load_model_weights, resolve_checkpoint
    from megacca.distributed.init import init_distributed
    from megacca.model.gpt import build_model

    global _STARTED_DISTRIBUTED
    _STARTED_DISTRIBUTED = not torch.distributed.is_initialized()
    init_distributed(1, 1, seed=cfg.train.seed, backend=cfg.parallel.backend)
    model = build_model(cfg)
    if torch.cuda.is_available():
        model = model.cuda()
    load_model_weights(model, resolve_checkpoint(cfg.train.init_from))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def score_pairs(model, pairs: list[Pair], seq_length: int, pad_id: int) -> list[tuple[float, float]]:
    """Each pair's reference log-probs ``(chosen, rejected)``: summed over the rows' loss masks."""
    import torch

    from megacca.model.gpt import summed_logprobs

    mb = collate_pairs(pairs, seq_length, pad_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        nll = model(mb["tokens"].to(device), None, None, labels=mb["labels"].to(device))
        logps = summed_logprobs(nll, mb["loss_mask"].to(device)).float().cpu().numpy()
    b = len(pairs)
    return [(float(logps[i]), float(logps[b + i])) for i in range(b)]


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
def _out_dirs(out: Path, n_sources: int, overwrite: bool) -> list[Path]:
    dirs = [out] if n_sources == 1 else [out / f"source{i}" for i in range(n_sources)]
    for d in dirs:
        if (d / MANIFEST_NAME).exists() or glob.glob(str(d / "*.tar")):
            if not overwrite:
                raise UsageError(f"{d} already holds shards; pass --overwrite to replace them")
            for f in glob.glob(str(d / "*.tar")) + [str(d / MANIFEST_NAME)]:
                if os.path.exists(f):
                    os.unlink(f)
    return dirs


def run(config: str, overrides: list[str], out: Optional[str] = None, split: Optional[str] = None,
        shard_size: int = 1000, overwrite: bool = False, log=print) -> list[dict]:
    from megacca.checkpoint import check_init_from, read_trainer_state, resolve_checkpoint
    from megacca.data.config import check_files
    from megacca.data.loader import alignment_epoch
    from megacca.tokenizer.vocab import UnifiedVocab

    cfg = load_config(config, overrides)
    if cfg.stage not in ("cca", "dpo"):
        raise ConfigError("stage", f"must be cca or dpo for reference log-probs, got {cfg.stage!r}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    check_files(cfg.data, cfg.stage, "model")
    check_init_from(cfg)
    d, m = cfg.data, cfg.model
    vocab = UnifiedVocab.load(d.vocab, text_model=d.text_model)
    ckpt = resolve_checkpoint(cfg.train.init_from)
    dirs = _out_dirs(Path(out) if out else Path(cfg.train.run_dir) / "ref_pairs", len(d.sources), overwrite)
    common = {"init_from": str(cfg.train.init_from), "init_step": int(read_trainer_state(ckpt).get("step", 0)),
              "align": dataclasses.asdict(cfg.align), "vocab": vocab.to_manifest(), "seed": cfg.train.seed,
              "micro_batch_size": cfg.train.micro_batch_size, "seq_length": m.seq_length}
    errors: Counter = Counter()
    epoch = alignment_epoch(d, cfg.align, cfg.stage, vocab, m.seq_length, cfg.train.micro_batch_size,
                            cfg.train.seed, split, errors, m.layout)
    first = next(epoch, None)  # reads the first shard: bad data there fails before the model loads
    if first is None:
        raise UsageError(f"no usable samples in data.sources (skipped: {dict(errors)})")
    epoch = itertools.chain([first], epoch)
    model = build_reference(reference_config(cfg))

    def records(batches):
        for _, batch in batches:
            logps = score_pairs(model, [p for _, p in batch], m.seq_length, vocab.pad_id)
            for (key, pair), lp in zip(batch, logps):
                yield key, pair, lp, key

    manifests = []
    for i, batches in itertools.groupby(epoch, key=lambda b: b[0]):  # the epoch walks source by source
        sc = d.sources[i]
        split_i = split or sc.split
        man = write_ref_pairs(str(dirs[i]), split_i, records(batches), cfg.stage, shard_size,
                              source={"path": sc.path, "split": split_i, "task": sc.task}, **common)
        manifests.append(man)
        log(f"{PROG}: {dirs[i]}: {man['splits'][split_i]['count']} {cfg.stage} pairs from {sc.path} "
            f"(split {split_i!r})")
    if errors:
        log(f"{PROG}: skipped bad samples: {dict(sorted(errors.items()))}")
    srcs = ", ".join(f"{{path: {dirs[i]}, weight: {s.weight}}}" for i, s in enumerate(d.sources))
    log(f"{PROG}: train with: align.reference=precomputed 'data.sources=[{srcs}]'")
    return manifests


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the stage's YAML config (stage: cca or dpo)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for `megacca train`")
    ap.add_argument("--out", default=None, help="output directory (default <train.run_dir>/ref_pairs)")
    ap.add_argument("--split", default=None, help="split to read from every source (default: each source's)")
    ap.add_argument("--shard-size", type=int, default=1000, help="pairs per output shard (default 1000)")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in the output")
    args = ap.parse_args(argv)
    try:
        run(args.config, args.overrides, args.out, args.split, args.shard_size, args.overwrite,
            log=lambda s: print(s, flush=True))
    except (UsageError, ConfigError, BadSample, ShardManifestError, VocabMismatchError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if _STARTED_DISTRIBUTED:  # leave the process group this tool started cleanly
            from megacca.distributed.init import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
