"""Model registry: spatial token mixers, their sizes, and `create_model(name, **overrides)`.

A mixer is a block class plus a table of sizes. `register_mixer(name, block_class, sizes)` adds
one model `unified_<name>_<size>` per size, to this registry and to timm (`timm.create_model`).
The five built-in mixers register themselves that way at the bottom of their own files
(stm_dist.models imports them); a mixer written anywhere else arrives through
`load_mixer_module(path_or_module)`: the recipe key `model.mixer_module`, the environment
variable STM_MIXER_MODULES (os.pathsep-separated, read when stm_dist.models is imported, so
every process of a launcher sees it) or a `stm_dist.mixers` entry point of an installed package.
See docs/mixers.md for the block contract.

Overrides of `create_model` are MetaArch keyword arguments (num_classes, img_size,
drop_path_rate, layer_scale_init_value, grad_checkpointing, features_only, out_indices, ...).
"""
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from typing import Dict, Optional, Sequence

from .meta_arch import MetaArch
from .names import ALIASES, unalias

__all__ = ["create_model", "list_models", "model_config", "resolve_name", "register_mixer", "mixers",
           "mixer_of", "load_mixer_module", "load_plugins", "paper_release", "MixerError"]

ENTRY_POINT_GROUP = "stm_dist.mixers"
ENV_VAR = "STM_MIXER_MODULES"
_RELEASE = "https://github.com/OpenGVLab/STM-Evaluation/releases/download/cls-ckpt/unified_{}.pth"

_META_ARGS = set(inspect.signature(MetaArch.__init__).parameters) - {"self", "block_type"}
_SIZE_KEYS = _META_ARGS | {"url"}
_MIXER_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")
_SIZE_NAME = re.compile(r"^[a-z0-9]+$")  # no '_': the size is what follows the last one

_models: Dict[str, dict] = {}  # model name -> config (block + MetaArch arguments + url)
_mixers: Dict[str, dict] = {}  # mixer name -> dict(block=..., sizes=(...), aliases=(...))
_of: Dict[str, tuple] = {}  # model name -> (mixer, size)
_aliases = ALIASES  # "unified_halonet_" -> "unified_halo_" (names.py)


class MixerError(ValueError):
    """A mixer that cannot be registered or loaded; the message names it and the fix."""


def paper_release(file_mixer: str, size: str) -> str:
    """URL of the paper's released ImageNet-1k checkpoint (its file names say halonet/internimage)."""
    return _RELEASE.format(f"{file_mixer}_{size}")


def _block_id(block) -> tuple:
    # A file loaded twice under two module names is the same mixer, not a clash.
    try:
        source = inspect.getsourcefile(block)
    except (TypeError, OSError):
        source = getattr(block, "__module__", None)
    return getattr(block, "__qualname__", repr(block)), source


