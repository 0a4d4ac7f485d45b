"""The pieces of torchvision's Mask R-CNN that differ from mmdet 2.x, re-done the way the original's
mmdet `mask_rcnn_r50_fpn` does them (small subclasses; everything else is torchvision's own code).

docs/detection.md lists each difference, which of them these classes remove and what is left.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align


LOW_PRECISION = (torch.float16, torch.bfloat16)


def full_precision(t):
    """Head outputs leave autocast in float32, as mmdet's @force_fp32 heads: box coordinates of a
    1333-px image in bfloat16 are 4-8 px apart, and torchvision's BoxCoder decodes in the deltas' dtype."""
    return t.float() if t.dtype in LOW_PRECISION else t


class Fp32RPNHead(RPNHead):
    """torchvision's RPNHead whose objectness and deltas come out in float32 under autocast."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [full_precision(t) for t in logits], [full_precision(t) for t in deltas]


class MmdetAnchorGenerator(AnchorGenerator):
    """mmdet's AnchorGenerator (center_offset 0): base anchors are NOT rounded to whole pixels (torchvision
    rounds: a ratio-0.5 anchor of size 32 is 45.25 px wide in mmdet, 46 in torchvision), and each level's
    stride is the fixed FPN stride rather than torchvision's `padded_size // map_size`, which is 61, not 64,
    for the P6 map of an 800-px-high batch (P6 = max-pool of P5 has ceil(H/64) rows)."""

    def __init__(self, sizes, aspect_ratios, strides):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)  # ratio-major, as mmdet (one scale per level)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list, feature_maps):
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides")
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        if dtype in LOW_PRECISION:  # anchors of autocast maps stay float32 (see full_precision)
            dtype = torch.float32
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        all_anchors = torch.cat(per_level)
        return [all_anchors for _ in image_list.image_sizes]


class MmdetMatcher(det_utils.Matcher):
    """mmdet's MaxIoUAssigner low-quality rule: an anchor whose IoU equals a ground truth's best IoU goes
    to THAT ground truth (the later one on ties, as mmdet's loop), and only if that best IoU reaches
    `min_pos_iou` (0.3 for the RPN). torchvision gives such anchors their own argmax box, at any IoU."""

    def __init__(self, high, low, min_pos_iou):
        super().__init__(high, low, allow_low_quality_matches=True)
        self.min_pos_iou = float(min_pos_iou)

    def set_low_quality_matches_(self, matches, all_matches, match_quality_matrix):
        best, _ = match_quality_matrix.max(dim=1)
        eq = (match_quality_matrix == best[:, None]) & (best[:, None] >= self.min_pos_iou)
        gt_idx, pred_idx = torch.nonzero(eq, as_tuple=True)
        if pred_idx.numel() == 0:
            return
        last = torch.full_like(matches, -1)
        last.scatter_reduce_(0, pred_idx, gt_idx.to(last.dtype), reduce="amax")
        upd = last >= 0
        matches[upd] = last[upd]


class L1RegionProposalNetwork(RegionProposalNetwork):
    """RPN with mmdet's L1 box loss (torchvision: smooth-L1 with beta 1/9), same normalisation: the sum
    over positive anchors divided by the number of sampled anchors of the batch."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos], reduction="sum")
        box_loss = box_loss / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


def map_roi_levels(boxes, num_levels, finest_scale=56):
    """mmdet SingleRoIExtractor.map_roi_levels: level floor(log2(sqrt(area) / 56)) clamped to the maps
    (torchvision's LevelMapper is the same formula with its epsilon placed outside the log)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).long()


class FixedScaleRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with the FPN's known strides and mmcv's RoIAlign settings (`aligned=True`:
    pixel centres at +0.5; `sampling_ratio=0`: adaptive). torchvision's MultiScaleRoIAlign has no
    `aligned` option (always False) and guesses each level's scale from the image sizes."""

    def __init__(self, featmap_names, output_size, strides, sampling_ratio=0, aligned=True):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.spatial_scales = [1.0 / s for s in strides]
        self.aligned = bool(aligned)

    def forward(self, x, boxes, image_shapes):
        feats = [x[n] for n in self.featmap_names]
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        levels = map_roi_levels(rois[:, 1:], len(feats))
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + self.output_size)
        for lvl, (feat, scale) in enumerate(zip(feats, self.spatial_scales)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel() == 0:
                continue
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned)
            out[idx] = pooled.to(out.dtype)  # autocast may pool levels in different dtypes
        return out


