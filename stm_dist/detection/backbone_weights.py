"""Classification weights into a detection backbone: `load_backbone_weights(backbone, source)`.

`source`: a state dict, one of our exports (stm-export's .pth / .safetensors), a run directory
(its best.pth, or best_ema.pth with use_ema=True), a timm weights file, the paper's release
files (`unified_*.pth`, the state dict under 'model'), or a detector checkpoint (its
`backbone.*` entries). Files are read by stm_dist.models' readers, so the containers, EMA
picks and prefixes are those of `load_pretrained`.

The original's rules (detection/mmdet_custom/models/backbones/meta_arch.py, init_weights):
* keys starting with `conv_head` or `head`, or containing `attn_mask`, are skipped;
* what is then left over must be `stage_norms.*` (the classification model's stage norms, not on
  the detection path): unexpected, dropped;
* what the backbone has and the checkpoint lacks must be `out_norm_*` (fresh LayerNorms): missing.
Anything else left over or lacking is an error naming the keys (strict=False: reported only).
Beyond the original, a 4-D `pos_embed`, a Swin `relative_position_bias_table` or a Halo
`height_rel`/`width_rel` of another size (weights trained at another resolution or window) is
resized as load_pretrained does, and buffers the model computes itself
(`relative_position_index`) are kept, never loaded.
"""
import os
from dataclasses import dataclass, field
from typing import List

import torch

from stm_dist.models.pretrained import CheckpointError, _convert, extract_state_dict

__all__ = ["load_backbone_weights", "BackboneLoadReport", "CheckpointError"]

_SKIP_PREFIXES = ("conv_head", "head")
_SKIP_CONTAINS = ("attn_mask",)
_DROPPED = "stage_norms"   # the only unexpected keys the original accepts
_NEW = "out_norm_"         # the only missing keys the original accepts
_OWN_BUFFERS = ("relative_position_index",)  # computed by the model from its configuration
_DETECTOR_PREFIX = "backbone."


@dataclass
class BackboneLoadReport:
    source: str = ""
    loaded: List[str] = field(default_factory=list)      # copied into the backbone
    skipped: List[str] = field(default_factory=list)     # conv_head* / head* / *attn_mask*
    unexpected: List[str] = field(default_factory=list)  # left over (stage_norms.*): dropped
    missing: List[str] = field(default_factory=list)     # not in the file (out_norm_*): fresh init
    resized: List[str] = field(default_factory=list)     # interpolated to the backbone's shape
    kept: List[str] = field(default_factory=list)        # the backbone's own computed buffers
    ema: bool = False

    def lines(self) -> List[str]:
        """What a run log shows: one line for the source, one per non-empty group."""
        out = [f"backbone weights from {self.source}{' (EMA weights)' if self.ema else ''}: "
               f"{len(self.loaded)} tensors loaded"]
        for what, keys in (("skipped (classifier, attention masks)", self.skipped),
                           ("unexpected, dropped", self.unexpected),
                           ("missing, new (fresh init)", self.missing),
                           ("resized", self.resized)):
            if keys:
                out.append(f"  {what} ({len(keys)}): {', '.join(keys)}")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _resolve_path(path: str, use_ema: bool) -> str:
    """A run directory means its best weights (stm-train keeps them as best.pth / best_ema.pth)."""
    if not os.path.isdir(path):
        return path
    name = "best_ema.pth" if use_ema else "best.pth"
    found = os.path.join(path, name)
    if os.path.isfile(found):
        return found
    has_ckpts = os.path.isdir(os.path.join(path, "checkpoints")) or os.path.basename(
        os.path.normpath(path)).startswith(("checkpoints", "step"))
    hint = (f"export its newest checkpoint first: stm-export {path} -o weights.pth{' --ema' if use_ema else ''}"
            if has_ckpts else "expected a run directory of stm-train, a .pth / .safetensors file or a state dict")
    raise CheckpointError(f"{path}: a directory without {name}; {hint}")


def _read(source, use_ema: bool):
    """(state dict, source name, the model the file names or None)."""
    if not isinstance(source, (str, os.PathLike)):
        return extract_state_dict(source, use_ema=use_ema, source="state dict"), "state dict", None
    path = _resolve_path(os.fspath(source), use_ema)
    try:  # the reader stm_dist.models uses (its .pth / .safetensors / sidecar conventions)
        from stm_dist.models.weights_file import read_file
    except ImportError:  # an older stm_dist.models: the reader lived in pretrained.py
        from stm_dist.models.pretrained import _read_file as read_file
    obj, is_ema, *named = read_file(path)
    named = named[0] if named else None
    return extract_state_dict(obj, use_ema=use_ema, source=path, is_ema=is_ema), path, named


def _backbone_part(sd: dict) -> dict:
    """A detector checkpoint holds the backbone under `backbone.`; anything else is taken whole."""
    if any(k.startswith(_DETECTOR_PREFIX) for k in sd) and not any(k.startswith("downsample_layers") for k in sd):
        return {k[len(_DETECTOR_PREFIX):]: v for k, v in sd.items() if k.startswith(_DETECTOR_PREFIX)}
    return sd


def load_backbone_weights(backbone: torch.nn.Module, source, log=print, strict: bool = True,
                          use_ema: bool = False) -> BackboneLoadReport:
    """Load classification (or detector) weights into a detection backbone by the original's
    rules (module doc); `log` gets the report's lines (None: silent). Returns the report."""
    sd, name, named = _read(source, use_ema)
    sd = _backbone_part(sd)
    report = BackboneLoadReport(source=name, ema=use_ema)
    own = backbone.state_dict()
    take = []
    for key in sd:
        if key.startswith(_SKIP_PREFIXES) or any(s in key for s in _SKIP_CONTAINS):
            report.skipped.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif key.endswith(_OWN_BUFFERS):
            report.kept.append(key)
        else:
            take.append(key)
    taken = set(take)
    report.missing = [k for k in own if k not in taken and not k.endswith(_OWN_BUFFERS)]
    report.kept += [k for k in own if k.endswith(_OWN_BUFFERS) and k not in report.kept]
    what = getattr(backbone, "name", "") or type(backbone).__name__
    holds = f" (the file holds weights of {named})" if named and named != what else ""
    odd_unexpected = [k for k in report.unexpected if _DROPPED not in k]
    odd_missing = [k for k in report.missing if _NEW not in k]
    if strict and (odd_unexpected or odd_missing):
        raise CheckpointError(
            f"{name} does not fit the detection backbone {what}{holds}: "
            + "; ".join(part for part in (
                f"{len(odd_missing)} of its tensors are not in the file: {', '.join(odd_missing[:12])}"
                if odd_missing else "",
                f"{len(odd_unexpected)} tensors of the file are not in it: {', '.join(odd_unexpected[:12])}"
                if odd_unexpected else "") if part)
            + " (only stage_norms.* may be left over and only out_norm_* may be new; is it another model "
              "or size? strict=False loads what matches)")
    new = {}
    for key in take:
        try:
            new[key] = _convert(key, sd[key], own[key], None, report)
        except CheckpointError as e:
            raise CheckpointError(f"{name} does not fit the detection backbone {what}{holds}: {e}") from None
    result = backbone.load_state_dict(new, strict=False)
    report.loaded = [k for k in new if k not in result.unexpected_keys]
    if log is not None:
        for line in report.lines():
            log(line)
    return report
