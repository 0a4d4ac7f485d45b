"""A small real instance-segmentation set in the COCO layout: handwritten digits on photographs.

Objects are scikit-learn's 8x8 handwritten digits (real, 1,797 of them), upscaled bicubically to
``digit_sizes`` pixels and pasted in a colour that stands out from the spot they land on, onto
crops of the real photographs and textures scikit-image ships inside its package (no download).
Categories "0".."9" have ids 1..10. A digit's mask is its upscaled strokes thresholded at half
intensity; the paste is blended with an alpha that crosses 1/2 exactly on that threshold, so
the mask is what a viewer sees. Later digits may cover earlier ones (up to ``max_hidden`` of each
earlier digit's own area): masks, boxes and areas are those of the visible part, and a digit
hidden entirely is dropped. Masks are stored as compressed RLE (digits like 0, 6, 8 have holes,
which COCO polygons cannot express); boxes are the visible mask's tight box.

Train digits come from the classification demo's train split and val digits from its val split
(data_tools/demo_data.py), so a backbone pretrained on the classification demo never saw a val
digit. Every image is drawn from (seed, split, image index) alone: the same seed gives the same
files, and asking for more images keeps the earlier ones.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
from PIL import Image

# skimage.data images that ship inside the package (checked offline); text-like ones left out
# (printed characters would be unlabelled digit look-alikes).
BACKGROUNDS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
               "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
# What `stm-shards demo-coco` writes unless told otherwise, and what `make demo-detection` trains on
# (stm_dist/cli/demo_detection.py says why each value).
DEFAULTS = {"train_images": 400, "val_images": 100, "min_digits": 3, "max_digits": 6, "min_size": 32,
            "max_size": 80, "min_canvas": 192, "max_canvas": 288, "max_hidden": 0.25}
SPLITS = (("train", 0), ("val", 1_000_000))  # split name, offset of its image and annotation ids
JPEG_QUALITY = 90
_BG_SIDE = 512  # backgrounds are cut down to this once: crops then resize small images


def _backgrounds() -> list[np.ndarray]:
    import skimage.data

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in BACKGROUNDS:
            a = np.asarray(getattr(skimage.data, name)())
            if a.dtype == bool:
                a = a.astype(np.uint8) * 255
            im = Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB")
            im.thumbnail((_BG_SIDE, _BG_SIDE), Image.BICUBIC)
            out.append(np.asarray(im))
    return out


def _digit_pools():
    """(train digits, val digits): (images in [0, 1], labels), the classification demo's split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from data_tools.demo_data import VAL_SIZE

    d = load_digits()
    idx = np.arange(len(d.images))
    tr, va = train_test_split(idx, test_size=VAL_SIZE, stratify=d.target, random_state=0)
    return {s: (d.images[np.sort(ids)] / 16.0, d.target[np.sort(ids)]) for s, ids in (("train", tr), ("val", va))}


def _canvas(rng, backgrounds, w: int, h: int) -> np.ndarray:
    bg = Image.fromarray(backgrounds[rng.integers(len(backgrounds))])
    # A random window of the photo (at most all of it) stretched to the canvas: resampling only
    # the window keeps this cheap.
    scale = max(w / bg.width, h / bg.height) * rng.uniform(1.0, 1.6)
    cw, ch = min(bg.width, w / scale), min(bg.height, h / scale)
    x, y = rng.uniform(0, bg.width - cw), rng.uniform(0, bg.height - ch)
    a = np.asarray(bg.resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch)), np.float32)
    return a[:, ::-1] if rng.random() < 0.5 else a


def _digit(rng, image: np.ndarray, size: int):
    """(alpha, mask) of one digit at ``size`` px: mask = strokes >= 1/2, alpha = 1/2 on its edge."""
    v = np.asarray(Image.fromarray(image.astype(np.float32), "F").resize((size, size), Image.BICUBIC))
    return np.clip((v - 0.5) * 4.0 + 0.5, 0.0, 1.0), v >= 0.5


def _colour(rng, patch: np.ndarray) -> np.ndarray:
    """A colour far in brightness from the photo under the digit, so every digit can be seen."""
    lum = float(patch.mean())
    base = rng.uniform(0.0, 1.0, 3)
    return (base * 70.0) if lum > 128 else (185.0 + base * 70.0)


