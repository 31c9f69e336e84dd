"""A model-only megacca checkpoint from a full state dict: what the importers (`from-hf`, ...) write.

The result is a checkpoint directory like a run's, without the engine's optimizer files and per-rank state:

    DST/model/         the weights as a megatron distributed checkpoint (what every reader loads, at any layout)
    DST/trainer.json   step, the resolved config, the vocabulary manifest, `converted_from`
    DST/vocab.json     the vocabulary manifest (when there is one), with the text model beside it

so `train.init_from=DST`, `megacca.load(DST)` and every subcommand read it like a trained checkpoint. The
weights go through the real model: it is built at tp = 1 in this process (a one-rank gloo group), the state
dict loads into it strictly (`canonical.load_canonical`: key and shape errors name both shapes), and
`megacca.checkpoint.save_model_weights` writes them, so the files are exactly what training writes.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

from megacca.config import Config, to_dict
from megacca.convert.files import staged_dir
from megacca.fileio import atomic_write_json


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """A one-rank process group with tp = pp = 1 for building models in a tool (torn down on exit when this
    call made it)."""
    import torch.distributed as dist

    from megacca.distributed.init import init_distributed, shutdown

    made = not dist.is_initialized()
    init_distributed(1, 1, seed=0, backend="gloo")
    try:
        yield
    finally:
        if made:
            shutdown()


def single_rank_config(cfg: Config) -> Config:
    """`cfg` at tp = pp = 1 (the layout full state dicts are in), with the padded vocabulary of `cfg`'s own tp:
    the embedding is padded to a multiple of make_vocab_size_divisible_by x tp, and a full state dict of a
    tp = 2 run has that many rows."""
    one = copy.deepcopy(cfg)
    one.model.make_vocab_size_divisible_by *= one.parallel.tp
    one.parallel.tp, one.parallel.pp, one.parallel.sequence_parallel = 1, 1, False
    return one


def build_full_model(cfg: Config, state_dict: dict[str, torch.Tensor], where: str):
    """The tp = 1 model `cfg` describes, holding `state_dict` (inside `single_process()`)."""
    from megacca.convert.canonical import load_canonical
    from megacca.model.gpt import build_model

    model = build_model(single_rank_config(cfg))
    load_canonical(model, state_dict, where)
    return model


def write_model_checkpoint(dst: str | Path, cfg: Config, state_dict: dict[str, torch.Tensor], *,
                           vocab: Optional[dict] = None, step: int = 0, converted_from: Optional[dict] = None,
                           files: Optional[dict[str, Path]] = None, where: str = "converted state dict") -> Path:
    """Write `state_dict` (canonical names, tp = 1) as the model-only checkpoint `dst` (see module docstring).
    `files`: extra files copied into the checkpoint, by relative path (the text model beside `vocab.json`, a
    VQ tokenizer under `vq/`)."""
    from megacca.checkpoint import save_model_weights

    with staged_dir(dst) as tmp:
        with single_process():
            model = build_full_model(cfg, state_dict, where)
            save_model_weights(model, tmp / "model")
        trainer = {"step": int(step), "config": to_dict(cfg), "vocab": vocab, "world_size": 1, "tokens_seen": 0,
                   "converted_from": converted_from}
        atomic_write_json(tmp / "trainer.json", trainer)
        if vocab is not None:
            atomic_write_json(tmp / "vocab.json", vocab)
        for name, src in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
    return Path(dst)
