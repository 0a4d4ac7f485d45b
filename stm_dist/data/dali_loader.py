"""Train and val loaders over DALI pipelines, with exact mid-epoch resume.

Each train epoch gets a freshly built pipeline whose inputs (file order, slice, seeds) are a
function of (seed, epoch, rank) only, so epoch ``e`` looks the same whether the run got there
directly, via ``set_epoch(e)`` or via a resume. Inside an epoch, DALI's own checkpoint (reader
position, shuffle buffer, RNG states of every random op, < 10 KB) restores the exact stream.
"""
from __future__ import annotations

import base64
import warnings

import torch

from stm_dist.data.epoch_plan import epoch_seed, file_order, slice_bounds, train_slice_id, train_steps
from stm_dist.data.manifest import ShardError, read_manifest, shard_files


def _dali_device(device: str) -> tuple[str, int | None]:
    if device == "cpu":
        return "cpu", None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is visible")
        return "gpu", torch.cuda.current_device() if device == "cuda" else torch.device(device).index
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


class _quiet_dali_aliases(warnings.catch_warnings):
    """DALI's own auto_aug calls deprecated aliases (experimental.equalize/filter) and forces
    those warnings on with simplefilter("default"); drop just those, which users cannot act on."""

    def __enter__(self):
        super().__enter__()
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if "is now deprecated. Use `nvidia.dali.fn." not in str(message):
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        return self


def _iterator(pipe, policy):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader", auto_reset=False,
                               last_batch_policy=getattr(LastBatchPolicy, policy))


class DaliTrainLoader:
    """See :func:`stm_dist.data.build_train_loader` for the contract.

    One pipeline serves consecutive epochs (building a RandAugment graph takes DALI seconds to
    tens of seconds). It is built at a "base epoch" b with seeds drawn from (seed, b, rank) and
    first slice (rank + b) % world_size; DALI then moves every rank to the next slice each epoch
    and keeps shuffling with its running RNG. ``set_epoch`` to anything but the current or next
    epoch rebuilds the pipeline with that epoch as base. The loader state stores b with DALI's
    checkpoint, so a resume rebuilds the same pipeline and restores it.
    """

    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, seed=0, img_size=224, device="cpu",
                 num_threads=2, randaug=True, shuffle_buffer=1024, split="train"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        self.tars, self.idxs, _ = shard_files(shard_dir, split, man)
        self.num_samples, self.num_classes = int(man["num_samples"]), int(man["num_classes"])
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.img_size, self.num_threads, self.randaug, self.shuffle_buffer = img_size, num_threads, randaug, shuffle_buffer
        self.device = device
        self._dali_device, self._device_id = _dali_device(device)
        self.steps = train_steps(self.num_samples, world_size, batch_size)
        if self.steps == 0:
            raise ShardError(f"{shard_dir}/{split}.json: {self.num_samples} samples cannot fill one batch of "
                             f"{batch_size} on each of {world_size} ranks")
        self.epoch, self.step, self.base_epoch = 0, 0, 0
        self._it = None
        self._resume_from = None  # DALI checkpoint to restore when the pipeline is built

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int):
        """Make ``epoch`` the current one. The current epoch: no-op (keeps a resumed position);
        the next one after a finished epoch: continue; anything else: rebuild from ``epoch``."""
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        if epoch == self.epoch + 1 and self.step >= self.steps:
            self._advance()
            return
        self.epoch, self.step, self.base_epoch = epoch, 0, epoch
        self._it, self._resume_from = None, None

    def _build(self):
        from stm_dist.data.dali_pipelines import train_pipeline

        with _quiet_dali_aliases():
            pipe = self._define(train_pipeline, self.base_epoch)
            pipe.build()
            self._it = _iterator(pipe, "DROP")
        self._resume_from = None

    def _define(self, train_pipeline, b):
        order = file_order(len(self.tars), self.seed, b)
        return train_pipeline(
            [self.tars[i] for i in order], [self.idxs[i] for i in order],
            shard_id=train_slice_id(self.rank, self.world_size, b), num_shards=self.world_size,
            img_size=self.img_size, device=self._dali_device, randaug=self.randaug,
            shuffle_buffer=self.shuffle_buffer, reader_seed=epoch_seed(self.seed, b, self.rank, 1),
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
            seed=epoch_seed(self.seed, b, self.rank, 2), enable_checkpointing=True,
            checkpoint=None if self._resume_from is None else base64.b64decode(self._resume_from),
        )

    def _advance(self):
        """Finish DALI's epoch (a rank whose slice is one sample longer may have one more batch,
        which drop_last discards so that all ranks run the same number of steps) and move on."""
        if self._it is None:
            self._build()
        for _ in self._it:
            pass
        self._it.reset()
        self.epoch, self.step = self.epoch + 1, 0

    def __iter__(self):
        from stm_dist.data.dali_pipelines import labels_from_ascii

        if self.step >= self.steps:  # the previous epoch was iterated to its end
            self._advance()
        if self._it is None:
            self._build()
        while self.step < self.steps:
            out = next(self._it)[0]
            self.step += 1
            images = out["images"]
            labels = labels_from_ascii(out["labels"])
            if self.device != "cpu":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels

    def state_dict(self) -> dict:
        """Position after the last batch handed out; small (the DALI part is < 10 KB)."""
        # base64 text, so the state survives JSON as well as torch.save
        dali = base64.b64encode(self._it.checkpoints()[0]).decode() if self._it is not None else self._resume_from
        return {
            "epoch": self.epoch, "step": self.step, "base_epoch": self.base_epoch, "dali": dali,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "num_samples": self.num_samples, "backend": "dali",
        }

    def load_state_dict(self, sd: dict):
        if sd.get("backend") != "dali":
            raise ValueError(f"loader state comes from backend {sd.get('backend')!r}, not 'dali'")
        for k in ("seed", "rank", "world_size", "batch_size", "num_samples"):
            if sd.get(k) != getattr(self, k):
                raise ValueError(f"loader state has {k}={sd.get(k)!r}, this loader has {getattr(self, k)!r}")
        self.epoch, self.step, self.base_epoch = int(sd["epoch"]), int(sd["step"]), int(sd["base_epoch"])
        self._it, self._resume_from = None, sd.get("dali")
        if self._resume_from is None and (self.step > 0 or self.epoch != self.base_epoch):
            raise ValueError(f"loader state at epoch {self.epoch} step {self.step} holds no DALI checkpoint")


