"""Input pipelines over ``stm-shards`` webdataset shards: DALI (GPU or CPU decode) or torch/PIL.

Importing this package is cheap: DALI, timm and the pipelines load when a loader is built.

Contract (stable; the engine builds against it)::

    build_train_loader(shard_dir, batch_size, *, rank=0, world_size=1, accum=1, seed=0, img_size=224,
                       device="cpu", num_threads=2, randaug=True, backend="dali",
                       dont_use_mmap=False, source_workers=0) -> TrainLoader
        follows the epoch plan (epoch_plan.py) of global batch G = batch_size * world_size * accum:
        rank r reads micro-batches r*accum .. r*accum+accum-1 of every global batch
        len(loader)            steps per epoch = num_samples // G, the same on every rank (drop_last)
        loader.next_step()     this rank's `accum` (images, labels) micro-batches of the next step
        iter(loader)           the rest of the current epoch's micro-batches, one by one
                               (images float32 NCHW normalised, labels int64, on `device`)
        loader.set_epoch(e)    make e the current epoch (no-op if it already is: a resumed
                               position is kept); running past an epoch's end moves on to e + 1
        loader.state_dict()    the elastic position: epoch, samples consumed of its plan, and
                               what the plan depends on (global batch, seed, shard set); the
                               same on every rank
        loader.load_state_dict(sd)   at any world size / micro-batch with the same G: the next
                               global batches are the uninterrupted run's, sample for sample
        loader.keys(epoch, step)     webdataset keys of this rank's micro-batches of a step
        loader.num_samples, loader.num_classes
    build_val_loader(shard_dir, batch_size, *, rank=0, world_size=1, img_size=224,
                     crop_pct=0.875, device="cpu", num_threads=2, backend="dali", dont_use_mmap=False)
        iterable of (images, labels); `num_samples` = this rank's count; the ranks' slices
        partition the split (no duplicates; the last batch may be short), so sums are exact
    BatchAugment(mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1, reprob=0.25, num_classes=...)
        (images, labels) -> (images, soft targets)
    read_manifest(shard_dir, split) -> dict (num_samples, num_classes, classes, counts, shards...)

Shards of split ``train`` are ``{shard_dir}/train-*.tar`` (+ ``.idx``), listed in ``train.json``.
``device`` is "cpu" or "cuda": with DALI, "cuda" decodes on the GPU (nvJPEG, ``mixed``).
``dont_use_mmap``: read the tars with plain reads instead of mapping them (network file systems).
``source_workers`` (DALI): processes that read the samples and draw their random choices
(``external_source(parallel=True)``); 0 = in the calling thread, ahead of use.
"""
from __future__ import annotations

from stm_dist.data.manifest import ShardError, read_manifest

__all__ = ["build_train_loader", "build_val_loader", "BatchAugment", "read_manifest", "ShardError"]

_BACKENDS = ("dali", "pil")


def _check_backend(backend: str):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def build_train_loader(shard_dir, batch_size, *, rank=0, world_size=1, accum=1, seed=0, img_size=224, device="cpu",
                       num_threads=2, randaug=True, backend="dali", split="train", dont_use_mmap=False,
                       source_workers=0):
    _check_backend(backend)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kw = {}
    if backend == "dali":
        from stm_dist.data.dali_loader import DaliTrainLoader as cls

        kw["source_workers"] = source_workers
    else:
        from stm_dist.data.pil_reader import PilTrainLoader as cls
    return cls(shard_dir, batch_size, rank=rank, world_size=world_size, accum=accum, seed=seed, img_size=img_size,
               device=device, num_threads=num_threads, randaug=randaug, split=split, dont_use_mmap=dont_use_mmap, **kw)


def build_val_loader(shard_dir, batch_size, *, rank=0, world_size=1, img_size=224, crop_pct=0.875, device="cpu",
                     num_threads=2, backend="dali", split="val", dont_use_mmap=False):
    _check_backend(backend)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if backend == "dali":
        from stm_dist.data.dali_loader import DaliValLoader as cls
    else:
        from stm_dist.data.pil_reader import PilValLoader as cls
    return cls(shard_dir, batch_size, rank=rank, world_size=world_size, img_size=img_size, crop_pct=crop_pct,
               device=device, num_threads=num_threads, split=split, dont_use_mmap=dont_use_mmap)


def __getattr__(name):
    if name == "BatchAugment":
        from stm_dist.data.batch_aug import BatchAugment

        return BatchAugment
    raise AttributeError(f"module 'stm_dist.data' has no attribute {name!r}")
