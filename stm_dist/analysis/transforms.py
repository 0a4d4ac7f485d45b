"""The invariance views: the original's PIL/torchvision transforms (tools/variance_transforms.py of
OpenGVLab/STM-Evaluation), pixel for pixel, computed once per image for all levels.

Levels are the original's: translation = "jitter strength" 0..64 step 4, pre/post rotation = 0..90
degrees step 5, scale = crop ratio range(200, 2001, 125) / 1000 (0.2 .. 1.95; the original's
range stops before 2.0).

Three deliberate differences from the original, all fixes:
* the jitter direction is drawn from a generator seeded per (seed, image, level), not from the
  unseeded global numpy stream, so results do not depend on the worker count or process split;
* it is drawn from all 8 directions (the original's ``np.random.randint(7)`` never picks the 8th);
* the jitter window is placed relative to torchvision's ``CenterCrop`` position (top =
  ``round((H - s) / 2)``) instead of ``H // 2 - s // 2``, so jitter 0 *is* the standard view:
  the two differ by one pixel when ``H - s`` is odd and ``(H - s) // 2`` is odd.
The rotation and scale views call the very torchvision functions the original calls.

What a translation level is: the offset of the crop window (px, along each axis it moves; the
diagonal directions move both), not the content's displacement. Within the crop margin
((resize - img_size) / 2 on the shorter side: 16 px at 224) the content moves by the offset;
past it the window is cut at the border and the zero padding re-centres it, so the content
moves by about (offset + margin) / 2: 40 px for the largest offset, 64, at 224 px
(`content_shift`, recorded per level).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from stm_dist.data.pil_reader import MEAN, STD

TYPES = ("translation", "pre_rotation", "post_rotation", "scale")
BICUBIC = T.InterpolationMode.BICUBIC

# (dy, dx) per direction, in the original's mode order (rows first, as its center[0]).
DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1))


def levels(kind: str) -> list:
    if kind == "translation":
        return list(range(0, 64 + 1, 4))
    if kind in ("pre_rotation", "post_rotation"):
        return list(range(0, 90 + 1, 5))
    if kind == "scale":
        return [r / 1000 for r in range(200, 2000 + 1, 125)]
    raise ValueError(f"unknown invariance type {kind!r}; choose one of {', '.join(TYPES)}")


def direction(seed: int, index: int, level: int) -> int:
    """The jitter direction (0..7) of image `index` at jitter strength `level`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, index, level, 0x7A5]))
    return int(rng.integers(8))


def jitter_crop(image: torch.Tensor, size: int, strength: int, mode: int) -> torch.Tensor:
    """The original's positon_jitter_crop on a CHW tensor: an s x s window moved `strength`
    pixels in direction `mode`, cut at the image border and zero-padded back to s x s with the
    padding split evenly (the original's rule, so a clipped window is re-centred)."""
    H, W = image.shape[-2:]
    dy, dx = DIRECTIONS[mode]
    top = int(round((H - size) / 2.0)) + dy * strength
    left = int(round((W - size) / 2.0)) + dx * strength
    h = size // 2
    # The original's window is [centre - s//2, centre + s//2), centre = corner + s//2.
    y0, y1 = max(top, 0), min(top + 2 * h, H)
    x0, x1 = max(left, 0), min(left + 2 * h, W)
    # A window wholly outside the image (jitter larger than the image, e.g. 64 px at 32 px) is
    # empty: all padding. The original would slice with a negative end there instead.
    y1, x1 = max(y1, y0), max(x1, x0)
    out = image[:, y0:y1, x0:x1]
    ih, iw = out.shape[-2:]
    pad = [(size - iw) // 2 if size > iw else 0, (size - iw + 1) // 2 if size > iw else 0,
           (size - ih) // 2 if size > ih else 0, (size - ih + 1) // 2 if size > ih else 0]
    return torch.nn.functional.pad(out, pad)


def content_shift(offset: int, size: int, resize_to: int) -> int | None:
    """How far (px) the content of the standard `size` crop moves in the view of a window moved
    `offset` px down (or right) on a side of `resize_to` px (jitter_crop's geometry: the cut
    window is re-centred by its padding). None when the window has left the image. Moving up or
    left mirrors it (one pixel apart at most, where the margin or the padding is odd)."""
    top = int(round((resize_to - size) / 2.0))
    y0 = top + offset
    shown = min(y0 + 2 * (size // 2), resize_to) - y0
    if shown <= 0:
        return None
    return offset - (size - shown) // 2 if size > shown else offset


def level_name(kind: str, img_size: int = 224, crop_pct: float = 0.875) -> str:
    """What a level of `kind` is, in words (the JSON's level_name, the plots' axis)."""
    if kind == "translation":
        margin = int(round((int(img_size / crop_pct) - img_size) / 2.0))
        return (f"crop-window offset (px per axis; the content moves as much only within the {margin} px "
                "crop margin, about (offset + margin) / 2 past it: content_shift_px)")
    return {"pre_rotation": "rotation before the centre crop (degrees)",
            "post_rotation": "rotation after the centre crop (degrees)",
            "scale": "crop ratio (the standard view's crop_pct replaced by it)"}[kind]


class InvarianceViews:
    """image (PIL RGB), index -> (1 + L, 3, s, s) float tensor: the standard view, then one view
    per level. The shared resize (and centre crop) is done once for all levels."""

    def __init__(self, kind: str, img_size: int = 224, crop_pct: float = 0.875, seed: int = 0):
        self.kind, self.size, self.seed, self.crop_pct = kind, int(img_size), int(seed), float(crop_pct)
        self.levels = levels(kind)
        self.resize_to = int(img_size / crop_pct)
        self.norm = T.Normalize(MEAN, STD)

    def standard(self, image):
        """The original's standard_transform (resize the shorter side, centre crop), unnormalised."""
        return TF.center_crop(TF.resize(image, self.resize_to, BICUBIC), self.size)

    def __call__(self, image, index: int) -> torch.Tensor:
        s = self.size
        resized = TF.resize(image, self.resize_to, BICUBIC)
        cropped = TF.center_crop(resized, s)
        views = [TF.to_tensor(cropped)]
        if self.kind == "translation":
            full = TF.to_tensor(resized)
            views += [jitter_crop(full, s, j, direction(self.seed, index, j)) for j in self.levels]
        elif self.kind == "pre_rotation":
            views += [TF.to_tensor(TF.center_crop(TF.rotate(resized, a, BICUBIC), s)) for a in self.levels]
        elif self.kind == "post_rotation":
            views += [TF.to_tensor(TF.rotate(cropped, a, BICUBIC)) for a in self.levels]
        else:
            views += [TF.to_tensor(TF.center_crop(TF.resize(image, int(s / r), BICUBIC), s)) for r in self.levels]
        return torch.stack([self.norm(v) for v in views])
