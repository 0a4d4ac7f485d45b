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
from nvidia.dali.auto_aug import augmentations as A
from nvidia.dali.auto_aug.core import select
from nvidia.dali.pipeline import do_not_convert

NUM_BINS = 41  # bins over timm's magnitude scale [0, 10], 0.25 apart


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


def apply_rand_augment(images, ops, signed_bins, *, img_size: int, n: int = 2, interp_type=types.INTERP_LINEAR):
    """Apply the policy to a batch of uint8 HWC images of side ``img_size`` (needs conditionals).

    ``ops``: (n,) int32 per sample, the op of each of the n levels, identity (15) for a skipped op;
    ``signed_bins``: ``signed_bin(bins, random_sign=signs)`` of (n,) magnitude bins and signs. Both
    are drawn on the host per sample (epoch_plan.sample_augment): timm's gauss(9, 0.5) magnitude
    per op clipped to [0, 10], prob 0.5 per op, a random sign for the signed ops."""
    # Each op is applied as plain Python while the graph is traced: DALI's autograph would
    # otherwise convert every op's call and, one call at a time, each of the ~1,700 host-side
    # magnitude -> parameter evaluations of the tables the ops build (~70% of tracing the policy,
    # ~7 of 10 s on an idle core, paid by every rank of every run). The batch is split among the
    # ops by `select` (converted: it branches on data) and by each DALI operator on its inputs,
    # whether its caller was converted or not; an op's own code branches on no data. So the
    # graph is the one the converted ops build (tests/data/test_dali_randaug.py compares them).
    suite = [do_not_convert(op) for op in timm_increasing_suite()]
    for level in range(n):
        images = select(
            suite,
            ops[level],
            images,
            magnitude_bin=signed_bins[level],
            num_magnitude_bins=NUM_BINS,
            shape=(img_size, img_size),
            fill_value=128,
            interp_type=interp_type,
        )
    return images

