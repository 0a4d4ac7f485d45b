"""U-InternImage (DCNv3) models: layout, fixture parity, sampling geometry, other sizes, compile."""
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import stm_dist.models.dcnv3 as dcnv3
from parity import check_counts, check_fixture, fast_model, fill_state_dict, meta_model, original_keys
from stm_dist.models import create_model
from stm_dist.models.dcnv3 import DCNv3Block, DeformableGridAttention
from stm_dist.ops import kernel_available, ms_deform_attn_reference

SIZES = ("micro", "tiny", "small", "base", "large")
# Spec §4: parameters, state-dict entries and pooled feature width of the original models.
PARAMS = dict(zip((f"unified_dcn_v3_{s}" for s in SIZES),
                  (4_302_692, 29_933_272, 50_082_280, 97_465_192, 223_339_610)))
ENTRIES = dict(zip((f"unified_dcn_v3_{s}" for s in SIZES[:4]), (363, 693, 759, 759)))
FEATURES = dict(zip(SIZES, (384, 768, 960, 1344, 1920)))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_feature_width(name):
    check_counts(name, PARAMS[name], FEATURES[name.rsplit("_", 1)[1]], ENTRIES.get(name))


@pytest.mark.parametrize("name", ["unified_dcn_v3_micro", "unified_dcn_v3_tiny"])
def test_state_dict_matches_original_and_loads_strictly(name):
    ref = original_keys(name)
    sd = meta_model(name).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == ref
    original = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
                for k, s in ref}
    original = fill_state_dict(original, torch.float32)
    model = create_model(name)
    model.load_state_dict(original, strict=True)
    assert torch.equal(model.stages[2][1].attn.sampling_offsets.weight,
                       original["stages.2.1.attn.sampling_offsets.weight"])


# float64 holds at 1e-9 for DCN because the reference points are built in float32 as the original's.
@pytest.mark.parametrize("size", ["micro", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fixture_parity(size, dtype):
    check_fixture(f"unified_dcn_v3_{size}", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "base"])
def test_fixture_parity_large(size):
    check_fixture(f"unified_dcn_v3_{size}", torch.float64)


def test_extra_inputs_geometry():
    stages = DCNv3Block.extra_inputs(torch.zeros(2, 3, 200, 136))
    # The stem/downsamples halve with ceil: 200 -> 50, 25, 13, 7 and 136 -> 34, 17, 9, 5.
    assert [s.size for s in stages] == [(50, 34), (25, 17), (13, 9), (7, 5)]
    for s in stages:
        h, w = s.size
        assert s.spatial_shapes.tolist() == [[h + 2, w + 2]] and s.spatial_shapes.device.type == "cpu"
        assert s.level_start_index.tolist() == [0]
        assert s.reference_points.dtype == torch.float32 and s.reference_points.shape == (1, h * w, 1, 2)
        i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                              indexing="ij")
        expect = torch.stack(((j.flatten() + 1.5) / (w + 2), (i.flatten() + 1.5) / (h + 2)), -1)
        torch.testing.assert_close(s.reference_points[0, :, 0].double(), expect, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="expected an image batch"):
        DCNv3Block.extra_inputs(torch.zeros(3, 64, 64))


def _direct_dcn(attn: DeformableGridAttention, u):
    """Independent closed form (spec §2.5): out[i,j,g] = sum_p a_p * bilinear(V_g at
    (i + gy_p + dy, j + gx_p + dx)) in pixel space, zero outside the image, then output_proj."""
    N, H, W, C = u.shape
    G, P = attn.num_groups, attn.num_points
    D = C // G
    q = attn.dw_conv(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    off = attn.sampling_offsets(q).reshape(N, H, W, G, P, 2)
    a = attn.attention_weights(q).reshape(N, H, W, G, P).softmax(-1)
    V = attn.value_proj(u).reshape(N, H, W, G, D)
    steps = torch.tensor([-1.0, 0.0, 1.0], dtype=u.dtype)
    gx, gy = steps.repeat_interleave(3), steps.repeat(3)  # x varies slowest over the 9 points
    ys = torch.arange(H, dtype=u.dtype)[:, None, None, None] + gy + off[..., 1]
    xs = torch.arange(W, dtype=u.dtype)[None, :, None, None] + gx + off[..., 0]
    n = torch.arange(N)[:, None, None, None, None]
    g = torch.arange(G)[None, None, None, :, None]
    out = torch.zeros(N, H, W, G, P, D, dtype=u.dtype)
    for cy in (0, 1):
        for cx in (0, 1):
            yy, xx = ys.floor() + cy, xs.floor() + cx
            w = (1 - (ys - yy).abs()) * (1 - (xs - xx).abs()) * ((yy >= 0) & (yy < H) & (xx >= 0) & (xx < W))
            v = V[n, yy.clamp(0, H - 1).long(), xx.clamp(0, W - 1).long(), g]
            out = out + w[..., None] * v
    out = (a[..., None] * out).sum(-2).reshape(N, H, W, C)
    return attn.output_proj(out)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(5, 7), (8, 8)])
