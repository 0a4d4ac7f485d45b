"""Detection train and val loaders over ``stm-shards`` detection shards (DALI, GPU or CPU decode).

Contract (built by stm_dist/detection/loaders.py by backend; like stm_dist.data's loaders)::

    build_det_train_loader(shard_dir, batch_size, *, rank=0, world_size=1, accum=1, seed=0,
                           scales=((1333, 800),), flip_prob=0.5, size_divisor=32, device="cpu",
                           num_threads=2, split="train", dont_use_mmap=False, backend="dali")
        the classification train loader's contract (plan_loader.PlanTrainLoader: len, next_step,
        iter, set_epoch, state_dict / load_state_dict at any world size, keys, num_samples,
        num_classes, last_step, close) over an epoch plan whose global batches each hold images
        of one aspect group (width >= height, or not); a micro-batch is (images, targets):
        images float32 (B, 3, Hp, Wp) normalised, zero-padded right/bottom to the batch's largest
        size rounded up to size_divisor; targets B dicts {boxes (N, 4) xyxy float32, labels (N,)
        int64 in 1..K, masks (N, h, w) uint8, image_id, image_size (h, w), orig_size (H0, W0),
        key}, crowd regions and degenerate boxes dropped.
    build_det_val_loader(shard_dir, batch_size, *, rank=0, world_size=1, scale=(1333, 800),
                         size_divisor=32, device="cpu", num_threads=2, split="val",
                         dont_use_mmap=False, with_masks=True, backend="dali")
        iterable of (images, targets), no flip, crowd kept; the ranks' slices partition the split
        (every image once); ``num_samples`` = this rank's count. ``with_masks=False`` skips
        rasterising the ground-truth masks (evaluation reads them from the COCO file instead).

``backend="pil"``: the same plan, choices and targets with the pixels made by PIL + torch in
``num_threads`` DataLoader workers (torch_loader.py; the reference DALI is tested against).

Labels are contiguous: 1 + position of the COCO category id in the manifest's ``categories``.
"""
from __future__ import annotations

import contextlib

import numpy as np

from stm_dist.data.dali_loader import _dali_device
from stm_dist.data.epoch_plan import EpochPlan, SampleTable, slice_bounds
from stm_dist.data.manifest import ShardError, read_manifest, shard_files
from stm_dist.data.plan_loader import PlanTrainLoader
from stm_dist.data.plan_source import TarReader, jpeg_size
from stm_dist.detection.transforms import MMDET_SCALE, SampleError, check_scales, target_to

__all__ = ["DetTrainLoader", "DetValLoader", "read_det_manifest"]


def read_det_manifest(shard_dir: str, split: str) -> tuple[dict, list[str], list[str], dict]:
    """(manifest, tars, index files, {category id: label}) of a detection split."""
    man = read_manifest(shard_dir, split)
    where = f"{shard_dir}/{split}.json"
    if man.get("task") != "detection":
        raise ShardError(f"{where}: not a detection split (task={man.get('task')!r}); detection shards come from "
                         "`stm-shards create` on a COCO layout (annotations/instances_<split>.json)")
    cats = man.get("categories")
    if not isinstance(cats, list) or not cats or len(cats) != int(man["num_classes"]):
        raise ShardError(f"{where}: 'categories' must list the num_classes={man['num_classes']} categories")
    ids = [int(c["id"]) for c in cats]
    if ids != sorted(set(ids)):
        raise ShardError(f"{where}: 'categories' must be sorted by id without repeats")
    tars, idxs, _ = shard_files(shard_dir, split, man)
    return man, tars, idxs, {cid: n + 1 for n, cid in enumerate(ids)}


