"""tools/convert_checkpoint.py and megacca.convert: every conversion exact, every refusal explained.

Checkpoints come from the real training entry point (debug-sized, 1-2 steps). Tolerances:
- Hugging Face parity: the issue's bound, 1e-4 on fp32 logits of size ~10 (the test model's weights are drawn
  with std 0.25 so that attention is far from uniform and a wrong q / k / v layout would move logits by O(1)).
  Two implementations of the same fp32 math differ by reduction order only: measured 0.0 (SDPA) and 6e-6
  (eager attention).
- Everything that copies tensors (round trips, reshard, consolidation, canonical naming) is compared exactly.
- Resumed runs: the resharded run and the source run continue at different tp, whose matmul reductions split
  differently (weights agree to ~2e-8 after a step, measured); 1e-6 absolute is 1000x below what one Adam step
  moves a weight (~1e-3), which dropped or misplaced optimizer state would show.
"""
from __future__ import annotations

import collections
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PY, run, train

TOOL = "tools/convert_checkpoint.py"
WORDS = "the a cat dog bird sat ran on under over mat tree house red blue green small big digit seven number".split()
CAPTIONS = ["the cat sat on the mat", "a big red digit seven", "small green bird under a tree"]


def tool(*args, check=True, timeout=600):
    return run([PY, TOOL, *map(str, args)], check=check, timeout=timeout)


def one_line_error(p) -> str:
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    lines = [line for line in p.stderr.strip().splitlines() if line.startswith("convert_checkpoint.py")
             and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def logits(ckpt, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """Full logits (every padded row) of the checkpoint's model at tp = 1, in a fresh process."""
    save_file({"ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
    run([PY, "tests/convert_worker.py", "logits", str(ckpt), str(tmp / "ids.safetensors"),
         str(tmp / "out.safetensors")])
    return load_file(str(tmp / "out.safetensors"))["logits"]


def sentencepiece_model(path: Path, model_type: str) -> Path:
    import sentencepiece as spm

    r = random.Random(0)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 10))) for _ in range(300)))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=40,
                                   model_type=model_type, bos_id=-1, eos_id=-1, minloglevel=2)
    return path


@pytest.fixture(scope="module")
def run1d(tmp_path_factory):
    """One step of the debug model with 1D rotary, GQA, weights drawn with std 0.25, over a unified vocabulary
    with classes, text pieces (a unigram sentencepiece model) and image codes."""
    from megacca.tokenizer.vocab import UnifiedVocab

    d = tmp_path_factory.mktemp("convert")
    sp = sentencepiece_model(d / "text.model", "unigram")
    UnifiedVocab.build(str(sp), 32, (2, 2), ["a", "b"]).save(str(d / "vocab.json"))
    train(d / "run1d", "parallel.engine=megatron", "train.max_steps=1", "train.tensorboard=false",
          f"data.vocab={d / 'vocab.json'}", "model.num_query_groups=2", "model.init_method_std=0.25",
          "model.seq_length=32")
    return d


