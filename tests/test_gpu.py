"""GPU-only paths: flash-attn against SDPA in bf16, a Transformer Engine checkpoint, `cpu_compat` inert on CUDA.

Marked `gpu`: skipped without CUDA (tests/conftest.py). On a GPU machine: `.venv/bin/python -m pytest -m gpu
tests`. A test whose extra (flash-attn, transformer_engine) is not installed skips with that reason.

bf16 tolerances follow flash-attn's own test suite: a bf16 result is compared with an fp32 reference run of the
same weights, and its error may be at most twice the error of the plain-torch (SDPA) bf16 run against that
reference. Both bf16 runs round every matmul and norm output to 8 mantissa bits (eps 2^-8 = 3.9e-3); a correct
kernel only changes where that rounding lands, so its error is of the same size, while a wrong one (no causal
mask, wrong scale, wrong GQA head mapping, a weight loaded into the wrong place) errs by O(1) of the tensor's
scale. The `SLACK` term (1e-3 of the tensor's scale, a quarter of bf16 eps) covers a tensor the SDPA run
happens to get almost exactly right, where twice a near-zero error would be an unfair bound.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import PY, run
from megacca.config import load_config

pytestmark = pytest.mark.gpu
SLACK = 1e-3


@pytest.fixture(scope="module")
def mcore():
    from megacca.distributed.init import init_distributed

    init_distributed(1, 1, seed=0)
    yield


def _gpt(backend: str, precision: str = "bf16"):
    from megacca.model.gpt import UnifiedGPT

    # debug shape with GQA (4 query heads over 2 groups) and 2D rotary image spans: every attention feature.
    # The megatron engine's config (bf16 needs no ZeRO stage there); only the model is built.
    cfg = load_config(None, ["parallel.engine=megatron", "model.num_query_groups=2", "model.rope=2d", "model.image_grid=4",
                             f"model.attention_backend={backend}", f"train.precision={precision}"])
    model = UnifiedGPT(cfg).cuda()
    assert model.attention_backend == backend
    return model, cfg


def _batch(cfg):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(8, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)
    tok[:, 5] = cfg.model.boi_token_id
    return tok.cuda(), torch.roll(tok, -1, dims=1).cuda()


def _run(model, tok, labels) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, loss, grads) of one forward/backward on the global token-mean NLL."""
    model.zero_grad(set_to_none=True)
    logits = model(tok).detach()
    loss = model(tok, labels=labels).float().mean()
    loss.backward()
    return logits, loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _fp32_copy(model):
    """The same weights in an fp32 SDPA model: the reference both bf16 runs are measured against."""
    ref, _ = _gpt("sdpa", "fp32")
    ref.load_state_dict({k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                         for k, v in model.state_dict().items()})
    return ref


