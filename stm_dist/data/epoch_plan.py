"""Who reads what, when: the epoch plan both backends follow, and the val slicing.

Train, epoch ``e``: one permutation of all ``N`` samples drawn from (seed, e) only, so every rank
computes the same one. It is cut into ``N // G`` global batches of ``G`` samples (drop_last, the
original's step count); global batch ``s`` is cut into micro-batches of ``mb`` in a fixed order
(micro-batch ``k`` = samples ``[k*mb, (k+1)*mb)`` of it) and rank ``r`` takes micro-batches
``r*accum .. r*accum+accum-1``. The data position is therefore (epoch, samples consumed), which
means the same thing at any world size and micro-batch: a run resumes on the same global batches.

Augmentation is a function of the sample too: its random numbers come from (seed, epoch, sample
index), so a sample looks the same whichever rank, micro-batch or layout reads it.

Val: the files in manifest order, rank r reads slice r in order; the slices partition the data
(no padding with duplicates), so accuracy summed over ranks is exact.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from stm_dist.data.manifest import ShardError

RA_OPS = 15  # timm's increasing set; op number RA_OPS is the identity (a skipped op)
RA_BINS = 41  # magnitude bins over timm's [0, 10] (see dali_randaug.py)


def slice_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of slice ``shard_id``; the same integer rule DALI's readers use."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def epoch_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 31-bit seed for (seed, epoch, index, stream); DALI and PIL want non-negative int32 seeds."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, stream])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


class SampleTable:
    """Every sample of a split located in its tar: (file, jpg offset/size, cls offset/size), in
    manifest order, read from the ``.idx`` files; keys (webdataset ``__key__``) on demand."""

    def __init__(self, tars: list[str], idxs: list[str]):
        self.tars, self.idxs = tars, idxs
        cols = [[], [], [], [], []]
        self.counts = []
        for f, idx in enumerate(idxs):
            with open(idx) as fh:
                lines = fh.read().splitlines()
            for n, line in enumerate(lines[1:], 2):
                parts = line.split()
                members = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
                if "jpg" not in members or "cls" not in members:
                    raise ShardError(f"{idx}:{n}: sample lacks a jpg or cls member")
                for c, v in zip(cols, (f, *members["jpg"], *members["cls"])):
                    c.append(v)
            self.counts.append(len(lines) - 1)
        self.file, self.jpg_off, self.jpg_size, self.cls_off, self.cls_size = (np.asarray(c, np.int64) for c in cols)
        self._keys = None

    def __len__(self):
        return len(self.file)

    def fingerprint(self) -> str:
        """Names of the shards and their sample counts: what the plan's indices refer to."""
        import os

        text = "\n".join(f"{os.path.basename(t)} {c}" for t, c in zip(self.tars, self.counts))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def keys(self, indices) -> list[str]:
        if self._keys is None:  # only for data.record_keys and tests: ImageNet's 1.28 M keys cost memory
            from data_tools.tar_index import split_member_name

            keys = []
            for idx in self.idxs:
                with open(idx) as fh:
                    for line in fh.read().splitlines()[1:]:
                        keys.append(split_member_name(line.split()[3])[0])
            self._keys = keys
        return [self._keys[int(i)] for i in indices]


class EpochPlan:
    """The global order of one run: see the module docstring."""

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.steps = num_samples // global_batch
        self._cached = {}

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of ``epoch`` (the last two are kept: a prefetching stream is already in
        the next epoch while the batches handed out are still in this one)."""
        if epoch not in self._cached:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x9E7]))
            if len(self._cached) >= 2:
                del self._cached[min(self._cached)]
            self._cached[epoch] = rng.permutation(self.num_samples)
        return self._cached[epoch]

    def micro(self, epoch: int, step: int, k: int, micro_batch: int) -> np.ndarray:
        """Sample indices of micro-batch ``k`` of global batch ``step`` of ``epoch``."""
        lo = step * self.global_batch + k * micro_batch
        return self.order(epoch)[lo : lo + micro_batch]


def random_resized_crop(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a crop window, drawn as torchvision/timm's RandomResizedCrop draws it
    (10 tries at a random area and log-uniform aspect ratio, else the centre at a clamped ratio)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def sample_augment(seed: int, epoch: int, index: int, width: int, height: int, n_ops: int = 2,
                   magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5):
    """The random choices of one sample's train view: crop window, flip and RandAugment's
    (op, magnitude bin, sign) per op, from (seed, epoch, sample index) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, 0xA06]))
    crop = random_resized_crop(rng, width, height)
    flip = int(rng.random() < 0.5)
    scale = (RA_BINS - 1) / 10.0
    op = rng.integers(0, RA_OPS, n_ops)
    op = np.where(rng.random(n_ops) < prob, op, RA_OPS).astype(np.int32)
    mag = np.rint(np.clip(rng.normal(magnitude * scale, magnitude_std * scale, n_ops), 0, RA_BINS - 1))
    sign = rng.integers(0, 2, n_ops).astype(np.int32)
    return crop, flip, op, mag.astype(np.int32), sign
