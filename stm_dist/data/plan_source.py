"""Reading the plan's samples from the tars, and the DALI ``external_source`` callback that feeds
one pipeline with them for the whole run.

The callback hands DALI, per sample, the JPEG bytes (read by offset, no tar parsing), the label
and every random choice of its train view (crop window, flip, RandAugment ops/bins/signs) drawn
on the host from (seed, epoch, sample index): the pipeline itself draws nothing, so it has no
random state to checkpoint, and a sample's pixels do not depend on which rank or micro-batch
reads it.
"""
from __future__ import annotations

import io
import mmap
import os

import numpy as np

from stm_dist.data.epoch_plan import sample_augment


class TarReader:
    """Byte ranges of the shard files: ``mmap`` (page cache, no copy), or ``os.pread`` where
    mmap is slow or unsafe (network file systems: ``data.dont_use_mmap``)."""

    def __init__(self, tars: list[str], dont_use_mmap: bool = False):
        self.tars, self.dont_use_mmap = tars, dont_use_mmap
        self._open = {}  # per process: a forked DataLoader worker opens its own

    def __getstate__(self):
        return {"tars": self.tars, "dont_use_mmap": self.dont_use_mmap, "_open": {}}

    def read(self, f: int, offset: int, size: int) -> np.ndarray:
        h = self._open.get(f)
        if h is None:
            fd = os.open(self.tars[f], os.O_RDONLY)
            if self.dont_use_mmap:
                h = fd
            else:
                h = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                os.close(fd)
            self._open[f] = h
        if self.dont_use_mmap:
            data = os.pread(h, size, offset)
            if len(data) != size:
                raise OSError(f"{self.tars[f]}: short read at offset {offset} ({len(data)} of {size} bytes)")
            return np.frombuffer(data, np.uint8)
        return np.frombuffer(h, np.uint8, size, offset)

    def label(self, f: int, offset: int, size: int) -> int:
        raw = self.read(f, offset, size).tobytes()
        try:
            return int(raw.decode("ascii").strip())
        except ValueError:
            raise ValueError(f"{self.tars[f]} at offset {offset}: the .cls member {raw[:16]!r} is not an "
                             f"ASCII integer") from None


_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def jpeg_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header; other formats through PIL's header parser."""
    b = memoryview(data)
    n, i = len(b), 2
    if n > 3 and b[0] == 0xFF and b[1] == 0xD8:
        while i + 9 < n:
            if b[i] != 0xFF:
                break
            marker = b[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _SOF:
                return (b[i + 7] << 8) | b[i + 8], (b[i + 5] << 8) | b[i + 6]
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    from PIL import Image

    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.size


class PlanSource:
    """Batch-mode ``external_source`` callback: each call returns the next micro-batch of this
    rank's stream through the plan (step by step, ``accum`` micro-batches a step, across epochs)
    as (jpegs, labels, crop anchors, crop shapes, flips[, RandAugment ops, bins, signs])."""

    def __init__(self, table, plan, reader: TarReader, *, rank, accum, micro_batch, epoch, step, micro,
                 randaug=True):
        self.table, self.plan, self.reader, self.randaug = table, plan, reader, randaug
        self.rank, self.accum, self.mb = rank, accum, micro_batch
        # This rank's micro-batch number (over the whole run) where the stream starts.
        self.start = (epoch * plan.steps + step) * accum + micro
        self.calls = 0

    def position(self, n: int) -> tuple[int, int, int]:
        """(epoch, step, micro) of the stream's n-th micro-batch."""
        q = self.start + n
        step, micro = divmod(q, self.accum)
        epoch, step = divmod(step, self.plan.steps)
        return epoch, step, micro

    def __call__(self, info=None):
        # DALI passes the batch number (an int, or BatchInfo with batch_info=True): with parallel
        # workers calls come out of order, in several processes, so the position derives from it.
        if info is None:
            n = self.calls
        else:
            n = info if isinstance(info, int) else info.iteration
        self.calls += 1
        epoch, step, micro = self.position(n)
        indices = self.plan.micro(epoch, step, self.rank * self.accum + micro, self.mb)
        t, mb = self.table, self.mb
        jpgs, labels = [], np.empty(mb, np.int64)
        anchor, shape = np.empty((mb, 2), np.float32), np.empty((mb, 2), np.float32)
        flip = np.empty(mb, np.int32)
        ops, bins, signs = (np.empty((mb, 2), np.int32) for _ in range(3))
        for n, i in enumerate(indices):
            f = int(t.file[i])
            jpg = self.reader.read(f, int(t.jpg_off[i]), int(t.jpg_size[i]))
            jpgs.append(jpg)
            labels[n] = self.reader.label(f, int(t.cls_off[i]), int(t.cls_size[i]))
            w, h = jpeg_size(jpg)
            (x, y, cw, ch), flip[n], ops[n], bins[n], signs[n] = sample_augment(self.plan.seed, epoch, int(i), w, h)
            anchor[n], shape[n] = (x, y), (cw, ch)
        if not self.randaug:  # DALI warns about (and pays for) outputs the graph does not use
            return jpgs, labels, anchor, shape, flip
        return jpgs, labels, anchor, shape, flip, ops, bins, signs
