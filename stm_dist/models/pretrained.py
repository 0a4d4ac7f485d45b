"""Loading released / trained checkpoints into the unified models.

`load_pretrained(model, path_or_state_dict, label_map=None, strict=True)` accepts a bare state
dict, a `.pth` or `.safetensors` file, or the training containers (`{'model': ...}`,
`{'module': ...}`, `{'state_dict': ...}`; EMA weights from `{'model_ema': ...}` /
`{'state_dict_ema': ...}` or an EMA export with `use_ema=True`), strips DDP/compile prefixes and
does the original's conveniences (spec §1.6):
* Swin `relative_position_bias_table`: bicubic resize of the (2w-1)^2 table;
* Halo `height_rel` / `width_rel`: linear resize (align_corners=True);
* any `*pos_embed` of 4-D shape: bilinear resize (align_corners=True) to the model's grid;
* `relative_position_index` / `attn_mask` buffers are always the model's own (never loaded);
* a classifier with another class count: rows picked by `label_map` (ints, or a file with one
  int per line), e.g. a 1000-class checkpoint into a 200-class subset model;
* without a label map and with `new_head=True` (fine-tuning), a classifier of another class count
  is dropped and the model keeps the head it was built with (its own init); the report says so.
Missing/unexpected keys are reported by name; in strict mode they are an error.
"""
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .names import unalias
from .weights_file import CheckpointError, _truthy, read_file

__all__ = ["load_pretrained", "extract_state_dict", "read_label_map", "LoadReport", "CheckpointError"]