class MmdetRoIHeads(RoIHeads):
    """Box and mask heads with mmdet's losses: L1 box loss (sum over positives / sampled RoIs),
    cross-entropy over sampled RoIs, and mask targets cut from the ground-truth masks by aligned
    RoIAlign and binarised at 0.5 (mmdet's BitmapMasks.crop_and_resize; torchvision uses
    unaligned RoIAlign and soft targets). Keypoint branches are not supported."""

    def __init__(self, *args, proposal_matcher=None, mask_size=28, **kwargs):
        super().__init__(*args, **kwargs)
        if proposal_matcher is not None:
            self.proposal_matcher = proposal_matcher
        self.mask_size = int(mask_size)

    def _mask_logits(self, features, boxes, image_shapes):
        feats = self.mask_roi_pool(features, boxes, image_shapes)
        return full_precision(self.mask_predictor(self.mask_head(feats)))

    def _mask_targets(self, gt_masks, boxes, matched_idxs):
        rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)
        m = self.mask_size
        soft = roi_align(gt_masks[:, None].to(boxes), rois, (m, m), 1.0, 0, True)[:, 0]
        return (soft >= 0.5).to(boxes.dtype)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (boxes, labels, masks per image)")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = (full_precision(t) for t in self.box_predictor(box_feats))
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            probs = maskrcnn_inference(self._mask_logits(features, boxes, image_shapes), labels)
            return [dict(boxes=b, labels=l, scores=s, masks=p) for b, l, s, p in zip(boxes, labels, scores, probs)], {}

        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels_all[pos]]
        loss_box = F.l1_loss(deltas, targets_all[pos], reduction="sum") / max(labels_all.numel(), 1)

        pos_boxes, pos_labels, mask_targets = [], [], []
        for props, lab, idx, tgt in zip(proposals, labels, matched_idxs, targets):
            p = torch.where(lab > 0)[0]
            pos_boxes.append(props[p])
            pos_labels.append(lab[p])
            if p.numel():
                mask_targets.append(self._mask_targets(tgt["masks"], props[p], idx[p]))
        mask_logits = self._mask_logits(features, pos_boxes, image_shapes)
        if mask_logits.shape[0] == 0:
            loss_mask = mask_logits.sum() * 0  # keeps the graph (and DDP/ZeRO hooks) whole
        else:
            pos_labels = torch.cat(pos_labels)
            picked = mask_logits[torch.arange(pos_labels.numel(), device=pos_labels.device), pos_labels]
            loss_mask = F.binary_cross_entropy_with_logits(picked, torch.cat(mask_targets))
        return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}


def paste_masks_mmdet(masks, boxes, height, width, chunk_elems=1 << 24):
    """mmdet's _do_paste_mask: every image pixel centre samples the box's 28x28 probabilities by
    bilinear grid_sample (align_corners=False). Exact but costs N*h*w work, so it runs in chunks of
    detections; torchvision pastes each mask into its box only (cheaper, slightly different edges)."""
    n = masks.shape[0]
    out = masks.new_zeros((n, 1, height, width))
    if n == 0:
        return out
    per = max(1, chunk_elems // max(1, height * width))
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    for s in range(0, n, per):
        b = boxes[s:s + per].float()
        x0, y0, x1, y1 = (b[:, i:i + 1] for i in range(4))
        gy = (ys[None] - y0) / (y1 - y0).clamp(min=1e-6) * 2 - 1
        gx = (xs[None] - x0) / (x1 - x0).clamp(min=1e-6) * 2 - 1
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, height, width), gy[:, :, None].expand(k, height, width)], dim=3)
        out[s:s + per] = F.grid_sample(masks[s:s + per].float(), grid, align_corners=False).to(out.dtype)
    return out


def init_like_mmdet(neck, box_head, box_predictor, mask_predictor):
    """mmdet 2.x's initialisation of the parts where torchvision's differs: FPN convs and the shared FCs
    Xavier-uniform, fc_cls N(0, 0.01), fc_reg N(0, 0.001), mask logits/deconv biases zero."""
    for m in neck.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for fc in (box_head.fc6, box_head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(box_predictor.cls_score.bias)
    nn.init.zeros_(box_predictor.bbox_pred.bias)
    for m in mask_predictor.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.zeros_(m.bias)

