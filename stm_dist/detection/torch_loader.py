"""A torch/PIL backend of the detection loaders: the same plan, choices and targets as the DALI
one (loader.py), with the pixels made by PIL decode + torch bilinear resize in DataLoader
workers. The reference DALI is checked against, and a fallback where DALI is not installed.

Pixels follow the DALI graph step for step: decode (PIL, libjpeg), bilinear resize without
antialiasing by pixel centres, rounded to uint8 as DALI's resize outputs, mirror, normalise,
zero-pad to the batch's largest size rounded up to ``size_divisor``.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from stm_dist.data.plan_loader import PlanTrainLoader
from stm_dist.detection.input_pipeline import DetSamples
from stm_dist.detection.loader import DetTrainLoader, DetValLoader
from stm_dist.detection.transforms import draw_choices, target_to

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255


def render(jpg: np.ndarray, new_w: int, new_h: int, flip: int) -> torch.Tensor:
    """float32 (3, new_h, new_w): the DALI graph's image before padding."""
    with Image.open(io.BytesIO(jpg.tobytes())) as im:
        x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (new_h, new_w):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                            antialias=False)
    x = x[0].round_().clamp_(0, 255)
    if flip:
        x = x.flip(-1)
    return (x - MEAN) / STD


def pad_batch(images: list, size_divisor: int) -> torch.Tensor:
    h = math.ceil(max(im.shape[1] for im in images) / size_divisor) * size_divisor
    w = math.ceil(max(im.shape[2] for im in images) / size_divisor) * size_divisor
    out = torch.zeros(len(images), 3, h, w)
    for n, im in enumerate(images):
        out[n, :, : im.shape[1], : im.shape[2]] = im
    return out


class _Samples(torch.utils.data.Dataset):
    """Items (sample, epoch or None): None = the val view (no flip, crowd kept)."""

    def __init__(self, samples: DetSamples, seed, scales, flip_prob, with_masks=True):
        self.samples, self.seed, self.scales, self.flip_prob = samples, seed, scales, flip_prob
        self.with_masks = with_masks

    def __len__(self):
        return len(self.samples.table)

    def __getitem__(self, item):
        i, epoch = item
        if epoch is None:
            s, flip = 0, 0
        else:
            s, flip = draw_choices(self.seed, epoch, i, len(self.scales), self.flip_prob)
        jpg, new_w, new_h, target = self.samples.view(i, self.scales[s], flip, drop_crowd=epoch is not None,
                                                      with_masks=self.with_masks)
        return render(jpg, new_w, new_h, flip), target


class _Collate:
    def __init__(self, size_divisor):
        self.size_divisor = size_divisor

    def __call__(self, batch):
        return pad_batch([b[0] for b in batch], self.size_divisor), [b[1] for b in batch]


class _PlanItems:
    """This rank's (sample, epoch) stream through the plan from a position, across epoch ends."""

    def __init__(self, loader, epoch, step, micro):
        self.ld, self.start = loader, (epoch, step, micro)

    def __iter__(self):
        return self.ld.positions(*self.start)


def _data_loader(dataset, items, batch_size, num_threads, size_divisor):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=max(0, num_threads),
                                       collate_fn=_Collate(size_divisor), persistent_workers=num_threads > 0)


class TorchDetTrainLoader(PlanTrainLoader):
    """DetTrainLoader's plan and targets; pixels by PIL + torch in ``num_threads`` workers."""

    backend = "pil"

    def __init__(self, *args, **kwargs):
        DetTrainLoader._setup(self, *args, **kwargs)
        self.dataset = _Samples(DetSamples(self.table, self.reader, self.labels_of), self.seed, self.scales,
                                self.flip_prob)
        self._it = None

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "task": "detection",
                "scales": [list(s) for s in self.scales], "flip_prob": self.flip_prob,
                "size_divisor": self.size_divisor}

    def _reposition(self):
        self._it = None

    def _fetch(self):
        if self._it is None:
            items = _PlanItems(self, self.epoch, self.step, self.micro)
            self._it = iter(_data_loader(self.dataset, items, self.batch_size, self.num_threads, self.size_divisor))
        images, targets = next(self._it)
        if self.device != "cpu":
            images, targets = images.to(self.device), [target_to(t, self.device) for t in targets]
        return images, targets


class TorchDetValLoader:
    """DetValLoader's slice and targets; pixels by PIL + torch."""

    def __init__(self, *args, **kwargs):
        DetValLoader._setup(self, *args, **kwargs)
        self.dataset = _Samples(DetSamples(self.table, self.reader, self.labels_of), 0, [self.scale], 0.0,
                                self.with_masks)
        self._loader = None

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        if self._loader is None:
            items = [(i, None) for i in range(self.lo, self.hi)]
            self._loader = _data_loader(self.dataset, items, self.batch_size, self.num_threads, self.size_divisor)
        for images, targets in self._loader:
            if self.device != "cpu":
                images, targets = images.to(self.device), [target_to(t, self.device) for t in targets]
            yield images, targets
