"""Batch-level augmentation on the batch's device: random erasing, then mixup/cutmix -> soft targets.

Both come from timm (the original used timm 0.6.7's): ``RandomErasing(p, mode='pixel', count 1)``
per image (the original erased per sample inside the dataset; same distribution), then
``Mixup(mixup 0.8, cutmix 1.0, prob 1, switch 0.5, mode 'batch', smoothing 0.1)``. With mixup and
cutmix off, targets are the (label-smoothed) one-hot vectors, so the loss is always soft-target CE.
"""
from __future__ import annotations

import torch


class BatchAugment:
    def __init__(self, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
                 reprob: float = 0.25, *, num_classes: int, mixup_prob: float = 1.0, mode: str = "batch"):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.smoothing = num_classes, smoothing
        self.erase = RandomErasing(probability=reprob, mode="pixel", max_count=1, device="cpu") if reprob > 0 else None
        self.mix = None
        if mixup > 0 or cutmix > 0:
            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                             mode=mode, label_smoothing=smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"BatchAugment wants NCHW images, got shape {tuple(images.shape)}")
        if labels.device.type == "cpu":
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels outside [0, {self.num_classes}): min {int(labels.min())}, "
                                 f"max {int(labels.max())}")
        else:  # on a GPU, checked without waiting for the device (fails at the next sync)
            torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                                f"labels outside [0, {self.num_classes})")
        if self.erase is not None:
            self.erase.device = images.device  # pixel-mode noise is drawn where the batch lives
            images = self.erase(images)
        if self.mix is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix in batch mode needs an even batch size, got {images.shape[0]}")
            return self.mix(images, labels)
        off = self.smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=images.device)
        targets.scatter_(1, labels.view(-1, 1), 1.0 - self.smoothing + off)
        return images, targets
