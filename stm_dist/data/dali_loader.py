"""Train and val loaders over DALI pipelines, with exact mid-epoch resume (DALI checkpoints:
reader position, shuffle buffer and the RNG state of every random op, < 10 KB)."""
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

    Every epoch gets a freshly built pipeline whose inputs are a function of (seed, epoch, rank)
    only: the shard files in an order drawn from (seed, epoch), slice (rank + epoch) % world_size,
    reader and augmentation seeds from (seed, epoch, rank). The pipeline is dropped after
    ``len(self)`` batches, inside DALI's first epoch, so DALI's own epoch transitions (padding,
    slice rotation, shuffle-buffer refill), which do not line up with drop_last steps when slices
    differ in size, never come into play. Epoch e is the same whether reached directly, via
    ``set_epoch`` or via a resume; within an epoch DALI's checkpoint restores the exact stream.
    Cost: one graph build per epoch (~1 s; 10-40 s with RandAugment on 2 busy cores).
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
        self.epoch, self.step = 0, 0
        self._it = None
        self._resume_from = None  # DALI checkpoint (base64) to restore when the pipeline is built

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int):
        """Start ``epoch`` from its beginning; a no-op if it is already the current epoch (so a
        resumed position survives the engine's usual set_epoch call)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            self._it, self._resume_from = None, None

    def _build(self):
        from stm_dist.data.dali_pipelines import train_pipeline

        e = self.epoch
        order = file_order(len(self.tars), self.seed, e)
        with _quiet_dali_aliases():
            pipe = train_pipeline(
                [self.tars[i] for i in order], [self.idxs[i] for i in order],
                shard_id=train_slice_id(self.rank, self.world_size, e), num_shards=self.world_size,
                img_size=self.img_size, device=self._dali_device, randaug=self.randaug,
                shuffle_buffer=self.shuffle_buffer, reader_seed=epoch_seed(self.seed, e, self.rank, 1),
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                seed=epoch_seed(self.seed, e, self.rank, 2), enable_checkpointing=True,
                checkpoint=None if self._resume_from is None else base64.b64decode(self._resume_from),
            )
            pipe.build()
            self._it = _iterator(pipe, "DROP")
        self._resume_from = None

    def __iter__(self):
        from stm_dist.data.dali_pipelines import labels_from_ascii

        if self.step >= self.steps:  # the previous epoch was iterated to its end
            self.set_epoch(self.epoch + 1)
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
        mid = 0 < self.step < self.steps
        if mid and self._it is not None:
            # base64 text, so the state survives JSON as well as torch.save
            dali = base64.b64encode(self._it.checkpoints()[0]).decode()
        else:
            dali = self._resume_from if mid else None
        return {
            "epoch": self.epoch, "step": self.step, "dali": dali,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "num_samples": self.num_samples, "backend": "dali",
        }

    def load_state_dict(self, sd: dict):
        if sd.get("backend") != "dali":
            raise ValueError(f"loader state comes from backend {sd.get('backend')!r}, not 'dali'")
        for k in ("seed", "rank", "world_size", "batch_size", "num_samples"):
            if sd.get(k) != getattr(self, k):
                raise ValueError(f"loader state has {k}={sd.get(k)!r}, this loader has {getattr(self, k)!r}")
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])
        self._it = None
        self._resume_from = sd.get("dali") if 0 < self.step < self.steps else None
        if 0 < self.step < self.steps and self._resume_from is None:
            raise ValueError(f"loader state is mid-epoch (epoch {self.epoch} step {self.step}) "
                             f"but holds no DALI checkpoint")


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
