"""The DPO stage through `launch/dpo_stage.sh` on text preference pairs (`tools/make_shards.py pairs`): step 1 is
log 2 (policy = reference), the chosen answers pull ahead, and the reference-free SimPO needs no reference.

Data made here: questions "is A plus B equal to C" (digit words) answered "yes" (chosen) and "no" (rejected), a
preference a few updates can learn on unseen pairs; a sentencepiece model trained on them; a short pretraining
run on the same texts (both answers equally often) as the starting point.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import PY, metrics, run, train

DPO = "configs/dpo/digits_captions.yaml"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from megacca.tokenizer.vocab import UnifiedVocab

    d = tmp_path_factory.mktemp("dpo")
    rng = np.random.default_rng(0)
    pairs, texts = [], []
    for _ in range(120):
        a, b = (int(x) for x in rng.integers(0, 5, 2))
        q = f"is {WORDS[a]} plus {WORDS[b]} equal to {WORDS[a + b]}"
        pairs.append({"prompt": q, "chosen": "yes", "rejected": "no"})
        texts += [{"text": f"{q} yes"}, {"text": f"{q} no"}]
    for name, rows in (("pairs.jsonl", pairs), ("texts.jsonl", texts)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([PY, "tools/make_shards.py", "pairs", "--input", str(d / "pairs.jsonl"), "--out", str(d / "pairs")])
    run([PY, "tools/make_shards.py", "text", "--input", str(d / "texts.jsonl"), "--out", str(d / "texts")])
    run([PY, "tokenizers/train_text.py", "--input", str(d / "texts.jsonl"), "--vocab-size", "48", "--model-type",
         "bpe", "--out", str(d / "text")])
    UnifiedVocab.build(str(d / "text.model"), 16, (4, 4)).save(str(d / "vocab.json"))
    common = [f"data.vocab={d / 'vocab.json'}", f"data.text_model={d / 'text.model'}", "model.seq_length=32",
              "train.tensorboard=false", "model.preset=debug", "model.rope=2d"]  # figures measured on debug
    train(d / "base", *common, f"data.sources=[{{path: {d / 'texts'}, task: text}}]", "train.micro_batch_size=8",
          "train.max_steps=6", config="configs/pretrain/digits.yaml")
    return SimpleNamespace(run=d / "base", opts=[*common, f"data.sources=[{{path: {d / 'pairs'}}}]"])


def _dpo(run_dir, base, *extra, **kw):
    return train(run_dir, *base.opts, f"train.init_from={base.run}", "train.micro_batch_size=4",
                 "train.global_batch_size=8", "train.max_steps=8", "optim.lr=1e-3", "align.beta=0.5", *extra,
                 config=DPO, script="launch/dpo_stage.sh", **kw)


def test_dpo_step1_is_log2_and_chosen_pull_ahead(tmp_path, base):
    _dpo(tmp_path / "r", base, "align.rpo_alpha=0")  # plain DPO (the digits config adds RPO's NLL term)
    m = metrics(tmp_path / "r")
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and m[0]["rewards/margins"] == 0.0
    last = [row["rewards/margins"] for row in m[-3:]]
    assert sum(last) / 3 > 0.1 and m[-1]["rewards/accuracies"] > 0.5
    assert m[-1]["logps/chosen"] > m[0]["logps/chosen"]


def test_simpo_runs_without_a_reference(tmp_path, base):
    _dpo(tmp_path / "s", base, "align.loss=simpo", "align.gamma=0.5", "align.length_normalize=true",
         "train.max_steps=3")
    m = metrics(tmp_path / "s")
    # reference-free: step 1 is -log σ(β(π_c - π_r) - γ) on the policy's own (length-normalised) log-probs,
    # so the rewards are β·π, not 0
    assert m[0]["rewards/chosen"] < 0 and m[0]["rewards/margins"] != 0.0


def test_rpo_step1_adds_alpha_times_the_chosen_token_nll(tmp_path, base):
    """`align.rpo_alpha` through the stage: at step 1 (policy = reference) the loss is log 2 plus α x the chosen
    response's NLL per scored token ("yes" and <eos>: every chosen answer here is the same)."""
    from megacca.tokenizer.vocab import UnifiedVocab

    alpha = 0.5
    _dpo(tmp_path / "p", base, f"align.rpo_alpha={alpha}", "train.max_steps=1")
    m = metrics(tmp_path / "p")[0]
    d = base.run.parent
    scored = len(UnifiedVocab.load(str(d / "vocab.json"), str(d / "text.model")).encode_text("yes")) + 1
    # float32 sums of a few log-probs of order 1-10: agreement to ~1e-6; a wrong count or term is off by > 0.1
    assert abs(m["loss"] - (math.log(2) + alpha * -m["logps/chosen"] / scored)) < 1e-5
    assert m["rewards/margins"] == 0.0