def register_mixer(name: str, block_class, sizes: Dict[str, dict], *, aliases: Sequence[str] = (),
                   replace: bool = False) -> Dict[str, dict]:
    """Register `unified_<name>_<size>` for every size: `sizes = {size: dict(depths=(4 ints),
    dims=(4 ints), drop_path_rate=..., block_kwargs={...}, forward_kwargs={...}, url=...,
    any other MetaArch argument)}`. `aliases`: other mixer names that resolve to this one
    (`unified_<alias>_<size>`). Returns {model name: config}. Registering the same block class
    again replaces it silently; another block under a taken name needs replace=True."""
    where = f"register_mixer({name!r})"
    if not isinstance(name, str) or not _MIXER_NAME.match(name):
        raise MixerError(f"{where}: a mixer name is lowercase letters, digits and '_' (e.g. 'pool')")
    if not callable(block_class):
        raise MixerError(f"{where}: block_class must be a class (see docs/mixers.md), got {block_class!r}")
    if not isinstance(sizes, dict) or not sizes:
        raise MixerError(f"{where}: sizes must be a non-empty dict {{size: dict(depths=..., dims=...)}}")
    for other in (name, *aliases):
        if f"unified_{other}_" in _aliases and _aliases[f"unified_{other}_"] != f"unified_{name}_":
            raise MixerError(f"{where}: {other!r} is already an alias of "
                             f"{_aliases[f'unified_{other}_'][8:-1]!r}; pick another name")
    table = {}
    for size, cfg in sizes.items():
        if not isinstance(size, str) or not _SIZE_NAME.match(size):
            raise MixerError(f"{where}: size {size!r}: a size name is lowercase letters and digits (e.g. 'micro')")
        if not isinstance(cfg, dict):
            raise MixerError(f"{where}: size {size!r}: expected a dict of MetaArch arguments, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - _SIZE_KEYS)
        if unknown:
            raise MixerError(f"{where}: size {size!r}: unknown key(s) {unknown}; accepted: {sorted(_SIZE_KEYS)}")
        for key in ("depths", "dims"):
            v = cfg.get(key)
            if not (isinstance(v, (list, tuple)) and len(v) == 4 and all(isinstance(i, int) and i > 0 for i in v)):
                raise MixerError(f"{where}: size {size!r}: '{key}' must be 4 positive ints (one per stage), got {v!r}")
        model = f"unified_{name}_{size}"
        old = _models.get(model)
        if old is not None and not replace and _block_id(old["block"]) != _block_id(block_class):
            raise MixerError(f"{where}: {model} is already registered with block "
                             f"{old['block'].__module__}.{old['block'].__qualname__}; pass replace=True "
                             "to override it, or pick another mixer name")
        table[model] = dict(cfg, block=block_class)
    for model, cfg in table.items():
        _models[model] = cfg
        _of[model] = (name, model[len(f"unified_{name}_"):])
    prev = _mixers.get(name, {})
    _mixers[name] = dict(block=block_class, sizes=tuple(dict.fromkeys((*prev.get("sizes", ()), *sizes))),
                         aliases=tuple(dict.fromkeys((*prev.get("aliases", ()), *aliases))))
    for alias in aliases:
        _aliases[f"unified_{alias}_"] = f"unified_{name}_"
    from . import timm_models

    for model, cfg in table.items():
        size = _of[model][1]
        timm_models.register(create_model, model, cfg.get("url") or "", [f"unified_{a}_{size}" for a in aliases])
    return {m: dict(c) for m, c in table.items()}


def mixers() -> Dict[str, tuple]:
    """{mixer name: its sizes}, in registration order."""
    return {n: m["sizes"] for n, m in _mixers.items()}


def mixer_of(model_name: str) -> Optional[tuple]:
    """(mixer, size) of a registered model name or alias; None if unknown."""
    try:
        return _of[resolve_name(model_name)]
    except KeyError:
        return None


def list_models(pattern: str = "*") -> list:
    """Sorted registered model names matching a shell-style pattern."""
    return sorted(n for n in _models if fnmatch.fnmatch(n, pattern))


def resolve_name(name: str) -> str:
    """Canonical model name for `name` (aliases resolved); a clear error if unknown."""
    name = unalias(name)
    if name not in _models:
        close = difflib.get_close_matches(name, list(_models), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (see stm_dist.models.list_models(); a mixer of "
                       f"your own: model.mixer_module or {ENV_VAR}, docs/mixers.md)")
    return name


def model_config(name: str) -> dict:
    """A copy of the registered config (block class + MetaArch arguments) of a model."""
    cfg = dict(_models[resolve_name(name)])
    cfg.pop("url", None)
    cfg["block_kwargs"] = dict(cfg.get("block_kwargs") or {})
    return cfg


def create_model(name: str, **overrides) -> MetaArch:
    """Build a registered model; `overrides` replace the registered MetaArch arguments. The one
    construction path: timm's entry points call it too."""
    canonical = resolve_name(name)
    cfg = model_config(canonical)
    unknown = sorted(set(overrides) - _META_ARGS)
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown argument(s) {unknown}; "
                        f"accepted: {sorted(_META_ARGS)}")
    block = cfg.pop("block")
    cfg.update(overrides)
    model = MetaArch(block_type=block, **cfg)
    from .timm_models import pretrained_cfg

    model.pretrained_cfg = model.default_cfg = pretrained_cfg(_models[canonical].get("url") or "", canonical)
    return model


# -- mixers from outside the package -----------------------------------------------------------
def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def load_mixer_module(spec: str, source: str = "mixer module"):
    """Import a mixer file (`path/to/file.py`) or module (`pkg.mod`) once; it registers its
    mixers by calling register_mixer. `source` names the setting in error messages."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixerError(f"{source}: expected a .py file or a module name, got {spec!r}")
    spec = spec.strip()
    before = len(_models)
    if _looks_like_path(spec):
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise MixerError(f"{source}: mixer file not found: {spec} (looked for {path})")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        mod_name = f"stm_dist_mixer_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # before exec: dataclasses / pickling look it up
        try:
            loader_spec.loader.exec_module(module)
        except MixerError:
            sys.modules.pop(mod_name, None)
            raise
        except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
            sys.modules.pop(mod_name, None)
            raise MixerError(f"{source}: {path} failed to import: {type(e).__name__}: {e}") from e
        what = path
    else:
        if spec in sys.modules:
            return sys.modules[spec]
        try:
            module = importlib.import_module(spec)
        except MixerError:
            raise
        except Exception as e:  # noqa: BLE001
            raise MixerError(f"{source}: cannot import mixer module {spec!r}: {type(e).__name__}: {e} "
                             "(give an importable module name or a path to a .py file)") from e
        what = spec
    if len(_models) == before and not any(getattr(c["block"], "__module__", None) == module.__name__
                                          for c in _models.values()):
        raise MixerError(f"{source}: {what} registered no mixer; call "
                         "stm_dist.models.register_mixer(name, BlockClass, sizes={...}) in it")
    return module


def load_plugins() -> None:
    """Mixers of STM_MIXER_MODULES and of installed `stm_dist.mixers` entry points. A broken one
    warns (naming it) instead of breaking every import of stm_dist.models."""
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(os.pathsep))):
        try:
            load_mixer_module(spec, source=ENV_VAR)
        except MixerError as e:
            warnings.warn(str(e), stacklevel=2)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not inspect.isclass(obj):  # `pkg.mod:register`, else a module
                obj()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"{ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
