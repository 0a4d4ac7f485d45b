"""Invariance to translation, rotation (before or after the centre crop) and scale: the
original's evaluate_invariance, exact-once over any number of processes.

Per level, over all images: top-1 / top-5 against the label, consistency (% of images whose
transformed view gets the standard view's top-1 class) and the soft cross-entropy of the
transformed view's logits to the softmax of the standard view's (timm SoftTargetCrossEntropy).

Precision: the model runs in fp32. The original's evaluation (shell/eval/invariance_eval.sh,
--use_amp true) ran under torch.cuda.amp.autocast, fp16: predictions near a tie can differ from
it, so compare the curves, not the last decimal. Translation levels are crop-window offsets, not
content displacements (transforms.py); each level records `content_shift_px`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .runner import ValImages, gather_per_image, progress
from .transforms import InvarianceViews, content_shift, level_name

PRECISION_NOTE = ("fp32 throughout; the original's evaluation ran under torch.cuda.amp.autocast (AMP, fp16 "
                  "on the GPU): predictions near a tie may differ")


def _per_image(model, views: torch.Tensor, labels: torch.Tensor) -> dict:
    """views (B, 1 + L, 3, s, s) -> per-image arrays of shape (B, 1 + L); column 0 = standard."""
    B, V = views.shape[:2]
    logits = model(views.flatten(0, 1)).float().view(B, V, -1)
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices                         # (B, V, k)
    pred = top[:, 0, 0]                                          # standard view's class
    target = F.softmax(logits[:, 0], dim=-1)                     # (B, C)
    loss = -(target[:, None] * F.log_softmax(logits, dim=-1)).sum(-1)
    return {"acc1": (top[..., 0] == labels[:, None]).cpu().numpy(),
            "acc5": (top == labels[:, None, None]).any(-1).cpu().numpy(),
            "consistency": (top[..., 0] == pred[:, None]).cpu().numpy(),
            "loss": loss.double().cpu().numpy()}


@torch.no_grad()
def run_invariance(model, data: ValImages, views: InvarianceViews, rank: int = 0) -> dict:
    results = {}
    with progress(data.my_images, f"invariance {views.kind}", rank) as bar:
        for b, _, images, labels in data:
            results[b] = _per_image(model, images, labels)
            bar.update(len(labels))
    cols = gather_per_image(results, data.num_images, "invariance")
    n = data.num_images

    def pct(a):
        return 100.0 * int(a.sum()) / n

    out_levels = []
    for j, level in enumerate(views.levels, start=1):
        shift = {"content_shift_px": content_shift(level, views.size, views.resize_to)} \
            if views.kind == "translation" else {}
        out_levels.append({"level": level, **shift, "acc1": pct(cols["acc1"][:, j]), "acc5": pct(cols["acc5"][:, j]),
                           "consistency": pct(cols["consistency"][:, j]),
                           # fsum: exactly rounded, so the total does not depend on summation order
                           "loss": math.fsum(cols["loss"][:, j].tolist()) / n})
    return {"type": views.kind, "num_images": n, "level_name": level_name(views.kind, views.size, views.crop_pct),
            "precision": "fp32", "precision_note": PRECISION_NOTE,
            "standard": {"acc1": pct(cols["acc1"][:, 0]), "acc5": pct(cols["acc5"][:, 0])},
            "levels": out_levels}
