"""A detection sample's geometry on the host: its random choices, its resized size, and its
targets (boxes, labels, masks) moved exactly as the pipeline moves its pixels.

Every random choice (the scale among several, the flip) comes from (seed, epoch, sample index)
as the classification plan's do (epoch_plan.sample_augment), so the DALI graph that resizes and
flips the pixels and this code that moves the boxes and masks act on the same decision, and a
resumed or re-sharded run draws the same ones.

Resize keeps the ratio by mmdet's rule (``mmcv.rescale_size``): for a scale (long, short) the
factor is min(long / longer side, short / shorter side) and the new size is rounded to the
nearest pixel; boxes are scaled by the exact per-axis ratios new/old, clipped to the image.
Flip is mmdet's: x1' = w - x2. Masks are rasterised by pycocotools at the resized size (polygons
scaled first) or decoded (RLE) at the original size and resized nearest-neighbour.
"""
from __future__ import annotations

import json

import numpy as np
import torch

MMDET_SCALE = ((1333, 800),)
# The 3x multi-scale recipe (InternImage / ConvNeXt): short side 480..800 step 32, long side 1333.
MULTI_SCALE_3X = tuple((1333, s) for s in range(480, 801, 32))


class SampleError(ValueError):
    """A sample's JSON is malformed or does not fit its image; the message names the sample."""


def draw_choices(seed: int, epoch: int, index: int, n_scales: int, flip_prob: float) -> tuple[int, int]:
    """(scale number, flip) of one sample's train view, from (seed, epoch, sample index) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, 0xDE7]))
    scale = int(rng.integers(0, n_scales)) if n_scales > 1 else 0
    flip = int(rng.random() < flip_prob)
    return scale, flip


def rescale_size(width: int, height: int, scale) -> tuple[int, int]:
    """(new width, new height) keeping the ratio, mmcv.rescale_size's rule for scale (long, short)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def check_scales(scales) -> tuple[tuple[int, int], ...]:
    out = tuple(tuple(int(v) for v in s) for s in scales)
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise ValueError(f"scales must be a non-empty list of (long, short) sides in pixels, got {scales!r}")
    return out


def parse_meta(raw: bytes, where: str) -> dict:
    """A sample's JSON member (see the shard contract), checked for what the targets use."""
    try:
        meta = json.loads(bytes(raw))
    except ValueError as e:
        raise SampleError(f"{where}: the .json member is not valid JSON ({e})") from None
    for key, kind in (("image_id", int), ("height", int), ("width", int), ("annotations", list)):
        if not isinstance(meta.get(key), kind):
            raise SampleError(f"{where}: the .json member lacks {key!r} (or it is not {kind.__name__})")
    for n, ann in enumerate(meta["annotations"]):
        for key in ("category_id", "bbox", "segmentation"):
            if key not in ann:
                raise SampleError(f"{where}: annotation {n} (id {ann.get('id')}) lacks {key!r}")
        if len(ann["bbox"]) != 4:
            raise SampleError(f"{where}: annotation {n} (id {ann.get('id')}) bbox {ann['bbox']!r} is not [x, y, w, h]")
    return meta


def keep_annotation(ann: dict, width: int, height: int, drop_crowd: bool) -> bool:
    """mmdet's CocoDataset._parse_ann_info filter: boxes with no overlap with the image, no area
    or a side under 1 px are dropped; crowd regions too in training (they are ignore regions)."""
    if drop_crowd and ann.get("iscrowd", 0):
        return False
    x, y, w, h = (float(v) for v in ann["bbox"])
    inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
    return inter_w * inter_h > 0 and float(ann.get("area", w * h)) > 0 and w >= 1 and h >= 1


def _nearest(mask: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres (the geometry DALI's resize uses)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def rasterise(segm, height: int, width: int, new_h: int, new_w: int, where: str) -> np.ndarray:
    """One annotation's mask, uint8 (new_h, new_w), from polygons or RLE at the original size."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons, in pixels of the original image
        sx, sy = new_w / width, new_h / height
        polys = []
        for poly in segm:
            p = np.asarray(poly, np.float64)
            if p.ndim != 1 or len(p) < 6 or len(p) % 2:
                raise SampleError(f"{where}: a polygon has {p.size} coordinates (needs >= 6, even)")
            p = p.copy()
            p[0::2] *= sx
            p[1::2] *= sy
            polys.append(p.tolist())
        if not polys:
            return np.zeros((new_h, new_w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, new_h, new_w))
        return mask_utils.decode(rle)
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise SampleError(f"{where}: RLE size {segm['size']} is not the image's [{height}, {width}]")
        rle = segm
        if isinstance(segm["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, height, width)
        m = mask_utils.decode(rle)
        return _nearest(m, new_h, new_w) if (new_h, new_w) != (height, width) else m
    raise SampleError(f"{where}: segmentation is neither polygons nor RLE ({type(segm).__name__})")


def build_target(meta: dict, key: str, new_w: int, new_h: int, flip: int, labels_of: dict, *, drop_crowd: bool,
                 with_masks: bool = True) -> dict:
    """The contract's target dict of one sample resized to (new_w, new_h), flipped if ``flip``."""
    height, width = meta["height"], meta["width"]
    sx, sy = new_w / width, new_h / height
    boxes, labels, masks = [], [], []
    for ann in meta["annotations"]:
        where = f"sample {key!r} (image_id {meta['image_id']}), annotation id {ann.get('id')}"
        if not keep_annotation(ann, width, height, drop_crowd):
            continue
        label = labels_of.get(ann["category_id"])
        if label is None:
            raise SampleError(f"{where}: category_id {ann['category_id']} is not in the manifest's categories")
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = np.clip([x * sx, y * sy, (x + w) * sx, (y + h) * sy], 0, [new_w, new_h, new_w, new_h])
        if box[2] <= box[0] or box[3] <= box[1]:  # degenerate once clipped to the image
            continue
        boxes.append(box)
        labels.append(label)
        if with_masks:
            masks.append(rasterise(ann["segmentation"], height, width, new_h, new_w, where))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = np.stack(masks) if masks else np.zeros((0, new_h, new_w), np.uint8)
    if flip:
        boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], axis=1)
        masks = masks[:, :, ::-1]
    target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
              "labels": torch.as_tensor(labels, dtype=torch.int64),
              "image_id": int(meta["image_id"]), "image_size": (new_h, new_w), "orig_size": (height, width),
              "key": key}
    if with_masks:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, np.uint8))
    return target


def target_to(target: dict, device) -> dict:
    """The target with its tensors on ``device``."""
    if str(device) == "cpu":
        return target
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}
