"""torch.compile / torch.export trace through the compiled op with no graph break."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stm_dist.ops as ops

pytestmark = pytest.mark.skipif(not ops.kernel_available("ms_deform_attn", "CPU"),
                                reason="stm_dist._C has no CPU kernel (extension not built)")


class TinyDeformSampler(nn.Module):
    """DCNv3-style sampling: projections, a zero-padded value map, a 3x3 grid plus learned
    offsets, softmax modulation over the points, then the op."""

    def __init__(self, dim=32, heads=2, points=9):
        super().__init__()
        self.heads, self.points = heads, points
        self.value = nn.Linear(dim, dim)
        self.offset = nn.Linear(dim, heads * points * 2)
        self.mask = nn.Linear(dim, heads * points)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # x (N, H, W, C)
        N, H, W, C = x.shape
        M, P = self.heads, self.points
        value = F.pad(self.value(x), (0, 0, 1, 1, 1, 1)).reshape(N, (H + 2) * (W + 2), M, C // M)
        hp, wp = H + 2, W + 2
        ys, xs = torch.meshgrid(torch.arange(H, device=x.device) + 1.5, torch.arange(W, device=x.device) + 1.5,
                                indexing="ij")
        ref = torch.stack([xs / wp, ys / hp], -1).reshape(1, H * W, 1, 1, 1, 2).to(x.dtype)
        ky, kx = torch.meshgrid(torch.arange(-1, 2, device=x.device), torch.arange(-1, 2, device=x.device),
                                indexing="ij")
        grid = torch.stack([kx / wp, ky / hp], -1).reshape(1, 1, 1, 1, P, 2).to(x.dtype)
        offsets = self.offset(x).reshape(N, H * W, M, 1, P, 2) / torch.tensor([wp, hp], dtype=x.dtype)
        loc = ref + grid + offsets
        attn = self.mask(x).reshape(N, H * W, M, 1, P).softmax(-1)
        shapes = torch.tensor([[hp, wp]], dtype=torch.long)
        start = torch.zeros(1, dtype=torch.long)
        out = ops.ms_deform_attn(value, shapes, start, loc, attn)
        return self.out(out.reshape(N, H, W, C))


def _fwd_bwd(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    model = TinyDeformSampler()
    x = torch.randn(2, 5, 6, 32)
    eager = _fwd_bwd(model, x)
    compiled = torch.compile(model, fullgraph=True)
    got = _fwd_bwd(compiled, x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-5)
    for g, e in zip(got[2], eager[2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_export_keeps_the_op_as_one_node():
    torch.manual_seed(0)
    model = TinyDeformSampler().eval()
    x = torch.randn(1, 4, 4, 32)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.stm_dist.ms_deform_attn.default in targets
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_compile_dcnv3_block():
    """One real U-InternImage block (stm_dist.models) compiled with fullgraph, forward + backward."""
    dcnv3 = pytest.importorskip("stm_dist.models.dcnv3")
    block_cls = getattr(dcnv3, "DCNv3Block", None)
    if block_cls is None:
        pytest.skip("stm_dist.models.dcnv3.DCNv3Block does not exist yet")
    torch.manual_seed(0)
    block = block_cls(dim=32, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=(6, 6),
                      layer_scale_init_value=1.0, num_heads=(2, 4, 8, 16))
    deform = block_cls.extra_inputs(torch.zeros(1, 3, 24, 24))[0]
    x = torch.randn(1, 32, *deform.size)

    def run(module):
        module.zero_grad()
        xi = x.detach().requires_grad_()
        out = module(xi, deform)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in module.parameters()]

    eager = run(block)
    got = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-5)
    for g, e in zip(got[2], eager[2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