# ---- to-hf / from-hf ---------------------------------------------------------------------------------------------
def test_to_hf_matches_transformers_and_comes_back_bit_exact(run1d, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megacca.checkpoint import read_full_state_dict
    from megacca.config import Config, from_dict
    from megacca.tokenizer.vocab import UnifiedVocab

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tmp_path / "hf"
    tool("to-hf", "--src", run1d / "run1d", "--dst", hf, "--max-shard-size", "60KB")  # sharded on purpose
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "megacca.json", "megacca_vocab.json", "tokenizer.json",
            "tokenizer_config.json", "text.model"} <= names
    assert len([n for n in names if n.startswith("model-000")]) > 1

    vocab = UnifiedVocab.load(str(run1d / "vocab.json"))
    ids = torch.randint(0, vocab.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = logits(run1d / "run1d", ids, tmp_path)
    for attention in ("eager", "sdpa"):
        model = LlamaForCausalLM.from_pretrained(hf, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation=attention).eval()
        with torch.no_grad():
            theirs = model(ids).logits
        assert theirs.shape == ours.shape  # every row, the padded ones included
        assert (theirs - ours).abs().max() <= 1e-4, (attention, (theirs - ours).abs().max())
    assert ours.abs().max() > 1  # logits of a model whose attention is not uniform

    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    for text in CAPTIONS:  # the unified ids, not the sentencepiece ones
        assert tok(text, add_special_tokens=False).input_ids == vocab.encode_text(text)
        assert tok.decode(vocab.encode_text(text)) == text
    assert tok.convert_tokens_to_ids(["<bos>", "<class:b>", "<code:5>"]) == [1, vocab.class_token(1),
                                                                              vocab.image_offset + 5]

    back = tmp_path / "back"
    tool("from-hf", "--src", hf, "--dst", back)
    a, b = read_full_state_dict(run1d / "run1d"), read_full_state_dict(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    src = json.loads((run1d / "run1d" / "checkpoints" / "step_00000001" / "trainer.json").read_text())
    got = json.loads((back / "trainer.json").read_text())
    assert got["step"] == src["step"] and got["vocab"] == src["vocab"]
    assert from_dict(Config, got["config"]) == from_dict(Config, src["config"])
    assert UnifiedVocab.load(str(back / "vocab.json")).encode_text(CAPTIONS[0]) == vocab.encode_text(CAPTIONS[0])


def test_to_hf_refuses_2d_rotary_saying_why(run1d, tmp_path):
    ckpt = tmp_path / "ckpt2d"
    shutil.copytree(run1d / "run1d" / "checkpoints" / "step_00000001", ckpt)
    state = json.loads((ckpt / "trainer.json").read_text())
    state["config"]["model"]["rope"] = "2d"
    (ckpt / "trainer.json").write_text(json.dumps(state))
    line = one_line_error(tool("to-hf", "--src", ckpt, "--dst", tmp_path / "hf", check=False))
    assert "model.rope=2d" in line and "(row, column)" in line and "LlamaForCausalLM" in line
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """A Hugging Face Llama as transformers writes it, with a BPE sentencepiece tokenizer.model and 3 embedding
    rows beyond its pieces (padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama") / "llama"
    d.mkdir()
    sp = sentencepiece_model(d / "tokenizer.model", "bpe")
    (d / "tokenizer.txt").unlink()
    import sentencepiece

    n = sentencepiece.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    cfg = LlamaConfig(vocab_size=n + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.25)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d, n


def test_from_hf_text_llm_keeps_its_logits_and_appends_image_rows(plain_llama, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from megacca.checkpoint import read_full_state_dict
    from megacca.tokenizer.vocab import UnifiedVocab

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, n = plain_llama
    ckpt = tmp_path / "ckpt"
    p = tool("from-hf", "--src", folder, "--dst", ckpt, "--add-image-codebook", "32", "--image-grid", "2", "2")
    assert f"rows {n}..{n + 2}" in p.stderr  # the padding rows it does not carry, said
    vocab = UnifiedVocab.load(str(ckpt / "vocab.json"))  # the sentencepiece model travels beside it
    assert (vocab.text_offset, vocab.text_size, vocab.codebook_size, vocab.image_grid) == (8, n, 32, (2, 2))
    assert vocab.text is not None and vocab.vocab_size == 8 + n + 32

    theirs_model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    hf_ids = torch.randint(3, n, (2, 20), generator=torch.Generator().manual_seed(1))
    hf_ids[:, 0] = 1  # its own <s>
    with torch.no_grad():
        theirs = theirs_model(hf_ids).logits[..., :n]
    as_text = hf_ids + vocab.text_offset  # the same pieces in the unified vocabulary
    as_megacca = as_text.clone()
    as_megacca[:, 0] = vocab.bos_id  # megacca's <bos>, whose rows are its <s>'s
    ours = logits(ckpt, torch.cat([as_text, as_megacca]), tmp_path)[..., vocab.text_offset:vocab.text_offset + n]
    assert (ours[:2] - theirs).abs().max() <= 1e-4 and (ours[2:] - theirs).abs().max() <= 1e-4
    assert theirs.abs().max() > 1

    sd, hf = read_full_state_dict(ckpt), theirs_model.state_dict()
    for ours_name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                               ("output_layer.weight", "lm_head.weight")):
        rows, hf_rows = sd[ours_name], hf[hf_name][:n]
        mean = hf_rows.double().mean(dim=0).float()
        assert torch.equal(rows[vocab.text_offset:vocab.text_offset + n], hf_rows)
        assert torch.equal(rows[vocab.bos_id], hf_rows[1]) and torch.equal(rows[vocab.eos_id], hf_rows[2])
        for i in [vocab.pad_id, vocab.boi_id, vocab.null_id, vocab.image_offset, vocab.vocab_size - 1, len(rows) - 1]:
            assert torch.equal(rows[i], mean), (ours_name, i)


# ---- safety -----------------------------------------------------------------------------------------------------
def test_pickle_that_needs_more_than_tensors_is_refused_unless_trusted(plain_llama, tmp_path):
    folder, _ = plain_llama
    evil = tmp_path / "pickled"
    shutil.copytree(folder, evil)
    sd = load_file(str(evil / "model.safetensors"))
    (evil / "model.safetensors").unlink()
    # A plain dict of tensors loads with weights_only; a defaultdict needs its class called to rebuild.
    torch.save(collections.defaultdict(None, sd), evil / "pytorch_model.bin")
    line = one_line_error(tool("from-hf", "--src", evil, "--dst", tmp_path / "a", "--add-image-codebook", "8",
                               check=False))
    assert "pytorch_model.bin" in line and "collections.defaultdict" in line and "--trust-pickle" in line
    assert not (tmp_path / "a").exists()

    from megacca.convert.files import read_tensor_file

    trusted = read_tensor_file(evil / "pytorch_model.bin", trust_pickle=True)  # what --trust-pickle reads
    assert isinstance(trusted, collections.defaultdict) and trusted.keys() == sd.keys()


def test_shape_mismatch_names_the_key_and_both_shapes_and_leaves_no_output(plain_llama, tmp_path):
    folder, _ = plain_llama
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:80].contiguous()
    save_file(sd, str(bad / "model.safetensors"))
    line = one_line_error(tool("from-hf", "--src", bad, "--dst", tmp_path / "out", "--add-image-codebook", "8",
                               check=False))
    assert "'model.layers.1.mlp.up_proj.weight'" in line and "(80, 64)" in line and "(96, 64)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no temporary left behind

    index = tmp_path / "escape"
    shutil.copytree(folder, index)
    (index / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight":
                                                                                   "../outside.safetensors"}}))
    line = one_line_error(tool("from-hf", "--src", index, "--dst", tmp_path / "out", "--add-image-codebook", "8",
                               check=False))
    assert "'../outside.safetensors'" in line and "not a file name inside the folder" in line

    line = one_line_error(tool("from-hf", "--src", folder, "--dst", bad, "--add-image-codebook", "8", check=False))
    assert f"{bad} already exists" in line


# ---- canonical names -------------------------------------------------------------------------------------------
def test_transformer_engine_names_load_into_the_local_spec(run1d, tmp_path):
    """A TE model's weights (built by spelling the local model's weights as TE does: TE needs CUDA) load into
    the local spec through both real paths, the full state dict and the distributed checkpoint; loading the
    TE-named dict without the canonical mapping fails (tests/convert_worker.py, `te`)."""
    run([PY, "tests/convert_worker.py", "te", str(run1d / "run1d"), str(tmp_path)])
    out = load_file(str(tmp_path / "te.safetensors"))
    assert bool(out["plain_load_fails"])
    assert not torch.equal(out["fresh"], out["reference"])
    assert torch.equal(out["flat"], out["reference"]) and torch.equal(out["dist"], out["reference"])

    from megacca.checkpoint import read_full_state_dict

    assert read_full_state_dict(tmp_path / "te_ckpt").keys() == read_full_state_dict(run1d / "run1d").keys()


# ---- consolidate -----------------------------------------------------------------------------------------------
def test_consolidate_zero3_equals_the_models_state_dict(tmp_path):
    from megacca.checkpoint import read_full_state_dict

    train(tmp_path / "z3", "parallel.zero_stage=3", "train.max_steps=2", "train.tensorboard=false", nproc=2)
    tool("consolidate", "--src", tmp_path / "z3", "--dst", tmp_path / "z3.safetensors")
    consolidated = load_file(str(tmp_path / "z3.safetensors"))
    model = read_full_state_dict(tmp_path / "z3")  # the weights the model computes with (ZeRO-3 gathered)
    assert consolidated.keys() == model.keys()
    for k in model:
        assert torch.equal(consolidated[k], model[k]), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "z3.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["megacca_step"] == "2" and "ZeRO consolidation" in meta["megacca_weights"]
    assert json.loads(meta["megacca_config"])["parallel"]["zero_stage"] == 3


# ---- reshard ---------------------------------------------------------------------------------------------------
def _model_space(engine_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a megatron distributed checkpoint (weights and optimizer state), read whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megacca.safe_load import restricted_pickle

    with restricted_pickle():
        reader = dcp.FileSystemReader(str(engine_dir))
        meta = reader.read_metadata()
        flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # a single-process read is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=reader, no_dist=True)
    return flat


def test_reshard_megatron_pp2_to_pp1_keeps_weights_and_optimizer_state(tmp_path):
    train(tmp_path / "pp2", "parallel.engine=megatron", "parallel.pp=2", "train.max_steps=2",
          "train.tensorboard=false", nproc=2)
    p = tool("reshard", "--src", tmp_path / "pp2", "--dst", tmp_path / "pp1", "--tp", "1", "--pp", "1")
    assert "optimizer carried" in p.stdout
    old = _model_space(tmp_path / "pp2" / "checkpoints" / "step_00000002" / "engine")
    new = _model_space(tmp_path / "pp1" / "checkpoints" / "step_00000002" / "engine")
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in new)
    assert old.keys() == new.keys()
    for k in old:  # weights and Adam moments, the same numbers at the new layout
        assert torch.equal(old[k], new[k]), k
    state = json.loads((tmp_path / "pp1" / "checkpoints" / "step_00000002" / "trainer.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 1 and state["config"]["parallel"]["pp"] == 1
    src_rank = json.loads((tmp_path / "pp2" / "checkpoints" / "step_00000002" / "rank_00000.json").read_text())
    new_rank = json.loads((tmp_path / "pp1" / "checkpoints" / "step_00000002" / "rank_00000.json").read_text())
    assert new_rank == src_rank  # data position and RNG of the rank at the same coordinates


def test_reshard_deepspeed_tp2_to_tp1_resumes_like_the_source(tmp_path):
    from megacca.checkpoint import read_full_state_dict

    common = ("parallel.zero_stage=1", "train.tensorboard=false", "train.max_steps=3")
    train(tmp_path / "tp2", *common, "parallel.tp=2", "train.save_every=2", nproc=2)  # checkpoints at 2 and 3
    step2, step3 = (tmp_path / "tp2" / "checkpoints" / f"step_0000000{i}" for i in (2, 3))
    tool("reshard", "--src", step2, "--dst", tmp_path / "tp1", "--tp", "1", "--pp", "1")
    before, moved = read_full_state_dict(step2), read_full_state_dict(tmp_path / "tp1")
    for k in before:
        assert torch.equal(before[k], moved[k]), k  # the same weights, so the same logits
    # Step 3 of the resharded run at tp 1 against the source's own step 3 at tp 2 (resume is exact, README).
    train(tmp_path / "tp1", *common, "parallel.tp=1")
    a, b = read_full_state_dict(tmp_path / "tp1"), read_full_state_dict(step3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # the step really moved them


def test_reshard_refusals(run1d, tmp_path):
    line = one_line_error(tool("reshard", "--src", run1d / "run1d", "--dst", tmp_path / "x", "--tp", "3", "--pp",
                               "1", check=False))
    assert "--tp 3" in line and "not divisible by tp=3" in line
    converted = tmp_path / "converted"
    tool("reshard", "--src", run1d / "run1d", "--dst", converted, "--tp", "1", "--pp", "1", "--drop-optimizer")
    assert not (converted / "engine").exists() and (converted / "model" / ".metadata").is_file()
    line = one_line_error(tool("reshard", "--src", converted, "--dst", tmp_path / "y", "--tp", "1", "--pp", "1",
                               check=False))
    assert "holds no optimizer state" in line and "--drop-optimizer" in line


def test_help_lists_every_subcommand_with_examples(root, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint_under_test", root / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for argv in (["--help"], *([name, "--help"] for name in ("to-hf", "from-hf", "reshard", "consolidate"))):
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out
        if len(argv) == 2:
            assert f"convert_checkpoint.py {argv[0]} --src" in out
    line = one_line_error(tool("to-hf", check=False))  # a usage mistake: one line, exit 2
    assert "--src" in line