def test_mixer_matches_closed_form_dcn(hw):
    torch.manual_seed(0)
    attn = DeformableGridAttention(32, 2).double()
    # Offsets of a pixel or two so samples land between pixels and across the border.
    attn.sampling_offsets.bias.normal_(0, 1.5)
    attn.attention_weights.weight.normal_(0, 0.5)
    H, W = hw
    u = torch.randn(2, H, W, 32, dtype=torch.float64)
    deform = DCNv3Block.extra_inputs(torch.zeros(1, 3, 4 * H, 4 * W))[0]
    got = attn(u, deform)
    # The float32 reference points carry ~1e-7 relative rounding into the positions.
    torch.testing.assert_close(got, _direct_dcn(attn, u), rtol=0, atol=1e-5)


@pytest.mark.parametrize("res", [256, 320])
def test_other_sizes_forward_backward(res):
    torch.manual_seed(0)
    model = create_model("unified_dcn_v3_micro", num_classes=10)
    x = torch.randn(2, 3, res, res)
    stages = model.forward_stages(x)
    assert [tuple(s.shape[-2:]) for s in stages] == [(res // 4 >> i, res // 4 >> i) for i in range(4)]
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.stages[0][0].attn.sampling_offsets.weight.grad.abs().sum() > 0


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in sorted(PARAMS) if not n.endswith("micro")])
def test_other_sizes_forward_all_models(name):
    model = fast_model(name)
    for res in (256, 320):
        out = model(torch.randn(1, 3, res, res))
        assert out.shape == (1, 1000) and torch.isfinite(out).all(), (name, res)


def test_feature_map_mismatch_is_a_clear_error():
    model = create_model("unified_dcn_v3_micro")
    wrong = DCNv3Block.extra_inputs(torch.zeros(1, 3, 128, 128))[0]
    with pytest.raises(ValueError, match=r"feature map \(16, 16\) does not match the sampling geometry \(32, 32\)"):
        model.stages[0][0](torch.zeros(1, 32, 16, 16), wrong)


def test_grad_checkpointing_same_numbers():
    torch.manual_seed(0)
    model = create_model("unified_dcn_v3_micro", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@torch.no_grad()
def test_bf16_autocast_samples_in_fp32():
    torch.manual_seed(0)
    model = create_model("unified_dcn_v3_micro", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)
    # A bf16 model (as DeepSpeed bf16 holds it) also runs: sampling happens in fp32 inside.
    assert torch.isfinite(model.to(torch.bfloat16)(x.to(torch.bfloat16))).all()


def _compile_check(model, x):
    """Compiled forward+backward equal eager; returns the ops the captured graph calls."""
    torch._dynamo.reset()
    called = []

    def backend(gm, example_inputs):
        called.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    return called


def test_compile_fullgraph_forward_backward():
    """One graph for forward and backward through `stm_dist.ops.ms_deform_attn` as the package
    resolves it (the compiled op with its fake kernel when built). aot_eager: dynamo capture +
    AOT autograd tracing decide graph breaks, without minutes of C++ codegen on 2 cores."""
    torch.manual_seed(0)
    called = _compile_check(create_model("unified_dcn_v3_micro", num_classes=10), torch.randn(2, 3, 64, 64))
    through_op = sum("stm_dist.ms_deform_attn" in c for c in called)
    assert through_op == (15 if kernel_available("ms_deform_attn", "CPU") else 0), called


def test_compile_fullgraph_reference_path(monkeypatch):
    """The pure-PyTorch sampling (what runs where no kernel is built) also compiles in one graph."""
    monkeypatch.setattr(dcnv3, "ms_deform_attn", ms_deform_attn_reference)
    torch.manual_seed(0)
    model = create_model("unified_dcn_v3_micro", num_classes=10, depths=(1, 1, 1, 1))
    called = _compile_check(model, torch.randn(2, 3, 64, 64))
    assert not any("stm_dist" in c for c in called) and any("grid_sample" in c for c in called)
