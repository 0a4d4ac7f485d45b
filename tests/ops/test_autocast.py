"""ms_deform_attn under autocast: the value map in the autocast dtype, locations and weights in
float32 (stm_dist/ops/registration.py), and the accuracy that gives against float32.

Bounds (measured on the CPU kernel, fixed seeds; docs/perf.md): the op alone is within 2^-7
(bf16) / 2^-10 (fp16) of max |output| of the float32 op at any map size, while bf16/fp16
*locations* grow with the map to 0.36 / 0.05 of max |output| at 130 px. A DCNv3 mixer under
autocast stays within 1e-2 (bf16) / 1.5e-3 (fp16) relative (Frobenius) of its float32 output.
"""
import pytest
import torch

import stm_dist.ops as ops
from stm_dist.models.dcnv3 import DCNv3Block

from .conftest import build_inputs

pytestmark = pytest.mark.skipif(not ops.kernel_available("ms_deform_attn", "CPU"),
                                reason="stm_dist._C has no CPU kernel (extension not built)")

op = torch.ops.stm_dist.ms_deform_attn
HALF = [torch.bfloat16, torch.float16]
OP_MAX_REL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
MIXER_REL = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


def dcn_inputs(size, heads=4, head_dim=16, points=9, seed=0):
    """One DCNv3 sampling call on a size x size (padded) map: a 3x3 grid around every inner pixel
    plus offsets of ~1.5 pixels, softmax weights; float32."""
    gen = torch.Generator().manual_seed(seed)
    q = size - 2
    value = torch.randn(1, size * size, heads, head_dim, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(q) + 1.5, torch.arange(q) + 1.5, indexing="ij")
    ref = torch.stack([xs / size, ys / size], -1).reshape(1, q * q, 1, 1, 1, 2)
    ky, kx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
    grid = torch.stack([kx / size, ky / size], -1).reshape(1, 1, 1, 1, points, 2)
    loc = ref + grid + torch.randn(1, q * q, heads, 1, points, 2, generator=gen) * 1.5 / size
    attn = torch.randn(1, q * q, heads, 1, points, generator=gen).softmax(-1)
    return value, torch.tensor([[size, size]]), torch.zeros(1, dtype=torch.long), loc, attn


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_casts_value_only(dtype):
    value, shapes, start, loc, attn = build_inputs(2, [(6, 5), (3, 3)], 4, 16, 7, 9, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    with torch.autocast("cpu", dtype=dtype):
        out = op(leaves[0], shapes, start, leaves[1], leaves[2])
        through_entry = ops.ms_deform_attn(value, shapes, start, loc, attn)
    expected = op(value.to(dtype), shapes, start, loc, attn)  # float32 locations and weights
    assert out.dtype == dtype and torch.equal(out, expected) and torch.equal(through_entry, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad)
    g_value, g_loc, g_attn = torch.ops.stm_dist.ms_deform_attn_backward(grad, value.to(dtype), shapes, start, loc, attn)
    assert [t.grad.dtype for t in leaves] == [torch.float32] * 3
    assert torch.equal(leaves[0].grad, g_value.float())
    assert torch.equal(leaves[1].grad, g_loc) and torch.equal(leaves[2].grad, g_attn)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_op_within_bound_of_float32_at_any_map_size(dtype):
    for size in (16, 130):
        value, shapes, start, loc, attn = dcn_inputs(size)
        f32 = op(value, shapes, start, loc, attn).double()
        with torch.autocast("cpu", dtype=dtype):
            got = op(value, shapes, start, loc, attn).double()
        scale = f32.abs().max()
        assert (got - f32).abs().max() <= OP_MAX_REL[dtype] * scale, size
        # Why the geometry stays float32: half-precision locations are off by a fraction of a
        # pixel that grows with the map, far beyond the bound at 130 px.
        half_geo = op(value.to(dtype), shapes, start, loc.to(dtype), attn.to(dtype)).double()
        if size == 130:
            assert (half_geo - f32).abs().max() > 20 * OP_MAX_REL[dtype] * scale


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dcnv3_mixer_under_autocast_tracks_float32(dtype):
    torch.manual_seed(0)
    block = DCNv3Block(dim=64, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=(28, 28),
                       layer_scale_init_value=1.0, num_heads=(4, 8, 16, 32)).eval()
    deform = DCNv3Block.extra_inputs(torch.zeros(1, 3, 112, 112))[0]
    x = block.norm1(torch.randn(1, 28, 28, 64)).detach()
    with torch.no_grad():
        ref = block.attn(x, deform)
        with torch.autocast("cpu", dtype=dtype):
            got = block.attn(x, deform)
    assert got.dtype == dtype
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    assert rel <= MIXER_REL[dtype], rel


def test_dcnv3_block_compiles_under_autocast():
    torch.manual_seed(0)
    block = DCNv3Block(dim=32, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=(6, 6),
                       layer_scale_init_value=1.0, num_heads=(2, 4, 8, 16))
    deform = DCNv3Block.extra_inputs(torch.zeros(1, 3, 24, 24))[0]
    x = torch.randn(1, 32, *deform.size)

    def run(module):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, deform)
        out.float().square().sum().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    eager = run(block)
    got = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    assert got[0].dtype == torch.float32  # the block's residual stream stays fp32
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    for g, e in zip(got[1], eager[1]):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=1e-3)
