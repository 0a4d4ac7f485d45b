"""The detection loaders by backend (the contract: loader.py's docstring): DALI (loader.py; GPU
or CPU decode) or PIL + torch (torch_loader.py), with the same plan, choices and targets."""
from __future__ import annotations

from stm_dist.detection.loader import DetTrainLoader, DetValLoader

BACKENDS = ("dali", "pil")


def _check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'dali' or 'pil', got {backend!r}")


def build_det_train_loader(shard_dir, batch_size, *, backend="dali", **kwargs):
    _check_backend(backend)
    if backend == "pil":
        from stm_dist.detection.torch_loader import TorchDetTrainLoader

        return TorchDetTrainLoader(shard_dir, batch_size, **kwargs)
    return DetTrainLoader(shard_dir, batch_size, **kwargs)


def build_det_val_loader(shard_dir, batch_size, *, backend="dali", **kwargs):
    _check_backend(backend)
    if backend == "pil":
        from stm_dist.detection.torch_loader import TorchDetValLoader

        return TorchDetValLoader(shard_dir, batch_size, **kwargs)
    return DetValLoader(shard_dir, batch_size, **kwargs)
