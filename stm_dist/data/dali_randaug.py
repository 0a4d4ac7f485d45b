"""RandAugment ``rand-m9-mstd0.5-inc1`` (the original's policy) built from DALI's auto_aug pieces.

timm's policy, which the original used, and how this follows it:

* ops: timm's "increasing" set of 15 (AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing,
  SolarizeIncreasing, SolarizeAdd, Color/Contrast/Brightness/SharpnessIncreasing, ShearX/Y,
  TranslateX/YRel) with timm's ranges at magnitude 10: rotate 30 deg, shear 0.3, translate 0.45 of
  the side, enhance factor 1 +- 0.9, posterize down to 0 bits kept (DALI keeps >= 1), solarize
  threshold 256 -> 0, solarize-add 0 -> 110. Sign of geometric/enhance ops is random, as in timm.
* n = 2 ops per image, each applied with probability 0.5 (timm's ``prob``); a skipped op is
  DALI's identity.
* magnitude: timm draws ``gauss(9, 0.5)`` per op and clips to [0, 10]. DALI's ``rand_augment``
  takes one fixed integer bin, so we pass our own per-sample, per-op bins: 41 bins over [0, 10]
  (0.25 apart), bin = round(4 * N(9, 0.5)) clipped to [0, 40]. (DALI tabulates every op's
  parameter for every bin while tracing the graph: 101 bins took ~45 s to build on 2 busy cores.)

Known differences from timm/PIL: warps use bilinear interpolation (DALI's warp ops offer linear
or nearest; timm uses bicubic) and fill with grey 128 (timm fills with the ImageNet mean colour
(124, 116, 104)); enhance/equalize arithmetic follows DALI's kernels, which match PIL's up to
rounding and a 1-pixel border for sharpness.
"""
from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as A
from nvidia.dali.auto_aug.core import select, signed_bin

NUM_BINS = 41  # bins over timm's magnitude scale [0, 10], 0.25 apart
LEVEL_MAX = 10.0


def timm_increasing_suite():
    """The 15 ops of timm's increasing set, plus identity last (used for skipped ops)."""
    return [
        A.auto_contrast,
        A.equalize,
        A.invert,
        A.rotate.augmentation((0, 30), True),
        A.posterize.augmentation((4, 0), False, A.poster_mask_uint8),
        A.solarize.augmentation((256, 0)),
        A.solarize_add.augmentation((0, 110)),
        A.color.augmentation((0, 0.9), True, A.shift_enhance_range),
        A.contrast.augmentation((0, 0.9), True, A.shift_enhance_range),
        A.brightness.augmentation((0, 0.9), True, A.shift_enhance_range),
        A.sharpness.augmentation((0, 0.9), True, A.sharpness_kernel),
        A.shear_x.augmentation((0, 0.3), True),
        A.shear_y.augmentation((0, 0.3), True),
        A.translate_x.augmentation((0, 0.45), True),
        A.translate_y.augmentation((0, 0.45), True),
        A.identity,
    ]


def rand_augment_timm(images, *, img_size: int, n: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                      prob: float = 0.5, seed: int | None = None, interp_type=types.INTERP_LINEAR):
    """Apply the policy to a batch of uint8 HWC images of side ``img_size`` (needs conditionals)."""
    suite = timm_increasing_suite()
    identity = len(suite) - 1
    scale = (NUM_BINS - 1) / LEVEL_MAX
    kw = {} if seed is None else {"seed": seed}
    mag = fn.random.normal(mean=magnitude * scale, stddev=magnitude_std * scale, shape=(n,), **kw)
    bins = fn.cast(dmath.clamp(mag, 0.0, float(NUM_BINS - 1)), dtype=types.INT32)  # cast rounds
    signed = signed_bin(bins, seed=seed, shape=(n,))
    op = fn.random.uniform(values=list(range(identity)), shape=(n,), dtype=types.INT32, **kw)
    apply = fn.cast(fn.random.coin_flip(probability=prob, shape=(n,), **kw), dtype=types.INT32)
    chosen = op * apply + identity * (1 - apply)
    for level in range(n):
        images = select(
            suite,
            chosen[level],
            images,
            magnitude_bin=signed[level],
            num_magnitude_bins=NUM_BINS,
            shape=(img_size, img_size),
            fill_value=128,
            interp_type=interp_type,
        )
    return images
