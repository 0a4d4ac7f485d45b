"""Detector weights wherever they come from, for stm-eval and stm-export: a detection run (its newest
complete checkpoint at any ZeRO stage, consolidated), a file of ours (stm-export's detector export,
a run's best.pth) or the paper's released mmdet 2.x files (`mask_rcnn_unified_*_1x.pth`).

Every source ends as (state dict in our key layout, description). The description says what
detector the weights need and how they were evaluated:
    {"model": backbone name, "source": where, "step": int | None, "ema": bool,
     "detector": {"task": "detection", "num_classes", "head", "short_sides", "max_size",
                  "size_divisor", "mmdet_compat", "layout": "ours" | "mmdet"}}
num_classes and head are read from the tensors themselves (a file without any description still
builds the right detector); the input scale comes from the run's config or the export's
description, else the paper's single scale 1333x800.
"""
from __future__ import annotations

import json
import os
import re

import torch

DETECTOR_KEY = "detector"  # the entry of an export (and its sidecar) that describes a detector
PAPER_SCALE = {"short_sides": [800.0], "max_size": 1333, "size_divisor": 32}
_MMDET_PREFIXES = ("rpn_head.", "roi_head.")
_OUR_PREFIXES = ("rpn.head.", "roi_heads.")
_CLS = "roi_heads.box_predictor.cls_score.weight"
_FC6 = "roi_heads.box_head.fc6.weight"
_FPN = "neck.inner_blocks.0.0.weight"
_MASK_CONV = re.compile(r"roi_heads\.mask_head\.(\d+)\.0\.weight")


def is_mmdet_layout(keys) -> bool:
    return any(k.startswith(_MMDET_PREFIXES) for k in keys)


def is_detector_keys(keys) -> bool:
    """A Mask R-CNN state dict (ours or mmdet's), not a classification model's."""
    return any(k.startswith(_MMDET_PREFIXES + _OUR_PREFIXES) for k in keys)


def _keys(path: str) -> list:
    """The tensor names of a weights file, read cheaply (safetensors header, memory-mapped torch;
    [] for a file that does not open: the loader proper names its problem)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception:  # noqa: BLE001
            return []
    obj = None
    for mmap in (True, False):  # a legacy (non-zip) torch file cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            break
        except Exception:  # noqa: BLE001
            continue
    if not isinstance(obj, dict):
        return []
    for k in ("state_dict", "model", "module"):
        if isinstance(obj.get(k), dict):
            return list(obj[k])
    return list(obj)


def guess_task(path: str, warn=print) -> str:
    """'detection' for a detection run, a detector export or a file of detector tensors (ours or
    mmdet's), else 'classification'."""
    if os.path.isdir(path):
        from .export import locate

        try:
            ckpt_dir, tag, marker = locate(path, warn=warn)
        except FileNotFoundError:
            return "classification"  # the classification path names what is missing
        return (_recorded_config(ckpt_dir, tag, marker).get("model") or {}).get("task", "classification")
    if not os.path.isfile(path):
        return "classification"
    try:
        with open(path + ".json") as f:
            side = json.load(f)
        if isinstance(side, dict) and isinstance(side.get(DETECTOR_KEY), dict):
            return "detection"
    except (OSError, ValueError):
        pass
    return "detection" if is_detector_keys(_keys(path)) else "classification"


def detector_shape(sd: dict, where: str) -> dict:
    """{"num_classes", "head"} of the detector whose state dict (our keys) is `sd`."""
    from stm_dist.detection.detector import head_config

    missing = [k for k in (_CLS, _FC6, _FPN) if k not in sd]
    if missing:
        raise ValueError(f"{where}: not a Mask R-CNN detector of ours (no {', '.join(missing)}); "
                         "expected a detection run, a detector export or a released mmdet Mask R-CNN file")
    fc, fpn = int(sd[_FC6].shape[0]), int(sd[_FPN].shape[0])
    convs = len({m.group(1) for k in sd for m in [_MASK_CONV.fullmatch(k)] if m})
    for head in ("full", "slim"):
        cfg = head_config(head)
        if (cfg.fc_dim, cfg.mask_convs, cfg.fpn_channels) == (fc, convs, fpn):
            return {"num_classes": int(sd[_CLS].shape[0]) - 1, "head": head}
    raise ValueError(f"{where}: heads of FC {fc}, {convs} mask convs, FPN {fpn} channels are neither the "
                     "'full' (1024, 4, 256) nor the 'slim' (256, 2, 64) Mask R-CNN head")


def _scale_of(run_cfg: dict) -> dict:
    det = run_cfg.get("detection") or {}
    out = dict(PAPER_SCALE)
    out.update({k: det[k] for k in PAPER_SCALE if det.get(k) is not None})
    out["mmdet_compat"] = bool(det.get("mmdet_compat", False))
    return out


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            out = yaml.safe_load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _recorded_config(ckpt_dir: str, tag: str, marker: dict) -> dict:
    """The run's config as {section: {key: value}}: from the checkpoint marker's recipe (small,
    already read), else from the client state the checkpoint saved (older checkpoints)."""
    recipe = marker.get("recipe")
    if isinstance(recipe, dict) and "model.task" in recipe:
        out: dict = {}
        for key, value in recipe.items():
            sec, _, name = key.partition(".")
            out.setdefault(sec, {})[name] = value
        return out
    from .export import _run_config

    return _run_config(ckpt_dir, tag)


def _from_run(src: str, ema: bool, warn) -> tuple[dict, dict, dict]:
    from .export import consolidate, locate

    ckpt_dir, tag, marker = locate(src, warn=warn)
    run_cfg = _recorded_config(ckpt_dir, tag, marker)
    task = (run_cfg.get("model") or {}).get("task", "classification")
    if task != "detection":
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: a {task} run (model.task={task}), not a detection run")
    sd = consolidate(ckpt_dir, tag, marker, ema=ema)
    info = {"model": marker.get("model"), "source": os.path.join(ckpt_dir, tag), "step": marker.get("step"),
            "ema": ema}
    return sd, info, _scale_of(run_cfg)


def _from_file(path: str, ema: bool) -> tuple[dict, dict, dict]:
    from stm_dist.detection.mmdet_keys import mmdet_to_ours
    from stm_dist.models.pretrained import extract_state_dict
    from stm_dist.models.weights_file import read_file

    obj, is_ema, named = read_file(path)
    side = {}
    if os.path.isfile(path + ".json"):  # stm-export's and best.pth's description
        side = _read_json(path + ".json")
    meta = obj if isinstance(obj, dict) else {}
    if path.endswith(".safetensors"):
        from .export import read_info

        meta = read_info(path)
    ours = (meta.get("meta") or {}).get("stm_dist") if isinstance(meta.get("meta"), dict) else None
    # the description: our export's entry, our mmdet export's meta, the sidecar
    desc = next((d for d in (meta.get(DETECTOR_KEY), (ours or {}).get(DETECTOR_KEY), side.get(DETECTOR_KEY))
                 if isinstance(d, dict)), None)
    # mmdet's {"meta", "state_dict", "optimizer"} and our containers alike
    sd = extract_state_dict(obj, use_ema=ema, source=path, is_ema=is_ema)
    layout = "mmdet" if is_mmdet_layout(sd) else "ours"
    if layout == "mmdet":
        sd = mmdet_to_ours(sd, source=path)
    scale = dict(PAPER_SCALE, mmdet_compat=layout == "mmdet")
    if isinstance(desc, dict):
        scale.update({k: desc[k] for k in PAPER_SCALE if desc.get(k) is not None})
        # weights in mmdet's layout are evaluated with mmdet's numerics, whatever trained them
        scale["mmdet_compat"] = layout == "mmdet" or bool(desc.get("mmdet_compat", False))
    else:  # a run's best.pth: the run's config lies beside it
        run_cfg = _read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml"))
        if (run_cfg.get("model") or {}).get("task") == "detection":
            scale = _scale_of(run_cfg)
    step = meta.get("step", side.get("step"))
    info = {"model": named or side.get("model"), "source": os.path.abspath(path),
            "step": step if isinstance(step, int) else None, "ema": bool(ema or is_ema), "layout": layout}
    return sd, info, scale


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def load_detector_source(src: str, ema: bool = False, warn=print, model: str | None = None) -> tuple[dict, dict]:
    """(fp32 state dict in our keys, description: module doc) of a detection run directory or
    checkpoint folder, or of a detector weights file (ours or the paper's mmdet layout). `model`
    names the backbone when the source does not (a bare or mmdet state dict)."""
    from stm_dist.models.registry import resolve_name

    if os.path.isdir(src):
        sd, info, scale = _from_run(src, ema, warn)
        layout = "ours"
    elif os.path.isfile(src):
        sd, info, scale = _from_file(src, ema)
        layout = info.pop("layout")
    else:
        raise FileNotFoundError(f"no such file or directory: {src}")
    name = model or info.get("model")
    if not name:
        raise ValueError(f"{src} does not say which backbone it holds (no stm-export metadata): pass --model NAME")
    if model and info.get("model") and resolve_name(model) != resolve_name(info["model"]):
        raise ValueError(f"{src} holds a detector on {info['model']}, not {model}: run with --model {info['model']}")
    info["model"] = resolve_name(name)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous() for k, v in sd.items()}
    shape = detector_shape(sd, src)
    info[DETECTOR_KEY] = {"task": "detection", **shape, **scale, "layout": layout}
    return sd, info