def _place(rng, ids, areas, mask, w, h, max_hidden, tries=20):
    """Top-left corner for a digit mask that hides at most ``max_hidden`` of any earlier digit."""
    s = mask.shape[0]
    for _ in range(tries):
        x, y = int(rng.integers(w - s + 1)), int(rng.integers(h - s + 1))
        under = ids[y : y + s, x : x + s][mask]
        hidden = np.bincount(under[under >= 0], minlength=len(areas))
        visible = np.bincount(ids[ids >= 0], minlength=len(areas))
        if all(hidden[k] == 0 or visible[k] - hidden[k] >= (1.0 - max_hidden) * areas[k] for k in range(len(areas))):
            return x, y
    return None


def _compose(rng, backgrounds, digits, labels, cfg):
    """One image: (RGB uint8 array, [(category_id, visible mask)], hidden digits dropped)."""
    w, h = (int(rng.integers(cfg["canvas_sizes"][0], cfg["canvas_sizes"][1] + 1)) for _ in range(2))
    img = _canvas(rng, backgrounds, w, h)
    ids = np.full((h, w), -1, np.int32)  # which digit each pixel shows (-1: the photo)
    cats, areas = [], []
    for _ in range(int(rng.integers(cfg["min_digits"], cfg["max_digits"] + 1))):
        k = int(rng.integers(len(digits)))
        size = int(rng.integers(cfg["digit_sizes"][0], min(cfg["digit_sizes"][1], w, h) + 1))
        alpha, mask = _digit(rng, digits[k], size)
        if not mask.any():
            continue
        at = _place(rng, ids, areas, mask, w, h, cfg["max_hidden"])
        if at is None:
            continue
        x, y = at
        region = img[y : y + size, x : x + size]
        colour = _colour(rng, region[mask])
        region *= 1.0 - alpha[..., None]
        region += alpha[..., None] * colour
        ids[y : y + size, x : x + size][mask] = len(cats)
        cats.append(int(labels[k]) + 1)
        areas.append(int(mask.sum()))
    objects = [(c, ids == k) for k, c in enumerate(cats)]
    kept = [(c, m) for c, m in objects if m.any()]
    return np.clip(img.round(), 0, 255).astype(np.uint8), kept, len(objects) - len(kept)


def write_demo_coco(out: str, *, train_images: int = DEFAULTS["train_images"], val_images: int = DEFAULTS["val_images"],
                    seed: int = 0, min_digits: int = DEFAULTS["min_digits"], max_digits: int = DEFAULTS["max_digits"],
                    digit_sizes=(DEFAULTS["min_size"], DEFAULTS["max_size"]),
                    canvas_sizes=(DEFAULTS["min_canvas"], DEFAULTS["max_canvas"]),
                    max_hidden: float = DEFAULTS["max_hidden"]) -> dict:
    """Write ``out/{train,val}/*.jpg`` and ``out/annotations/instances_{train,val}.json``."""
    from pycocotools import mask as mask_utils

    if not (1 <= min_digits <= max_digits):
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not (8 <= digit_sizes[0] <= digit_sizes[1] <= canvas_sizes[0] <= canvas_sizes[1]):
        raise ValueError(f"need 8 <= digit sizes {digit_sizes} <= canvas sizes {canvas_sizes}")
    if not 0.0 <= max_hidden <= 1.0:
        raise ValueError(f"max_hidden must be in [0, 1], got {max_hidden}")
    cfg = dict(min_digits=min_digits, max_digits=max_digits, digit_sizes=digit_sizes, canvas_sizes=canvas_sizes,
               max_hidden=max_hidden)
    backgrounds, pools = _backgrounds(), _digit_pools()
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    counts = {}
    for split_no, ((split, offset), n) in enumerate(zip(SPLITS, (train_images, val_images))):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, anns, hidden = [], [], 0
        for i in range(n):
            rng = np.random.default_rng([seed, split_no, i])
            pixels, objects, dropped = _compose(rng, backgrounds, *pools[split], cfg)
            hidden += dropped
            image_id = offset + i + 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(os.path.join(out, split, name), format="JPEG", quality=JPEG_QUALITY)
            images.append({"id": image_id, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
            for cat, m in objects:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                anns.append({"id": offset + len(anns) + 1, "image_id": image_id, "category_id": cat,
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(m.sum()),
                             "iscrowd": 0, "segmentation": {"size": [int(v) for v in rle["size"]],
                                                            "counts": rle["counts"].decode("ascii")}})
        gt = {"info": {"description": "stm-dist demo: scikit-learn digits on scikit-image photos", "seed": seed},
              "licenses": [], "images": images, "annotations": anns, "categories": categories}
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(gt, f, separators=(",", ":"))
        counts[split] = {"images": len(images), "annotations": len(anns), "dropped_hidden": hidden}
    return counts
