"""Effective receptive field (Luo et al. 2016; the RepLKNet recipe): the gradient of the central
pixel of the last stage's output with respect to the input image, summed over images.

As RepLKNet's visualize_erf.py, the objective is relu(central pixel) summed over channels; the
map is |d objective / d input| summed over the 3 input channels and all images. `area_ratio[t]`
is the area / (H W) of the smallest square, centred on the map's centre of mass, that holds a
fraction >= t of the map's total. The centre of mass, not the image centre: the central output
pixel of a stride-32 stack of 3x3/stride-2 convs looks at input pixel 32 i (at 224 px the 7x7
map's pixel 3 is centred on 96, not 112), so an image-centred square would also count that offset. RepLKNet measures that on a log10(1 + x) rescaled map; we
measure the raw contributions (what "fraction of the total contribution" says) and use the log
scale only for the picture.
"""
from __future__ import annotations

import numpy as np
import torch

from .runner import ValImages, gather_batches, progress

THRESHOLDS = ("0.2", "0.3", "0.5", "0.99")


def last_stage(model):
    """The feature map whose central pixel the ERF follows: the last stage's output (after its
    stage norm) of a unified model; any module returning a NCHW map is used as it is."""
    return (lambda x: model.forward_stages(x)[-1]) if hasattr(model, "forward_stages") else model


def batch_map(feature_fn, images: torch.Tensor) -> np.ndarray:
    """(H, W) float64: summed |gradient| of relu(central pixel) over this batch's images."""
    x = images.detach().clone().requires_grad_(True)
    out = feature_fn(x)
    h, w = out.shape[-2:]
    central = torch.relu(out[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(central, x)
    return grad.abs().double().sum(dim=(0, 1)).cpu().numpy()


def area_ratio(erf: np.ndarray, thresh: float) -> float:
    """Area (fraction of H x W) of the smallest square around the centre of mass holding
    >= thresh of the total (cut at the image border)."""
    H, W = erf.shape
    total = float(erf.sum())
    if total <= 0:
        raise RuntimeError("the effective receptive field is all zeros (no gradient reaches the input)")
    cy = int(round(float((erf.sum(1) * np.arange(H)).sum()) / total))
    cx = int(round(float((erf.sum(0) * np.arange(W)).sum()) / total))
    # cumulative sums make each square's sum O(1)
    c = np.pad(erf.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    for r in range(max(H, W)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, H), max(cx - r, 0), min(cx + r + 1, W)
        s = c[y1, x1] - c[y0, x1] - c[y1, x0] + c[y0, x0]
        if s >= thresh * total * (1 - 1e-12):
            return (y1 - y0) * (x1 - x0) / (H * W)
    return 1.0


def run_erf(model, data: ValImages, rank: int = 0) -> dict:
    feature_fn = last_stage(model)
    results = {}
    with progress(data.my_images, "erf", rank) as bar:
        for b, _, images, _ in data:
            results[b] = batch_map(feature_fn, images)
            bar.update(len(images))
    parts = gather_batches(results)
    erf = np.zeros_like(parts[0])
    for p in parts:  # batch order: the same sum whatever the process count
        erf += p
    return {"num_images": data.num_images, "map": erf,
            "area_ratio": {t: area_ratio(erf, float(t)) for t in THRESHOLDS}}