_MODEL_OWN_BUFFERS = ("relative_position_index", "attn_mask")
_HEAD_KEYS = ("head.weight", "head.bias")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)     # interpolated to the model's shape
    ignored: List[str] = field(default_factory=list)     # model-owned buffers / dropped heads
    new_head: List[str] = field(default_factory=list)    # dropped: the model keeps its own init
    head_classes: Optional[tuple] = None                 # (checkpoint, model) class counts of a new head
    ema: bool = False                                    # the EMA weights were picked
    source: str = ""

    def __str__(self):
        parts = [f"loaded {self.source}" + (" (EMA weights)" if self.ema else "")]
        for name in ("missing", "unexpected", "resized", "ignored", "new_head"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {', '.join(keys)}")
        return "; ".join(parts)

    def head_line(self) -> str:
        """One line for a run log about a replaced classifier ('' when the head was loaded)."""
        if not self.new_head:
            return ""
        old, new = self.head_classes or ("?", "?")
        return (f"new classifier: {', '.join(self.new_head)} of {self.source} dropped "
                f"({old} -> {new} classes), re-initialised with the model's own init")


def read_label_map(label_map: Union[str, os.PathLike, Sequence[int]]) -> List[int]:
    """A list of class indices, from a sequence or a file with one int per line."""
    if isinstance(label_map, (str, os.PathLike)):
        out = []
        with open(label_map) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(int(line.strip()))
                except ValueError:
                    raise CheckpointError(f"{label_map}:{lineno}: expected one integer class index, "
                                          f"got {line.strip()!r}") from None
        return out
    return [int(i) for i in label_map]


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


_EMA_KEYS = ("model_ema", "state_dict_ema")
_MODEL_KEYS = ("model", "module", "state_dict")


def extract_state_dict(obj, use_ema: bool = False, source: str = "checkpoint", is_ema: bool = False) -> dict:
    """The model state dict inside a checkpoint container (or the bare dict itself). `is_ema`:
    the file as a whole is an EMA export (its metadata / sidecar says so)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    inner = next((obj[k] for k in _MODEL_KEYS if isinstance(obj.get(k), dict)), obj)
    ema_entry = next((obj[k] for k in _EMA_KEYS if isinstance(obj.get(k), dict)), None)
    if use_ema:
        if ema_entry is not None:
            sd = ema_entry
        elif is_ema or _truthy(obj.get("ema")):
            sd = inner
        else:
            raise CheckpointError(
                f"{source}: EMA weights asked for (use_ema / model.pretrained_ema) but the file holds none: "
                f"no 'model_ema' / 'state_dict_ema' entry and not an EMA export "
                f"(top-level keys: {sorted(map(str, obj))[:10]}); load its weights without EMA, or export "
                f"the EMA with `stm-export --ema`")
    else:
        sd = inner
        if sd is obj and ema_entry is not None:
            raise CheckpointError(f"{source}: holds only EMA weights ('model_ema' / 'state_dict_ema'); "
                                  "pass use_ema=True (model.pretrained_ema=true) to load them")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict (non-tensor entries {bad[:5]}); expected a bare "
                              "state dict or a dict with 'model' / 'module' / 'state_dict' / 'model_ema'")
    return _strip_prefixes(sd)


def _resize_rel_table(key, value, target):
    """(L1, nH) Swin relative-position table -> (L2, nH) by bicubic resize of the 2-D grid."""
    if value.shape[1] != target.shape[1]:
        raise CheckpointError(f"{key}: checkpoint has {value.shape[1]} heads, model has {target.shape[1]}")
    s1, s2 = math.isqrt(value.shape[0]), math.isqrt(target.shape[0])
    nh = value.shape[1]
    grid = value.float().permute(1, 0).reshape(1, nh, s1, s1)
    grid = F.interpolate(grid, size=(s2, s2), mode="bicubic")
    return grid.reshape(nh, s2 * s2).permute(1, 0)


def _resize_rel_1d(key, value, target):
    """(2w-1, d) Halo relative embedding -> (rows, d) by linear resize (align_corners=True)."""
    if value.shape[1] != target.shape[1]:
        raise CheckpointError(f"{key}: head dim {value.shape[1]} in checkpoint, {target.shape[1]} in model")
    v = value.float().permute(1, 0).unsqueeze(0)
    v = F.interpolate(v, size=target.shape[0], mode="linear", align_corners=True)
    return v.squeeze(0).permute(1, 0)


def _resize_pos_embed(key, value, target):
    """(1, C, H1, W1) absolute position embedding -> (1, C, H2, W2), bilinear, align_corners."""
    if value.shape[:2] != target.shape[:2]:
        raise CheckpointError(f"{key}: shape {tuple(value.shape)} cannot be resized to {tuple(target.shape)}")
    return F.interpolate(value.float(), size=tuple(target.shape[2:]), mode="bilinear", align_corners=True)


def _convert(key, value, target, label_map, report):
    if value.shape == target.shape:
        return value
    if key.endswith("relative_position_bias_table") and value.dim() == 2:
        out = _resize_rel_table(key, value, target)
    elif key.endswith(("height_rel", "width_rel")) and value.dim() == 2:
        out = _resize_rel_1d(key, value, target)
    elif key.endswith("pos_embed") and value.dim() == 4:
        out = _resize_pos_embed(key, value, target)
    elif key in _HEAD_KEYS:
        if label_map is None:
            raise CheckpointError(f"{key}: checkpoint has {value.shape[0]} classes, model {target.shape[0]}; "
                                  "pass label_map= (class indices, or a file with one per line)")
        if len(label_map) != target.shape[0]:
            raise CheckpointError(f"label_map has {len(label_map)} entries but the model has "
                                  f"{target.shape[0]} classes")
        out_of_range = [i for i in label_map if not 0 <= i < value.shape[0]]
        if out_of_range:
            raise CheckpointError(f"label_map indices {out_of_range[:5]} are outside the checkpoint's "
                                  f"{value.shape[0]} classes")
        out = value[torch.as_tensor(label_map, dtype=torch.long)]
    else:
        raise CheckpointError(f"{key}: shape {tuple(value.shape)} in checkpoint, {tuple(target.shape)} in model")
    if out.shape != target.shape:
        raise CheckpointError(f"{key}: resized to {tuple(out.shape)}, model expects {tuple(target.shape)}")
    report.resized.append(key)
    return out.to(value.dtype)


def load_pretrained(model: torch.nn.Module, path_or_state_dict, label_map=None, strict: bool = True,
                    use_ema: bool = False, new_head: bool = False) -> LoadReport:
    """Load a checkpoint into `model` (see module doc); returns what was missing/resized/ignored.
    `new_head=True` (fine-tuning): a classifier of another class count, and no label map, is
    dropped and the model keeps its own freshly built head."""
    is_ema, named = False, None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        obj, is_ema, named = read_file(source)
    else:
        source, obj = "state dict", path_or_state_dict
    try:
        return _load(model, obj, source, label_map, strict, use_ema, new_head, is_ema)
    except CheckpointError as e:
        other = _other_model(named, model)
        if other:  # the file says which model it holds: the likeliest cause of a mismatch
            raise CheckpointError(f"{source} holds weights of {named} (the file says so){other}: {e}") from None
        raise


def _other_model(named, model) -> str:
    """How a load error mentions the model the file names: ', not <model>' when that is another
    model than `model`, '' when `model`'s own name is unknown, None (not at all) when the file
    names none or names `model` itself."""
    if not named:
        return None
    mine = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not mine:
        return ""
    return None if unalias(named) == unalias(mine) else f", not {mine}"


def _load(model, obj, source, label_map, strict, use_ema, new_head, is_ema) -> LoadReport:
    sd = extract_state_dict(obj, use_ema=use_ema, source=source, is_ema=is_ema)
    label_map = read_label_map(label_map) if label_map is not None else None

    report = LoadReport(source=source, ema=use_ema)
    own = model.state_dict()
    features_only = getattr(model, "features_only", False)
    drop_head = (new_head and label_map is None and "head.weight" in sd and "head.weight" in own
                 and sd["head.weight"].shape != own["head.weight"].shape)
    if drop_head:
        report.head_classes = (int(sd["head.weight"].shape[0]), int(own["head.weight"].shape[0]))
    new = {}
    for key, value in sd.items():
        if any(b in key for b in _MODEL_OWN_BUFFERS):
            report.ignored.append(key)
        elif key not in own:
            if features_only and key.split(".")[0] in ("conv_head", "head"):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
        elif drop_head and key in _HEAD_KEYS:
            report.new_head.append(key)
        else:
            new[key] = _convert(key, value, own[key], label_map, report)
    report.missing = [k for k in own if k not in new and k not in report.new_head
                      and not any(b in k for b in _MODEL_OWN_BUFFERS)]
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{source} does not match {type(model).__name__} "
                              f"(missing {len(report.missing)}: {', '.join(report.missing[:20])}; "
                              f"unexpected {len(report.unexpected)}: {', '.join(report.unexpected[:20])})")
    model.load_state_dict(new, strict=False)
    return report
