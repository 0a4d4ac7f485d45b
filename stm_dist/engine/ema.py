"""Exponential moving average of a model's floating-point state.

Only floating-point tensors are averaged. The original (timm 0.6.7 ModelEma) averaged every
state-dict entry, integer buffers included, which truncates Swin's relative_position_index after
the first update (spec §9.3); integer buffers here are copied, never averaged.
The average is kept in float32 whatever precision the model trains in.
"""
from __future__ import annotations

import contextlib

import torch


class ModelEMA:
    def __init__(self, named_tensors, decay: float):
        """`named_tensors`: (name, tensor) pairs of the full (gathered) model state."""
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        for name, t in named_tensors:
            t = t.detach()
            self.shadow[name] = t.float().clone() if t.is_floating_point() else t.clone()

    @torch.no_grad()
    def update(self, named_tensors):
        d = self.decay
        for name, t in named_tensors:
            s = self.shadow[name]
            if s.is_floating_point():
                s.mul_(d).add_(t.detach().to(s.dtype), alpha=1.0 - d)
            else:
                s.copy_(t)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict):
        missing = set(self.shadow) - set(sd)
        unexpected = set(sd) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for k, v in sd.items():
            self.shadow[k].copy_(v)


def model_state_tensors(module: torch.nn.Module):
    """(name, tensor) for every parameter and buffer, with state-dict names."""
    return list(module.state_dict(keep_vars=True).items())


def gathered(module: torch.nn.Module, zero_stage: int):
    """Context in which ZeRO-3 partitioned parameters are whole (read-only); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
