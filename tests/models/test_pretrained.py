"""load_pretrained: containers, prefixes, interpolation conveniences, label maps, named errors."""
import argparse

import pytest
import torch
import torch.nn as nn

from parity import fill_state_dict
from stm_dist.models import CheckpointError, create_model, load_pretrained


def _filled(name, **kw):
    m = create_model(name, **kw)
    m.load_state_dict(fill_state_dict(m.state_dict(), torch.float32))
    return m


def _same(a, b, skip=("relative_position_index", "attn_mask")):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not any(s in k for s in skip))


@pytest.mark.parametrize("name", ["unified_swin_micro", "unified_halo_micro", "unified_convnext_micro"])
def test_training_container_file_loads_strictly(tmp_path, name):
    src = _filled(name)
    # The original training script's container, DDP prefix included.
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": sd, "epoch": 1, "args": argparse.Namespace(lr=1e-3), "model_ema": sd}, path)
    dst = create_model(name)
    report = load_pretrained(dst, str(path))
    assert not report.missing and not report.unexpected and not report.resized
    assert _same(src, dst)


def test_ema_pick_and_bare_dict():
    src, ema = _filled("unified_convnext_micro"), create_model("unified_convnext_micro")
    dst = create_model("unified_convnext_micro")
    load_pretrained(dst, {"model": src.state_dict(), "model_ema": ema.state_dict()}, use_ema=True)
    assert _same(ema, dst)
    load_pretrained(dst, src.state_dict())
    assert _same(src, dst)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_pretrained(dst, {"model": src.state_dict()}, use_ema=True)
    with pytest.raises(CheckpointError, match="use_ema=True"):
        load_pretrained(dst, {"model_ema": ema.state_dict(), "epoch": 3})
    with pytest.raises(CheckpointError, match="non-tensor"):
        load_pretrained(dst, {"weights": src.state_dict()})


def test_missing_and_unexpected_are_named():
    sd = create_model("unified_convnext_micro").state_dict()
    del sd["stages.2.3.dwconv.weight"]
    sd["stages.9.0.extra"] = torch.zeros(1)
    dst = create_model("unified_convnext_micro")
    with pytest.raises(CheckpointError, match=r"stages\.2\.3\.dwconv\.weight.*stages\.9\.0\.extra"):
        load_pretrained(dst, sd)
    report = load_pretrained(dst, sd, strict=False)
    assert report.missing == ["stages.2.3.dwconv.weight"] and report.unexpected == ["stages.9.0.extra"]
    bad = create_model("unified_convnext_micro").state_dict()
    bad["stages.0.0.dwconv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"stages\.0\.0\.dwconv\.weight: shape"):
        load_pretrained(dst, bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(dst, "/nonexistent/nope.pth")


def test_label_map_1000_to_10(tmp_path):
    src = _filled("unified_halo_micro")
    classes = [3, 1, 4, 15, 92, 65, 358, 979, 323, 846]
    dst = create_model("unified_halo_micro", num_classes=10)
    with pytest.raises(CheckpointError, match="label_map"):
        load_pretrained(dst, src.state_dict())
    f = tmp_path / "labels.txt"
    f.write_text("\n".join(map(str, classes)) + "\n")
    for label_map in (classes, str(f)):
        report = load_pretrained(dst, src.state_dict(), label_map=label_map)
        assert report.resized == ["head.weight", "head.bias"]
    x = torch.randn(1, 3, 64, 64)
    src.eval(), dst.eval()
    with torch.no_grad():  # same rows; only matmul blocking may differ in the last bit
        torch.testing.assert_close(dst(x), src(x)[:, classes], rtol=1e-6, atol=1e-8)
    with pytest.raises(CheckpointError, match="outside"):
        load_pretrained(dst, src.state_dict(), label_map=[0] * 9 + [1000])
    f.write_text("1\nx\n")
    with pytest.raises(CheckpointError, match=r"labels.txt:2"):
        load_pretrained(dst, src.state_dict(), label_map=str(f))


def test_swin_table_bicubic_resize():
    # Built at 160 px the last stage (5x5) uses 5x5 windows: 81-row tables instead of 169.
    src = _filled("unified_swin_micro")
    dst = create_model("unified_swin_micro", img_size=160)
    report = load_pretrained(dst, src.state_dict())
    assert report.resized == [f"stages.3.{j}.attn.relative_position_bias_table" for j in range(2)]
    t_src = src.stages[3][0].attn.relative_position_bias_table.detach()
    t_dst = dst.stages[3][0].attn.relative_position_bias_table.detach()
    grid = t_src.t().reshape(1, 8, 13, 13)
    want = nn.functional.interpolate(grid, size=(9, 9), mode="bicubic").reshape(8, 81).t()
    torch.testing.assert_close(t_dst, want)
    assert torch.isfinite(dst(torch.randn(1, 3, 160, 160))).all()


def test_halo_rel_linear_resize():
    kw = dict(block_kwargs=dict(num_heads=(1, 2, 4, 8), block_size=8, halo_size=3))
    src = _filled("unified_halo_micro")
    dst = create_model("unified_halo_micro", **kw)
    report = load_pretrained(dst, src.state_dict())
    assert len(report.resized) == 2 * 15  # height_rel + width_rel of each of the 15 blocks
    a = src.stages[0][0].attn.pos_embed.height_rel.detach()
    b = dst.stages[0][0].attn.pos_embed.height_rel.detach()
    assert b.shape == (27, 32)
    torch.testing.assert_close(b[0], a[0]), torch.testing.assert_close(b[-1], a[-1])  # align_corners
    assert torch.all((b[13] - a[12]).abs() < 1e-6)  # the centre stays the centre


def test_pos_embed_bilinear_resize_is_generic():
    class Toy(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.blk = nn.Module()
            self.blk.pos_embed = nn.Parameter(torch.zeros(1, 4, s, s))

    src = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 4, 1, 1)
    dst = Toy(7)
    report = load_pretrained(dst, {"blk.pos_embed": src})
    assert report.resized == ["blk.pos_embed"]
    want = nn.functional.interpolate(src, size=(7, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(dst.blk.pos_embed.data, want)


def test_features_only_ignores_classifier_keys():
    src = _filled("unified_convnext_micro")
    dst = create_model("unified_convnext_micro", features_only=True)
    report = load_pretrained(dst, src.state_dict())
    assert set(report.ignored) == {k for k in src.state_dict() if k.split(".")[0] in ("conv_head", "head")}
    assert _same(dst, dst) and torch.equal(dst.stage_norms[3].weight, src.stage_norms[3].weight)
