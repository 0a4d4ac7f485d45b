"""The original's released detectors (`mask_rcnn_unified_<mixer>_<size>_1x.pth`, mmdet 2.x layout) in
our Mask R-CNN, and back.

Key map (mmdet 2.x `MaskRCNN` with FPN, RPNHead, Shared2FCBBoxHead, FCNMaskHead -> ours):

    backbone.*                              -> backbone.*  (the detection backbone keeps the original's keys)
    neck.lateral_convs.{i}.conv.*           -> neck.inner_blocks.{i}.0.*
    neck.fpn_convs.{i}.conv.*               -> neck.layer_blocks.{i}.0.*
    rpn_head.rpn_conv.*                     -> rpn.head.conv.0.0.*
    rpn_head.rpn_cls.*                      -> rpn.head.cls_logits.*   (sigmoid, one logit per anchor)
    rpn_head.rpn_reg.*                      -> rpn.head.bbox_pred.*
    roi_head.bbox_head.shared_fcs.{0,1}.*   -> roi_heads.box_head.fc{6,7}.*
    roi_head.bbox_head.fc_cls.*             -> roi_heads.box_predictor.cls_score.*  rows: mmdet's background
                                               row K (last) -> our row 0, mmdet class c -> our label c+1
    roi_head.bbox_head.fc_reg.*             -> roi_heads.box_predictor.bbox_pred.*  mmdet's 4K rows (per class,
                                               no background) -> our rows 4(c+1)..4(c+1)+3; our background
                                               rows 0..3 (never read) are zero
    roi_head.mask_head.convs.{i}.conv.*     -> roi_heads.mask_head.{i}.0.*
    roi_head.mask_head.upsample.*           -> roi_heads.mask_predictor.conv5_mask.*
    roi_head.mask_head.conv_logits.*        -> roi_heads.mask_predictor.mask_fcn_logits.*  K -> K+1 channels,
                                               our background channel 0 (never read) zero

Both frameworks decode boxes with means 0 and stds (0.1, 0.1, 0.2, 0.2) (torchvision's weights 10, 10, 5,
5) and order the deltas (dx, dy, dw, dh) and the anchors (location-major, ratio 0.5/1/2) the same way,
so the tensors need no other change.
"""
import re

import torch

_PREFIXES = [  # (mmdet prefix, our prefix), '#' = a layer index; class-indexed tensors are handled apart
    ("neck.lateral_convs.#.conv.", "neck.inner_blocks.#.0."),
    ("neck.fpn_convs.#.conv.", "neck.layer_blocks.#.0."),
    ("rpn_head.rpn_conv.", "rpn.head.conv.0.0."),
    ("rpn_head.rpn_cls.", "rpn.head.cls_logits."),
    ("rpn_head.rpn_reg.", "rpn.head.bbox_pred."),
    ("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6."),
    ("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7."),
    ("roi_head.mask_head.convs.#.conv.", "roi_heads.mask_head.#.0."),
    ("roi_head.mask_head.upsample.", "roi_heads.mask_predictor.conv5_mask."),
]


def _rule(src, dst):
    rx = re.compile(re.escape(src).replace("\\#", r"(\d+)") + r"(weight|bias)")
    return rx, dst


_TO_OURS = [_rule(a, b) for a, b in _PREFIXES]
_TO_MMDET = [_rule(b, a) for a, b in _PREFIXES]
_CLS = "roi_head.bbox_head.fc_cls."
_REG = "roi_head.bbox_head.fc_reg."
_LOGITS = "roi_head.mask_head.conv_logits."
_OUR_CLS = "roi_heads.box_predictor.cls_score."
_OUR_REG = "roi_heads.box_predictor.bbox_pred."
_OUR_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits."
# buffers the backbone rebuilds from its configuration: a release file may or may not hold them
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


class MmdetKeyError(KeyError):
    def __str__(self):
        return str(self.args[0])


def _rename(key, rules):
    for rx, dst in rules:
        m = rx.fullmatch(key)
        if m:
            *index, leaf = m.groups()
            return (dst.replace("#", index[0]) if index else dst) + leaf
    return None


def _bg_first(t):
    """mmdet's class axis [c_0 .. c_{K-1}, background] -> ours [background, c_0 .. c_{K-1}]."""
    return torch.cat([t[-1:], t[:-1]], dim=0)


def _bg_zero_first(t, group=1):
    """K classes (in groups of `group` rows) -> K+1 with zero rows for our background label 0."""
    return torch.cat([t.new_zeros((group,) + tuple(t.shape[1:])), t], dim=0)


