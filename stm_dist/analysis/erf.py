"""Effective receptive field (Luo et al. 2016; the RepLKNet recipe): the gradient of the central
pixel of the last stage's output with respect to the input image, over many images.

What we compute, exactly:

* input: each validation image resized as a whole to S x S (bicubic, aspect not kept, no crop),
  as RepLKNet's visualize_erf.py; S defaults to its 1024 px (ERF_IMG_SIZE, see there why);
* objective: relu(central pixel of the last stage's output) summed over channels (RepLKNet's),
  central = (h // 2, w // 2) of the h x w output;
* two maps of d objective / d input, summed over the 3 input channels:
  `map` (erf_map.npy)  |gradient|, summed over the images;
  `map_relu`           relu(gradient), averaged over the images (RepLKNet's contribution scores).

Two statistics, each at t = 0.2, 0.3, 0.5, 0.99:

* `area_ratio` (ours): area / (H W) of the smallest square, centred on the |gradient| map's
  centre of mass, whose share of the raw map's total is >= t (side 1, 2, 3, ... cut at the
  border; 1.0 when only the whole image holds it). Raw contributions, because "a fraction of
  the total contribution" is what the threshold says; the centre of mass, because the central
  output pixel of a stride-32 stack of 3x3/stride-2 convs looks at input pixel 32 i, not at the
  image centre (at 224 px the 7x7 map's pixel 3 is centred on 96, not 112).
* `replknet_area_ratio` (RepLKNet's analyze_erf.py, as published): the relu map rescaled to
  log10(x + 1) and divided by its maximum; squares of side 2i + 1, i = 1 .. H // 2 - 1, centred on
  the image pixel (H // 2, W // 2); the first whose share is strictly greater than t (`>`); its
  side in `replknet_side`. None where no such square exists (RepLKNet never tries the whole
  image; its script fails there).

The log scale compresses the strong centre and lifts the faint tail, so RepLKNet's ratios are
larger than ours for the same field; they are comparable with RepLKNet's published table only
at its 1024 px.
"""
from __future__ import annotations

import numpy as np
import torch

from .runner import ValImages, gather_batches, progress

THRESHOLDS = ("0.2", "0.3", "0.5", "0.99")

from .options import ERF_BATCH, ERF_IMG_SIZE  # noqa: F401  (the defaults; why: see there)

DEFINITIONS = {
    "area_ratio": "ours: |gradient| of relu(central output pixel) w.r.t. the input, summed over channels "
                  "and images; area / (H W) of the smallest square centred on the map's centre of mass "
                  "holding >= t of the raw total",
    "replknet_area_ratio": "RepLKNet (analyze_erf.py): relu(gradient) averaged over images, log10(x + 1), "
                           "divided by its max; area / (H W) of the first square of side 3, 5, ... centred on "
                           "the image whose share is > t; null: no square short of the whole image",
}


def erf_transform(size: int):
    """PIL image -> normalised (3, size, size) tensor: RepLKNet's resize of the whole image."""
    from torchvision import transforms as T

    from stm_dist.data.pil_reader import MEAN, STD

    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def last_stage(model):
    """The feature map whose central pixel the ERF follows: the last stage's output (after its
    stage norm) of a unified model; any module returning a NCHW map is used as it is."""
    return (lambda x: model.forward_stages(x)[-1]) if hasattr(model, "forward_stages") else model


def batch_map(feature_fn, images: torch.Tensor) -> dict:
    """{"abs": summed |gradient|, "relu": summed relu(gradient)}, (H, W) float64 each, of
    relu(central pixel) over this batch's images (images do not interact in eval mode)."""
    x = images.detach().clone().requires_grad_(True)
    out = feature_fn(x)
    h, w = out.shape[-2:]
    central = torch.relu(out[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(central, x)
    grad = grad.double()
    return {"abs": grad.abs().sum(dim=(0, 1)).cpu().numpy(), "relu": grad.relu().sum(dim=(0, 1)).cpu().numpy()}


def _square_sums(m: np.ndarray):
    """Integral image: the sum of m[y0:y1, x0:x1] in O(1)."""
    c = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return lambda y0, y1, x0, x1: c[y1, x1] - c[y0, x1] - c[y1, x0] + c[y0, x0]


def area_ratio(erf: np.ndarray, thresh: float) -> float:
    """Ours: area (fraction of H x W) of the smallest square around the centre of mass holding
    >= thresh of the total (cut at the image border)."""
    H, W = erf.shape
    total = float(erf.sum())
    if total <= 0:
        raise RuntimeError("the effective receptive field is all zeros (no gradient reaches the input)")
    cy = int(round(float((erf.sum(1) * np.arange(H)).sum()) / total))
    cx = int(round(float((erf.sum(0) * np.arange(W)).sum()) / total))
    square = _square_sums(erf)
    for r in range(max(H, W)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, H), max(cx - r, 0), min(cx + r + 1, W)
        if square(y0, y1, x0, x1) >= thresh * total * (1 - 1e-12):
            return (y1 - y0) * (x1 - x0) / (H * W)
    return 1.0


def replknet_area_ratio(contributions: np.ndarray, thresh: float):
    """RepLKNet's statistic of its mean relu-gradient map: (side, area ratio) or None (module doc)."""
    H, W = contributions.shape
    data = np.log10(np.asarray(contributions, dtype=np.float64) + 1)
    if data.max() <= 0:
        raise RuntimeError("the effective receptive field is all zeros (no gradient reaches the input)")
    data = data / data.max()
    total, square = float(data.sum()), _square_sums(data)
    for i in range(1, H // 2):
        side = 2 * i + 1
        y0, x0 = H // 2 - i, W // 2 - i
        if square(y0, y0 + side, x0, x0 + side) / total > thresh:
            return side, side / H * side / W
    return None


def run_erf(model, data: ValImages, rank: int = 0) -> dict:
    feature_fn = last_stage(model)
    results = {}
    with progress(data.my_images, "erf", rank) as bar:
        for b, _, images, _ in data:
            results[b] = batch_map(feature_fn, images)
            bar.update(len(images))
    parts = gather_batches(results)
    erf, relu = np.zeros_like(parts[0]["abs"]), np.zeros_like(parts[0]["relu"])
    for p in parts:  # batch order: the same sum whatever the process count
        erf += p["abs"]
        relu += p["relu"]
    relu /= data.num_images  # RepLKNet averages: the +1 of its log10(x + 1) sees the mean
    replknet = {t: replknet_area_ratio(relu, float(t)) for t in THRESHOLDS}
    return {"num_images": data.num_images, "map": erf, "map_relu": relu,
            "area_ratio": {t: area_ratio(erf, float(t)) for t in THRESHOLDS},
            "replknet_area_ratio": {t: None if v is None else v[1] for t, v in replknet.items()},
            "replknet_side": {t: None if v is None else v[0] for t, v in replknet.items()},
            "definitions": dict(DEFINITIONS)}
