"""The analyses' command-line values, checked without importing torch: bad input is named in one
line within a fraction of a second, before any model or data is loaded."""
from __future__ import annotations

import fractions
import os

DEFAULT_EPS = ("0", "1/255", "2/255", "4/255")

# The ERF's default input size, RepLKNet's. At 224 px the last stage of a stride-32 model is 7 x 7
# and the fields of most mixers reach the image border, so the 99% square is ~ the whole image for
# all of them and the comparison loses its power; at 1024 px (32 x 32) the fields stay inside. It
# has ~21x the pixels and FLOPs of 224 px (measured on one busy CPU thread, micro models of all
# five mixers: 3-11 s per image at 1024 px, 0.1-0.2 s at 224), affordable for the 50 images of
# the recipe on a GPU; we keep the published size, so the statistic compares with RepLKNet's table.
ERF_IMG_SIZE = 1024
ERF_BATCH = 8  # images per batch at 1024 px: activations with gradients of a base model fit a GPU


class AnalysisError(ValueError):
    """Bad input to an analysis (the message names it)."""


def parse_eps(text: str, what: str = "--eps") -> float:
    """'1/255', '0.004' or '0' -> float in [0, 1]; AnalysisError naming the value otherwise."""
    try:
        v = float(fractions.Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise AnalysisError(f"{what}: {text!r} is not a number or a fraction like 1/255") from None
    if not 0.0 <= v <= 1.0:
        raise AnalysisError(f"{what}: {text!r} is outside [0, 1] (pixels are in [0, 1])")
    return v


def check(args) -> dict:
    """Validate parsed stm-analyze arguments; return the parsed extras (eps list, step size)."""
    from stm_dist.data.manifest import read_manifest

    positive = [("--img-size", args.img_size, 8), ("--batch", args.batch, 1)]
    if args.limit is not None:
        positive.append(("--limit", args.limit, 1))
    if args.analysis == "erf":
        positive.append(("--images", args.images, 1))
    if args.analysis == "robustness":
        positive.append(("--pgd-steps", args.pgd_steps, 1))
    for name, value, low in positive:
        if value < low:
            raise AnalysisError(f"{name} must be >= {low}, got {value}")
    if not 0 < args.crop_pct <= 1:
        raise AnalysisError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    out = {}
    if args.analysis == "robustness":
        out["eps"] = [parse_eps(e) for e in (args.eps or DEFAULT_EPS)]
        out["step_size"] = None if args.pgd_step_size is None else parse_eps(args.pgd_step_size, "--pgd-step-size")
    if args.checkpoint != "random" and not os.path.exists(args.checkpoint):
        raise AnalysisError(f"checkpoint not found: {args.checkpoint}")
    out["manifest"] = read_manifest(args.data, args.split)
    return out
