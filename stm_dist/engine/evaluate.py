"""Top-1/top-5 evaluation where every validation image counts exactly once across ranks.

Evaluation runs on a plain fp32 copy of the weights on each rank (no collectives per batch),
so ranks with different numbers of validation batches never wait on each other, whatever the
ZeRO stage; the counts are summed once at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device, expected_samples: int | None = None) -> dict:
    was_training = model.training
    model.eval()
    c1 = c5 = n = 0
    loss_sum = 0.0
    for images, labels in loader:
        images = images.to(device, torch.float32, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        c1 += (top[:, 0] == labels).sum().item()
        c5 += (top == labels[:, None]).any(dim=1).sum().item()
        n += labels.numel()
    c1, c5, n, loss_sum = all_reduce_sum([c1, c5, n, loss_sum])
    model.train(was_training)
    n = int(n)
    if expected_samples is not None and n != expected_samples:
        raise RuntimeError(f"evaluation saw {n} images over all ranks, the validation set has {expected_samples}")
    if n == 0:
        raise RuntimeError("evaluation saw no images")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "samples": n}
