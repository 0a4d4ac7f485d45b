"""Mask R-CNN (torchvision's, maintained, with CPU and CUDA RoIAlign/NMS kernels) on a unified
detection backbone, configured to the original's mmdet 2.x `mask_rcnn_r50_fpn` 1x numbers.

No resize/normalise/pad inside the model: the input pipeline delivers normalised images, zero-padded
to a multiple of 32, and each target's `image_size` (h, w) of the unpadded resized image; the model
only wraps them into torchvision's ImageList. docs/detection.md compares it with mmdet.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from .rcnn_parts import (
    FixedScaleRoIAlign,
    Fp32RPNHead,
    L1RegionProposalNetwork,
    MmdetAnchorGenerator,
    MmdetMatcher,
    MmdetRoIHeads,
    init_like_mmdet,
    paste_masks_mmdet,
)

FEATURE_STRIDES = (4, 8, 16, 32)  # the backbone's four out_norm maps; P6 (stride 64) is a max-pool of P5
ANCHOR_STRIDES = FEATURE_STRIDES + (64,)
ROI_FEATURES = ("0", "1", "2", "3")  # RoIs pool from P2-P5, as mmdet's featmap_strides [4, 8, 16, 32]


@dataclass(frozen=True)
class MaskRCNNConfig:
    """The original's numbers (detection/configs/_base_/models/mask_rcnn_r50_fpn.py, train_cfg/test_cfg)."""

    fpn_channels: int = 256
    fc_dim: int = 1024  # Shared2FCBBoxHead fc_out_channels
    mask_convs: int = 4  # FCNMaskHead num_convs
    mask_channels: int = 256  # FCNMaskHead conv_out_channels
    anchor_scale: int = 8  # anchor side = scale * stride: 32 .. 512
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_min_pos_iou: float = 0.3
    rpn_batch: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_pre_nms_train: int = 2000  # per level, as mmdet's nms_pre
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    roi_iou: float = 0.5
    roi_batch: int = 512
    roi_pos_fraction: float = 0.25
    roi_sampling_ratio: int = 0  # RoIAlign samples per bin side; 0 = adaptive (mmcv's default)
    box_roi_size: int = 7
    mask_roi_size: int = 14
    mask_size: int = 28
    box_stds: tuple = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWHBBoxCoder target_stds (means 0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


# CPU tests and the demo: small FCs, half the mask convs, half the sampled RoIs and 2x2 RoIAlign samples
# per bin (torchvision's CPU RoIAlign backward was 29% of a demo step with adaptive sampling and 512 RoIs).
SLIM = {"fc_dim": 256, "mask_convs": 2, "roi_batch": 128, "roi_sampling_ratio": 2}


def head_config(head="full", fpn_channels=None):
    """The head sizes for `head` ("full": the original's; "slim": a CPU-sized variant, 64-channel FPN by
    default) with `fpn_channels` overriding the FPN (and mask conv) width."""
    if head not in ("full", "slim"):
        raise ValueError(f"head must be 'full' or 'slim', got {head!r}")
    extra = dict(SLIM) if head == "slim" else {}
    width = int(fpn_channels) if fpn_channels is not None else (64 if head == "slim" else 256)
    return MaskRCNNConfig(fpn_channels=width, mask_channels=width, **extra)


class MaskRCNN(nn.Module):
    """backbone -> FPN (`neck`) -> RPN -> box and mask heads. `forward(images, targets)`: training ->
    dict of scalar losses (their sum is the loss); eval -> one dict per image: "boxes" (xyxy, resized
    image pixels), "labels" (1..K), "scores", "masks" (N, 1, h, w) probabilities at the image's
    unpadded resized size (h, w) = target["image_size"] (the whole padded tensor when no targets);
    with mmdet_compat also "masks_28", the (N, 1, 28, 28) probabilities before pasting."""

    def __init__(self, backbone, neck, rpn, roi_heads, num_classes, mmdet_compat=False):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = int(num_classes)
        self.mmdet_compat = bool(mmdet_compat)

    @staticmethod
    def image_sizes(images, targets):
        if images.dim() != 4:
            raise ValueError(f"images must be a padded (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        if targets is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
        sizes = []
        for i, t in enumerate(targets):
            if "image_size" not in t:
                raise KeyError(f"target {i} (key {t.get('key', '?')}) has no 'image_size'")
            h, w = (int(v) for v in t["image_size"])
            if h > images.shape[-2] or w > images.shape[-1] or h <= 0 or w <= 0:
                raise ValueError(
                    f"target {i} (key {t.get('key', '?')}): image_size {(h, w)} does not fit the padded "
                    f"batch {tuple(images.shape[-2:])}"
                )
            sizes.append((h, w))
        return sizes

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise ValueError("training needs targets: boxes, labels, masks and image_size per image")
        sizes = self.image_sizes(images, targets)
        feats = self.backbone(images)
        feats = self.neck(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        image_list = ImageList(images, sizes)
        train_targets = targets if self.training else None
        proposals, rpn_losses = self.rpn(image_list, feats, train_targets)
        detections, roi_losses = self.roi_heads(feats, proposals, sizes, train_targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        paste = paste_masks_mmdet if self.mmdet_compat else _paste_torchvision
        for det, (h, w) in zip(detections, sizes):
            if self.mmdet_compat:  # coco_eval pastes these straight at the original size, as mmdet does
                det["masks_28"] = det["masks"]
            det["masks"] = paste(det["masks"], det["boxes"], h, w)  # (N, 1, 28, 28) -> (N, 1, h, w)
        return detections


def _paste_torchvision(masks, boxes, h, w):
    return paste_masks_in_image(masks, boxes, (h, w), padding=1)


def build_detector(backbone, num_classes, *, fpn_channels=None, head="full", mmdet_compat=False, **backbone_overrides):
    """Mask R-CNN for `num_classes` object classes (labels 1..K, 0 = background) on `backbone`: a model
    name for `stm_dist.detection.create_backbone` (built with `backbone_overrides`, e.g. drop_path_rate)
    or an already built module with `.out_channels` (4 widths) whose forward returns the 4 maps at
    strides 4-32.

    head="full" is the original's head (FPN 256, FC 1024, 4 mask convs of 256); "slim" is a CPU-sized
    one (FPN 64, FC 256, 2 mask convs, 256 sampled RoIs, 2x2 RoIAlign samples). Training always uses mmdet's rules where torchvision's differ
    cheaply (L1 box losses, unrounded anchors at fixed strides, aligned adaptive RoIAlign, binarised
    mask targets, mmdet's low-quality matching and initialisation). `mmdet_compat=True` also pastes
    masks as mmdet does (grid_sample over the image, costlier): for reproducing released detectors."""
    if isinstance(backbone, str):
        from . import create_backbone  # lazy: the backbone module is heavy

        backbone = create_backbone(backbone, **backbone_overrides)
    elif backbone_overrides:
        raise ValueError(f"backbone overrides {sorted(backbone_overrides)} need a backbone name, not a module")
    in_channels = list(getattr(backbone, "out_channels", []) or [])
    if len(in_channels) != len(FEATURE_STRIDES):
        raise ValueError(f"the backbone must expose .out_channels with 4 widths, got {in_channels!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    cfg = head_config(head, fpn_channels)
    c = cfg.fpn_channels

    neck = FeaturePyramidNetwork(in_channels, c, extra_blocks=LastLevelMaxPool())
    sizes = tuple((cfg.anchor_scale * s,) for s in ANCHOR_STRIDES)  # one anchor size per level: 32 .. 512
    anchors = MmdetAnchorGenerator(sizes, (cfg.anchor_ratios,) * len(ANCHOR_STRIDES), ANCHOR_STRIDES)
    rpn = L1RegionProposalNetwork(
        anchors,
        Fp32RPNHead(c, len(cfg.anchor_ratios)),
        cfg.rpn_pos_iou,
        cfg.rpn_neg_iou,
        cfg.rpn_batch,
        cfg.rpn_pos_fraction,
        dict(training=cfg.rpn_pre_nms_train, testing=cfg.rpn_pre_nms_test),
        dict(training=cfg.rpn_post_nms_train, testing=cfg.rpn_post_nms_test),
        cfg.rpn_nms,
    )
    rpn.proposal_matcher = MmdetMatcher(cfg.rpn_pos_iou, cfg.rpn_neg_iou, cfg.rpn_min_pos_iou)

    box_head = TwoMLPHead(c * cfg.box_roi_size**2, cfg.fc_dim)
    box_predictor = FastRCNNPredictor(cfg.fc_dim, num_classes + 1)
    mask_head = MaskRCNNHeads(c, [cfg.mask_channels] * cfg.mask_convs, 1)
    mask_predictor = MaskRCNNPredictor(cfg.mask_channels, cfg.mask_channels, num_classes + 1)
    init_like_mmdet(neck, box_head, box_predictor, mask_predictor)
    roi_heads = MmdetRoIHeads(
        FixedScaleRoIAlign(ROI_FEATURES, cfg.box_roi_size, FEATURE_STRIDES, cfg.roi_sampling_ratio),
        box_head,
        box_predictor,
        cfg.roi_iou,
        cfg.roi_iou,
        cfg.roi_batch,
        cfg.roi_pos_fraction,
        tuple(1.0 / s for s in cfg.box_stds),  # torchvision's BoxCoder weights = 1 / mmdet's stds
        cfg.score_thresh,
        cfg.nms_thresh,
        cfg.detections_per_img,
        mask_roi_pool=FixedScaleRoIAlign(ROI_FEATURES, cfg.mask_roi_size, FEATURE_STRIDES, cfg.roi_sampling_ratio),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        proposal_matcher=MmdetMatcher(cfg.roi_iou, cfg.roi_iou, cfg.roi_iou),
        mask_size=cfg.mask_size,
    )
    model = MaskRCNN(backbone, neck, rpn, roi_heads, num_classes, mmdet_compat=mmdet_compat)
    model.config = cfg
    return model