def aspect_groups(table: SampleTable, reader: TarReader) -> np.ndarray:
    """0 where an image's width >= its height, 1 otherwise (mmdet's GroupSampler flag, flipped),
    from each JPEG's frame header (a few hundred bytes a sample; no decode, no JSON parse)."""
    out = np.empty(len(table), np.int64)
    for i in range(len(table)):
        w, h = jpeg_size(reader.read(int(table.file[i]), int(table.jpg_off[i]), int(table.jpg_size[i])))
        out[i] = 0 if w >= h else 1
    return out


def _dali_iterator(pipe):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return DALIGenericIterator([pipe], ["images", "indices"], reader_name=None, auto_reset=False,
                               last_batch_policy=LastBatchPolicy.PARTIAL)


@contextlib.contextmanager
def _naming_samples(queue):
    """DALI's decode errors name no sample (`Failed to decode sample #2`): name the batches in
    flight (the iterator runs the first ones when it is made, the later ones at each next())."""
    try:
        yield
    except SampleError:  # raised by our own source, already naming its sample
        raise
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"the DALI pipeline failed on a batch of samples among {queue.pending_keys()} "
                           f"(a damaged JPEG? `stm-shards verify --full` checks every one): {e}") from e


def _build_pipe(source, loader):
    from stm_dist.detection.input_pipeline import det_pipeline

    pipe = det_pipeline(source, device=loader._dali_device, size_divisor=loader.size_divisor,
                        batch_size=loader.batch_size, num_threads=loader.num_threads, device_id=loader._device_id,
                        seed=0)
    pipe.build()
    with _naming_samples(source.queue):
        return _dali_iterator(pipe)


def _take(it, queue, device):
    with _naming_samples(queue):
        out = next(it)[0]
    targets = queue.pop(out["indices"].cpu().numpy())
    images = out["images"]
    if device != "cpu":
        images = images.to(device, non_blocking=True)
        targets = [target_to(t, device) for t in targets]
    return images, targets


class DetTrainLoader(PlanTrainLoader):
    """PlanTrainLoader's position, resume and stepping over the aspect-grouped plan; one DALI
    pipeline for the whole run (built at the first batch, rebuilt only on a jump), fed by
    input_pipeline.DetPlanSource."""

    backend = "dali"

    def __init__(self, *args, **kwargs):
        self._setup(*args, **kwargs)
        self._dali_device, self._device_id = _dali_device(self.device)
        self._it = self._source = None

    def _setup(self, shard_dir, batch_size, *, rank=0, world_size=1, accum=1, seed=0, scales=MMDET_SCALE,
               flip_prob=0.5, size_divisor=32, device="cpu", num_threads=2, split="train", dont_use_mmap=False):
        # PlanTrainLoader.__init__ reads a classification table (.cls members); the same fields
        # are set here from the detection manifest, and every other method is its own.
        _check_device(device)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if accum < 1 or batch_size < 1:
            raise ValueError(f"batch_size and accum must be >= 1, got {batch_size}, {accum}")
        if not 0.0 <= flip_prob <= 1.0 or size_divisor < 1:
            raise ValueError(f"flip_prob must be in [0, 1] and size_divisor >= 1, got {flip_prob}, {size_divisor}")
        man, tars, idxs, self.labels_of = read_det_manifest(shard_dir, split)
        self.manifest, self.categories = man, man["categories"]
        self.table = SampleTable(tars, idxs, member="json")
        self.num_samples, self.num_classes = int(man["num_samples"]), int(man["num_classes"])
        if len(self.table) != self.num_samples:
            raise ShardError(f"{shard_dir}/{split}.json says {self.num_samples} samples, its .idx files list "
                             f"{len(self.table)}: re-run `stm-shards create`")
        self.batch_size, self.rank, self.world_size, self.accum, self.seed = batch_size, rank, world_size, accum, seed
        self.global_batch = batch_size * world_size * accum
        self.scales, self.flip_prob, self.size_divisor = check_scales(scales), float(flip_prob), int(size_divisor)
        self.device, self.num_threads, self.dont_use_mmap = device, num_threads, dont_use_mmap
        self.reader = TarReader(tars, dont_use_mmap)
        self.groups = aspect_groups(self.table, self.reader)
        self.plan = EpochPlan(self.num_samples, self.global_batch, seed, groups=self.groups)
        self.steps = self.plan.steps
        if self.steps == 0:
            counts = np.bincount(self.groups, minlength=2).tolist()
            raise ShardError(f"{shard_dir}/{split}.json: {counts[0]} landscape and {counts[1]} portrait images cannot "
                             f"fill one global batch of {self.global_batch} ({batch_size} x {world_size} ranks x "
                             f"{accum} accumulation) of one aspect group")
        self.epoch = self.step = self.micro = 0
        self.last_step = None

    def describe(self) -> dict:
        import nvidia.dali

        return {"backend": self.backend, "device": self.device, "task": "detection",
                "scales": [list(s) for s in self.scales], "flip_prob": self.flip_prob,
                "size_divisor": self.size_divisor, "dali": nvidia.dali.__version__}

    def _reposition(self):
        self._it = self._source = None

    def _fetch(self):
        from stm_dist.detection.input_pipeline import DetPlanSource, DetSamples

        if self._it is None:
            self._source = DetPlanSource(DetSamples(self.table, self.reader, self.labels_of), self.table, self.plan,
                                         rank=self.rank, accum=self.accum, micro_batch=self.batch_size,
                                         epoch=self.epoch, step=self.step, micro=self.micro, scales=self.scales,
                                         flip_prob=self.flip_prob)
            self._it = _build_pipe(self._source, self)
        return _take(self._it, self._source.queue, self.device)


