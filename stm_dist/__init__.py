"""stm-dist: spatial token mixers compared inside one unified backbone, trained with DeepSpeed.

Importing the package is cheap: subpackages load on first attribute access, so a user who only
wants `stm_dist.models` never pays for DeepSpeed or DALI.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "ops", "data", "engine", "cli", "env")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'stm_dist' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
