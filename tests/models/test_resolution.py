"""Any input size that is a multiple of 32: padding, masks, features, gradient checkpointing."""
import pytest
import torch

from parity import TOL, load_fixture, max_deviation, run_fixture
from stm_dist.models import create_model
from stm_dist.models.halo import HaloAttention
from stm_dist.models.swin import SwinBlock, shift_window_mask, window_partition

CORE = ("halo", "swin", "convnext")


@pytest.mark.parametrize("stm", CORE)
@pytest.mark.parametrize("size", [256, 320])
def test_micro_forward_backward_any_size(stm, size):
    torch.manual_seed(0)
    model = create_model(f"unified_{stm}_micro", num_classes=10).train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"unified_{s}_{z}" for s in CORE for z in ("tiny", "small", "base")])
def test_larger_models_forward_any_size(name):
    model = create_model(name).eval()
    with torch.no_grad():
        for size in (256, 320):
            out = model(torch.randn(1, 3, size, size))
            assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_swin_general_mask_path_gives_fixture_numbers():
    """Forcing the run-time mask construction (not the stored buffer) still matches at 224."""
    ref = load_fixture("unified_swin_micro", torch.float64)
    from parity import filled_model
    model = filled_model("unified_swin_micro", torch.float64)
    for blk in (b for s in model.stages for b in s):
        if blk.attn_mask is not None:
            H, W = blk.input_resolution
            assert torch.equal(shift_window_mask(H, W, H, W, 7, 3).double(), blk.attn_mask)
            blk.input_resolution = (-1, -1)  # never equal to the actual size: general path
    from parity import fixture_input
    with torch.no_grad():
        stages = model.forward_stages(fixture_input(torch.float64))
        logits = model.head(model.avg_head(model.conv_head(stages[-1])))
    got = dict(logits=logits, stage_slice=[s[0, :8, :2, :2] for s in stages])
    dev = max_deviation(got, ref)
    assert dev["logits"] <= TOL[torch.float64]["logits"] and dev["stage"] <= TOL[torch.float64]["stage"]


@pytest.mark.parametrize("H,W,shift", [(10, 10, 0), (10, 16, 3), (20, 8, 3), (14, 14, 3), (16, 24, 3)])
def test_swin_mask_semantics(H, W, shift):
    """A real token attends exactly the real tokens of its window that are not wrapped around."""
    ws = 7
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    mask = shift_window_mask(H, W, Hp, Wp, ws, shift)
    if mask is None:
        assert shift == 0 and (H, W) == (Hp, Wp)
        return
    # Original coordinates of every token in the rolled frame, partitioned like the features.
    yy, xx = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    coords = torch.stack([(yy + shift) % Hp, (xx + shift) % Wp], -1).view(1, Hp, Wp, 2)
    c = window_partition(coords, ws)  # (nW, N, 2)
    real = (c[..., 0] < H) & (c[..., 1] < W)
    near = ((c[:, :, None, :] - c[:, None, :, :]).abs() < ws).all(-1)
    allowed = near & real[:, None, :]
    q_real = real[:, :, None].expand_as(allowed)
    assert torch.equal((mask == 0)[q_real], allowed[q_real])
    assert set(mask.unique().tolist()) <= {0.0, -100.0}


def _naive_halo(attn: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-query reference: attend the 13x13 window around the query's 7x7 block, real pixels only."""
    B, H, W, C = x.shape
    h, d, bs, hs = attn.num_heads, attn.dim_head_qk, attn.block_size, attn.halo_size
    q = attn.q(x).view(B, H, W, h, d)
    kv = attn.kv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).view(B, H, W, h, 2 * d)
    k, v = kv[..., :d], kv[..., d:]
    hr, wr = attn.pos_embed.height_rel, attn.pos_embed.width_rel
    out = torch.zeros(B, H, W, h, d, dtype=x.dtype)
    for y in range(H):
        for xq in range(W):
            oy, ox = (y // bs) * bs - hs, (xq // bs) * bs - hs
            ys = [oy + i for i in range(bs + 2 * hs) if 0 <= oy + i < H]
            xs = [ox + j for j in range(bs + 2 * hs) if 0 <= ox + j < W]
            kk = k[:, ys][:, :, xs]  # (B, ny, nx, h, d)
            vv = v[:, ys][:, :, xs]
            qq = q[:, y, xq]  # (B, h, d)
            logit = torch.einsum("bhd,byxhd->bhyx", qq * attn.scale, kk)
            ry = torch.stack([hr[(yk - oy) - (y % bs) + 12] for yk in ys])  # (ny, d)
            rx = torch.stack([wr[(xk - ox) - (xq % bs) + 12] for xk in xs])
            logit = logit + torch.einsum("bhd,yd->bhy", qq, ry)[..., None] + torch.einsum("bhd,xd->bhx", qq, rx)[:, :, None]
            a = logit.flatten(2).softmax(-1).view_as(logit)
            out[:, y, xq] = torch.einsum("bhyx,byxhd->bhd", a, vv)
    return attn.proj(out.reshape(B, H, W, h * d))


@pytest.mark.parametrize("H,W", [(7, 7), (10, 12), (14, 9)])
def test_halo_padding_is_masked(H, W):
    torch.manual_seed(0)
    attn = HaloAttention(64, 2).double()
    x = torch.randn(2, H, W, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _naive_halo(attn, x), rtol=0, atol=1e-12)


def test_swin_block_small_runtime_map_does_not_shift():
    blk = SwinBlock(32, stage=0, depth=1, input_resolution=(56, 56), num_heads=(1,))
    assert blk.shift_size == 3
    x = torch.randn(1, 32, 5, 6)
    y = blk(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("stm", CORE)
def test_features_only(stm):
    torch.manual_seed(0)
    cls = create_model(f"unified_{stm}_micro").eval()
    feat = create_model(f"unified_{stm}_micro", features_only=True, out_indices=(1, 3)).eval()
    missing = feat.load_state_dict(cls.state_dict(), strict=False)
    assert not missing.missing_keys
    assert feat.feature_info.channels() == [64, 256] and feat.feature_info.reduction() == [8, 32]
    assert cls.feature_info.channels() == [32, 64, 128, 256]
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        outs = feat(x)
        ref = cls.forward_stages(x)
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 24), (1, 256, 4, 6)]
    torch.testing.assert_close(outs[0], ref[1]), torch.testing.assert_close(outs[1], ref[3])
    assert feat.head is None and not any(n.startswith(("head", "conv_head")) for n in feat.state_dict())
    with pytest.raises(RuntimeError, match="features_only"):
        feat.forward_head(outs[-1])
    full = cls.forward_features(x)
    assert full.shape == (1, 256, 4, 6)
    torch.testing.assert_close(full, ref[3])
    assert cls.forward_head(full, pre_logits=True).shape == (1, 384)
    torch.testing.assert_close(cls.forward_head(full), cls(x))


@pytest.mark.parametrize("stm", CORE)
def test_grad_checkpointing_same_gradients(stm):
    torch.manual_seed(0)
    a = create_model(f"unified_{stm}_micro", num_classes=5)
    b = create_model(f"unified_{stm}_micro", num_classes=5, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        m.train()
        m(x).logsumexp(-1).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    b.set_grad_checkpointing(False)
    assert not b.grad_checkpointing
