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
scaled first, inside their window) or decoded (RLE) at the original size and resized
nearest-neighbour.
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


def _scaled_polygons(segm: list, sx: float, sy: float, where: str) -> list[np.ndarray]:
    polys = []
    for poly in segm:
        p = np.array(poly, np.float64)
        if p.ndim != 1 or len(p) < 6 or len(p) % 2:
            raise SampleError(f"{where}: a polygon has {p.size} coordinates (needs >= 6, even)")
        p[0::2] *= sx
        p[1::2] *= sy
        polys.append(p)
    return polys


def rasterise(segm, height: int, width: int, new_h: int, new_w: int, where: str):
    """One annotation's mask at the resized size as (window, x0, y0): the uint8 pixels of the
    part [y0, y0 + rows) x [x0, x0 + cols) of the (new_h, new_w) mask outside of which it is 0.

    Polygons (pixels of the original image) are scaled and rasterised inside their bounding
    window only, shifted by whole pixels (which pycocotools' rasteriser commutes with exactly):
    a full-image mask per instance cost ~1.4 ms at 1333x800, most of a sample's host time.
    RLE is decoded at the original size and resized nearest-neighbour."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        polys = _scaled_polygons(segm, new_w / width, new_h / height, where)
        if not polys:
            return np.zeros((0, 0), np.uint8), 0, 0
        xs = np.concatenate([p[0::2] for p in polys])
        ys = np.concatenate([p[1::2] for p in polys])
        # one pixel of margin beyond the extent, cut to the image (pycocotools clips there too)
        x0, x1 = max(0, int(np.floor(xs.min())) - 1), min(new_w, int(np.ceil(xs.max())) + 1)
        y0, y1 = max(0, int(np.floor(ys.min())) - 1), min(new_h, int(np.ceil(ys.max())) + 1)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0), np.uint8), 0, 0
        for p in polys:
            p[0::2] -= x0
            p[1::2] -= y0
        rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in polys], y1 - y0, x1 - x0))
        return mask_utils.decode(rle), x0, y0
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise SampleError(f"{where}: RLE size {segm['size']} is not the image's [{height}, {width}]")
        rle = segm
        if isinstance(segm["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, height, width)
        m = mask_utils.decode(rle)
        return (_nearest(m, new_h, new_w) if (new_h, new_w) != (height, width) else m), 0, 0
    raise SampleError(f"{where}: segmentation is neither polygons nor RLE ({type(segm).__name__})")


def full_mask(segm, height: int, width: int, new_h: int, new_w: int, where: str = "") -> np.ndarray:
    """The whole (new_h, new_w) mask of one annotation (what :func:`rasterise` windows)."""
    out = np.zeros((new_h, new_w), np.uint8)
    m, x0, y0 = rasterise(segm, height, width, new_h, new_w, where)
    out[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
    return out


def build_target(meta: dict, key: str, new_w: int, new_h: int, flip: int, labels_of: dict, *, drop_crowd: bool,
                 with_masks: bool = True) -> dict:
    """The contract's target dict of one sample resized to (new_w, new_h), flipped if ``flip``."""
    height, width = meta["height"], meta["width"]
    sx, sy = new_w / width, new_h / height
    boxes, labels, kept = [], [], []
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
        kept.append((ann, where))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if flip:
        boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], axis=1)
    if with_masks:
        # zeros is calloc'd: only the windows are written (flipped in place when the image is)
        masks = np.zeros((len(kept), new_h, new_w), np.uint8)
        for n, (ann, where) in enumerate(kept):
            m, x0, y0 = rasterise(ann["segmentation"], height, width, new_h, new_w, where)
            rows, cols = m.shape
            if flip:
                masks[n, y0 : y0 + rows, new_w - x0 - cols : new_w - x0] = m[:, ::-1]
            else:
                masks[n, y0 : y0 + rows, x0 : x0 + cols] = m
    target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
              "labels": torch.as_tensor(labels, dtype=torch.int64),
              "image_id": int(meta["image_id"]), "image_size": (new_h, new_w), "orig_size": (height, width),
              "key": key}
    if with_masks:
        target["masks"] = torch.from_numpy(masks)
    return target


def target_to(target: dict, device) -> dict:
    """The target with its tensors on ``device``."""
    if str(device) == "cpu":
        return target
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}
