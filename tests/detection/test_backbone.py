"""create_backbone beyond the fixtures: other input sizes, training (every parameter gets a
gradient), overrides, a mixer of one's own (examples/pool_mixer.py), the classification blocks
left as they were, clear errors, a lazy package."""
import os
import subprocess
import sys

import pytest
import torch

from stm_dist.detection import create_backbone, load_backbone_weights
from stm_dist.models import create_model, load_mixer_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO = [f"unified_{m}_micro" for m in ("halo", "pvt", "swin", "convnext", "dcn_v3")]


@pytest.mark.parametrize("name", MICRO)
def test_small_odd_input_trains(name):
    """64x96: stage maps 16x24 .. 2x3, none a multiple of Swin's window or Halo's block, PVT's
    position embedding resized; train mode with drop path; every parameter gets a gradient."""
    torch.manual_seed(0)
    model = create_backbone(name).train()
    assert model.out_channels == list(model.dims) and model.strides == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 96)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // s, 96 // s) for c, s in zip(model.out_channels, model.strides)]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    # out_norm_i normalises only the returned copy: a fresh LayerNorm gives zero mean per pixel
    assert outs[0].mean(1).abs().max() < 1e-4


def test_overrides_and_errors():
    m = create_backbone("unified_convnext_micro", out_indices=(1, 2, 3), drop_path_rate=0.0,
                        block_kwargs={"kernel_size": 5})
    assert m.out_channels == [64, 128, 256] and m.strides == [8, 16, 32]
    assert not any(k.startswith("out_norm_0") for k in m.state_dict())
    assert m.stages[0][0].dwconv.kernel_size == (5, 5)
    assert len(m(torch.randn(1, 3, 64, 64))) == 3
    # the detection configs' drop path by size
    assert create_backbone("unified_swin_base").stages[3][1].drop_path.drop_prob == pytest.approx(0.3)
    with pytest.raises(TypeError, match="num_classes"):
        create_backbone("unified_convnext_micro", num_classes=10)
    with pytest.raises(KeyError, match="unified_convnext_micro"):
        create_backbone("unified_convnxt_micro")
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.randn(1, 3, 64, 80))


def test_classification_blocks_unchanged():
    """The detection behaviour is an option of the blocks; classification keeps its own."""
    cls_swin = create_model("unified_swin_micro")
    det_swin = create_backbone("unified_swin_micro")
    assert any(k.endswith("attn_mask") for k in cls_swin.state_dict())
    assert not any(k.endswith("attn_mask") for k in det_swin.state_dict())
    assert cls_swin.stages[3][1].shift_size == 0 and det_swin.stages[3][1].shift_size == 3  # 7x7 last stage
    assert not cls_swin.stages[0][0].detection and det_swin.stages[0][0].detection
    assert not create_model("unified_pvt_micro").stages[0][0].detection
    assert not create_model("unified_halo_micro").stages[0][0].attn.detection


def test_registered_mixer_gets_a_backbone():
    load_mixer_module(os.path.join(REPO, "examples", "pool_mixer.py"))
    cls = create_model("unified_pool_micro")
    backbone = create_backbone("unified_pool_micro")
    assert backbone.out_channels == [32, 64, 128, 256]
    assert {k.split(".")[0] for k in backbone.state_dict()} == {"downsample_layers", "stages", "out_norm_0",
                                                               "out_norm_1", "out_norm_2", "out_norm_3"}
    report = load_backbone_weights(backbone, cls.state_dict(), log=None)
    assert sorted(report.missing) == sorted(f"out_norm_{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.unexpected and all(k.startswith("stage_norms.") for k in report.unexpected)
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


def test_package_import_is_lazy():
    """Importing the package costs nothing (not even torch); the names resolve on first use."""
    code = "import sys, stm_dist.detection; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    import stm_dist.detection as d

    assert d.create_backbone is create_backbone and "load_backbone_weights" in dir(d)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        d.nope
