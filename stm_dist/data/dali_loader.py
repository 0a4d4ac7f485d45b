"""Train and val loaders over DALI pipelines: train follows the epoch plan through one pipeline
for the whole run (plan_loader.py, plan_source.py); val reads each rank's slice in order."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings

import torch

from stm_dist.data.epoch_plan import slice_bounds
from stm_dist.data.manifest import read_manifest, shard_files
from stm_dist.data.plan_loader import PlanTrainLoader


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


@contextlib.contextmanager
def _autograph_scratch():
    """DALI's conditionals (autograph) write every function they convert to a temporary .py
    file and remove it only in an atexit hook, which a rank ending in os._exit (ours do) or a
    kill never runs: ~45 files in /tmp per RandAugment pipeline, thousands on a shared node.
    Tracing the graph in a private folder that is removed once traced leaves none; the
    converted code is only run while the graph is traced."""
    old, tempfile.tempdir = tempfile.tempdir, tempfile.mkdtemp(prefix="stm-dali-autograph-")
    try:
        yield
    finally:
        scratch, tempfile.tempdir = tempfile.tempdir, old
        shutil.rmtree(scratch, ignore_errors=True)


def _iterator(pipe, policy, reader_name="reader"):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return DALIGenericIterator([pipe], ["images", "labels"], reader_name=reader_name, auto_reset=False,
                               last_batch_policy=getattr(LastBatchPolicy, policy))


class DaliTrainLoader(PlanTrainLoader):
    """See :func:`stm_dist.data.build_train_loader` for the contract.

    One pipeline for the whole run, built at the first batch: an ``external_source`` callback
    (plan_source.PlanSource) walks this rank's part of the epoch plan from the loader's position
    through every epoch end, so nothing is rebuilt between epochs and DALI's prefetching runs on
    into the next epoch. Only a jump to another position (``load_state_dict`` or ``set_epoch``
    after the pipeline was built) rebuilds it. The pipeline draws no random numbers (the plan
    hands it each sample's choices), so a position is all a resume needs: no DALI checkpoint.
    """

    backend = "dali"

    def __init__(self, *args, source_workers=0, **kwargs):
        super().__init__(*args, **kwargs)
        self._dali_device, self._device_id = _dali_device(self.device)
        self.source_workers = source_workers
        self._it = None

    def describe(self) -> dict:
        import nvidia.dali

        return dict(super().describe(), dali=nvidia.dali.__version__)

    def _reposition(self):
        self._it = None

    def _build(self):
        from stm_dist.data.dali_pipelines import train_pipeline
        from stm_dist.data.plan_source import PlanSource, TarReader

        source = PlanSource(self.table, self.plan, TarReader(self.table.tars, self.dont_use_mmap), rank=self.rank,
                            accum=self.accum, micro_batch=self.batch_size, epoch=self.epoch, step=self.step,
                            micro=self.micro, randaug=self.randaug)
        with _quiet_dali_aliases():
            # source_workers > 0: the callback (reads, host-drawn choices) runs in that many
            # processes instead of the training loop's thread; spawned, since CUDA may be up.
            par = dict(py_num_workers=self.source_workers, py_start_method="spawn") if self.source_workers else {}
            with _autograph_scratch():  # the graph is traced here; build() starts the workers
                pipe = train_pipeline(source, img_size=self.img_size, device=self._dali_device,
                                      randaug=self.randaug, parallel=bool(self.source_workers),
                                      batch_size=self.batch_size, num_threads=self.num_threads,
                                      device_id=self._device_id, seed=0, **par)
            pipe.build()
            self._it = _iterator(pipe, "FILL", reader_name=None)

    def _fetch(self):
        if self._it is None:
            self._build()
        out = next(self._it)[0]
        images, labels = out["images"], out["labels"]
        if self.device != "cpu":
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return images, labels


class DaliValLoader:
    """See :func:`stm_dist.data.build_val_loader` for the contract."""

    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, img_size=224, crop_pct=0.875, device="cpu",
                 num_threads=2, split="val", dont_use_mmap=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        man = read_manifest(shard_dir, split)
        self.tars, self.idxs, _ = shard_files(shard_dir, split, man)
        self.num_classes = int(man["num_classes"])
        lo, hi = slice_bounds(int(man["num_samples"]), rank, world_size)
        self.num_samples = hi - lo
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, device
        self.img_size, self.resize_size = img_size, int(img_size / crop_pct)
        self.num_threads, self.dont_use_mmap = num_threads, dont_use_mmap
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
                                seed=0, dont_use_mmap=self.dont_use_mmap)
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
