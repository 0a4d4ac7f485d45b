"""Model registry: `create_model(name, **overrides)` and `list_models()`.

Each mixer module (halo, pvt, swin, convnext, dcnv3) declares its models as plain data in a
`MODELS = {name: dict(block=BlockClass, depths=..., dims=..., drop_path_rate=...,
block_kwargs=..., forward_kwargs=...)}` table; this module only collects those tables and hands
a config to `MetaArch`. Overrides are MetaArch keyword arguments (num_classes, img_size,
drop_path_rate, layer_scale_init_value, grad_checkpointing, features_only, out_indices, ...).
"""
import difflib
import fnmatch
import importlib
import inspect

from .meta_arch import MetaArch

__all__ = ["create_model", "list_models", "model_config", "resolve_name"]

_MIXER_MODULES = ("halo", "pvt", "swin", "convnext", "dcnv3")

# Names used by the README and the released checkpoint files.
_ALIASES = {"unified_halonet_": "unified_halo_", "unified_internimage_": "unified_dcn_v3_"}

_registry = None


def _models() -> dict:
    global _registry
    if _registry is None:
        reg = {}
        for mod in _MIXER_MODULES:
            table = importlib.import_module(f"{__package__}.{mod}").MODELS
            clash = set(reg) & set(table)
            if clash:
                raise RuntimeError(f"model names registered twice (in {mod}.py): {sorted(clash)}")
            reg.update(table)
        _registry = reg
    return _registry


def list_models(pattern: str = "*") -> list:
    """Sorted registered model names matching a shell-style pattern."""
    return sorted(n for n in _models() if fnmatch.fnmatch(n, pattern))


def resolve_name(name: str) -> str:
    """Canonical model name for `name` (aliases resolved); a clear error if unknown."""
    for alias, canonical in _ALIASES.items():
        if name.startswith(alias):
            name = canonical + name[len(alias):]
    if name not in _models():
        close = difflib.get_close_matches(name, list(_models()), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (see stm_dist.models.list_models())")
    return name


def model_config(name: str) -> dict:
    """A copy of the registered config (block class + MetaArch arguments) of a model."""
    cfg = dict(_models()[resolve_name(name)])
    cfg["block_kwargs"] = dict(cfg.get("block_kwargs") or {})
    return cfg


_META_ARGS = set(inspect.signature(MetaArch.__init__).parameters) - {"self", "block_type"}


def create_model(name: str, **overrides) -> MetaArch:
    """Build a registered model; `overrides` replace the registered MetaArch arguments."""
    cfg = model_config(name)
    unknown = sorted(set(overrides) - _META_ARGS)
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown argument(s) {unknown}; "
                        f"accepted: {sorted(_META_ARGS)}")
    block = cfg.pop("block")
    cfg.update(overrides)
    return MetaArch(block_type=block, **cfg)