def load_into(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Strict load of our-layout detector weights; buffers the backbone derives from its
    configuration (relative_position_index, attn_mask) are kept when the weights lack them."""
    from stm_dist.detection.mmdet_keys import key_mismatches

    own = model.state_dict()
    missing, unexpected, wrong = key_mismatches(own, sd)
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit the detector: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"shape mismatches {wrong[:8]} (another backbone or size?)")
    full = {k: sd.get(k, own[k]) for k in own}
    model.load_state_dict(full, strict=True)


def export_detector(src: str, out_path: str, ema: bool = False, mmdet: bool = False, fmt: str | None = None,
                    warn=print, model: str | None = None) -> dict:
    """Write a detector's fp32 weights: our key layout as stm-export writes classification
    weights (.pth container or .safetensors, the description under "detector" and in the
    sidecar <file>.json), or with `mmdet` the mmdet 2.x layout of the paper's release files
    ({"meta", "state_dict"}, background class last; stm_dist.detection.mmdet_keys)."""
    from .export import format_for, publish, write

    fmt = format_for(out_path, fmt)
    if mmdet and fmt != "pth":
        raise ValueError(f"--mmdet writes mmdet's torch checkpoint format: name the output {os.path.splitext(out_path)[0]}.pth")
    sd, info = load_detector_source(src, ema=ema, warn=warn, model=model)
    info[DETECTOR_KEY] = dict(info[DETECTOR_KEY], layout="mmdet" if mmdet else "ours")  # the file's, now
    if not mmdet:
        write(sd, out_path, info, fmt)
        return dict(info, format=fmt, layout="ours")
    from stm_dist.detection.mmdet_keys import ours_to_mmdet

    meta = {"stm_dist": info}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        torch.save({"meta": meta, "state_dict": ours_to_mmdet(sd)}, tmp)
        publish(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with open(out_path + ".json", "w") as f:
        json.dump(dict(info, format="pth"), f, indent=1)
    return dict(info, format="pth", layout="mmdet")
