"""The Mask R-CNN on a unified backbone: a train step and an eval forward on CPU (micro backbone, slim
head), and the parts re-done the mmdet way (anchors, RoI levels and aligned pooling, matching, pasting)."""
import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, roi_align
from torchvision.ops.poolers import initLevelMapper

from stm_dist.detection.detector import build_detector
from stm_dist.detection.rcnn_parts import (
    FixedScaleRoIAlign,
    MmdetAnchorGenerator,
    MmdetMatcher,
    paste_masks_mmdet,
)
from stm_dist.detection.detector import _paste_torchvision

K = 3  # classes


def _targets():
    """Two images of a padded 128x160 batch: the second one's unpadded size is 112x150."""
    out = []
    for (h, w), boxes, labels in (
        ((128, 160), [[10, 20, 60, 90], [50, 30, 130, 110]], [1, 3]),
        ((112, 150), [[30, 10, 100, 60]], [2]),
    ):
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes):
            m[y1 + 4:y2 - 4, x1 + 4:x2 - 4] = 1  # masks inside their boxes
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                    "masks": masks, "image_size": (h, w), "image_id": len(out) + 1, "key": f"img{len(out)}"})
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("unified_convnext_micro", K, head="slim", drop_path_rate=0.0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))


def test_train_step_then_eval_forward(model, images):
    model.train()
    targets = _targets()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(4):  # a few steps on one batch: the loss must fall
        losses = model(images, targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        first = float(total.detach()) if first is None else first
        for part in ("backbone", "neck", "rpn", "roi_heads.box_head", "roi_heads.mask_head", "roi_heads.mask_predictor"):
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
            assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        opt.step()
    assert float(total.detach()) < first

    model.eval()
    # after 4 steps on one batch every foreground score is still tiny: take all of them (the 0.05 cut
    # would leave none), so the 100-detection cap is what bounds the output
    model.roi_heads.score_thresh = 0.0
    try:
        with torch.no_grad():
            outs = model(images, [{"image_size": t["image_size"]} for t in targets])
            model.mmdet_compat = True  # mmdet's mask pasting; boxes, scores, labels unchanged
            compat = model(images, [{"image_size": t["image_size"]} for t in targets])
    finally:
        model.roi_heads.score_thresh = 0.05
        model.mmdet_compat = False
    for out, alt in zip(outs, compat):
        assert "masks_28" not in out and alt["masks_28"].shape == (len(alt["boxes"]), 1, 28, 28)
        assert all(torch.equal(out[k], alt[k]) for k in ("boxes", "scores", "labels"))
        differ = ((out["masks"] >= 0.5) != (alt["masks"] >= 0.5)).float().mean()
        assert float(differ) < 0.05  # the two pastes part only along box edges (measured 0.8% and 1.2%)
    for out, t in zip(outs, targets):
        n = out["boxes"].shape[0]
        assert n == 100
        h, w = t["image_size"]
        assert out["masks"].shape == (n, 1, h, w) and out["masks"].dtype == torch.float32
        assert 0 <= float(out["masks"].min()) and float(out["masks"].max()) <= 1
        assert out["labels"].min() >= 1 and out["labels"].max() <= K
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()  # clipped to the unpadded image


def test_bad_targets_are_named(model, images):
    model.train()
    t = _targets()
    del t[1]["image_size"]
    with pytest.raises(KeyError, match="target 1 .key img1. has no 'image_size'"):
        model(images, t)
    t = _targets()
    t[0]["image_size"] = (160, 160)
    with pytest.raises(ValueError, match="image_size \\(160, 160\\) does not fit the padded batch \\(128, 160\\)"):
        model(images, t)
    with pytest.raises(ValueError, match="training needs targets"):
        model(images)


def test_slim_and_full_heads_have_the_configured_sizes(model):
    assert model.config.fpn_channels == 64 and model.config.fc_dim == 256
    assert model.roi_heads.box_predictor.cls_score.out_features == K + 1
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * (K + 1)
    # The slim head samples fewer RoIs with fixed 2x2 RoIAlign samples (CPU speed); the full head keeps
    # mmdet's 512 RoIs and adaptive sampling, which the released detectors' numerics depend on.
    heads = model.roi_heads
    assert heads.fg_bg_sampler.batch_size_per_image == 128
    assert heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio == 2
    full = build_detector(model.backbone, K, head="full").roi_heads
    assert full.fg_bg_sampler.batch_size_per_image == 512
    assert full.box_roi_pool.sampling_ratio == full.mask_roi_pool.sampling_ratio == 0
    with pytest.raises(ValueError, match="head must be 'full' or 'slim'"):
        build_detector(model.backbone, K, head="tiny")
    with pytest.raises(ValueError, match="need a backbone name"):
        build_detector(model.backbone, K, drop_path_rate=0.1)


def test_anchors_follow_mmdet():
    """mmdet: unrounded base anchors (size 8*stride, ratios h/w 0.5/1/2) centred at 0, shifted by the fixed
    stride; torchvision rounds them and takes P6's stride as padded_size // rows (800 // 13 = 61)."""
    strides = (4, 8, 16, 32, 64)
    gen = MmdetAnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * 5, strides)
    feats = [torch.zeros(1, 1, math.ceil(800 / s), math.ceil(1216 / s)) for s in strides]
    anchors = gen(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    sizes = [f.shape[-1] * f.shape[-2] * 3 for f in feats]
    levels = anchors.split(sizes)
    w = 32 / math.sqrt(0.5)  # ratio 0.5 (h/w) of area 32^2: 45.25 px wide, 22.63 high
    assert levels[0][0].tolist() == pytest.approx([-w / 2, -w / 4, w / 2, w / 4])
    assert levels[0][3].tolist() == pytest.approx([4 - w / 2, -w / 4, 4 + w / 2, w / 4])  # next location: +4 px
    p6 = levels[4].reshape(13, 19, 3, 4)
    assert float(p6[12, 0, 1, 1]) == pytest.approx(12 * 64 - 256)  # row 12 of P6 centred at 768 (not 12 * 61)


def test_roi_levels_and_aligned_pooling():
    """FPN level floor(log2(sqrt(area) / 56)) in 0..3 as mmdet's (and torchvision's) mapper; pooled with
    RoIAlign aligned=True, adaptive sampling at that level's stride."""
    boxes = torch.tensor([[0, 0, 111, 111], [0, 0, 113, 113], [0, 0, 230, 220], [0, 0, 500, 480], [3, 4, 9, 8.0]])
    tv = initLevelMapper(2, 5)([boxes])
    feats = {str(i): torch.randn(1, 2, 256 // s, 256 // s, generator=torch.Generator().manual_seed(i))
             for i, s in enumerate((4, 8, 16, 32))}
    pool = FixedScaleRoIAlign(["0", "1", "2", "3"], 7, (4, 8, 16, 32))
    out = pool(feats, [boxes], [(256, 256)])
    want_levels = [0, 1, 2, 3, 0]
    assert tv.tolist() == want_levels
    for i, lvl in enumerate(want_levels):
        rois = torch.cat([torch.zeros(1, 1), boxes[i:i + 1]], dim=1)
        ref = roi_align(feats[str(lvl)], rois, 7, 1 / (4 * 2**lvl), 0, True)
        assert torch.equal(out[i:i + 1], ref)
    assert not torch.allclose(out[4:], roi_align(feats["0"], torch.cat([torch.zeros(1, 1), boxes[4:]], 1), 7, 0.25, 0, False))


def test_matcher_low_quality_rule_needs_min_iou():
    """mmdet's RPN assigner: an anchor that is a ground truth's best match becomes positive only if that
    IoU reaches min_pos_iou (0.3); torchvision's Matcher would take it at any IoU."""
    gt = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110.0]])
    anchors = torch.tensor([[0, 0, 10, 20], [100, 100, 140, 140], [50, 50, 60, 60.0]])  # IoU 0.5, 1/16, 0
    matches = MmdetMatcher(0.7, 0.3, 0.3)(box_iou(gt, anchors))
    assert matches.tolist() == [0, -1, -1]  # 0.5 < 0.7 but gt 0's best (>= 0.3): positive; 1/16: negative


