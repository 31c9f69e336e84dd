"""The unified model in one process: attention backends, 2D rotary, summed log-probs, FLOPs and size formulas."""
from __future__ import annotations

import pytest
import torch

from megacca.config import load_config
from megacca.model.rope import positions_2d, rotary_emb_2d


@pytest.fixture(scope="module")
def mcore():
    from megacca.distributed.init import init_distributed

    init_distributed(1, 1, seed=0)
    yield


def _model(*overrides):
    from megacca.model.gpt import UnifiedGPT

    cfg = load_config(None, ["model.vocab_size=300", "model.seq_length=24", *overrides])
    torch.manual_seed(0)  # CPU init draws from the default generator: same seed, same weights
    return UnifiedGPT(cfg), cfg


def _tokens(cfg, b=2, boi_at=3):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(8, cfg.model.vocab_size, (b, cfg.model.seq_length), generator=g)
    t[:, boi_at] = cfg.model.boi_token_id
    return t


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_sdpa_backend_matches_megatron_dot_product_attention(mcore, rope):
    ref, cfg = _model("model.attention_backend=local", f"model.rope={rope}", "model.image_grid=4")
    sdpa, _ = _model("model.attention_backend=sdpa", f"model.rope={rope}", "model.image_grid=4")
    sdpa.load_state_dict(ref.state_dict())
    tok = _tokens(cfg)
    # Same math, different kernels (fused softmax-matmul vs baddbmm + softmax): fp32 rounding only.
    torch.testing.assert_close(sdpa(tok), ref(tok), atol=1e-5, rtol=1e-5)


def test_positions_2d_by_hand():
    # <bos> x <boi> [2x2 image] <eoi> y, grid 2: the image spans 2 positions per axis; text resumes after it.
    t = torch.tensor([[1, 20, 3, 50, 51, 52, 53, 4, 21]])
    pos = positions_2d(t, boi_id=3, grid=2)[0].tolist()
    assert pos == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 4], [4, 3], [4, 4], [5, 5], [6, 6]]
    # two images in a row, and a text-only row
    t2 = torch.tensor([[3, 9, 9, 9, 9, 3, 9, 9, 9, 9]])
    assert positions_2d(t2, 3, 2)[0].tolist() == [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2], [3, 3], [4, 4],
                                                   [4, 5], [5, 4], [5, 5]]
    assert positions_2d(torch.tensor([[5, 6, 7]]), 3, 2)[0].tolist() == [[0, 0], [1, 1], [2, 2]]


def test_rotary_2d_depends_only_on_relative_row_and_column():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb

    from megacca.model.gpt import transformer_config

    cfg = load_config(None)
    tcfg = transformer_config(cfg)
    d = 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def score(pq, pk):
        eq = rotary_emb_2d(torch.tensor([[pq]]), d, 10000.0)
        ek = rotary_emb_2d(torch.tensor([[pk]]), d, 10000.0)
        return (apply_rotary_pos_emb(q, eq, tcfg) * apply_rotary_pos_emb(k, ek, tcfg)).sum().item()

    # Fp32 trig of positions up to ~50: 1e-5 is a few ulps of the score's magnitude.
    assert score((7, 3), (5, 1)) == pytest.approx(score((12, 40), (10, 38)), abs=1e-5)
    assert score((7, 3), (5, 1)) != pytest.approx(score((7, 3), (5, 2)), abs=1e-3)  # columns matter
    assert score((7, 3), (5, 1)) != pytest.approx(score((7, 3), (4, 1)), abs=1e-3)  # rows matter


def test_summed_logprobs_match_log_softmax_reference(mcore):
    from megacca.model.gpt import sequence_logprobs

    model, cfg = _model()
    tok = _tokens(cfg)
    labels = torch.roll(tok, -1, dims=1)
    mask = torch.zeros_like(tok, dtype=torch.float32)
    mask[:, 5:15] = 1.0
    mask[1, 10:] = 0.0
    got = sequence_logprobs(model, tok, labels, mask)
    # Over the padded vocabulary, as megatron's vocab-parallel CE computes it (the padded rows are real
    # parameters that training pushes down; samplers mask them).
    logits = model(tok).float()
    assert logits.shape[-1] == cfg.padded_vocab_size() == 320
    ref = (torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    # Vocab-parallel CE computes log-sum-exp with its own max subtraction: fp32 rounding over ~10 tokens.
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    got.sum().backward()  # differentiable (the alignment stages train through it)
    assert model.output_layer.weight.grad is not None


def test_flops_formula_matches_flop_counter(mcore):
    from torch.utils.flop_counter import FlopCounterMode

    from megacca.model.flops import train_flops_per_token

    # megatron's local attention uses bmm/baddbmm, which FlopCounterMode counts (as the full S x S square).
    model, cfg = _model("model.attention_backend=local")
    tok = _tokens(cfg)
    with FlopCounterMode(display=False) as fc:
        model(tok, labels=tok).sum().backward()
    measured = fc.get_total_flops() / tok.numel()
    # The counter sees only matmuls; so does the formula. The output layer is padded to 320 rows in both.
    assert measured == pytest.approx(train_flops_per_token(cfg), rel=1e-9)


def test_param_count_formula_matches_model(mcore):
    from megacca.model.flops import param_count

    model, cfg = _model("model.num_query_groups=2")
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
