"""Optimizer parameter groups: which parameters get weight decay.

`param_groups(model, weight_decay)` reproduces the original recipe (spec §6.4): a parameter is
*not* decayed when it is 1-D, its name ends with `.bias`, or it is in `model.no_weight_decay()`
(Swin relative-position tables). Everything else is decayed -- which, as a side effect of the
shape rule, includes the 4-D layer-scale gammas of ConvNeXt/Halo, PVT `pos_embed` and Halo
`height_rel`/`width_rel`, while the 1-D gammas of Swin/PVT/DCN escape decay.

`corrected=True` removes that accident: layer-scale gammas and every position table/embedding are
never decayed, whatever their shape. Use it knowingly: it no longer matches the paper's runs.
"""
import torch.nn as nn

__all__ = ["param_groups", "decay_split"]

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


def param_groups(model: nn.Module, weight_decay: float, corrected: bool = False) -> list:
    """Param groups for torch/DeepSpeed optimizers, in order of first appearance like the original."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model, corrected)
    groups = {
        "decay": dict(params=[params[n] for n in decay], weight_decay=weight_decay, group_name="decay"),
        "no_decay": dict(params=[params[n] for n in no_decay], weight_decay=0.0, group_name="no_decay"),
    }
    first = [n for n, p in model.named_parameters() if p.requires_grad][:1]
    order = ["decay", "no_decay"] if first and first[0] in decay else ["no_decay", "decay"]
    return [groups[k] for k in order if groups[k]["params"]]
