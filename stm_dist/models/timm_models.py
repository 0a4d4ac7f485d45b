"""Every registered model inside timm. The models register with timm on `import stm_dist.models`
(do that before `timm.create_model("unified_swin_tiny")`; aliases `unified_halonet_*` /
`unified_internimage_*` too).

The entry points build through our `create_model` (the one construction path) inside timm's
`build_model_with_cfg`, so timm's own machinery applies: `pretrained_cfg` / `default_cfg`,
`features_only=True` (timm's FeatureGetterNet over `MetaArch.forward_intermediates`),
`pretrained_cfg_overlay`, and timm's standard arguments (`drop_rate`: dropout before the
classifier; `global_pool`: 'avg', 'max', 'avgmax', 'catavgmax', '' = none; `output_stride`: 32,
the only stride the unified models have; `in_chans`), so timm's train.py creates them.

Weights load with our checkpoint conventions (stm_dist.models.pretrained: containers, prefixes,
rel-pos / pos-embed resizing, a new head for another class count, logged as a warning that names
both counts): a file or URL through `MetaArch.load_pretrained` (timm's `custom_load` hook, also
for `pretrained_cfg_overlay=dict(file=...)`; timm's own reader refuses the original's release
files, which pickle an argparse.Namespace), an in-memory state dict
(`pretrained_cfg_overlay=dict(state_dict=...)`) through `filter_state_dict`. A local file that
records its data config (stm-export's files: input size, crop, mean/std, class count) configures
the model with it: `timm.data.resolve_data_config({}, model=m)` gives the file's input size, and
without `num_classes` the model takes the file's class count. The caller's arguments and overlay
entries win over the file's.
"""
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model

__all__ = ["pretrained_cfg", "register", "filter_state_dict", "timm_names"]

# timm's register_model reads the pretrained cfgs of an entry point from its module's table.
default_cfgs = {}
_registered = {}  # timm name -> canonical model name


# The paper's ImageNet-1k recipe (spec §3): 224 px, crop 0.875, bicubic, ImageNet mean/std.
_BASE = dict(
    url="",
    num_classes=1000,
    input_size=(3, 224, 224),
    pool_size=(7, 7),
    crop_pct=0.875,
    interpolation="bicubic",
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    first_conv="downsample_layers.0.stem.0",
    classifier="head",
    custom_load=True,
    paper_ids="arXiv:2211.05781",
)


def pretrained_cfg(url: str = "", architecture: str = "") -> dict:
    """timm-style pretrained cfg of one of our models, with its release URL (if any)."""
    cfg = dict(_BASE, url=url)
    if architecture:
        cfg["architecture"] = architecture
    return cfg


def filter_state_dict(state_dict: dict, model) -> dict:
    """timm's pretrained_filter_fn: our loader does the conversion into `model` (strict, a new
    head for another class count); timm then loads the converted weights back unchanged."""
    model.load_pretrained(state_dict)
    return model.state_dict()


def _construct(create_model, canonical: str, output_stride: int = 32, **kwargs):
    if output_stride != 32:
        raise ValueError(f"{canonical}: output_stride={output_stride} is not supported: the unified models "
                         "have stride 32 only (no dilated stages); leave it at 32, or take the stride 4/8/16 "
                         "maps with features_only=True")
    if "in_chans" in kwargs:  # timm's name for it
        kwargs["in_channels"] = kwargs.pop("in_chans")
    return create_model(canonical, **kwargs)


def _weights_overlay(overlay: dict, kwargs: dict) -> dict:
    """The caller's pretrained_cfg_overlay completed from the weights it names: a local file's
    data config (input size, crop, mean/std, class count) and, when the caller gives no
    num_classes / img_size, the weights' class count and input size (set in `kwargs`); our
    loader reads the file (custom_load)."""
    from .weights_file import DATA_KEYS, classifier_rows, describe

    given = dict(overlay)
    found = {}
    if isinstance(overlay.get("file"), str) and overlay["file"]:
        cfg = describe(overlay["file"])["pretrained_cfg"]
        # JSON gave lists; timm's cfg holds tuples (resolve_data_config returns them as they are).
        found = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in DATA_KEYS if cfg.get(k) is not None}
    elif isinstance(overlay.get("state_dict"), dict):
        inner = next((overlay["state_dict"][k] for k in ("model", "module", "state_dict")
                      if isinstance(overlay["state_dict"].get(k), dict)), overlay["state_dict"])
        rows = classifier_rows(inner)
        found = {} if rows is None else {"num_classes": rows}
    if "num_classes" in kwargs:  # the caller's class count: the file's head is replaced if it differs
        found.pop("num_classes", None)
    if "img_size" not in kwargs and found.get("input_size"):
        # Swin's windows and relative-position tables, PVT's position embedding and DCNv3's
        # sampling grid are built for an input size: the one the weights were trained at.
        kwargs["img_size"] = tuple(int(v) for v in found["input_size"][-2:])
    if any(given.get(k) for k in ("file", "url", "hf_hub_id", "hf_hub_filename")):
        # timm resets custom_load for an overlaid source; our loader reads every source.
        given.setdefault("custom_load", True)
    return dict(found, **given)


def _build(create_model, timm_name: str, canonical: str, pretrained: bool = False, **kwargs):
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _weights_overlay(kwargs.get("pretrained_cfg_overlay") or {}, kwargs)
    return build_model_with_cfg(
        partial(_construct, create_model, canonical), timm_name, pretrained,
        pretrained_filter_fn=filter_state_dict,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs)


def register(create_model, canonical: str, url: str = "", aliases=()) -> None:
    """timm entry points for `canonical` and its alias names (again: the cfg is refreshed), each
    building through `create_model` (the registry's: handed in, so this module needs no import
    of the registry, which imports it)."""
    for name in (canonical, *aliases):
        cfg = dict(_BASE, url=url)
        if _registered.get(name) == canonical and default_cfgs.get(name) == cfg:
            continue
        default_cfgs[name] = cfg

        def entry(pretrained: bool = False, _name=name, **kwargs):
            return _build(create_model, _name, canonical, pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = __name__
        entry.__doc__ = (f"{canonical} (stm_dist, registered with timm on `import stm_dist.models`); "
                         f"pretrained=True loads {url or 'no released weights'}")
        globals()[name] = entry
        if name in _registered:  # a re-registered mixer: replace without timm's overwrite warning
            from timm.models._registry import _clear_model_entries

            _clear_model_entries(name)
        register_model(entry)
        _registered[name] = canonical


def timm_names() -> dict:
    """{timm name: canonical model name} of every entry point this package registered."""
    return dict(_registered)
