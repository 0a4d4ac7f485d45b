"""Who reads what, when: the epoch plan both backends follow, and the val slicing.

Train, epoch ``e``: one permutation of all ``N`` samples drawn from (seed, e) only, so every rank
computes the same one. It is cut into ``N // G`` global batches of ``G`` samples (drop_last, the
original's step count); global batch ``s`` is cut into micro-batches of ``mb`` in a fixed order
(micro-batch ``k`` = samples ``[k*mb, (k+1)*mb)`` of it) and rank ``r`` takes micro-batches
``r*accum .. r*accum+accum-1``. The data position is therefore (epoch, samples consumed), which
means the same thing at any world size and micro-batch: a run resumes on the same global batches.

Augmentation is a function of the sample too: its random numbers come from (seed, epoch, sample
index), so a sample looks the same whichever rank, micro-batch or layout reads it.

Grouped plans (detection: ``groups`` = each sample's aspect group, landscape or portrait): the
epoch's permutation is cut per group into whole global batches, and those batches are put in an
order drawn from (seed, epoch) too, so every global batch holds one group only (drop_last per
group; the step count is the same every epoch). Without ``groups`` the plan is the plain one.

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
    manifest order, read from the ``.idx`` files; keys (webdataset ``__key__``) on demand.
    ``member`` names the second member (classification ``cls``; detection ``json``, whose
    offset/size then fill the ``cls_*`` columns)."""

    def __init__(self, tars: list[str], idxs: list[str], member: str = "cls"):
        self.tars, self.idxs, self.member = tars, idxs, member
        cols = [[], [], [], [], []]
        self.counts = []
        for lo in range(0, len(idxs), _BATCH_FILES):
            for f, parsed in enumerate(_parse_index_files(idxs[lo : lo + _BATCH_FILES], member), lo):
                self.counts.append(len(parsed[0]))
                for c, v in zip(cols, (np.full(len(parsed[0]), f, np.int64), *parsed)):
                    c.append(v)
        self.file, self.jpg_off, self.jpg_size, self.cls_off, self.cls_size = (
            np.concatenate(c) if c else np.zeros(0, np.int64) for c in cols)
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


_BATCH_FILES = 16  # index files parsed as one array: amortises numpy's per-call cost (~1.5 MB)


def _parse_index_files(idxs: list[str], member: str = "cls"):
    """(jpg_off, jpg_size, <member>_off, <member>_size) per index file, in order."""
    raws = []
    for idx in idxs:
        with open(idx, "rb") as fh:
            raws.append(fh.read())
    bodies = [r.partition(b"\n")[2] for r in raws]
    if all(b.endswith(b"\n") for b in bodies):
        cols = _parse_two_member_body(b"".join(bodies), member)
        if cols is not None:
            cut = np.cumsum([b.count(b"\n") for b in bodies])[:-1]
            return list(zip(*(np.split(c, cut) for c in cols)))
    # Some file is laid out otherwise (or empty): file by file, the odd ones line by line.
    out = []
    for idx, raw in zip(idxs, raws):
        body = raw.partition(b"\n")[2]
        parsed = _parse_two_member_body(body, member) if body.endswith(b"\n") else None
        out.append(parsed if parsed is not None else _parse_index_lines(idx, raw, member))
    return out


def _parse_index_lines(idx: str, raw: bytes, member: str = "cls"):
    lines = raw.decode().splitlines()
    cols = [[], [], [], []]
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        members = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
        if "jpg" not in members or member not in members:
            raise ShardError(f"{idx}:{n}: sample lacks a jpg or {member} member")
        for c, v in zip(cols, (*members["jpg"], *members[member])):
            c.append(v)
    return tuple(np.asarray(c, np.int64) for c in cols)


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _parse_two_member_body(body: bytes, member: str = "cls"):
    """(jpg_off, jpg_size, cls_off, cls_size) of index lines (header removed) that are every one
    exactly ``cls off size name jpg off size name`` (or jpg first; ``member`` in place of cls),
    single-spaced, as stm-shards
    writes; None for anything else. Token bounds come from the separator positions and the
    numbers from the digit bytes, all in numpy: ImageNet's 1.28 M lines took 7 s per rank with a
    Python loop per line on the 2-core box."""
    a = np.frombuffer(body, np.uint8)
    seps = np.flatnonzero((a == 32) | (a == 10))
    if len(seps) % 8:
        return None
    seps = seps.reshape(-1, 8)  # 7 spaces then the newline, per line, if the layout holds
    if (a[seps[:, 7]] != 10).any() or (a[seps[:, :7]] != 32).any():
        return None
    starts = np.empty_like(seps)
    starts[0, 0] = 0
    starts[1:, 0] = seps[:-1, 7] + 1
    starts[:, 1:] = seps[:, :7] + 1
    lengths = seps - starts
    if (lengths <= 0).any():
        return None

    def is_word(t, word):
        s, w = starts[:, t], np.frombuffer(word, np.uint8)
        return bool((lengths[:, t] == len(w)).all() and all((a[s + i] == w[i]).all() for i in range(len(w))))

    second = member.encode()
    if is_word(0, b"jpg") and is_word(4, second):
        j, c = 0, 4
    elif is_word(0, second) and is_word(4, b"jpg"):
        j, c = 4, 0
    else:
        return None

    def number(t):
        length = lengths[:, t]
        width = int(length.max())
        if width > 18:  # beyond int64
            return None
        # Right-aligned digit matrix: column i holds the digit of 10**(width-1-i), 0 left of it.
        place = np.arange(width - 1, -1, -1)
        pos = seps[:, t, None] - 1 - place  # the token ends at its separator
        inside = place < length[:, None]
        d = a[np.where(inside, pos, 0)].astype(np.int64) - 48
        if ((d < 0) | (d > 9))[inside].any():
            return None
        d[~inside] = 0
        return d @ _POW10[place]

    cols = tuple(number(t) for t in (j + 1, j + 2, c + 1, c + 2))
    return None if any(x is None for x in cols) else cols


class EpochPlan:
    """The global order of one run: see the module docstring. ``groups`` (optional): one small
    non-negative int per sample; every global batch then holds samples of one group only."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, groups=None):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.groups = None if groups is None else np.asarray(groups, np.int64)
        if self.groups is None:
            self.steps = num_samples // global_batch
        else:
            if self.groups.shape != (num_samples,) or (num_samples and self.groups.min() < 0):
                raise ValueError(f"groups must be {num_samples} non-negative ints, got shape {self.groups.shape}")
            self.steps = int((np.bincount(self.groups) // global_batch).sum()) if num_samples else 0
        self._cached = {}

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of ``epoch`` (the last two are kept: a prefetching stream is already in
        the next epoch while the batches handed out are still in this one)."""
        if epoch not in self._cached:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x9E7]))
            if len(self._cached) >= 2:
                del self._cached[min(self._cached)]
            order = rng.permutation(self.num_samples)
            if self.groups is not None:
                order = self._grouped(order, epoch)
            self._cached[epoch] = order
        return self._cached[epoch]

    def _grouped(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """The permutation's samples, group by group in its order, cut into whole global batches
        (each group's remainder left out this epoch), the batches then in an order from (seed,
        epoch) - so the groups mix over the epoch as the plain plan's samples do."""
        g = self.global_batch
        member = self.groups[perm]
        batches = []
        for grp in np.unique(member):
            rows = perm[member == grp]
            whole = len(rows) // g * g
            batches.append(rows[:whole].reshape(-1, g))
        batches = np.concatenate(batches) if batches else np.zeros((0, g), np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x6A0]))
        return batches[rng.permutation(len(batches))].reshape(-1)

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