class DaliValLoader:
    """See :func:`stm_dist.data.build_val_loader` for the contract."""

    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, img_size=224, crop_pct=0.875, device="cpu",
                 num_threads=2, split="val"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        self.tars, self.idxs, _ = shard_files(shard_dir, split, man)
        self.num_classes = int(man["num_classes"])
        lo, hi = slice_bounds(int(man["num_samples"]), rank, world_size)
        self.num_samples = hi - lo
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, device
        self.img_size, self.resize_size = img_size, int(img_size / crop_pct)
        self.num_threads = num_threads
        self._dali_device, self._device_id = _dali_device(device)
        self._it, self._finished = None, False

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        from stm_dist.data.dali_pipelines import labels_from_ascii, val_pipeline

        if self.num_samples == 0:
            return
        if self._it is None or not self._finished:  # first pass, or the last one was abandoned
            pipe = val_pipeline(self.tars, self.idxs, shard_id=self.rank, num_shards=self.world_size,
                                img_size=self.img_size, resize_size=self.resize_size, device=self._dali_device,
                                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                                seed=0)
            pipe.build()
            self._it = _iterator(pipe, "PARTIAL")
        else:
            self._it.reset()
        seen, self._finished = 0, False
        for out in self._it:
            images, labels = out[0]["images"], labels_from_ascii(out[0]["labels"])
            seen += images.shape[0]
            if self.device != "cpu":
                images, labels = images.to(self.device), labels.to(self.device)
            yield images, labels
        self._finished = True
        if seen != self.num_samples:
            raise RuntimeError(f"val rank {self.rank}: DALI returned {seen} samples, expected {self.num_samples}")
