"""Swin/PVT/Halo attention: the SDPA path (default) equals the explicit path; shared, bounded masks.

The fixture tests (test_parity_core.py, test_pvt.py) run the default, i.e. fused, path; here the
two paths are compared directly, forward and backward, at a size where Swin shifts and pads and
Halo masks padding (64 px: 16/8/4/2 maps), in float64 (tight) and float32 (bounded).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from stm_dist.models import create_model, halo, layers, swin
from stm_dist.models.layers import MaskCache, set_fused_attn

ATTN_MIXERS = ("halo", "swin", "pvt")
# float32 bound: both paths round differently (scale folded into q vs into the logits, fused
# softmax); observed max |diff| ~1e-7 on logits, far below the fixture tolerance (1e-6).
FP32 = dict(rtol=1e-4, atol=2e-6)


def _pair(stm: str, dtype):
    torch.manual_seed(0)
    fused = create_model(f"unified_{stm}_micro", num_classes=10).to(dtype).train()
    explicit = copy.deepcopy(fused)
    assert set_fused_attn(explicit, False) > 0
    return fused, explicit


def _forward_backward(model, x):
    out = model(x)
    out.logsumexp(-1).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("stm", ATTN_MIXERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_equals_explicit_forward_and_backward(stm, dtype, monkeypatch):
    monkeypatch.setattr(layers, "SDPA_ON_CPU_WITH_MASK_GRAD", True)  # SDPA even where it is slower
    fused, explicit = _pair(stm, dtype)
    x = torch.randn(1, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out_f, grad_f = _forward_backward(fused, x)
    out_e, grad_e = _forward_backward(explicit, x)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else FP32
    torch.testing.assert_close(out_f, out_e, **tol)
    for n, g in grad_e.items():
        torch.testing.assert_close(grad_f[n], g, **tol, msg=n)
    # The learned position parameters really receive gradient through the attention mask.
    learned = [n for n in grad_f if "relative_position_bias_table" in n or "_rel" in n]
    assert stm == "pvt" or (learned and all(grad_f[n].abs().sum() > 0 for n in learned))


@pytest.mark.parametrize("stm", ATTN_MIXERS)
def test_switch_selects_the_kernel(stm, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, explicit = (m.eval() for m in _pair(stm, torch.float32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        explicit(x)
        assert not calls
        fused(x)
    blocks = sum(len(s) for s in fused.stages)
    assert len(calls) == blocks
    assert set_fused_attn(fused, False) == blocks  # one attention module per block
    assert all(not m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))
    # Training on CPU: SDPA only where no mask needs a gradient (PVT); see layers.sdpa_pays.
    calls.clear()
    set_fused_attn(fused, True)
    fused.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(calls) == (blocks if stm == "pvt" else 0)


def test_mask_cache_is_lru_and_bounded():
    cache, built = MaskCache(maxsize=2), []

    def build(v):
        return lambda: built.append(v) or torch.tensor(v)

    a = cache.get("a", build(1))
    assert cache.get("a", build(99)) is a and built == [1]  # a hit builds nothing
    cache.get("b", build(2))
    cache.get("a", build(99))  # touch a: b is now the oldest
    cache.get("c", build(3))
    assert len(cache) == 2 and built == [1, 2, 3]
    cache.get("b", build(4))  # b was evicted, so it is rebuilt
    assert built == [1, 2, 3, 4]


@pytest.mark.parametrize("stm,module,builder", [("swin", swin, "shift_window_mask"),
                                                ("halo", halo, "halo_key_mask")])
def test_masks_shared_across_blocks_and_bounded(stm, module, builder, monkeypatch):
    model = create_model(f"unified_{stm}_micro", num_classes=10).eval()
    monkeypatch.setattr(module, "_MASKS", MaskCache(maxsize=8))
    built, real = [], getattr(module, builder)
    monkeypatch.setattr(module, builder, lambda *a, **k: built.append(a[:2]) or real(*a, **k))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    # 96 px gives 24/12/6/3 maps, all padded. Halo: one key mask per map size larger than a
    # block (maps within one block attend their real pixels only: no mask). Swin: at 24 and 12
    # a padding-only and a shifted mask, at 6 and 3 (one window) padding only.
    want = 6 if stm == "swin" else 2
    assert len(built) == len(module._MASKS) == want, built  # one build per mask, not per block
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))
    assert len(built) == want  # the second pass only hits
    with torch.no_grad():
        for size in (32, 64, 128) if stm == "swin" else (64, 128, 160, 192, 224):
            model(torch.randn(1, 3, size, size))
    assert len(module._MASKS) == 8 and len(built) > 8  # many resolutions: evicted, not grown


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (7, 4), (7, 7)])
def test_halo_one_block_path_equals_the_masked_window(hw, fused):
    """A map within one block attends only its real pixels; the general path attends the whole
    13x13 window with padding masked. Same function, forward and backward (float64)."""
    torch.manual_seed(0)
    attn = halo.HaloAttention(64, 2, block_size=7, halo_size=3, fused_attn=fused).double()
    x = torch.randn(2, *hw, 64, dtype=torch.float64, requires_grad=True)
    fast, full = attn._one_block(x), attn._blocked(x)
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x] + list(attn.parameters()), g)
    grads_full = torch.autograd.grad(full, [x] + list(attn.parameters()), g)
    for a, b in zip(grads_fast, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
