"""Inference correctness and the sampler: attention masks, absolute rotary positions, megatron's KV cache
against full recomputation (1D/2D rotary, tp=1 and tp=2), padded prompt batches, constrained decoding,
classifier-free guidance and seeding."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from conftest import torchrun
from gen_worker import PREFIX, build, cached_logits, fixed_tokens, make_vocab

# Cache-vs-recompute and padded-vs-alone tolerance: the same fp32 math over other kernel shapes (one query
# against the cached prefix instead of the square causal kernel, a longer masked key range), so only
# summation order differs; measured ~2e-7 on logits of magnitude ~1, 1e-5 leaves 50x headroom.
ATOL = 1e-5


@pytest.fixture(scope="module")
def mcore():
    from megacca.distributed.init import init_distributed

    init_distributed(1, 1, seed=0)
    yield


@pytest.fixture(scope="module")
def vocab():
    return make_vocab()


def _core_attention(backend: str):
    model, _ = build("1d", 1, f"model.attention_backend={backend}")
    return model.decoder.layers[0].self_attention.core_attention


def _qkv(sq: int, sk: int, b: int = 2, heads: int = 4, groups: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(sq, b, heads, d, generator=g), torch.randn(sk, b, groups, d, generator=g),
            torch.randn(sk, b, groups, d, generator=g))


# ---------------------------------------------------------------------------------------------- attention
def test_unmasked_causal_attention_is_the_fused_causal_kernel(mcore):
    """The training path (no mask, causal) must stay exactly torch's is_causal kernel: bit-identical."""
    attn = _core_attention("sdpa")
    q, k, v = _qkv(6, 6)
    got = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=attn.softmax_scale, enable_gqa=True)
    assert torch.equal(got, ref.permute(2, 0, 1, 3).reshape(6, 2, -1))


def _pad_mask(sq: int, sk: int, pad: list[int], causal: bool) -> torch.Tensor:
    """megatron-convention mask [b, 1, sq, sk], True = masked: row r's first pad[r] keys, plus the future."""
    ar = torch.arange(sk)
    m = (ar[None, :] < torch.tensor(pad)[:, None])[:, None, None, :].expand(len(pad), 1, sq, sk)
    if causal:
        m = m | torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)
    return m


@pytest.mark.parametrize("case", ["padded_prefill", "decode_one", "decode_chunk"])
def test_sdpa_masks_match_megatron_dot_product_attention(mcore, case):
    """Each mask case against megatron's own DotProductAttention (`local`) given the complete explicit mask."""
    sdpa, local = _core_attention("sdpa"), _core_attention("local")
    sq, sk = {"padded_prefill": (6, 6), "decode_one": (1, 7), "decode_chunk": (3, 7)}[case]
    q, k, v = _qkv(sq, sk)
    # Each pad query sees itself (as the sampler's masks do): an all-masked row is NaN under -inf.
    eye = torch.eye(sq, sk, dtype=torch.bool) if sq == sk else torch.zeros(sq, sk, dtype=torch.bool)
    full = _pad_mask(sq, sk, [0, 2], causal=True) & ~eye
    ref = local(q, k, v, full)
    if case == "padded_prefill":  # the complete mask, and the padding mask alone with the causal type
        got = [sdpa(q, k, v, full, attn_mask_type=AttnMaskType.causal),
               sdpa(q, k, v, _pad_mask(sq, sk, [0, 2], causal=False) & ~eye, attn_mask_type=AttnMaskType.causal)]
    elif case == "decode_one":  # what megatron's cache passes after the prefill: no_mask + the padding
        got = [sdpa(q, k, v, _pad_mask(sq, sk, [0, 2], causal=False), attn_mask_type=AttnMaskType.no_mask)]
    else:  # sq < sk, causal aligned bottom-right (torch's is_causal would align it top-left)
        ref = local(q, k, v, _pad_mask(sq, sk, [0, 0], causal=True))
        got = [sdpa(q, k, v, None, attn_mask_type=AttnMaskType.causal)]
    for g in got:
        # Same math: megatron masks with -10000 (exp underflows to exactly 0 in fp32) and SDPA with -inf; the
        # rest is fp32 summation order.
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)


