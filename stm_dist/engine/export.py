"""Turn a run's checkpoint (any ZeRO stage) into one fp32 weights file: `.pth` or `.safetensors`.

Both hold the model's own state-dict keys (the original release's key layout) and say what they
are: the model name, its pretrained_cfg (what timm needs to use the weights: input size, class
count, mean/std, crop), the checkpoint they came from, the step and whether they are the EMA.
* `.safetensors`: the tensors, with that description as string metadata ("stm_dist.model",
  "stm_dist.pretrained_cfg" (JSON), "stm_dist.source", "stm_dist.step", "stm_dist.ema").
* `.pth`: `{"state_dict": sd, "model": name, "pretrained_cfg": {...}, "source", "step", "ema"}`,
  the container both our `load_pretrained` and timm's `load_state_dict` look into.
A sidecar `<file>.json` repeats the description for tools that do not open the weights.
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .checkpoint import locate  # noqa: F401  (stm-eval and stm-analyze find checkpoints here too)
from .flat_params import Layout

FORMATS = ("pth", "safetensors")
META_PREFIX = "stm_dist."
# Where the weights can be fetched from is not a property of these weights.
_CFG_DROP = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "architecture")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def consolidate(ckpt_dir: str, tag: str, marker: dict, ema: bool = False) -> dict:
    """The checkpoint's fp32 weights (or their EMA) in the model's own keys."""
    sd = _consolidate(ckpt_dir, tag, marker, ema)
    layout = marker.get("param_layout")
    # ZeRO 3 with zero3_fetch_unit 'flat' saved one tensor per fetch unit and group: split them back.
    return Layout.from_json(layout).unflatten(sd) if layout else sd


def _consolidate(ckpt_dir: str, tag: str, marker: dict, ema: bool) -> dict:
    tag_dir = os.path.join(ckpt_dir, tag)
    if ema:
        from .ema import assemble

        states = [c.get("ema") for c in ckpt.load_all_clients(tag_dir, int(marker.get("world_size", 1)))]
        if any(s is None for s in states):
            raise KeyError(f"{tag_dir}: this run kept no EMA weights (train.ema was false)")
        # Each rank saved the slices of the average it owns; put them back together.
        return {k: v.float() if v.is_floating_point() else v for k, v in assemble(states).items()}
    stage = int(marker.get("zero_stage", 0))
    if stage == 0:
        path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
        # The module DeepSpeed holds is the fp32 master (bf16/fp16 train under autocast);
        # only the explicit pure_bf16 mode stores 16-bit weights here.
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag)
    # Buffers come back in the training dtype; parameters are the fp32 master copy.
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def format_for(out_path: str, fmt: str | None = None) -> str:
    """The file format: `fmt` if given, else from the suffix (.safetensors, anything else .pth).
    A format the suffix contradicts is refused: timm picks its reader by the suffix."""
    by_suffix = "safetensors" if out_path.endswith(".safetensors") else "pth"
    if fmt is None:
        return by_suffix
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != by_suffix:
        stem = os.path.splitext(out_path)[0]
        want = stem + (".safetensors" if fmt == "safetensors" else ".pth")
        raise ValueError(f"--format {fmt} but the output is named {out_path} (readers, timm's included, "
                         f"choose the format by the suffix): name it {want}")
    return fmt


def _run_config(ckpt_dir: str, tag: str) -> dict:
    """The experiment config the checkpoint was trained under ({} when it cannot be read)."""
    try:
        return ckpt.load_client(os.path.join(ckpt_dir, tag), 0).get("config") or {}
    except (RuntimeError, AttributeError):
        return {}


def pretrained_cfg(name: str, sd: dict, run_cfg: dict) -> dict:
    """timm's pretrained_cfg for these weights: the registered one (when stm_dist.models gives it
    to timm), with the class count, input size and crop of the run that trained them."""
    cfg: dict = {}
    try:
        import stm_dist.models  # noqa: F401  (registers the models with timm)
        from timm.models import get_pretrained_cfg

        found = get_pretrained_cfg(name, allow_unregistered=False)
        if found is not None:
            cfg = found.to_dict()
    except (ImportError, RuntimeError, KeyError, ValueError):
        pass
    cfg = {k: v for k, v in cfg.items() if k not in _CFG_DROP and v is not None}
    model, data = run_cfg.get("model") or {}, run_cfg.get("data") or {}
    cfg.setdefault("mean", _IMAGENET_MEAN)
    cfg.setdefault("std", _IMAGENET_STD)
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("classifier", "head")
    if "head.weight" in sd:
        cfg["num_classes"] = int(sd["head.weight"].shape[0])
    elif model.get("num_classes"):
        cfg["num_classes"] = int(model["num_classes"])
    if model.get("img_size"):
        size = int(model["img_size"])
        cfg["input_size"] = (3, size, size)
        if "pool_size" in cfg:  # the last stage's map: stride 32
            cfg["pool_size"] = (max(1, size // 32), max(1, size // 32))
    cfg.setdefault("input_size", (3, 224, 224))
    if data.get("crop_pct"):
        cfg["crop_pct"] = float(data["crop_pct"])
    cfg.setdefault("crop_pct", 0.875)
    return json.loads(json.dumps(cfg))  # plain JSON types (tuples -> lists), as the file will hold


def publish(tmp: str, out_path: str) -> None:
    """Move a finished temporary file into place with the mode a new file gets under the umask
    (safetensors' writer creates files 0600, unreadable to the group that shares the weights)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, out_path)


def write(sd: dict, out_path: str, info: dict, fmt: str):
    """Write `sd` with its description `info` (model, pretrained_cfg, source, step, ema)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            meta = {f"{META_PREFIX}{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in info.items()}
            save_file(sd, tmp, metadata=meta)
        else:
            torch.save({"state_dict": sd, **info}, tmp)
        publish(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with open(out_path + ".json", "w") as f:
        json.dump(dict(info, format=fmt), f, indent=1)


def recorded_input(path: str, warn=print) -> dict:
    """What a checkpoint records about the data its weights expect: {'img_size', 'crop_pct',
    'num_classes'} (those it knows) and 'source' (where they were read). A weights file: its
    pretrained_cfg (stm-export's metadata, the .pth container or the sidecar .json), for a
    best.pth / best_ema.pth the config of its run beside it; a run directory or checkpoint
    folder: the config of the run that trained it."""
    out: dict = {}
    if os.path.isdir(path):
        ckpt_dir, tag, _ = locate(path, warn=warn)
        run_cfg = _run_config(ckpt_dir, tag)
        model, data = run_cfg.get("model") or {}, run_cfg.get("data") or {}
        found = {"img_size": model.get("img_size"), "crop_pct": data.get("crop_pct"),
                 "num_classes": model.get("num_classes")}
        out["source"] = f"the run config of {os.path.join(ckpt_dir, tag)}"
    else:
        from stm_dist.models.weights_file import describe

        cfg = describe(path)["pretrained_cfg"]
        size = cfg.get("input_size")
        found = {"img_size": int(size[-1]) if isinstance(size, (list, tuple)) and size else None,
                 "crop_pct": cfg.get("crop_pct"), "num_classes": cfg.get("num_classes")}
        out["source"] = f"{os.path.basename(path)}'s pretrained_cfg"
        if found["img_size"] is None:
            run_cfg = _best_run_config(path)
            if run_cfg:
                model, data = run_cfg.get("model") or {}, run_cfg.get("data") or {}
                found = {"img_size": model.get("img_size"), "crop_pct": data.get("crop_pct"),
                         "num_classes": found["num_classes"] or model.get("num_classes")}
                out["source"] = f"the run config beside {os.path.basename(path)}"
    out.update({k: v for k, v in found.items() if v is not None})
    return out


def _best_run_config(path: str) -> dict:
    """The config of the run a best.pth / best_ema.pth belongs to (its config.yaml sits beside
    it; the sidecar names the kind and the model), else {}."""
    import yaml

    try:
        with open(path + ".json") as f:
            side = json.load(f)
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")) as f:
            run_cfg = yaml.safe_load(f) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not (isinstance(side, dict) and str(side.get("kind", "")).startswith("best") and isinstance(run_cfg, dict)):
        return {}
    return run_cfg if (run_cfg.get("model") or {}).get("name") == side.get("model") else {}


def read_info(path: str) -> dict:
    """The description stored inside an export (model, pretrained_cfg, source, step, ema)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        out = {}
        for k, v in meta.items():
            if k.startswith(META_PREFIX):
                k = k[len(META_PREFIX):]
                out[k] = v if k in ("model", "source") else json.loads(v)
        return out
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj.items() if k != "state_dict"} if isinstance(obj, dict) else {}


def _from_file(path: str, ema: bool, model: str | None) -> tuple[dict, dict]:
    """(state dict, description) of a weights file: an export, a best.pth, a release file."""
    from stm_dist.models.pretrained import extract_state_dict
    from stm_dist.models.weights_file import DATA_KEYS, describe, read_file

    obj, is_ema, named = read_file(path)
    sd = extract_state_dict(obj, use_ema=ema, source=path, is_ema=is_ema)
    name = model or named
    if not name:
        raise ValueError(f"{path} does not say which model it holds (no stm-export metadata, no release args): "
                         "pass --model NAME")
    from stm_dist.models.registry import resolve_name

    name = resolve_name(name)
    cfg = pretrained_cfg(name, sd, {})
    recorded = describe(path)["pretrained_cfg"]  # what the file knows beats the registered defaults
    cfg.update({k: recorded[k] for k in DATA_KEYS if recorded.get(k) is not None})
    meta = read_info(path) if path.endswith(".safetensors") else (obj if isinstance(obj, dict) else {})
    step = meta.get("step", meta.get("epoch"))
    return sd, {"model": name, "pretrained_cfg": json.loads(json.dumps(cfg)), "source": os.path.abspath(path),
                "step": step if isinstance(step, int) else None, "ema": bool(ema or is_ema)}


def load_source(src: str, ema: bool = False, warn=print, model: str | None = None) -> tuple[dict, dict]:
    """(fp32 state dict, description: model, pretrained_cfg, source, step, ema) of a run
    directory / checkpoint folder (consolidated, any ZeRO stage) or of a weights file."""
    if os.path.isfile(src):
        sd, info = _from_file(src, ema, model)
    else:
        ckpt_dir, tag, marker = locate(src, warn=warn)
        sd = consolidate(ckpt_dir, tag, marker, ema=ema)
        name = marker.get("model")
        info = {"model": name, "pretrained_cfg": pretrained_cfg(name, sd, _run_config(ckpt_dir, tag)),
                "source": os.path.join(ckpt_dir, tag), "step": marker.get("step"), "ema": ema}
    # Own, contiguous storage per tensor: safetensors refuses shared or strided tensors, and the
    # two formats must hold the same bytes.
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}, info


def export(run_path: str, out_path: str, ema: bool = False, warn=print, fmt: str | None = None,
           model: str | None = None) -> dict:
    fmt = format_for(out_path, fmt)
    sd, info = load_source(run_path, ema=ema, warn=warn, model=model)
    write(sd, out_path, info, fmt)
    return dict(info, format=fmt)