def test_mask_paste_mmdet_matches_torchvision_inside_and_outside():
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [0.0, 0.0, 30.0, 30.0]])
    a = paste_masks_mmdet(masks, boxes, 80, 100, chunk_elems=80 * 100)  # one detection per chunk
    b = _paste_torchvision(masks, boxes, 80, 100)
    assert a.shape == b.shape == (2, 1, 80, 100)
    for m in (a, b):
        assert (m[0, 0, 22:68, 12:48] > 0.99).all() and float(m[0, 0, :18].max()) == 0 and float(m[0, 0, :, 53:].max()) == 0


def test_batch_without_objects_still_reaches_every_parameter(model, images):
    """Images whose annotations were all dropped (crowds, degenerate boxes): the losses stay finite and
    every parameter still gets a gradient (DDP and ZeRO wait for each parameter's hook)."""
    model.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 128, 160, dtype=torch.uint8), "image_size": (128, 160)} for _ in range(2)]
    model.zero_grad()
    losses = model(images, empty)
    assert float(losses["loss_box_reg"]) == 0 and float(losses["loss_mask"]) == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_autocast_keeps_boxes_in_float32(model, images):
    """Under bf16 autocast (the engine's bf16 mode) the heads' outputs, anchors, proposals and boxes stay
    float32, as mmdet's @force_fp32 heads: bf16 coordinates of a large image are 4-8 px apart."""
    model.eval()
    model.roi_heads.score_thresh = 0.0  # detections whatever the earlier tests trained
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model(images, [{"image_size": t["image_size"]} for t in _targets()])
    finally:
        model.roi_heads.score_thresh = 0.05
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.neck({str(i): f for i, f in enumerate(model.backbone(images))})
        anchors = model.rpn.anchor_generator(ImageList(images, [(128, 160)] * 2), list(feats.values()))
    assert feats["0"].dtype == torch.bfloat16 and anchors[0].dtype == torch.float32
    for out in outs:
        assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32
    boxes = torch.cat([o["boxes"] for o in outs])
    assert boxes.numel() and (boxes != boxes.bfloat16().float()).any()  # not rounded to bf16 anywhere
