"""LlamaGen's class-conditional GPT in megacca (`model.layout: llamagen`): `tools/convert_checkpoint.py
from-llamagen` / `to-llamagen` against a reference forward written here from LlamaGen's published architecture
(FoundationVision/LlamaGen `autoregressive/models/gpt.py`: interleaved 2D rotary whose condition rows are zero,
fused wqkv, SwiGLU, RMSNorm, a class table with a null row, a codebook-only head), the round trip, sampling,
the VQ tokenizer carried in the checkpoint, codebook-only log-probs at tp=2, and a CCA run on a converted model.

Everything is tiny and random (dim 64, 2 layers, 4x4 codes of 64, 10 classes): the point is the mapping,
which random weights exercise fully.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import PurePosixPath

import pytest
import torch
import torch.nn.functional as F

from conftest import PY, metrics, run, torchrun, train

TOOL = "tools/convert_checkpoint.py"
DIM, LAYERS, HEADS, FFN, CODES, CLASSES, GRID = 64, 2, 4, 96, 64, 10, 4


# ---------------------------------------------------------------------------------------------------------
# LlamaGen, as published (the reference)
# ---------------------------------------------------------------------------------------------------------
def llamagen_state_dict(seed: int = 0, kv_heads: int = HEADS, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random LlamaGen c2i `Transformer.state_dict()` (num_classes=10 plus the null row, vocab = codebook).
    Norm weights are random too, so a norm mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    hd = DIM // HEADS

    def w(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": w(CODES, DIM, scale=1.0),
          "cls_embedding.embedding_table.weight": w(CLASSES + 1, DIM, scale=1.0),
          "norm.weight": 1 + w(DIM, scale=0.1), "output.weight": w(CODES, DIM)}
    for n in range(LAYERS):
        sd.update({f"layers.{n}.attention.wqkv.weight": w((HEADS + 2 * kv_heads) * hd, DIM),
                   f"layers.{n}.attention.wo.weight": w(DIM, DIM),
                   f"layers.{n}.feed_forward.w1.weight": w(FFN, DIM),
                   f"layers.{n}.feed_forward.w3.weight": w(FFN, DIM),
                   f"layers.{n}.feed_forward.w2.weight": w(DIM, FFN),
                   f"layers.{n}.attention_norm.weight": 1 + w(DIM, scale=0.1),
                   f"layers.{n}.ffn_norm.weight": 1 + w(DIM, scale=0.1)})
    return sd


def reference_logits(sd: dict, cond: torch.Tensor, codes: torch.Tensor, kv_heads: int = HEADS,
                     eps: float = 1e-5, base: float = 10000.0) -> torch.Tensor:
    """LlamaGen's `Transformer.forward(idx=codes, cond_idx=cond)` in eval mode (no dropout), fp32: logits
    [B, 1 + T, K] of the condition (class index, CLASSES = the null row) followed by T codes."""
    sd = {k: v.float() for k, v in sd.items()}
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][cond][:, None], sd["tok_embeddings.weight"][codes]], 1)
    b, s, _ = x.shape
    hd = DIM // HEADS
    # precompute_freqs_cis_2d(grid, hd, base, cls_token_num=1): half the pairs by row, half by column,
    # interleaved (2i, 2i+1), one all-zero row for the condition, then the grid row-major from (0, 0).
    half = hd // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(GRID).float(), freqs)
    grid = torch.cat([f[:, None, :].expand(-1, GRID, -1), f[None, :, :].expand(GRID, -1, -1)], dim=-1)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    fc = torch.cat([torch.zeros(1, hd // 2, 2), table])[:s].view(1, s, 1, hd // 2, 2)

    def rotate(t):  # apply_rotary_emb
        ts = t.reshape(*t.shape[:-1], -1, 2)
        return torch.stack([ts[..., 0] * fc[..., 0] - ts[..., 1] * fc[..., 1],
                            ts[..., 1] * fc[..., 0] + ts[..., 0] * fc[..., 1]], dim=-1).flatten(3)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    for n in range(LAYERS):
        p = f"layers.{n}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split([DIM, kv_heads * hd, kv_heads * hd], dim=-1)
        q, k = rotate(q.view(b, s, HEADS, hd)), rotate(k.view(b, s, kv_heads, hd))
        v = v.view(b, s, kv_heads, hd)
        k, v = (t.repeat_interleave(HEADS // kv_heads, dim=2) for t in (k, v))
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + att.transpose(1, 2).reshape(b, s, DIM) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def reference_greedy(sd: dict, cond: int, n: int) -> list[int]:
    """LlamaGen's `generate` with temperature -> 0 (greedy), recomputing the whole prefix each step."""
    codes: list[int] = []
    for _ in range(n):
        logits = reference_logits(sd, torch.tensor([cond]), torch.tensor([codes], dtype=torch.long))
        codes.append(int(logits[0, -1].argmax()))
    return codes


