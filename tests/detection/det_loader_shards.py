"""Tiny detection shards written by hand in the shard contract's format (tar of <key>.jpg +
<key>.json, DALI index, manifest with task/categories), whose objects are known exactly: white
shapes on a dark noisy ground, so a test can find an object's pixels in the decoded image.

Objects: a polygon (category 3 -> label 1), a blob given as uncompressed RLE (category 7 ->
label 2), and a crowd region that is not drawn (dropped in training). Images come in landscape
and portrait sizes, so the aspect grouping has two groups to keep apart.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from data_tools.tar_index import HashingFd, ShardWriter

CATEGORIES = [{"id": 3, "name": "polygon"}, {"id": 7, "name": "blob"}]
LANDSCAPE = [(64, 48), (72, 40), (56, 56), (80, 52)]
PORTRAIT = [(40, 64), (48, 72), (44, 60)]


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    if counts and counts[0] == 0 and flat[0] == 0:
        counts = counts[1:]
    return {"size": list(mask.shape), "counts": counts}


def make_sample(rng: np.random.Generator, image_id: int, width: int, height: int) -> tuple[bytes, dict]:
    img = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    # Polygon in the first half (left, or top for a portrait), blob (an ellipse) in the second.
    wide = width >= height
    x0 = rng.uniform(2, (width / 2 if wide else width) - 20)
    y0 = rng.uniform(2, (height if wide else height / 2) - 22)
    poly = [x0, y0, x0 + rng.uniform(14, 18), y0 + rng.uniform(0, 4), x0 + rng.uniform(4, 10), y0 + rng.uniform(16, 20)]
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).polygon(poly, fill=(255, 255, 255))
    img = np.asarray(pil).copy()
    cx = rng.uniform(width / 2 + 9 if wide else 10, width - 10)
    cy = rng.uniform(10 if wide else height / 2 + 9, height - 10)
    rx, ry = rng.uniform(5, 8), rng.uniform(5, 8)
    yy, xx = np.mgrid[:height, :width]
    blob = (((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1).astype(np.uint8)
    img[blob > 0] = 255
    ys, xs = np.nonzero(blob)
    px, py = poly[0::2], poly[1::2]
    anns = [
        {"id": image_id * 10 + 1, "category_id": 3, "iscrowd": 0, "segmentation": [poly],
         "bbox": [min(px), min(py), max(px) - min(px), max(py) - min(py)],
         "area": float((max(px) - min(px)) * (max(py) - min(py)) / 2)},
        {"id": image_id * 10 + 2, "category_id": 7, "iscrowd": 0, "segmentation": _rle(blob),
         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())],
         "area": float(blob.sum())},
        {"id": image_id * 10 + 3, "category_id": 3, "iscrowd": 1, "segmentation": _rle(np.ones_like(blob)),
         "bbox": [0.0, 0.0, float(width), float(height)], "area": float(width * height)},
    ]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    meta = {"image_id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width,
            "annotations": anns}
    return buf.getvalue(), meta


def write_split(out: str, split: str, n: int, seed: int = 0, per_shard: int = 7, truncate=()) -> dict:
    """``n`` samples (sizes cycling through the landscape and portrait lists) in shards of
    ``per_shard``, the JPEGs of the sample numbers in ``truncate`` cut to half (damaged data
    that `stm-shards create` would have refused); returns the manifest (also at out/split.json)."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = LANDSCAPE + PORTRAIT
    samples = [make_sample(rng, 1000 * (seed + 1) + k, *sizes[k % len(sizes)]) for k in range(n)]
    samples = [(jpg[: len(jpg) // 2] if k in truncate else jpg, meta) for k, (jpg, meta) in enumerate(samples)]
    shards, images = [], []
    for s, lo in enumerate(range(0, n, per_shard)):
        name = f"{split}-{s:06d}"
        fd = os.open(os.path.join(out, name + ".tar"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        w = ShardWriter(HashingFd(fd))
        for jpg, meta in samples[lo : lo + per_shard]:
            w.add_sample(f"s{meta['image_id']}", [("jpg", jpg), ("json", json.dumps(meta).encode())])
            images.append(meta)
        size = w.finish()
        os.close(fd)
        with open(os.path.join(out, name + ".idx"), "w") as f:
            f.write(w.index_text())
        shards.append({"name": name + ".tar", "index_file": name + ".idx", "samples": len(w.samples), "bytes": size,
                       "sha256": w.f.sha256.hexdigest()})
    gt = {"images": [{k: m[k] for k in ("id", "file_name", "height", "width") if k in m} | {"id": m["image_id"]}
                     for m in images],
          "annotations": [dict(a, image_id=m["image_id"]) for m in images for a in m["annotations"]],
          "categories": CATEGORIES}
    with open(os.path.join(out, f"{split}_annotations.json"), "w") as f:
        json.dump(gt, f)
    man = {"format": "stm-shards/1", "split": split, "task": "detection", "num_samples": n,
           "num_classes": len(CATEGORIES), "categories": CATEGORIES, "annotations": f"{split}_annotations.json",
           "shards": shards}
    with open(os.path.join(out, f"{split}.json"), "w") as f:
        json.dump(man, f)
    return man