def test_sdpa_refuses_what_it_cannot_honour(mcore):
    attn = _core_attention("sdpa")
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="needs an attention_mask"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(TypeError, match="must be bool"):
        attn(q, k, v, torch.zeros(4, 4), attn_mask_type=AttnMaskType.causal)
    with pytest.raises(NotImplementedError, match="attention bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1))


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_training_forward_with_masks_matches_local_backend(mcore, vocab, rope):
    """Whole model, training mode: no mask (the training path, NLL as the loss sees it) and an explicit padding
    mask (every layer gets it) give local's results."""
    ref, _ = build(rope, 1, "model.attention_backend=local")
    sdpa, _ = build(rope, 1, "model.attention_backend=sdpa")
    sdpa.load_state_dict(ref.state_dict())
    tok = fixed_tokens(vocab)
    labels = torch.roll(tok, -1, 1)
    # fp32, fused softmax-matmul vs baddbmm + softmax: rounding only.
    torch.testing.assert_close(sdpa(tok, labels=labels), ref(tok, labels=labels), atol=1e-5, rtol=1e-5)
    mask = _pad_mask(14, 14, [0, 3, 5], causal=True) & ~torch.eye(14, dtype=torch.bool)
    torch.testing.assert_close(sdpa(tok, None, mask), ref(tok, None, mask), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- KV cache, positions
@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_kv_cache_logits_equal_full_recompute(mcore, vocab, rope):
    from megacca.generation.kv_cache import IncrementalDecoder
    from megacca.generation.sampler import full_logits

    model, _ = build(rope)
    tok = fixed_tokens(vocab)  # crosses a whole image, text after it, and a second image
    full = full_logits(model, tok)
    cached = cached_logits(model, tok, PREFIX)
    assert cached.shape == (3, 14 - PREFIX + 1, vocab.vocab_size)
    torch.testing.assert_close(cached, full[:, PREFIX - 1:], atol=ATOL, rtol=0)
    # Several tokens fed at once after the prefill: the chunk is causal within itself.
    with torch.no_grad():
        dec = IncrementalDecoder(model, tok[:, :PREFIX].tolist(), 4, vocab.pad_id)
        dec.logits()
        for t in range(PREFIX, PREFIX + 3):
            dec.append(tok[:, t])
        torch.testing.assert_close(dec.logits()[:, :vocab.vocab_size], full[:, PREFIX + 2], atol=ATOL, rtol=0)


def test_kv_cache_past_prefill_needs_2d_positions(mcore, vocab):
    from megatron.core.inference.contexts import StaticInferenceContext

    model, _ = build("2d")
    model.eval()
    ctx = StaticInferenceContext(1, 8)
    tok = fixed_tokens(vocab, 1)
    with torch.no_grad():
        model(tok[:, :3], None, None, inference_context=ctx, runtime_gather_output=True)
        ctx.increment_sequence_len_offset(3)
        with pytest.raises(ValueError, match="needs rotary_positions"):
            model(tok[:, 3:4], None, None, inference_context=ctx, runtime_gather_output=True)


@pytest.mark.parametrize("rope,use_cache,backend", [("1d", True, "sdpa"), ("1d", False, "sdpa"),
                                                    ("2d", True, "sdpa"), ("2d", False, "sdpa"),
                                                    ("2d", True, "local")])
def test_padded_prompt_batch_gives_each_row_its_own_logits(mcore, vocab, rope, use_cache, backend):
    """Left padding with positions counted from the first real token: each row's next-token logits, at the
    prefill and after three appended tokens (one, then a chunk of two), are those of the row alone (also
    through megatron's own attention, which takes the same explicit masks)."""
    from megacca.generation.kv_cache import IncrementalDecoder
    from megacca.generation.sampler import full_logits

    model, _ = build(rope, 1, f"model.attention_backend={backend}")
    model.eval()
    tok = fixed_tokens(vocab)
    prompts = [tok[0, :9].tolist(), tok[1, :2].tolist(), tok[2, 1:5].tolist()]  # lengths 9, 2, 4
    more = fixed_tokens(vocab)[:, 11:14]  # three image codes appended to every row
    with torch.no_grad():
        dec = IncrementalDecoder(model, prompts, 3, vocab.pad_id, use_cache=use_cache)
        first = dec.logits()
        dec.append(more[:, 0])
        dec.logits()
        dec.append(more[:, 1])  # then a chunk of two tokens: causal within itself, padding hidden
        dec.append(more[:, 2])
        last = dec.logits()
    for r, p in enumerate(prompts):
        alone = full_logits(model, torch.tensor([p + more[r].tolist()]))[0]
        torch.testing.assert_close(first[r, :vocab.vocab_size], alone[len(p) - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[r, :vocab.vocab_size], alone[-1], atol=ATOL, rtol=0)


def test_rotary_emb_1d_is_megatrons_at_the_same_positions(mcore):
    from megacca.model.rope import rotary_emb_1d

    model, _ = build("1d")
    ours = rotary_emb_1d(torch.arange(12).expand(3, 12), model.rotary_pos_emb.inv_freq)
    assert ours.shape == (12, 3, 1, 16)
    assert torch.equal(ours, model.rotary_pos_emb(12).expand(12, 3, 1, 16))


def test_rotary_positions_of_left_padded_rows(vocab):
    from megacca.model.rope import rotary_positions

    t = torch.tensor([[0, 0, 1, 3, 40, 41, 42, 43, 4, 20],
                      [1, 3, 40, 41, 42, 43, 4, 20, 21, 22]])
    pos = rotary_positions(t, "2d", 3, 2, start=torch.tensor([2, 0]))
    # Row 0 alone: <bos> <boi> 2x2 image <eoi> text → (0,0) (1,1) (2,2)(2,3)(3,2)(3,3) (4,4) (5,5); pads at 0.
    assert pos[0].tolist() == [[0, 0], [0, 0], [0, 0], [1, 1], [2, 2], [2, 3], [3, 2], [3, 3], [4, 4], [5, 5]]
    assert pos[1, :8].tolist() == pos[0, 2:].tolist()
    assert rotary_positions(t, "1d", 3, 2, start=torch.tensor([2, 0]))[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5,
                                                                                        6, 7]


# ------------------------------------------------------------------------------------------------ sampler
def _parse(out: list[int], vocab, max_new: int | None, open_codes: int | None = None) -> None:
    """Assert the constraints on one generated row; `open_codes`: codes already in an image span the prompt
    left open (None: the prompt ends in text mode)."""
    hw = vocab.image_grid[0] * vocab.image_grid[1]
    opened_by_prompt = open_codes is not None
    in_img, count = opened_by_prompt, open_codes or 0
    for n, t in enumerate(out):
        assert 0 <= t < vocab.vocab_size and t != vocab.pad_id, (n, t)
        if in_img:
            if count < hw:
                assert vocab.is_image(t), (n, t)
                count += 1
            else:
                assert t == vocab.eoi_id, (n, t)
                in_img = False
                if opened_by_prompt:
                    assert n == len(out) - 1  # a prompt's image ends the row
                    return
        else:
            never = (vocab.eoi_id, vocab.bos_id, vocab.specials["<reserved7>"])
            assert not vocab.is_image(t) and t not in never, (n, t)
            if t == vocab.eos_id:
                assert n == len(out) - 1
                return
            if t == vocab.boi_id:
                in_img, count = True, 0
    assert not in_img and len(out) == max_new  # stopped by the budget, never inside an image


def _boost(model, ids, amount: float = 100.0):
    """Add `amount` to the output layer's logits of `ids` (a forward hook; returns its handle)."""
    ids = torch.tensor(ids)

    def hook(module, args, out):
        logits = out[0].clone()
        logits[..., ids] += amount
        return (logits, *out[1:])

    return model.output_layer.register_forward_hook(hook)


def _adversarial(model, vocab):
    """Every forbidden id (<pad>, <eoi>, <bos>, <reserved7>, the padded vocabulary rows) and every image code
    leads by 100 logits: without the constraints, each step would emit one of them."""
    return _boost(model, [vocab.pad_id, vocab.eoi_id, vocab.bos_id, vocab.specials["<reserved7>"],
                          *range(vocab.image_offset, model.vocab_size)])


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_constrained_decoding_stays_in_the_codebook_and_closes_images(mcore, vocab, rope):
    from megacca.generation.sampler import generate

    model, _ = build(rope)
    _adversarial(model, vocab)
    images = [[1, 8 + k, 3] for k in range(10)] + [[1, 20, 21, 3], [1, 3, 40]]  # the last: an open span
    for temperature in (0, 2.0):
        outs = generate(model, vocab, images, temperature=temperature, seed=0)
        for p, out in zip(images, outs):
            _parse(out, vocab, None, len(p) - 1 - p.index(vocab.boi_id))
        assert [len(o) for o in outs] == [5] * 11 + [4]  # 4 codes + <eoi>; 3 after the prompt's own code
    # Text mode, hot sampling over many rows: images open (and must close within the budget) and text stops.
    text = [[1, 20], [1, 3, 40, 41, 42, 43, 4], [1, 8]] * 24
    outs = generate(model, vocab, text, max_new_tokens=9, temperature=3.0, seed=1)
    for out in outs:
        _parse(out, vocab, 9)
    assert any(vocab.boi_id in o for o in outs)  # the span rules were exercised
    with pytest.raises(ValueError, match="cannot close the image"):
        generate(model, vocab, images, max_new_tokens=3)


def test_text_generation_stops_at_eos(mcore, vocab):
    from megacca.generation.sampler import generate

    model, _ = build("1d")
    _boost(model, [vocab.eos_id])
    assert generate(model, vocab, [[1, 3, 40, 41, 42, 43, 4]], temperature=0) == [[vocab.eos_id]]
    assert generate(model, vocab, [[1, 20]], max_new_tokens=4, top_p=0.5, seed=0) == [[vocab.eos_id]]


def test_cfg_scale_one_equals_guidance_free(mcore, vocab):
    """s = 1 through the real 2B-row guided batch (unconditional rows `<bos> <null> <boi>`, shorter than the
    text prompts, so left-padded) samples what the guidance-free batch of B samples with the same seed. The
    conditional logits agree to rounding, and u + 1*(c - u) = c to an ulp; a draw could only flip on a tie
    that close, so the seeded comparison is exact."""
    from megacca.generation import sampler

    model, _ = build("2d")
    prompts = [[1, 8 + k, 3] for k in range(6)] + [[1, 20, 21, 22, 3], [1, 25, 3]]
    free = sampler.generate(model, vocab, prompts, seed=3, top_k=40)
    kw = dict(temperature=1.0, top_k=40, top_p=None, cfg_interval=None, seed=3, use_cache=True)
    assert sampler._generate(model, vocab, prompts, None, cfg_scale=1.0, **kw) == free
    assert sampler.generate(model, vocab, prompts, seed=3, top_k=40, cfg_scale=1.0) == free
    # An empty guidance interval leaves every image position unguided (the conditional logits as they are).
    assert sampler.generate(model, vocab, prompts, seed=3, top_k=40, cfg_scale=4.0, cfg_interval=(0.0, 0.0)) \
        == free
    guided = sampler.generate(model, vocab, prompts, seed=3, top_k=40, cfg_scale=4.0)
    assert guided != free  # guidance changes the samples
    for out in guided:
        _parse(out, vocab, None, 0)


def test_seeded_sampling_is_deterministic_and_cache_independent(mcore, vocab):
    from megacca.generation.sampler import generate

    model, _ = build("2d")
    prompts = [[1, 8 + k, 3] for k in range(8)] + [[1, 20, 21, 3]]
    a = generate(model, vocab, prompts, seed=11, top_p=0.9)
    assert generate(model, vocab, prompts, seed=11, top_p=0.9) == a
    assert generate(model, vocab, prompts, seed=12, top_p=0.9) != a
    # Recomputation gives the cache's logits to rounding (see ATOL), hence the same draws.
    assert generate(model, vocab, prompts, seed=11, top_p=0.9, use_cache=False) == a
    assert generate(model, vocab, prompts, temperature=0, use_cache=False) == generate(model, vocab, prompts,
                                                                                       temperature=0)


def test_sampler_leaves_the_model_in_training_mode(mcore, vocab):
    from megacca.generation.sampler import full_logits, generate

    model, _ = build("1d")
    model.train()
    generate(model, vocab, [[1, 8, 3]], seed=0)
    full_logits(model, torch.tensor([[1, 8, 3]]))
    assert model.training


# ---------------------------------------------------------------------------------------- tensor parallel
def test_tp2_generation_matches_tp1(tmp_path):
    """Two gloo ranks at tp=2 against one process at tp=1, same seeded weights: the cache equals recomputation
    on every rank, the gathered logits match, and every rank generates the same ids as tp=1."""
    from safetensors.torch import load_file

    for tp in (1, 2):
        torchrun(tp, "tests/gen_worker.py", tmp_path, tp, timeout=300)
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text())
               for name in ("tp1_rank0", "tp2_rank0", "tp2_rank1")}
    for rope in ("1d", "2d"):
        for rep in reports.values():
            assert rep[f"{rope}_cache_vs_full"] < ATOL
        # tp=2 splits the matmuls and all-reduces partial sums: fp32 rounding (measured ~2e-7).
        torch.testing.assert_close(load_file(str(tmp_path / f"tp2_{rope}.safetensors"))["logits"],
                                   load_file(str(tmp_path / f"tp1_{rope}.safetensors"))["logits"],
                                   atol=ATOL, rtol=0)
        for key in ("greedy", "sampled", "cfg", "text"):
            want = reports["tp1_rank0"][f"{rope}_{key}"]
            assert reports["tp2_rank0"][f"{rope}_{key}"] == want
            assert reports["tp2_rank1"][f"{rope}_{key}"] == want