# ---------------------------------------------------------------------------------------------------------
# The mapping alone
# ---------------------------------------------------------------------------------------------------------
def test_rotary_permutation_turns_interleaved_pairs_into_halves():
    from megacca.convert.llamagen import rotary_permutation

    perm = rotary_permutation(8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    # megatron's pair (i, i + d/2) holds LlamaGen's (2i, 2i + 1)
    x = torch.arange(8)
    assert all((x[perm][i], x[perm][i + 4]) == (2 * i, 2 * i + 1) for i in range(4))


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_state_dict_mapping_round_trips_bit_exactly(kv_heads):
    from megacca.convert.llamagen import infer_shape, to_llamagen_state_dict, to_megacca_state_dict
    from megacca.tokenizer.vocab import UnifiedVocab

    sd = llamagen_state_dict(kv_heads=kv_heads)
    shape = infer_shape(sd, num_heads=HEADS)
    assert (shape.n_kv_head, shape.ffn, shape.num_classes, shape.codebook_size) == (kv_heads, FFN, CLASSES, CODES)
    vocab = UnifiedVocab.build(None, CODES, (GRID, GRID), [str(k) for k in range(CLASSES)])
    ours = to_megacca_state_dict(sd, shape, vocab, 128)
    back = to_llamagen_state_dict(ours, shape, vocab)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    emb = ours["embedding.word_embeddings.weight"]
    assert torch.equal(emb[vocab.null_id], sd["cls_embedding.embedding_table.weight"][CLASSES])
    others = [i for i in range(128) if not (vocab.class_offset <= i < vocab.class_offset + CLASSES
                                           or vocab.image_offset <= i < vocab.vocab_size or i == vocab.null_id)]
    assert not emb[others].any() and not ours["output_layer.weight"][:vocab.image_offset].any()


@pytest.mark.parametrize("overrides,key", [
    (["model.rope=1d"], "model.layout"),
    (["model.logprob_norm=vocab"], "model.logprob_norm"),
    (["data.sources=[{path: x, task: auto}]"], "data.sources[0].task"),
    (["data.kind=synthetic", "data.sources=[]"], "data.kind"),
    (["model.seq_length=15"], "model.seq_length"),
    (["model.image_token_offset=null"], "model.layout"),
])
def test_layout_config_errors_name_the_key(overrides, key):
    from megacca.config import ConfigError, load_config, validate_layout

    ok = ["model.rope=2d", "model.image_grid=4", "model.layout=llamagen", "model.logprob_norm=codebook",
          "model.image_token_offset=18", "model.codebook_size=64", "model.vocab_size=82", "model.seq_length=16",
          "data.kind=webdataset", "data.sources=[{path: x, task: c2i}]"]
    validate_layout(load_config(None, ok, check=False))  # (data.vocab, which the full check needs, is not here)
    with pytest.raises(ConfigError) as e:
        validate_layout(load_config(None, ok + overrides, check=False))
    assert e.value.key == key


def test_loader_rows_are_llamagens_sequences(tmp_path):
    from megacca.config import AlignConfig
    from megacca.data.config import DataConfig, SourceConfig
    from megacca.data.loader import build_alignment_source, build_webdataset_source
    from megacca.tokenizer.vocab import UnifiedVocab
    from test_align_stage import write_class_codes

    write_class_codes(tmp_path / "codes", samples=24, classes=CLASSES, codebook=CODES)
    vocab = UnifiedVocab.build(None, CODES, (GRID, GRID), [str(k) for k in range(CLASSES)])
    data = DataConfig(kind="webdataset", sources=[SourceConfig(path=str(tmp_path / "codes"), task="c2i")],
                      num_workers=0, cond_dropout=0.5)
    s = GRID * GRID  # [condition] + H*W codes is one row of S + 1 tokens
    b = next(build_webdataset_source(data, vocab, s, 4, seed=0, layout="llamagen"))
    conds = b["tokens"][:, 0]
    assert all(vocab.class_offset <= c < vocab.class_offset + CLASSES or c == vocab.null_id for c in conds.tolist())
    assert (conds == vocab.null_id).any() and (conds != vocab.null_id).any()  # cond_dropout 0.5 over 4 rows
    assert (b["tokens"][:, 1:] >= vocab.image_offset).all() and (b["labels"] >= vocab.image_offset).all()
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1]) and (b["loss_mask"] == 1).all()
    pairs = next(build_alignment_source(data, AlignConfig(uncond_ratio=0.0), "cca", vocab, s, 3, seed=0,
                                        layout="llamagen"))
    t = pairs["tokens"]
    assert torch.equal(t[3:, 1:], t[:3, 1:]) and torch.equal(t[3:, 0], torch.roll(t[:3, 0], -1))  # roll negatives
    assert (pairs["loss_mask"] == 1).all()  # every code scored, nothing else in the row


