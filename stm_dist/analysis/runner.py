"""What the three analyses share: the process group, the model (any checkpoint stm-eval takes),
the validation images read straight from the shards, and exact-once, split-independent results.

Work split: the first `limit` validation images (manifest order) are cut into global batches of
`batch` images; rank r computes batches r, r + W, r + 2W, ... Every batch therefore holds the
same images whatever the number of processes, so every per-image number is bit-identical
between a 1-process and an N-process run; the per-batch results are gathered and combined in
batch order on every rank, so the totals are identical too (and each image counts once, for any
set size: nothing is padded or dropped).
"""
from __future__ import annotations

import os
import sys

import torch

from stm_dist.data.epoch_plan import SampleTable
from stm_dist.data.manifest import read_manifest, shard_files
from stm_dist.data.pil_reader import MEAN, STD, read_sample
from stm_dist.data.plan_source import TarReader

from .options import AnalysisError


def init_distributed():
    """(rank, world, device): plain torch.distributed (gloo on CPU, nccl on GPUs) under torchrun
    or the deepspeed launcher, a world of one otherwise; DeepSpeed itself is never imported."""
    from stm_dist.engine.distributed import init

    return init(use_deepspeed=False)


def load_model(name: str, source, num_classes: int, img_size: int, *, use_ema: bool = False,
               label_map=None, seed: int = 0) -> torch.nn.Module:
    """The model in eval mode, fp32, with the weights of `source` (a .pth path or a state dict:
    what stm-eval's checkpoint resolution gives); `source="random"` keeps the seeded random
    initialisation (for timing the analyses and for tests)."""
    from stm_dist.models import create_model
    from stm_dist.models.pretrained import load_pretrained

    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, img_size=img_size)
    if not (isinstance(source, str) and source == "random"):
        load_pretrained(model, source, label_map=label_map, use_ema=use_ema)
    return model.float().eval()


class Normalized(torch.nn.Module):
    """model((x - mean) / std) for x in [0, 1]: attacks live in pixel space, before normalisation
    (the same arithmetic as torchvision's Normalize: subtract, then divide)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


class _IndexedSamples(torch.utils.data.Dataset):
    """(index, transform(image, index), label) for validation image `index` of the shards."""

    def __init__(self, table: SampleTable, transform):
        self.table, self.transform, self.reader = table, transform, TarReader(table.tars)

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        img, label = read_sample(self.reader, self.table, i)
        return i, self.transform(img, i), label


class ValImages:
    """The validation images of a shard directory, batched for this rank (see the module doc)."""

    def __init__(self, shard_dir: str, transform, *, batch: int, rank: int = 0, world: int = 1,
                 limit: int | None = None, split: str = "val", num_workers: int = 0, device="cpu"):
        if batch < 1:
            raise AnalysisError(f"--batch must be >= 1, got {batch}")
        man = read_manifest(shard_dir, split)
        tars, idxs, _ = shard_files(shard_dir, split, man)
        self.manifest = man
        self.num_classes = int(man["num_classes"])
        total = int(man["num_samples"])
        if limit is not None and limit < 1:
            raise AnalysisError(f"--limit must be >= 1, got {limit}")
        self.num_images = min(total, limit) if limit else total
        self.batch, self.rank, self.world, self.device = batch, rank, world, torch.device(device)
        self.num_batches = -(-self.num_images // batch)
        self.my_batches = list(range(rank, self.num_batches, world))
        self.my_images = sum(min(batch, self.num_images - b * batch) for b in self.my_batches)
        self.dataset = _IndexedSamples(SampleTable(tars, idxs), transform)
        self.num_workers = max(0, min(num_workers, os.cpu_count() or 1))

    def __len__(self):
        return len(self.my_batches)

    def __iter__(self):
        """(global batch id, image indices, transformed images, labels) for this rank's batches;
        images and labels on `device`."""
        items = [i for b in self.my_batches for i in range(b * self.batch, min((b + 1) * self.batch, self.num_images))]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch, sampler=items,
                                             num_workers=self.num_workers)
        for b, (idx, images, labels) in zip(self.my_batches, loader):
            yield b, idx, images.to(self.device), labels.to(self.device, torch.int64)


def gather_batches(results: dict) -> list:
    """{global batch id: result} of every rank -> the results of all batches, in batch order."""
    import torch.distributed as dist

    merged = dict(results)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, results)
        merged = {}
        for p in parts:
            clash = set(merged) & set(p)
            if clash:  # cannot happen with the strided split; a guard against a wrong world size
                raise RuntimeError(f"batches {sorted(clash)[:5]} were computed by two ranks")
            merged.update(p)
    return [merged[b] for b in sorted(merged)]


def gather_per_image(results: dict, expected: int, what: str) -> dict:
    """{batch id: {key: per-image array}} of every rank -> {key: array over all images, in image
    order}; an error unless each of the `expected` images is there exactly once."""
    import numpy as np

    parts = gather_batches(results)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = len(next(iter(cols.values())))
    if n != expected:
        raise RuntimeError(f"{what} saw {n} images over all ranks, expected {expected}")
    return cols


def progress(total: int, desc: str, rank: int):
    """A tqdm bar on rank 0 (stderr), silent on the other ranks."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=rank != 0, file=sys.stderr, dynamic_ncols=True)
