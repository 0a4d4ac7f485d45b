"""Detection and instance segmentation with the unified backbones (issue 21): the original's
detection backbones (`create_backbone`, `load_backbone_weights`), torchvision's Mask R-CNN, the
COCO input pipeline and evaluation.

Lazy on purpose: importing the package loads nothing heavy; the names below resolve on first
use, and the parts import their submodules directly (`from stm_dist.detection.detector import ...`).
"""
import importlib

# public name -> submodule that defines it (resolved by __getattr__ on first access)
_LAZY = {
    "create_backbone": "backbone",
    "list_backbones": "backbone",
    "load_backbone_weights": "backbone_weights",
    "BackboneLoadReport": "backbone_weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