# ---------------------------------------------------------------------------------------------------------
# Through the tool: from-llamagen, megacca.load, to-llamagen
# ---------------------------------------------------------------------------------------------------------
def tiny_vq_config():
    from megacca.tokenizer.vq import vq16

    # LlamaGen's VQ layout at a size a CPU decodes instantly: 2x downsampling, so 4x4 codes are 8x8 pixels.
    return vq16(codebook_size=CODES, codebook_embed_dim=8, ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=32,
                image_size=8)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A LlamaGen GPT file as LlamaGen's training script saves it ({"model": ...} with a stale freqs_cis) and a
    LlamaGen VQ file, converted by the real tool."""
    from megacca.tokenizer.vq import VQModel

    d = tmp_path_factory.mktemp("llamagen")
    sd = llamagen_state_dict()
    # LlamaGen's train_c2i.py saves {"model", "optimizer", "steps", "args" (an argparse.Namespace)}.
    torch.save({"model": {**sd, "freqs_cis": torch.zeros(1 + GRID * GRID, DIM // HEADS // 2, 2)}, "steps": 100,
                "args": argparse.Namespace(gpt_model="GPT-B", image_size=64)}, d / "gpt.pt")
    torch.manual_seed(0)
    vq = VQModel(tiny_vq_config()).eval()
    torch.save({"model": vq.state_dict()}, d / "vq.pt")
    out = run([PY, TOOL, "from-llamagen", "--gpt", str(d / "gpt.pt"), "--vq", str(d / "vq.pt"), "--image-grid",
               str(GRID), "--num-heads", str(HEADS), "--dst", str(d / "ck")])
    return {"dir": d, "sd": sd, "ck": d / "ck", "vq": vq, "summary": out.stdout}


def _inputs(vocab, seed: int = 3):
    """Rows [condition] + 15 codes (conditions: classes 3 and 7, and the null class) for megacca and LlamaGen."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.tensor([3, CLASSES, 7])
    codes = torch.randint(0, CODES, (3, GRID * GRID), generator=g)
    ids = [vocab.class_token(3), vocab.null_id, vocab.class_token(7)]
    tokens = torch.cat([torch.tensor(ids)[:, None], codes[:, :-1] + vocab.image_offset], dim=1)
    return cond, codes, tokens