def mmdet_to_ours(state_dict, source="state dict"):
    """A released detector's state dict (mmdet 2.x keys) -> our keys and class layout. Raises
    MmdetKeyError naming `source` and every key it cannot place."""
    out, unknown = {}, []
    for key, t in state_dict.items():
        if key.startswith("backbone."):
            out[key] = t
        elif key.startswith(_CLS):
            out[_OUR_CLS + key[len(_CLS):]] = _bg_first(t)
        elif key.startswith(_REG):
            if t.shape[0] % 4:
                raise MmdetKeyError(f"{source}: {key} has {t.shape[0]} rows, not 4 per class")
            out[_OUR_REG + key[len(_REG):]] = _bg_zero_first(t, 4)
        elif key.startswith(_LOGITS):
            out[_OUR_LOGITS + key[len(_LOGITS):]] = _bg_zero_first(t)
        else:
            new = _rename(key, _TO_OURS)
            if new is None:
                unknown.append(key)
            else:
                out[new] = t
    if unknown:
        raise MmdetKeyError(
            f"{source}: {len(unknown)} key(s) outside mmdet's Mask R-CNN (FPN, RPNHead, Shared2FCBBoxHead, "
            f"FCNMaskHead) layout: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    return out


def ours_to_mmdet(state_dict):
    """Our detector's state dict -> mmdet 2.x keys and class layout (the inverse of mmdet_to_ours)."""
    out = {}
    for key, t in state_dict.items():
        if key.startswith("backbone."):
            out[key] = t
        elif key.startswith(_OUR_CLS):
            out[_CLS + key[len(_OUR_CLS):]] = torch.cat([t[1:], t[:1]], dim=0)
        elif key.startswith(_OUR_REG):
            out[_REG + key[len(_OUR_REG):]] = t[4:]
        elif key.startswith(_OUR_LOGITS):
            out[_LOGITS + key[len(_OUR_LOGITS):]] = t[1:]
        else:
            new = _rename(key, _TO_MMDET)
            if new is None:
                raise MmdetKeyError(f"our key {key} has no place in mmdet's Mask R-CNN layout")
            out[new] = t
    return out


def read_mmdet_checkpoint(path):
    """The state dict of an mmdet checkpoint file ({"meta", "state_dict", "optimizer"} or a bare dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch.load raised
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected an mmdet checkpoint holding a 'state_dict' of tensors")
    return sd


def key_mismatches(own: dict, sd: dict) -> tuple:
    """(missing, unexpected, shape mismatches) of weights `sd` against a detector's state dict `own`;
    buffers the backbone derives from its configuration (DERIVED_BUFFERS) may be missing. The
    mismatches read "key: file (shape) vs model (shape)"."""
    missing = [k for k in own if k not in sd and not k.endswith(DERIVED_BUFFERS)]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    return missing, unexpected, wrong


def load_mmdet_detector(model, path_or_state_dict, log=print):
    """Load a released mmdet 2.x Mask R-CNN into `model` (built by build_detector with the same backbone
    and num_classes, normally with mmdet_compat=True). Strict: every tensor of ours comes from the file
    (except buffers the backbone rebuilds, DERIVED_BUFFERS, when the file lacks them) and every tensor of
    the file is used, with matching shapes; otherwise a ValueError names the file and the keys."""
    if isinstance(path_or_state_dict, dict):
        source, sd = "state dict", path_or_state_dict
    else:
        source, sd = path_or_state_dict, read_mmdet_checkpoint(path_or_state_dict)
    ours = mmdet_to_ours(sd, source=str(source))
    own = model.state_dict()
    missing, unexpected, wrong = key_mismatches(own, ours)
    if missing or unexpected or wrong:
        hint = ""
        if any(k.startswith(_OUR_CLS) for k in wrong):
            k = int(ours[_OUR_CLS + "weight"].shape[0]) - 1
            hint = f" (the file has {k} classes: build the detector with num_classes={k})"
        raise ValueError(
            f"{source}: does not match the detector{hint}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {wrong[:8]}"
        )
    kept = [k for k in own if k not in ours]
    for k in kept:
        ours[k] = own[k]
    model.load_state_dict(ours, strict=True)
    log(f"loaded {len(ours) - len(kept)} tensors from {source}"
        + (f"; {len(kept)} derived buffers kept from the model" if kept else ""))
    return {"loaded": len(ours) - len(kept), "kept_derived": kept}
