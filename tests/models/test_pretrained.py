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


def test_new_head_drops_the_classifier_and_keeps_the_models_own():
    src = _filled("unified_convnext_micro", num_classes=10)
    torch.manual_seed(0)
    fresh = create_model("unified_convnext_micro", num_classes=5)
    torch.manual_seed(0)
    dst = create_model("unified_convnext_micro", num_classes=5)
    with pytest.raises(CheckpointError, match="label_map"):  # not asked for: still an error
        load_pretrained(dst, src.state_dict())
    report = load_pretrained(dst, src.state_dict(), new_head=True)
    assert report.new_head == ["head.weight", "head.bias"] and report.head_classes == (10, 5)
    assert "head.weight, head.bias" in report.head_line() and "10 -> 5 classes" in report.head_line()
    assert torch.equal(dst.head.weight, fresh.head.weight) and torch.equal(dst.head.bias, fresh.head.bias)
    sd = src.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items() if not k.startswith("head."))
    # A label map still picks rows; a head of the same size loads as it is.
    report = load_pretrained(dst, src.state_dict(), label_map=[0, 2, 4, 6, 8], new_head=True)
    assert not report.new_head and torch.equal(dst.head.weight, src.head.weight[[0, 2, 4, 6, 8]])
    same = create_model("unified_convnext_micro", num_classes=10)
    assert not load_pretrained(same, src.state_dict(), new_head=True).new_head
    assert torch.equal(same.head.weight, src.head.weight)
    # Keys missing for other reasons stay an error naming them.
    del sd["stages.1.0.dwconv.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1: stages\.1\.0\.dwconv\.weight"):
        load_pretrained(dst, sd, new_head=True)


def test_ema_pick_from_every_container_and_export(tmp_path):
    from safetensors.torch import save_file

    live, ema = _filled("unified_convnext_micro"), create_model("unified_convnext_micro")
    dst = create_model("unified_convnext_micro")
    # timm's training container
    load_pretrained(dst, {"state_dict": live.state_dict(), "state_dict_ema": ema.state_dict()}, use_ema=True)
    assert _same(ema, dst)
    load_pretrained(dst, {"state_dict": live.state_dict(), "state_dict_ema": ema.state_dict()})
    assert _same(live, dst)
    # our EMA export: a bare state dict whose sidecar (or safetensors metadata) says ema
    pth = tmp_path / "ema.pth"
    torch.save(ema.state_dict(), pth)
    (tmp_path / "ema.pth.json").write_text('{"model": "unified_convnext_micro", "ema": true}')
    assert load_pretrained(dst, str(pth), use_ema=True).ema and _same(ema, dst)
    st = tmp_path / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(st),
              metadata={"stm_dist.model": "unified_convnext_micro", "stm_dist.ema": "true",
                        "stm_dist.pretrained_cfg": "{}"})
    load_pretrained(dst, live.state_dict())
    load_pretrained(dst, str(st), use_ema=True)
    assert _same(ema, dst)
    # a file without EMA weights: the error names the file
    plain = tmp_path / "live.safetensors"
    save_file({k: v.contiguous() for k, v in live.state_dict().items()}, str(plain))
    load_pretrained(dst, str(plain))
    assert _same(live, dst)
    torch.save({"model": live.state_dict()}, tmp_path / "live.pth")
    for path in (plain, tmp_path / "live.pth"):
        with pytest.raises(CheckpointError, match=rf"{path.name}: EMA weights asked for .* holds none"):
            load_pretrained(dst, str(path), use_ema=True)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="broken.safetensors: cannot be read as a safetensors file"):
        load_pretrained(dst, str(bad))
