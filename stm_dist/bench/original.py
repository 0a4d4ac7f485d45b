"""Import the original STM-Evaluation model definitions beside ours, for side-by-side timing.

The original's `classification/models` package is imported under a private name
(`stm_original`) straight from a checkout; nothing of it is copied into this project. Its package
`__init__` files are not run: they import every factory, and the DCNv3 one needs the compiled
CUDA op, which would make Halo/PVT/Swin/ConvNeXt unusable too. Each factory module is imported
on its own, so one mixer failing to import does not hide the others.

The original targets timm 0.6.x (`timm.models.layers.halo_attn`, `window_partition(x, int)`),
which current timm no longer offers. `timm_dir` (a folder holding timm 0.6.x, e.g.
`pip install --no-deps --target DIR timm==0.6.7`) is swapped in as `timm` only while the
original's modules import; their objects keep their references, and our own timm is put back.
"""
import importlib
import os
import sys
import types

PACKAGE = "stm_original"
# Our model-name prefix -> the original's factory module.
FACTORIES = {"unified_halo_": "halonet_factory", "unified_pvt_": "pvt_factory",
             "unified_swin_": "swin_factory", "unified_convnext_": "convnext_factory",
             "unified_dcn_v3_": "dcnv3_factory"}
# Why a mixer's original may not import, in words (printed next to the import error).
KNOWN_LIMITS = {"dcnv3_factory": "the original DCNv3 needs its compiled CUDA op "
                                 "MultiScaleDeformableAttention (no CPU implementation)"}


class OriginalUnavailable(RuntimeError):
    pass


def models_dir(checkout: str) -> str:
    return os.path.join(checkout, "classification", "models")


def check_checkout(checkout) -> str:
    """None if `checkout` looks like an STM-Evaluation checkout, else why not."""
    if not checkout:
        return "no --original checkout given"
    if not os.path.isfile(os.path.join(models_dir(checkout), "meta_arch.py")):
        return f"{checkout!r} has no classification/models/meta_arch.py (not an STM-Evaluation checkout)"
    return None


def _is_timm(name: str) -> bool:
    return name == "timm" or name.startswith("timm.")


def _stub_package(name: str, path: str) -> None:
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        mod.__package__ = name
        sys.modules[name] = mod


def _factory_name(model: str) -> str:
    for prefix, factory in FACTORIES.items():
        if model.startswith(prefix):
            return factory
    raise OriginalUnavailable(f"no original factory is known for {model!r}")


def load_factory(checkout: str, model: str, timm_dir: str = None):
    """The original's factory function for `model` (same name as ours).

    Raises OriginalUnavailable with the reason when it cannot be imported.
    """
    why = check_checkout(checkout)
    if why:
        raise OriginalUnavailable(why)
    factory = _factory_name(model)
    root = models_dir(checkout)
    _stub_package(PACKAGE, root)
    _stub_package(f"{PACKAGE}.blocks", os.path.join(root, "blocks"))
    _stub_package(f"{PACKAGE}.model_factory", os.path.join(root, "model_factory"))
    # Our models must be imported before the swap so they bind to our timm.
    import stm_dist.models  # noqa: F401
    from stm_dist.models import list_models
    list_models()

    ours = {}
    if timm_dir:
        ours = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_timm(k)}
        sys.path.insert(0, timm_dir)
    try:
        mod = importlib.import_module(f"{PACKAGE}.model_factory.{factory}")
    except Exception as e:  # noqa: BLE001 - any import failure means: cannot compare this mixer
        limit = KNOWN_LIMITS.get(factory)
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        raise OriginalUnavailable(f"{limit}; {msg}" if limit else msg) from e
    finally:
        if timm_dir:
            sys.path.remove(timm_dir)
            for k in [k for k in sys.modules if _is_timm(k)]:
                del sys.modules[k]  # the original's modules still hold what they imported
            sys.modules.update(ours)
    fn = getattr(mod, model, None)
    if fn is None:
        raise OriginalUnavailable(f"the original {factory} defines no {model}")
    return fn
