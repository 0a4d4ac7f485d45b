"""A torch/PIL reader of the same shards: the baseline DALI is measured against, and the fallback
where DALI is not installed. Same contract as the DALI loaders (see ``stm_dist.data``).

Transforms are timm's ``create_transform`` with the original recipe, i.e. the original's exact
PIL pipeline (RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, normalise;
val: resize to img_size/crop_pct, centre crop). Random erasing and mixup are batch-level
(``BatchAugment``), as with DALI.

Order and randomness: the epoch plan (epoch_plan.py), the same samples in the same micro-batches as
DALI, through one DataLoader for the whole run (its sampler runs on across epoch ends, so its
workers start once). Every sample's augmentation is seeded from (seed, epoch, sample), so output
does not depend on worker count, rank or micro-batch, and resume = start the sampler there.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from stm_dist.data.epoch_plan import SampleTable, epoch_seed, slice_bounds
from stm_dist.data.manifest import read_manifest, shard_files
from stm_dist.data.plan_loader import PlanTrainLoader
from stm_dist.data.plan_source import TarReader

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def read_sample(reader: TarReader, table: SampleTable, i: int) -> tuple[Image.Image, int]:
    """Sample ``i`` of ``table`` as (RGB PIL image, label), EXIF orientation applied."""
    f = int(table.file[i])
    label = reader.label(f, int(table.cls_off[i]), int(table.cls_size[i]))
    with Image.open(io.BytesIO(reader.read(f, int(table.jpg_off[i]), int(table.jpg_size[i])).tobytes())) as im:
        return ImageOps.exif_transpose(im).convert("RGB"), label


class _ShardSamples(torch.utils.data.Dataset):
    def __init__(self, table, transform, dont_use_mmap=False):
        self.table, self.transform = table, transform
        self.reader = TarReader(table.tars, dont_use_mmap)

    def __len__(self):
        return len(self.table)

    def __getitem__(self, item):
        i, sample_seed = item
        img, label = read_sample(self.reader, self.table, i)
        if sample_seed is None:
            return self.transform(img), label
        # timm's transforms draw from python's, numpy's and torch's global generators: seed them
        # per sample, and put them back so a loader running in the caller's process (no workers)
        # leaves the training's own random streams alone.
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        try:
            return self.transform(img), label
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _posterize_min1(img, bits_to_keep, **kw):
    from timm.data.auto_augment import posterize

    return posterize(img, max(1, bits_to_keep), **kw)


def _clamp_posterize(transform):
    """timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (reachable with mstd 0.5), which
    Pillow >= 11 rejects; keep >= 1 bit, as DALI's posterize does."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_min1


def _loader(dataset, items, batch_size, num_threads, drop_last, persistent=False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=max(0, num_threads),
                                       drop_last=drop_last, persistent_workers=persistent and num_threads > 0)


class _PlanSampler:
    """This rank's (sample, augmentation seed) stream through the plan from a position, across
    epoch ends (never exhausted: the loader counts what it hands out)."""

    def __init__(self, loader, epoch, step, micro):
        self.ld, self.start = loader, (epoch, step, micro)

    def __iter__(self):
        for i, epoch in self.ld.positions(*self.start):
            yield i, epoch_seed(self.ld.seed, epoch, i, 3)


class PilTrainLoader(PlanTrainLoader):
    backend = "pil"

    def __init__(self, *args, **kwargs):
        from timm.data import create_transform

        super().__init__(*args, **kwargs)
        tf = create_transform(self.img_size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                              auto_augment="rand-m9-mstd0.5-inc1" if self.randaug else None,
                              color_jitter=None, interpolation="bicubic", re_prob=0.0, mean=MEAN, std=STD)
        _clamp_posterize(tf)
        self.dataset = _ShardSamples(self.table, tf, self.dont_use_mmap)
        self._it = None

    def _reposition(self):
        self._it = None

    def _fetch(self):
        if self._it is None:
            sampler = _PlanSampler(self, self.epoch, self.step, self.micro)
            self._it = iter(_loader(self.dataset, sampler, self.batch_size, self.num_threads, True, persistent=True))
        images, labels = next(self._it)
        return images.to(self.device), labels.to(self.device, torch.int64)


def val_transform(img_size: int, crop_pct: float):
    """The original's eval view: shorter side to int(img_size / crop_pct) then centre crop;
    from 384 px up a square warp to img_size (no crop)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    resize = [T.Resize((img_size, img_size), bicubic)] if img_size >= 384 else [
        T.Resize(int(img_size / crop_pct), bicubic), T.CenterCrop(img_size)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(MEAN, STD)])


class PilValLoader:
    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, img_size=224, crop_pct=0.875, device="cpu",
                 num_threads=2, split="val", dont_use_mmap=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        tars, idxs, _ = shard_files(shard_dir, split, man)
        self.num_classes = int(man["num_classes"])
        self.lo, self.hi = slice_bounds(int(man["num_samples"]), rank, world_size)
        self.num_samples = self.hi - self.lo
        self.batch_size, self.device, self.num_threads = batch_size, device, num_threads
        self.dataset = _ShardSamples(SampleTable(tars, idxs), val_transform(img_size, crop_pct), dont_use_mmap)
        self._loader = None

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        if self._loader is None:
            # One loader for every pass, its workers kept alive: starting them cost ~1.4 s per
            # evaluation. Exact-once holds across passes, an abandoned one included: a new pass
            # on a persistent loader restarts the sampler and drops what was still in flight.
            items = [(i, None) for i in range(self.lo, self.hi)]
            self._loader = _loader(self.dataset, items, self.batch_size, min(self.num_threads, os.cpu_count() or 1),
                                   False, persistent=True)
        for images, labels in self._loader:
            yield images.to(self.device), labels.to(self.device, torch.int64)
