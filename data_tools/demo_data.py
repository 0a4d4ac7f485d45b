"""A small real data set in the ImageNet layout: scikit-learn's handwritten digits.

1,797 real 8x8 grey digits (10 classes), stratified 1,497 / 300 train/val split (seed 0),
upscaled bicubically to ``size`` pixels and saved as RGB JPEG (quality 95), with
``meta/train.txt`` and ``meta/val.txt`` listing ``<class>/<file>.JPEG <label>``.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

VAL_SIZE = 300


def write_demo_source(out: str, size: int = 32, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, va = train_test_split(idx, test_size=VAL_SIZE, stratify=digits.target, random_state=seed)
    os.makedirs(os.path.join(out, "meta"), exist_ok=True)
    counts = {}
    for split, ids in (("train", sorted(tr)), ("val", sorted(va))):
        lines = []
        for i in ids:
            label = int(digits.target[i])
            rel = f"{label}/digit_{i:04d}.JPEG"
            path = os.path.join(out, split, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            img = Image.fromarray(images[i], "L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(path, format="JPEG", quality=95)
            lines.append(f"{rel} {label}")
        with open(os.path.join(out, "meta", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        counts[split] = len(lines)
    return counts