class DetValLoader:
    """See the module docstring. One pipeline for every pass; a pass left unfinished rebuilds it."""

    def __init__(self, *args, **kwargs):
        self._setup(*args, **kwargs)
        self._dali_device, self._device_id = _dali_device(self.device)
        self._it = self._source = None
        self._finished = False

    def _setup(self, shard_dir, batch_size, *, rank=0, world_size=1, scale=MMDET_SCALE[0], size_divisor=32,
               device="cpu", num_threads=2, split="val", dont_use_mmap=False, with_masks=True):
        _check_device(device)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or size_divisor < 1:
            raise ValueError(f"batch_size and size_divisor must be >= 1, got {batch_size}, {size_divisor}")
        man, tars, idxs, self.labels_of = read_det_manifest(shard_dir, split)
        self.manifest, self.categories = man, man["categories"]
        self.num_classes = int(man["num_classes"])
        self.table = SampleTable(tars, idxs, member="json")
        if len(self.table) != int(man["num_samples"]):
            raise ShardError(f"{shard_dir}/{split}.json says {man['num_samples']} samples, its .idx files list "
                             f"{len(self.table)}: re-run `stm-shards create`")
        self.lo, self.hi = slice_bounds(len(self.table), rank, world_size)
        self.num_samples = self.hi - self.lo
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, device
        self.scale, self.size_divisor, self.with_masks = check_scales([scale])[0], int(size_divisor), with_masks
        self.num_threads = num_threads
        self.reader = TarReader(tars, dont_use_mmap)

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        from stm_dist.detection.input_pipeline import DetSamples, DetValSource

        if self.num_samples == 0:
            return
        if self._it is None or not self._finished:  # first pass, or the last one was abandoned
            self._source = DetValSource(DetSamples(self.table, self.reader, self.labels_of), self.lo, self.hi,
                                        self.batch_size, self.scale, self.with_masks)
            self._it = _build_pipe(self._source, self)
        self._finished = False
        seen = 0
        for _ in range(len(self)):
            images, targets = _take(self._it, self._source.queue, self.device)
            seen += len(targets)
            yield images, targets
        self._finished = True
        if seen != self.num_samples:
            raise RuntimeError(f"val rank {self.rank}: read {seen} samples, expected {self.num_samples}")


def _check_device(device: str):
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
