"""The compiled CPU kernel of torch.ops.stm_dist.ms_deform_attn against the grid_sample reference,
torch.library.opcheck and float64 gradcheck."""
import pytest
import torch

import stm_dist.ops as ops
from stm_dist.ops import ms_deform_attn_reference

from .conftest import SHAPES, build_inputs

pytestmark = pytest.mark.skipif(not ops.kernel_available("ms_deform_attn", "CPU"),
                                reason="stm_dist._C has no CPU kernel (extension not built)")

op = torch.ops.stm_dist.ms_deform_attn


def _grads(fn, inputs, grad_out):
    value, shapes, start, loc, attn = [t.detach().clone() for t in inputs]
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, start, leaves[1], leaves[2])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES)
def test_opcheck(shape):
    value, shapes, start, loc, attn = build_inputs(*shape)
    args = (value.requires_grad_(), shapes, start, loc.requires_grad_(), attn.requires_grad_())
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gradcheck_float64(shape):
    batch, levels, heads, _, queries, points = shape
    value, shapes, start, loc, attn = build_inputs(batch, levels, heads, 4, queries, points)
    # Random locations: a finite-difference step of 1e-7 straddling a pixel line (where the
    # bilinear location gradient jumps) has negligible odds.
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: op(v, shapes, start, l, a), leaves, eps=1e-7, atol=1e-6,
                                    nondet_tol=0.0)


@pytest.mark.parametrize("dtype,fwd_tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, fwd_tol):
    inputs = build_inputs(*shape, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    out_ref, grads_ref = _grads(ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in inputs],
                                torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                                            generator=gen, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    out, grads = _grads(op, inputs, grad_out)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=fwd_tol)
    # Location gradients scale with the map size (d loc -> d pixel is H or W): compare relative
    # to their magnitude.
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        scale = max(1.0, r.abs().max().item())
        assert (g.double() - r).abs().max().item() <= fwd_tol * scale * 10, name


# bfloat16 keeps 8 significant bits: inputs are rounded to bf16 before the reference sees them,
# so what remains is the rounding of the output (and of the grads) plus float32 accumulation.
# Documented bound: forward within 2^-7 relative to max |output|, grads within 2^-6 relative.
BF16_FWD_REL = 2.0**-7
BF16_GRAD_REL = 2.0**-6


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_bfloat16_within_bound(shape):
    inputs = build_inputs(*shape, dtype=torch.bfloat16)
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    grad_out = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                           generator=torch.Generator().manual_seed(2)).bfloat16()
    out_ref, grads_ref = _grads(ms_deform_attn_reference, exact, grad_out.double())
    out, grads = _grads(op, inputs, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert (out.double() - out_ref).abs().max() <= BF16_FWD_REL * out_ref.abs().max()
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        assert (g.double() - r).abs().max() <= BF16_GRAD_REL * r.abs().max(), name


def test_non_contiguous_inputs_are_accepted(make_inputs):
    value, shapes, start, loc, attn = make_inputs(2, [(4, 5)], 3, 8, 6, 4)
    # Same values, strided storage.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous() and not attn_nc.is_contiguous()
    torch.testing.assert_close(op(value_nc, shapes, start, loc_nc, attn_nc), op(value, shapes, start, loc, attn),
                               rtol=0, atol=0)


def test_backward_independent_of_thread_count(make_inputs):
    inputs = make_inputs(3, [(5, 6), (2, 3)], 4, 16, 9, 6, dtype=torch.float32)
    grad_out = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.stm_dist.ms_deform_attn_backward(grad_out, *inputs)
        torch.set_num_threads(max(2, before))
        many = torch.ops.stm_dist.ms_deform_attn_backward(grad_out, *inputs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_samples_outside_the_map_contribute_nothing(make_inputs):
    value, shapes, start, loc, attn = make_inputs(1, [(4, 4)], 2, 8, 3, 4)
    loc = torch.full_like(loc, 1.2)  # every sample beyond the right/bottom edge
    loc = loc.requires_grad_()
    out = op(value, shapes, start, loc, attn)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(loc.grad, torch.zeros_like(loc))


def test_ops_entry_point_uses_the_kernel_with_float32_geometry(make_inputs):
    value, shapes, start, loc, attn = make_inputs(2, [(4, 5)], 2, 16, 5, 9, dtype=torch.bfloat16)
    # Next to a bf16 value the entry point hands the kernel float32 locations and weights, whatever
    # they came in as (here bf16 locations, float32 weights as a softmax under autocast gives).
    out = ops.ms_deform_attn(value, shapes, start, loc, attn.float())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, op(value, shapes, start, loc.float(), attn.float()))


def _strided(t, dims):
    # Same values, permuted storage: not contiguous, and not a layout empty_like would make
    # contiguous either.
    return t.transpose(*dims).contiguous().transpose(*dims)


@pytest.mark.parametrize("geo_dtype", [torch.float64, torch.float32], ids=["same-dtype", "bf16-value-f32-geometry"])
def test_opcheck_non_contiguous_inputs(make_inputs, geo_dtype):
    value, shapes, start, loc, attn = make_inputs(2, [(4, 5), (2, 3)], 3, 8, 6, 4)
    value = value if geo_dtype == torch.float64 else value.bfloat16()
    loc, attn = loc.to(geo_dtype), attn.to(geo_dtype)
    value_nc, loc_nc, attn_nc = _strided(value, (2, 3)), _strided(loc, (0, 1)), _strided(attn, (1, 2))
    grad_nc = _strided(torch.randn(2, 6, 24, dtype=value.dtype), (0, 1))
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, grad_nc))
    fwd = torch.library.opcheck(op, (value_nc.requires_grad_(), shapes, start, loc_nc.requires_grad_(),
                                     attn_nc.requires_grad_()))
    assert all(v == "SUCCESS" for v in fwd.values()), fwd
    # The backward op on its own: its fake kernel must give the real kernels' (contiguous) strides.
    bwd = torch.library.opcheck(torch.ops.stm_dist.ms_deform_attn_backward,
                                (grad_nc, value_nc.detach(), shapes, start, loc_nc.detach(), attn_nc.detach()))
    assert all(v == "SUCCESS" for v in bwd.values()), bwd
    grads = torch.ops.stm_dist.ms_deform_attn_backward(grad_nc, value_nc.detach(), shapes, start, loc_nc.detach(),
                                                       attn_nc.detach())
    assert all(g.is_contiguous() for g in grads)
    assert [g.dtype for g in grads] == [value.dtype, geo_dtype, geo_dtype]


def test_cpu_backward_runs_under_deterministic_algorithms(make_inputs):
    inputs = make_inputs(2, [(5, 6)], 2, 16, 7, 9, dtype=torch.float32)
    grad_out = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = torch.ops.stm_dist.ms_deform_attn_backward(grad_out, *inputs)
        again = torch.ops.stm_dist.ms_deform_attn_backward(grad_out, *inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