def test_logits_equal_llamagen_over_the_codebook(converted):
    import megacca

    m = megacca.load(converted["ck"])
    try:
        v = m.vocab
        assert (m.cfg.model.layout, m.cfg.model.logprob_norm, v.num_classes, v.codebook_size) == \
            ("llamagen", "codebook", CLASSES, CODES)
        cond, codes, tokens = _inputs(v)
        ref = reference_logits(converted["sd"], cond, codes[:, :-1])
        got = m.logits(tokens)[..., v.image_offset:v.image_offset + CODES]
        err = (got - ref).abs().max().item()
        # fp32 throughout; the same math in another order (megatron's fused qkv and rotate-half, torch's RMSNorm
        # and SDPA kernels vs the reference's): measured 3.6e-6 on logits of magnitude ~5, i.e. a few ulps
        # accumulated over 2 layers. 2e-5 leaves headroom for other CPUs' kernels, and is far below the 1e-1
        # scale of any mapping mistake (a wrong permutation or table row changes logits by O(1)).
        assert err < 2e-5, err
        print(f"max |megacca - LlamaGen| logit = {err:.2e}")
    finally:
        m.close()


def test_to_llamagen_round_trip_is_bit_exact(converted, tmp_path):
    run([PY, TOOL, "to-llamagen", "--src", str(converted["ck"]), "--dst", str(tmp_path / "back.pt")])
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(back) == {"model"}
    sd = converted["sd"]  # without the stale freqs_cis, which LlamaGen recomputes and never loads
    assert back["model"].keys() == sd.keys()
    assert all(back["model"][k].dtype == sd[k].dtype and torch.equal(back["model"][k], sd[k]) for k in sd)


def test_bare_safetensors_input_converts_to_the_same_weights(converted, tmp_path):
    from safetensors.torch import save_file

    from megacca.checkpoint import read_full_state_dict

    save_file(converted["sd"], str(tmp_path / "gpt.safetensors"))  # the bare state dict, as XXL / 3B ship
    run([PY, TOOL, "from-llamagen", "--gpt", str(tmp_path / "gpt.safetensors"), "--image-grid", str(GRID),
         "--num-heads", str(HEADS), "--dst", str(tmp_path / "ck")])
    a, b = read_full_state_dict(converted["ck"]), read_full_state_dict(tmp_path / "ck")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "ck" / "vocab.json").read_text())["vq_sha256"] is None


