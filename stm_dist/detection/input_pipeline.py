"""The detection DALI graph and the host-side sources that feed it.

The graph decodes (``mixed`` = nvJPEG on the GPU, or the CPU), resizes each image to the size
the host chose (bilinear without antialiasing, as mmdet's cv2 resize), mirrors it if the host
said so, normalises with the ImageNet mean/std and zero-pads every image of the batch to the
batch's largest height and width rounded up to ``size_divisor``. It draws nothing at random.

The sources (``external_source`` callbacks, batch mode) read each sample's JPEG and JSON by
offset (plan_source.TarReader, the epoch_plan.SampleTable of ``.jpg``/``.json``), take its
resized size and flip from transforms.py, hand DALI (jpegs, widths, heights, flips, sample
indices) and keep the targets built from the same choices in a queue; the loader pops them as
it takes each batch out of DALI and checks that the sample indices agree, so pixels and targets
cannot drift apart.
"""
from __future__ import annotations

import collections

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from stm_dist.data.dali_pipelines import MEAN, STD, _decoder_args
from stm_dist.data.plan_source import PlanSource, jpeg_size
from stm_dist.detection.transforms import SampleError, build_target, draw_choices, parse_meta, rescale_size


@pipeline_def
def det_pipeline(source, *, device, size_divisor):
    jpg, width, height, flip, index = fn.external_source(
        source=source, num_outputs=5, batch=True,
        dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64])
    images = fn.decoders.image(jpg, **_decoder_args(device))
    images = fn.resize(images, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=False)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                      mirror=flip)
    # No shape: every sample is padded to the batch's largest extent, rounded up by `align`.
    images = fn.pad(images, axes=(1, 2), align=size_divisor, fill_value=0.0)
    return images, index


class DetSamples:
    """Reads one detection sample (JPEG bytes + parsed JSON) and builds its view and target."""

    def __init__(self, table, reader, labels_of: dict):
        self.table, self.reader, self.labels_of = table, reader, labels_of

    def key(self, i: int) -> str:
        return self.table.keys([i])[0]

    def read(self, i: int):
        t = self.table
        f = int(t.file[i])
        jpg = self.reader.read(f, int(t.jpg_off[i]), int(t.jpg_size[i]))
        where = f"{t.tars[f]} sample {self.key(i)!r}"
        meta = parse_meta(self.reader.read(f, int(t.cls_off[i]), int(t.cls_size[i])), where)
        try:
            w, h = jpeg_size(jpg)
        except Exception as e:  # PIL's header parser: UnidentifiedImageError, OSError, ...
            raise SampleError(f"{where}: the .jpg member is not a readable image ({e})") from None
        if (w, h) != (meta["width"], meta["height"]):
            raise SampleError(f"{where}: the JPEG is {w}x{h} but its .json says {meta['width']}x{meta['height']}")
        return jpg, meta

    def view(self, i: int, scale, flip: int, *, drop_crowd: bool, with_masks: bool = True):
        """(jpeg, new width, new height, target) of sample ``i`` at ``scale``, flipped if ``flip``."""
        jpg, meta = self.read(i)
        new_w, new_h = rescale_size(meta["width"], meta["height"], scale)
        target = build_target(meta, self.key(i), new_w, new_h, flip, self.labels_of, drop_crowd=drop_crowd,
                              with_masks=with_masks)
        return jpg, new_w, new_h, target


def _batch(views, indices, flips):
    n = len(views)
    widths, heights = np.empty(n, np.float32), np.empty(n, np.float32)
    for j, (_, w, h, _) in enumerate(views):
        widths[j], heights[j] = w, h
    return ([v[0] for v in views], widths, heights, np.asarray(flips, np.int32),
            np.asarray(indices, np.int64))


class TargetQueue:
    """Targets of the batches handed to DALI, oldest first (DALI calls a non-parallel source in
    order, and returns the batches in that order)."""

    def __init__(self):
        self._q = collections.deque()

    def push(self, indices, targets):
        self._q.append((np.asarray(indices, np.int64), targets))

    def pending_keys(self) -> list[str]:
        return [t["key"] for _, targets in self._q for t in targets]

    def pop(self, indices) -> list:
        if not self._q:
            raise RuntimeError("DALI returned a batch the source never produced")
        want, targets = self._q.popleft()
        got = np.asarray(indices).reshape(-1)
        if not np.array_equal(want, got):
            raise RuntimeError(f"DALI batch samples {got.tolist()} differ from the source's {want.tolist()}: "
                               "pixels and targets would not match")
        return targets


class DetPlanSource(PlanSource):
    """This rank's stream through the (aspect-grouped) epoch plan, across epoch ends, as
    PlanSource walks it for classification; the resize/flip choices from (seed, epoch, sample)."""

    def __init__(self, samples: DetSamples, table, plan, *, rank, accum, micro_batch, epoch, step, micro, scales,
                 flip_prob):
        super().__init__(table, plan, samples.reader, rank=rank, accum=accum, micro_batch=micro_batch, epoch=epoch,
                         step=step, micro=micro, randaug=False)
        self.samples, self.scales, self.flip_prob = samples, scales, flip_prob
        self.queue = TargetQueue()

    def __call__(self, info=None):
        n = self.calls
        self.calls += 1
        epoch, step, micro = self.position(n)
        indices = self.plan.micro(epoch, step, self.rank * self.accum + micro, self.mb)
        views, flips = [], []
        for i in indices:
            s, flip = draw_choices(self.plan.seed, epoch, int(i), len(self.scales), self.flip_prob)
            views.append(self.samples.view(int(i), self.scales[s], flip, drop_crowd=True))
            flips.append(flip)
        self.queue.push(indices, [v[3] for v in views])
        return _batch(views, indices, flips)


class DetValSource:
    """This rank's val slice [lo, hi) in order, batch after batch, starting over at its end (the
    loader takes exactly one pass's batches per pass, so prefetched ones begin the next pass)."""

    def __init__(self, samples: DetSamples, lo: int, hi: int, batch_size: int, scale, with_masks: bool):
        self.samples, self.lo, self.hi, self.bs = samples, lo, hi, batch_size
        self.scale, self.with_masks = scale, with_masks
        self.batches = -(-(hi - lo) // batch_size)
        self.calls = 0
        self.queue = TargetQueue()

    def __call__(self, info=None):
        b = self.calls % self.batches
        self.calls += 1
        indices = np.arange(self.lo + b * self.bs, min(self.hi, self.lo + (b + 1) * self.bs))
        views = [self.samples.view(int(i), self.scale, 0, drop_crowd=False, with_masks=self.with_masks)
                 for i in indices]
        self.queue.push(indices, [v[3] for v in views])
        return _batch(views, indices, [0] * len(views))
