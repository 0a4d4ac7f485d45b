"""A file in the released detectors' mmdet 2.x layout loads strictly into our Mask R-CNN, with the class
order and the per-class regression rows moved where they belong."""
import pytest
import torch

from stm_dist.detection.detector import build_detector
from stm_dist.detection.mmdet_keys import MmdetKeyError, load_mmdet_detector, mmdet_to_ours, ours_to_mmdet

FIXTURES = "/work/shared/spec/original_det_fixtures/fixtures.pt"

# mmdet 2.x MaskRCNN (mask_rcnn_r50_fpn: FPN out_channels 256, num_outs 5 without extra convs, RPNHead with
# 3 anchors, Shared2FCBBoxHead 1024, FCNMaskHead 4 convs, 80 classes), read off its modules: key, shape.
# "C0".."C3" are the backbone's four output widths (the FPN's in_channels).
MMDET_HEAD_KEYS = [
    *[(f"neck.lateral_convs.{i}.conv.weight", (256, f"C{i}", 1, 1)) for i in range(4)],
    *[(f"neck.lateral_convs.{i}.conv.bias", (256,)) for i in range(4)],
    *[(f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3)) for i in range(4)],
    *[(f"neck.fpn_convs.{i}.conv.bias", (256,)) for i in range(4)],
    ("rpn_head.rpn_conv.weight", (256, 256, 3, 3)),
    ("rpn_head.rpn_conv.bias", (256,)),
    ("rpn_head.rpn_cls.weight", (3, 256, 1, 1)),  # use_sigmoid: one logit per anchor
    ("rpn_head.rpn_cls.bias", (3,)),
    ("rpn_head.rpn_reg.weight", (12, 256, 1, 1)),
    ("rpn_head.rpn_reg.bias", (12,)),
    ("roi_head.bbox_head.fc_cls.weight", (81, 1024)),  # 80 classes + background LAST
    ("roi_head.bbox_head.fc_cls.bias", (81,)),
    ("roi_head.bbox_head.fc_reg.weight", (320, 1024)),  # reg_class_agnostic=False: 4 rows per class
    ("roi_head.bbox_head.fc_reg.bias", (320,)),
    ("roi_head.bbox_head.shared_fcs.0.weight", (1024, 256 * 7 * 7)),
    ("roi_head.bbox_head.shared_fcs.0.bias", (1024,)),
    ("roi_head.bbox_head.shared_fcs.1.weight", (1024, 1024)),
    ("roi_head.bbox_head.shared_fcs.1.bias", (1024,)),
    *[(f"roi_head.mask_head.convs.{i}.conv.weight", (256, 256, 3, 3)) for i in range(4)],
    *[(f"roi_head.mask_head.convs.{i}.conv.bias", (256,)) for i in range(4)],
    ("roi_head.mask_head.upsample.weight", (256, 256, 2, 2)),  # ConvTranspose2d: (in, out, k, k)
    ("roi_head.mask_head.upsample.bias", (256,)),
    ("roi_head.mask_head.conv_logits.weight", (80, 256, 1, 1)),  # no background channel
    ("roi_head.mask_head.conv_logits.bias", (80,)),
]


@pytest.fixture(scope="module")
def fixtures():
    return torch.load(FIXTURES, weights_only=False)["models"]


def _release_file(fixtures, name, path):
    """A `mask_rcnn_unified_<mixer>_micro_1x.pth` as mmdet writes it: {"meta", "state_dict", "optimizer"},
    every tensor distinct; class-indexed rows hold their mmdet row number so moves can be checked."""
    spec = fixtures[name]
    widths = [s[1] for s in spec["shapes"]]
    g = torch.Generator().manual_seed(0)
    sd = {f"backbone.{k}": torch.randn(tuple(s), generator=g) for k, s in spec["weight_keys"]}
    for key, shape in MMDET_HEAD_KEYS:
        shape = tuple(widths[int(d[1])] if isinstance(d, str) else d for d in shape)
        sd[key] = torch.randn(shape, generator=g)
    for key in ("roi_head.bbox_head.fc_cls.", "roi_head.bbox_head.fc_reg.", "roi_head.mask_head.conv_logits."):
        for leaf in ("weight", "bias"):
            t = sd[key + leaf]
            rows = torch.arange(t.shape[0], dtype=t.dtype).reshape((-1,) + (1,) * (t.dim() - 1))
            sd[key + leaf] = rows + 0.001 * t
    torch.save({"meta": {"mmdet_version": "2.25.1", "CLASSES": [f"c{i}" for i in range(80)]}, "state_dict": sd,
                "optimizer": {}}, path)
    return sd


@pytest.mark.parametrize("name", ["unified_convnext_micro", "unified_swin_micro"])
def test_release_layout_loads_strictly(fixtures, tmp_path, name):
    path = tmp_path / f"mask_rcnn_{name}_1x.pth"
    sd = _release_file(fixtures, name, path)
    model = build_detector(name, 80, mmdet_compat=True)  # the full, original head
    logs = []
    report = load_mmdet_detector(model, path, log=logs.append)
    assert report["loaded"] == len(sd) and str(path) in logs[0]
    ours = model.state_dict()
    # swin rebuilds its relative_position_index; nothing else may come from anywhere but the file
    assert all("relative_position_index" in k for k in report["kept_derived"])
    assert bool(report["kept_derived"]) == (name == "unified_swin_micro")

    cls, reg = ours["roi_heads.box_predictor.cls_score.weight"], ours["roi_heads.box_predictor.bbox_pred.weight"]
    logits = ours["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(cls[0], sd["roi_head.bbox_head.fc_cls.weight"][80])  # mmdet's background row -> our 0
    for c in (0, 1, 41, 79):  # mmdet class c -> our label c + 1
        assert torch.equal(cls[c + 1], sd["roi_head.bbox_head.fc_cls.weight"][c])
        assert torch.equal(reg[4 * (c + 1):4 * (c + 2)], sd["roi_head.bbox_head.fc_reg.weight"][4 * c:4 * c + 4])
        assert torch.equal(logits[c + 1], sd["roi_head.mask_head.conv_logits.weight"][c])
        assert float(cls[c + 1, 0]) == pytest.approx(c, abs=0.01)
    assert not reg[:4].any() and not logits[0].any()  # our background rows: never read, zero

    # every tensor of the file lands unchanged somewhere: mapping back gives the file exactly
    back = ours_to_mmdet({k: v for k, v in ours.items() if k not in report["kept_derived"]})
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mismatches_are_named(fixtures, tmp_path):
    path = tmp_path / "mask_rcnn_unified_convnext_micro_1x.pth"
    sd = _release_file(fixtures, "unified_convnext_micro", path)
    small = build_detector("unified_convnext_micro", 3)
    with pytest.raises(ValueError, match=r"mask_rcnn_unified_convnext_micro_1x.pth: .*num_classes=80"):
        load_mmdet_detector(small, path, log=lambda s: None)
    with pytest.raises(MmdetKeyError, match=r"roi_head.bbox_head.fc_extra.weight"):
        mmdet_to_ours({**sd, "roi_head.bbox_head.fc_extra.weight": torch.zeros(1)})
    del sd["neck.fpn_convs.3.conv.bias"]
    model = build_detector("unified_convnext_micro", 80)
    with pytest.raises(ValueError, match=r"missing \['neck.layer_blocks.3.0.bias'\]"):
        load_mmdet_detector(model, sd, log=lambda s: None)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch checkpoint"):
        load_mmdet_detector(model, tmp_path / "junk.pth", log=lambda s: None)
