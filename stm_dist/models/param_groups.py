"""Optimizer parameter groups: which parameters get weight decay.

`param_groups(model, weight_decay)` reproduces the original recipe (spec §6.4): a parameter is
*not* decayed when it is 1-D, its name ends with `.bias`, or it is in `model.no_weight_decay()`
(Swin relative-position tables). Everything else is decayed -- which, as a side effect of the
shape rule, includes the 4-D layer-scale gammas of ConvNeXt/Halo, PVT `pos_embed` and Halo
`height_rel`/`width_rel`, while the 1-D gammas of Swin/PVT/DCN escape decay.

`corrected=True` removes that accident: layer-scale gammas and every position table/embedding are
never decayed, whatever their shape. Use it knowingly: it no longer matches the paper's runs.

`layer_decay` (BEiT / timm style layer-wise lr decay, for fine-tuning): every parameter gets a
layer id from `model.group_matcher(coarse=False)` (timm's matcher format, numbered as timm numbers
it: stem 0, ..., unmatched parameters such as the head last) and its group an
`lr_scale = layer_decay ** (num_layers - 1 - layer_id)`, which the schedule multiplies into the
lr. The weight-decay split inside each layer is the rule above, unchanged.
"""
import math
import re
from collections.abc import Iterable

import torch.nn as nn

__all__ = ["param_groups", "decay_split", "layer_ids", "layer_scales"]

# timm's marker suffix: "belongs to the group before it" (e.g. a pre-head norm).
MATCH_PREV_GROUP = 99999

# Last name component of parameters that scale or position, not project.
_NO_DECAY_CORRECTED = ("gamma_1", "gamma_2", "gamma1", "gamma2", "pos_embed", "absolute_pos_embed",
                       "height_rel", "width_rel", "relative_position_bias_table")


def _no_decay(name: str, param, skip: set, corrected: bool) -> bool:
    if param.ndim == 1 or name.endswith(".bias") or name in skip:
        return True
    return corrected and name.rsplit(".", 1)[-1] in _NO_DECAY_CORRECTED


def decay_split(model: nn.Module, corrected: bool = False):
    """(decayed names, not-decayed names) over trainable parameters, in model order."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p, skip, corrected) else decay).append(name)
    return decay, no_decay


def _compile_matcher(matcher):
    """timm's dict matcher -> [(regex, group ordinal, suffix or None)], in match order."""
    out = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            out += [(re.compile(pattern), ordinal, suffix) for pattern, suffix in spec]
        else:
            out.append((re.compile(spec), ordinal, None))
    return out


def _sort_key(name: str, compiled, matcher) -> tuple:
    if compiled is None:  # a callable matcher returns an ordinal or a tuple of them
        key = matcher(name)
        return tuple(float(k) for k in key) if isinstance(key, Iterable) else (float(key),)
    for regex, ordinal, suffix in compiled:
        m = regex.match(name)
        if m:
            parts = [ordinal, *(g for g in m.groups() if g is not None), *(suffix or ())]
            return tuple(float(p) for p in parts)
    return (math.inf,)  # not matched (neck, head): after every matched layer


def layer_ids(model: nn.Module) -> dict:
    """{parameter name: layer id} from `model.group_matcher(coarse=False)`; ids are consecutive
    from 0 in the matcher's order, a key ending in MATCH_PREV_GROUP joins the layer before it."""
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"{type(model).__name__} has no group_matcher(): layer-wise lr decay cannot "
                         "number its layers")
    matcher = model.group_matcher(coarse=False)
    compiled = _compile_matcher(matcher) if isinstance(matcher, dict) else None
    keys = {name: _sort_key(name, compiled, matcher) for name, _ in model.named_parameters()}
    ids, lid = {}, -1
    for key in sorted(set(keys.values())):
        if lid < 0 or key[-1] != MATCH_PREV_GROUP:
            lid += 1
        ids[key] = lid
    return {name: ids[key] for name, key in keys.items()}


def layer_scales(num_layers: int, layer_decay: float) -> list:
    """lr multiplier of each layer id: the last layer (the head) learns at the full lr."""
    return [layer_decay ** (num_layers - 1 - i) for i in range(num_layers)]


def _layer_decay_groups(model, weight_decay, corrected, layer_decay):
    lids = layer_ids(model)
    scales = layer_scales(max(lids.values()) + 1, layer_decay)
    decay = set(decay_split(model, corrected)[0])
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, kind = lids[name], "decay" if name in decay else "no_decay"
        g = groups.get((lid, kind))
        if g is None:
            g = groups[(lid, kind)] = dict(params=[], weight_decay=weight_decay if kind == "decay" else 0.0,
                                           group_name=f"layer_{lid}_{kind}", layer_id=lid, lr_scale=scales[lid])
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def param_groups(model: nn.Module, weight_decay: float, corrected: bool = False,
                 layer_decay: float | None = None) -> list:
    """Param groups for torch/DeepSpeed optimizers, in order of first appearance like the original;
    with `layer_decay`, one group per (layer id, decayed or not), ordered by layer id."""
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        return _layer_decay_groups(model, weight_decay, corrected, layer_decay)
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model, corrected)
    groups = {
        "decay": dict(params=[params[n] for n in decay], weight_decay=weight_decay, group_name="decay"),
        "no_decay": dict(params=[params[n] for n in no_decay], weight_decay=0.0, group_name="no_decay"),
    }
    first = [n for n, p in model.named_parameters() if p.requires_grad][:1]
    order = ["decay", "no_decay"] if first and first[0] in decay else ["no_decay", "decay"]
    return [groups[k] for k in order if groups[k]["params"]]