def _no_worse(name: str, got: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    plain_err = (plain.float() - ref.float()).abs().max().item()
    bound = 2 * plain_err + SLACK * ref.float().abs().max().item()
    assert err <= bound, f"{name}: error {err:.3e} vs fp32, SDPA bf16 errs {plain_err:.3e} (bound {bound:.3e})"


def _perturb(model) -> None:
    """Make every weight distinctive (norm weights start as all ones, which a misplaced load would not show)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32)
            p.copy_(p.float() * (1 + 0.5 * noise) if p.dim() == 1 else p.float() + 0.02 * noise)


def test_flash_attn_matches_sdpa_in_bf16(mcore, monkeypatch):
    pytest.importorskip("flash_attn")
    import megacca.model.attention as attention

    calls = {"n": 0}
    real = attention.flash_attn_func

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(attention, "flash_attn_func", counted)
    flash, cfg = _gpt("flash")
    sdpa, _ = _gpt("sdpa")
    sdpa.load_state_dict(flash.state_dict())
    ref = _fp32_copy(flash)
    tok, labels = _batch(cfg)

    f_logits, f_loss, f_grads = _run(flash, tok, labels)
    assert calls["n"] > 0  # the flash-attn kernel really ran (CUDA, bf16), not the SDPA fallback
    s_logits, s_loss, s_grads = _run(sdpa, tok, labels)
    r_logits, r_loss, r_grads = _run(ref, tok, labels)

    _no_worse("logits", f_logits, s_logits, r_logits)
    _no_worse("loss", f_loss, s_loss, r_loss)
    assert f_grads.keys() == r_grads.keys()
    for name in r_grads:
        _no_worse(f"grad {name}", f_grads[name], s_grads[name], r_grads[name])


def test_transformer_engine_checkpoint_loads(mcore, tmp_path):
    pytest.importorskip("transformer_engine")
    from megacca.checkpoint import load_model_weights, save_model_weights

    te, cfg = _gpt("te")
    _perturb(te)
    tok, labels = _batch(cfg)
    logits, loss, _ = _run(te, tok, labels)
    assert torch.isfinite(loss) and torch.isfinite(logits).all()

    # A plain state dict (TE modules carry `_extra_state`) loads into a freshly initialised TE model.
    fresh, _ = _gpt("te")
    assert not torch.equal(_run(fresh, tok, labels)[0], logits)
    fresh.load_state_dict(te.state_dict())
    # Same weights, same kernels, same input on the same device: the forward is deterministic.
    assert torch.equal(_run(fresh, tok, labels)[0], logits)

    # The distributed checkpoint the engines write loads into a fresh TE model ...
    save_model_weights(te, tmp_path / "te")
    again, _ = _gpt("te")
    load_model_weights(again, tmp_path / "te")
    again_logits, again_loss, _ = _run(again, tok, labels)
    assert torch.equal(again_logits, logits) and torch.isfinite(again_loss)

    # ... and into the local-spec SDPA model (the CPU path): TE stores the norms fused into the next linear
    # (`linear_qkv.layer_norm_weight`), and megatron's key map must put them back into `input_layernorm`.
    sdpa, _ = _gpt("sdpa")
    load_model_weights(sdpa, tmp_path / "te")
    s_logits, s_loss, _ = _run(sdpa, tok, labels)
    assert torch.isfinite(s_loss)
    ref = _fp32_copy(sdpa)
    r_logits, r_loss, _ = _run(ref, tok, labels)
    _no_worse("TE logits", logits, s_logits, r_logits)
    _no_worse("TE loss", loss, s_loss, r_loss)


def test_cpu_compat_is_inert_on_cuda():
    """In a fresh interpreter (nothing else has touched torch.cuda): installing the CPU layer, directly and
    through init_distributed, leaves every torch.cuda function and megatron RNG hook as it was and activates no
    TorchFunctionMode, so CUDA placements stay on the GPU."""
    script = textwrap.dedent("""
        import torch
        import megatron.core.tensor_parallel.random as mrandom
        from torch.overrides import _get_current_function_mode_stack

        names = ["current_device", "synchronize", "manual_seed", "get_rng_state", "set_rng_state",
                 "memory_allocated", "max_memory_allocated"]
        before = {n: getattr(torch.cuda, n) for n in names}
        rng_hooks = (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)

        from megacca import cpu_compat
        from megacca.distributed.init import init_distributed, shutdown

        assert cpu_compat.install() is False
        init_distributed(1, 1, seed=0)
        changed = [n for n in names if getattr(torch.cuda, n) is not before[n]]
        assert not changed, f"torch.cuda functions replaced: {changed}"
        assert (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state) == rng_hooks
        assert not cpu_compat._INSTALLED
        assert _get_current_function_mode_stack() == [], _get_current_function_mode_stack()
        assert isinstance(torch.cuda.current_device(), int)
        assert torch.empty(2, device="cuda").is_cuda and torch.zeros(2).cuda().is_cuda
        assert torch.zeros(2).to("cuda").is_cuda
        assert torch.zeros(2).type() == "torch.FloatTensor"
        assert torch.zeros(2, device="cuda").type() == "torch.cuda.FloatTensor"
        shutdown()
        print("inert")
    """)
    p = run([PY, "-c", script], timeout=300)
    assert p.stdout.strip().endswith("inert"), p.stdout + p.stderr
