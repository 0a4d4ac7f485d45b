"""Per-iteration LR and weight-decay schedules, computed the way the original recipe does (spec §6.3).

The original precomputes one value per optimizer step: a linear warm-up built with
`numpy.linspace(start, peak, warmup_iters)` (both end points included), then a cosine from the
peak down to the final value over the remaining iterations. Reproducing it with the same numpy
operations keeps our schedule equal to the original's to the last bit, not just approximately.
"""
from __future__ import annotations

import math

import numpy as np


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """The original: len(train_set) // (batch_size * update_freq * world_size), drop_last."""
    return num_samples // global_batch


def cosine_schedule(peak: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_init: float = 0.0, warmup_steps: int = -1) -> np.ndarray:
    """One value per optimizer step for `epochs * iters_per_epoch` steps (float64)."""
    total = epochs * iters_per_epoch
    warm = warmup_steps if warmup_steps > 0 else warmup_epochs * iters_per_epoch
    if warm > total:
        raise ValueError(f"warm-up ({warm} steps) is longer than the whole schedule ({total} steps)")
    # The original only builds the warm-up ramp when warmup_epochs > 0.
    ramp = np.linspace(warmup_init, peak, warm) if (warmup_epochs > 0 and warm > 0) else np.zeros(0)
    n = total - len(ramp)
    cos = np.array([final + 0.5 * (peak - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    return np.concatenate((ramp, cos))


def step_schedule(peak: float, epochs: int, iters_per_epoch: int, milestones, gamma: float,
                  warmup_steps: int = 0, warmup_ratio: float = 0.001) -> np.ndarray:
    """mmdet's "step" policy: `peak * gamma ** k` from the epoch of the k-th milestone on, the
    first `warmup_steps` scaled by mmdet's linear warm-up `1 - (1 - i / warmup_steps) * (1 -
    warmup_ratio)` (the detection 1x recipe: milestones 8 and 11 of 12 epochs, 1,000 warm-up
    iterations from 0.001 x peak)."""
    total = epochs * iters_per_epoch
    epoch_of = np.arange(total) // iters_per_epoch
    k = np.searchsorted(np.asarray(sorted(milestones), dtype=np.float64), epoch_of, side="right")
    lr = peak * np.power(float(gamma), k)
    warm = min(max(warmup_steps, 0), total)
    i = np.arange(warm)
    lr[:warm] *= 1.0 - (1.0 - i / warm) * (1.0 - warmup_ratio)
    return lr


class Schedules:
    """LR and weight decay per optimizer step, plus applying them to optimizer param groups."""

    def __init__(self, optim_cfg, sched_cfg, iters_per_epoch: int):
        o, s = optim_cfg, sched_cfg
        self.iters_per_epoch = iters_per_epoch
        self.total_steps = s.epochs * iters_per_epoch
        if getattr(s, "kind", "cosine") == "step":
            # The warm-up starts at warmup_init_lr: mmdet's warmup_ratio = warmup_init_lr / lr.
            warm = s.warmup_steps if s.warmup_steps > 0 else s.warmup_epochs * iters_per_epoch
            self.lr = step_schedule(o.lr, s.epochs, iters_per_epoch, s.milestones, s.gamma, warm, o.warmup_init_lr / o.lr)
        else:
            self.lr = cosine_schedule(o.lr, o.min_lr, s.epochs, iters_per_epoch, s.warmup_epochs,
                                      o.warmup_init_lr, s.warmup_steps)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd = cosine_schedule(o.weight_decay, wd_end, s.epochs, iters_per_epoch)

    def apply(self, param_groups, step: int) -> float:
        """Set lr (every group) and weight decay (groups that decay at all) for `step`."""
        if step >= self.total_steps:
            raise IndexError(f"step {step} is past the schedule's end ({self.total_steps} steps)")
        lr = float(self.lr[step])
        wd = float(self.wd[step])
        for g in param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            # Remember which groups decay: once set, a group's weight_decay is a scheduled value.
            if "decays" not in g:
                g["decays"] = g.get("weight_decay", 0.0) > 0
            if g["decays"]:
                g["weight_decay"] = wd
        return lr