def test_refusals_are_one_line_naming_what(converted, tmp_path):
    def fails(*args) -> str:
        p = run([PY, TOOL, *args], check=False)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        return lines[0]

    gpt = str(converted["dir"] / "gpt.pt")
    assert "--image-grid" in fails("from-llamagen", "--gpt", gpt, "--num-heads", "4", "--dst", str(tmp_path / "a"))
    bad = dict(converted["sd"])
    bad["layers.1.feed_forward.w2.weight"] = torch.zeros(DIM, FFN + 1)
    torch.save(bad, tmp_path / "bad.pt")
    msg = fails("from-llamagen", "--gpt", str(tmp_path / "bad.pt"), "--image-grid", "4", "--num-heads", "4",
                "--dst", str(tmp_path / "b"))
    assert "layers.1.feed_forward.w2.weight" in msg and "(64, 97)" in msg and "(64, 96)" in msg
    t2i = {k: v for k, v in converted["sd"].items() if not k.startswith("cls_embedding")}
    t2i["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(DIM, 8)
    torch.save({"model": t2i}, tmp_path / "t2i.pt")
    assert "text-to-image" in fails("from-llamagen", "--gpt", str(tmp_path / "t2i.pt"), "--image-grid", "4",
                                    "--dst", str(tmp_path / "c"))
    torch.save({"model": converted["sd"], "out": PurePosixPath("x")}, tmp_path / "pickled.pt")  # names a class
    assert "--trust-pickle" in fails("from-llamagen", "--gpt", str(tmp_path / "pickled.pt"), "--image-grid", "4",
                                     "--num-heads", "4", "--dst", str(tmp_path / "d"))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_help_shows_both_subcommands_with_examples():
    out = run([PY, TOOL, "--help"]).stdout
    assert "from-llamagen" in out and "to-llamagen" in out
    for sub, flag in (("from-llamagen", "--gpt"), ("to-llamagen", "--src")):
        text = run([PY, TOOL, sub, "--help"]).stdout
        assert "examples:" in text and f"convert_checkpoint.py {sub} {flag}" in text


def test_greedy_sampling_is_llamagen_greedy_and_gives_hw_codes(converted):
    import megacca

    m = megacca.load(converted["ck"])
    try:
        v = m.vocab
        prompt = m.class_prompt(7)
        assert prompt == [v.class_token(7)]  # the LlamaGen layout's prompt: the condition alone
        got = m.generate([prompt, [v.null_id]], temperature=0)
        # KV-cache decoding with the cached condition key zero and 2D positions from the history: the same
        # greedy path as LlamaGen's model recomputed from scratch at every step.
        assert got[0] == [v.image_offset + c for c in reference_greedy(converted["sd"], 7, GRID * GRID)]
        assert got[1] == [v.image_offset + c for c in reference_greedy(converted["sd"], CLASSES, GRID * GRID)]
        codes, _ = m.sample_images([m.class_prompt(k) for k in range(4)], cfg_scale=2.0, seed=0)
        assert codes.shape == (4, GRID, GRID) and codes.min() >= 0 and codes.max() < CODES
    finally:
        m.close()


def test_decode_images_uses_the_vq_converted_into_the_checkpoint(converted):
    import megacca

    m = megacca.load(converted["ck"])
    try:
        assert m.vq_dir == converted["ck"] / "vq"
        codes = torch.randint(0, CODES, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = converted["vq"].decode(codes)
        assert torch.equal(m.decode_images(codes), want)
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------------------
# Codebook-only log-probs, at tp=1 and tp=2 (each rank masks its own vocabulary slice)
# ---------------------------------------------------------------------------------------------------------
def _reference_nll(sd, vocab) -> torch.Tensor:
    cond, codes, _ = _inputs(vocab)
    logp = torch.log_softmax(reference_logits(sd, cond, codes[:, :-1]), dim=-1)  # LlamaGen's head: codes only
    return -logp.gather(-1, codes[..., None])[..., 0]


def _nll(model, vocab) -> torch.Tensor:
    _, codes, tokens = _inputs(vocab)
    return model(tokens, labels=codes + vocab.image_offset).float()


def tp_worker(ck: str, out: str, tp: int) -> None:
    """Under torchrun: the converted checkpoint at tp ranks, its per-token NLL of `_inputs` and whether every
    gradient is finite (the masked logits are -inf), saved by rank 0."""
    import torch.distributed as dist

    from megacca.checkpoint import load_model_weights, read_trainer_state
    from megacca.config import Config, from_dict
    from megacca.distributed.init import init_distributed
    from megacca.model.gpt import build_model
    from megacca.tokenizer.vocab import UnifiedVocab

    saved = read_trainer_state(ck)
    cfg = from_dict(Config, saved["config"])
    cfg.parallel.tp = tp
    cfg.model.make_vocab_size_divisible_by //= tp  # the checkpoint's padded rows, split over tp ranks
    init_distributed(tp, 1, seed=0)
    model = build_model(cfg)
    load_model_weights(model, ck)
    nll = _nll(model, UnifiedVocab(saved["vocab"]))
    nll.sum().backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    if dist.get_rank() == 0:
        torch.save({"nll": nll.detach(), "finite": finite}, out)
    dist.barrier()


def test_codebook_normalised_nll_is_llamagens_loss_at_tp1_and_tp2(converted, tmp_path):
    import megacca

    m = megacca.load(converted["ck"])
    try:
        vocab = m.vocab
        ref = _reference_nll(converted["sd"], vocab)
        with torch.no_grad():
            tp1 = _nll(m.model, vocab)
            _, codes, tokens = _inputs(vocab)
            whole = -torch.log_softmax(m.model(tokens).float(), -1).gather(-1, (codes + vocab.image_offset)[..., None])
        # Normalised over the whole padded vocabulary the NLL would be larger: its 64 non-code rows are zero
        # logits, not -inf.
        assert (whole[..., 0] > tp1 + 1e-3).all()
    finally:
        m.close()
    # The same fp32 rounding as the logits (a log-softmax adds a few ulps): see the logits test.
    assert (tp1 - ref).abs().max().item() < 2e-5
    torchrun(2, __file__, "tp", converted["ck"], tmp_path / "tp2.pt", 2)
    tp2 = torch.load(tmp_path / "tp2.pt", weights_only=True)
    assert tp2["finite"]
    assert (tp2["nll"] - ref).abs().max().item() < 2e-5


# ---------------------------------------------------------------------------------------------------------
# The paper's path on a tiny model: import, CCA, export
# ---------------------------------------------------------------------------------------------------------
def test_cca_on_a_converted_model_end_to_end(converted, tmp_path):
    import megacca
    from megacca.checkpoint import read_full_state_dict
    from test_align_stage import write_class_codes

    ck = converted["ck"]
    write_class_codes(tmp_path / "codes", samples=64, classes=CLASSES, codebook=CODES)
    src = f"[{{path: {tmp_path / 'codes'}, task: c2i}}]"
    # The shipped recipe, at the converted model's size and on a CPU (fp32, ZeRO-0, one rank).
    train(tmp_path / "cca", f"train.init_from={ck}", f"data.vocab={ck / 'vocab.json'}", f"data.sources={src}",
          "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", f"model.ffn_hidden_size={FFN}",
          f"model.seq_length={GRID * GRID}", "parallel.zero_stage=0", "train.precision=fp32", "train.micro_batch_size=4",
          "train.global_batch_size=4", "train.max_steps=3", "train.save_every=3", "data.num_workers=0",
          "train.tensorboard=false", "optim.lr=1e-3", config="configs/cca/llamagen_b_c2i.yaml",
          script="launch/cca_stage.sh")
    rows = metrics(tmp_path / "cca")
    f, lam = rows[0]["pos_like_frac"], 1000.0
    # policy == reference at step 1: every Δ is 0 (README, "Alignment: CCA and DPO")
    assert abs(rows[0]["loss"] - math.log(2) * (1 + f + (1 - f) * lam) / lam) < 1e-6
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    trained = read_full_state_dict(tmp_path / "cca")
    out_rows = trained["output_layer.weight"]
    vocab_offset = json.loads((ck / "vocab.json").read_text())["image_offset"]
    # Codebook-only log-probs give the non-code output rows no gradient: they are still exactly zero.
    assert not out_rows[:vocab_offset].any() and not out_rows[vocab_offset + CODES:].any()
    run([PY, TOOL, "to-llamagen", "--src", str(tmp_path / "cca"), "--dst", str(tmp_path / "cca.pt")])
    sd = torch.load(tmp_path / "cca.pt", weights_only=True)["model"]
    assert not torch.equal(sd["output.weight"], converted["sd"]["output.weight"])  # it trained
    m = megacca.load(tmp_path / "cca")
    try:
        cond, codes, tokens = _inputs(m.vocab)
        got = m.logits(tokens)[..., m.vocab.image_offset:m.vocab.image_offset + CODES]
        assert (got - reference_logits(sd, cond, codes[:, :-1])).abs().max().item() < 2e-5  # as above
    finally:
        m.close()


if __name__ == "__main__":  # the tp worker, under torchrun
    import sys

    assert sys.argv[1] == "tp"
    tp_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
