"""U-PVT (v1, the paper's) and PVT-v2 models: layout, fixture parity, other input sizes, compile."""
import pytest
import torch
import torch.nn.functional as F

from parity import (check_counts, check_fixture, fast_model, fill_state_dict, filled_model, fixture_input, meta_model, original_keys)
from stm_dist.models import create_model
from stm_dist.models.pvt import PvtBlock, SpatialReductionAttention

SIZES = ("micro", "tiny", "small", "base")
# Spec §4: parameters, state-dict entries and pooled feature width of the original models.
PARAMS = {
    "unified_pvt_micro": 4_454_056, "unified_pvt_tiny": 31_157_736,
    "unified_pvt_small": 50_887_656, "unified_pvt_base": 91_566_312,
    "unified_pvt_v2_micro": 4_314_664, "unified_pvt_v2_tiny": 30_398_952,
    "unified_pvt_v2_small": 50_282_472, "unified_pvt_v2_base": 90_931_176,
}
ENTRIES = {"unified_pvt_micro": 209, "unified_pvt_tiny": 405, "unified_pvt_small": 645, "unified_pvt_base": 1205}
FEATURES = {"micro": 384, "tiny": 768, "small": 768, "base": 768}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_feature_width(name):
    check_counts(name, PARAMS[name], FEATURES[name.rsplit("_", 1)[1]], ENTRIES.get(name))


@pytest.mark.parametrize("name", ["unified_pvt_micro", "unified_pvt_tiny"])
def test_state_dict_matches_original_and_loads_strictly(name):
    ref = original_keys(name)
    model = meta_model(name)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == ref
    # A state dict built only from the original listing (names + shapes) loads strictly.
    original = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
                for k, s in ref}
    original = fill_state_dict(original, torch.float32)
    model = create_model(name)
    model.load_state_dict(original, strict=True)
    assert torch.equal(model.stages[0][0].pos_embed, original["stages.0.0.pos_embed"])


@pytest.mark.parametrize("size", ["micro", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fixture_parity(size, dtype):
    check_fixture(f"unified_pvt_{size}", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "base"])
def test_fixture_parity_large(size):
    check_fixture(f"unified_pvt_{size}", torch.float64)


@pytest.mark.parametrize("name", ["unified_pvt_micro", "unified_pvt_v2_micro"])
@pytest.mark.parametrize("res", [256, 320])
def test_other_sizes_forward_backward(name, res):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(2, 3, res, res)
    stages = model.forward_stages(x)
    assert [tuple(s.shape[-2:]) for s in stages] == [(res // 4 >> i, res // 4 >> i) for i in range(4)]
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name == "unified_pvt_micro":  # the resized positional embedding is learned too
        assert model.stages[0][0].pos_embed.grad.abs().sum() > 0


@torch.no_grad()
def test_resized_pos_embed_equals_model_built_at_that_size():
    """Running a 224-built model at 320 == building at 320 and loading the 224 weights the way
    the original's checkpoint loader does (bilinear, align_corners=True resize of pos_embed)."""
    at224 = filled_model("unified_pvt_micro", torch.float64)
    at320 = create_model("unified_pvt_micro", img_size=320).double().eval()
    sd = at224.state_dict()
    for k, v in sd.items():
        if k.endswith("pos_embed"):
            sd[k] = F.interpolate(v, size=at320.state_dict()[k].shape[-2:], mode="bilinear", align_corners=True)
    at320.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 320, 320, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(at224(x), at320(x))
    # ... and the 320-built model still runs the 224 fixture input through the resize path.
    assert torch.isfinite(at320(fixture_input(torch.float64))).all()


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in sorted(PARAMS) if not n.endswith("micro")])
def test_other_sizes_forward_all_models(name):
    model = fast_model(name)
    for res in (256, 320):
        out = model(torch.randn(1, 3, res, res))
        assert out.shape == (1, 1000) and torch.isfinite(out).all(), (name, res)


@pytest.mark.parametrize("name", ["unified_pvt_micro"])
def test_compile_fullgraph_forward_backward(name):
    """One graph for forward and backward (aot_eager: dynamo capture + AOT autograd tracing, the
    part that decides graph breaks, without minutes of C++ codegen on a 2-core box)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_layer_scale_off_and_bad_heads():
    model = create_model("unified_pvt_micro", layer_scale_init_value=0)
    blk = model.stages[0][0]
    assert blk.gamma_1 is None and blk.gamma_2 is None
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        SpatialReductionAttention(30, 4)
    assert isinstance(blk, PvtBlock) and model.stages[0][1].pos_embed is None
