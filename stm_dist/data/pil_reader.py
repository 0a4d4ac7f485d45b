"""A torch/PIL reader of the same shards: the baseline DALI is measured against, and the fallback
where DALI is not installed. Same contract as the DALI loaders (see ``stm_dist.data``).

Transforms are timm's ``create_transform`` with the original recipe, i.e. the original's exact
PIL pipeline (RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, normalise;
val: resize to img_size/crop_pct, centre crop). Random erasing and mixup are batch-level
(``BatchAugment``), as with DALI.

Order and randomness: epoch e draws a permutation of all samples from (seed, e), rank r takes
slice r of it and runs ``(N // world) // batch`` steps. Every sample's augmentation is seeded from
(seed, epoch, sample), so output does not depend on worker count, and resume = skip to the step.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from stm_dist.data.epoch_plan import epoch_seed, slice_bounds, train_steps
from stm_dist.data.manifest import ShardError, read_manifest, shard_files

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _index_entries(tars, idxs):
    """[(file number, jpg offset, jpg size, cls offset, cls size)] over all shards, in order."""
    out = []
    for f, (tar, idx) in enumerate(zip(tars, idxs)):
        with open(idx) as fh:
            lines = fh.read().splitlines()
        for n, line in enumerate(lines[1:], 2):
            parts = line.split()
            members = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
            if "jpg" not in members or "cls" not in members:
                raise ShardError(f"{idx}:{n}: sample lacks a jpg or cls member")
            out.append((f, *members["jpg"], *members["cls"]))
    return out


class _ShardSamples(torch.utils.data.Dataset):
    def __init__(self, tars, entries, transform):
        self.tars, self.entries, self.transform = tars, entries, transform
        self._files = {}  # opened lazily, per worker process

    def __len__(self):
        return len(self.entries)

    def _read(self, f, off, size):
        fh = self._files.get(f)
        if fh is None:
            fh = self._files[f] = open(self.tars[f], "rb")
        fh.seek(off)
        return fh.read(size)

    def __getitem__(self, item):
        i, sample_seed = item
        f, joff, jsize, coff, csize = self.entries[i]
        label = int(self._read(f, coff, csize).decode("ascii").strip())
        with Image.open(io.BytesIO(self._read(f, joff, jsize))) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
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


def _loader(dataset, items, batch_size, num_threads, drop_last):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=max(0, num_threads),
                                       drop_last=drop_last, persistent_workers=False)


class PilTrainLoader:
    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, seed=0, img_size=224, device="cpu",
                 num_threads=2, randaug=True, split="train", **_ignored):
        from timm.data import create_transform

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        tars, idxs, _ = shard_files(shard_dir, split, man)
        self.num_samples, self.num_classes = int(man["num_samples"]), int(man["num_classes"])
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.num_threads = device, num_threads
        self.steps = train_steps(self.num_samples, world_size, batch_size)
        if self.steps == 0:
            raise ShardError(f"{shard_dir}/{split}.json: {self.num_samples} samples cannot fill one batch of "
                             f"{batch_size} on each of {world_size} ranks")
        tf = create_transform(img_size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                              auto_augment="rand-m9-mstd0.5-inc1" if randaug else None,
                              color_jitter=None, interpolation="bicubic", re_prob=0.0, mean=MEAN, std=STD)
        _clamp_posterize(tf)
        self.dataset = _ShardSamples(tars, _index_entries(tars, idxs), tf)
        self.epoch, self.step = 0, 0

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int):
        if int(epoch) != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def _items(self):
        perm = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, 0xB17])).permutation(
            self.num_samples)
        lo, _ = slice_bounds(self.num_samples, self.rank, self.world_size)
        mine = perm[lo : lo + self.steps * self.batch_size]
        return [(int(i), epoch_seed(self.seed, self.epoch, int(i), 3)) for i in mine[self.step * self.batch_size :]]

    def __iter__(self):
        if self.step >= self.steps:
            self.epoch, self.step = self.epoch + 1, 0
        for images, labels in _loader(self.dataset, self._items(), self.batch_size, self.num_threads, True):
            self.step += 1
            yield images.to(self.device), labels.to(self.device, torch.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "backend": "pil"}

    def load_state_dict(self, sd: dict):
        if sd.get("backend") != "pil":
            raise ValueError(f"loader state comes from backend {sd.get('backend')!r}, not 'pil'")
        for k in ("seed", "rank", "world_size", "batch_size", "num_samples"):
            if sd.get(k) != getattr(self, k):
                raise ValueError(f"loader state has {k}={sd.get(k)!r}, this loader has {getattr(self, k)!r}")
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])


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
                 num_threads=2, split="val"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        tars, idxs, _ = shard_files(shard_dir, split, man)
        self.num_classes = int(man["num_classes"])
        self.lo, self.hi = slice_bounds(int(man["num_samples"]), rank, world_size)
        self.num_samples = self.hi - self.lo
        self.batch_size, self.device, self.num_threads = batch_size, device, num_threads
        self.dataset = _ShardSamples(tars, _index_entries(tars, idxs), val_transform(img_size, crop_pct))

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        items = [(i, None) for i in range(self.lo, self.hi)]
        for images, labels in _loader(self.dataset, items, self.batch_size, min(self.num_threads, os.cpu_count() or 1), False):
            yield images.to(self.device), labels.to(self.device, torch.int64)
