"""Synchronised BatchNorm for the conv head, on gloo/CPU as well as NCCL.

The original converted the head's BatchNorm to torch's SyncBatchNorm: each micro-step
normalises with the statistics of the whole global micro-batch (every rank's samples), so the
result does not depend on how the batch is split over ranks. torch's SyncBatchNorm runs only
on GPUs; this one reduces per-channel sums with a differentiable all-reduce
(torch.distributed.nn), which works on every backend, and keeps its statistics in fp32 under
autocast. One all-reduce per BatchNorm per micro-step: the models have one BatchNorm.

Running statistics come out identical on every rank (they are computed from the same reduced
sums), so no separate averaging of buffers is needed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)
    return t


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics span all ranks; state-dict compatible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            c = xf.shape[1]
            count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=xf.device)
            # Sums in float64: E[x^2] - E[x]^2 over a global batch must not cancel away.
            packed = torch.cat([xf.sum((0, 2, 3)).double(), (xf * xf).sum((0, 2, 3)).double(), count.double()])
            packed = _all_reduce(packed)
            n = packed[-1]
            mean = packed[:c] / n
            var = (packed[c:2 * c] / n - mean * mean).clamp_min(0)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
            inv = torch.rsqrt(var.float() + self.eps)
            y = (xf - mean.float()[None, :, None, None]) * inv[None, :, None, None]
            if self.affine:
                y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        # Under autocast the fp32 result flows on (as autocast's own batch_norm does); a pure
        # bf16 module gets its dtype back.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def convert(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` with SyncBatchNorm2d, keeping its parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device="meta")
            # The very same Parameter and buffer objects: optimizer groups built before the
            # conversion stay valid.
            for n, t in list(child.named_parameters(recurse=False)):
                setattr(new, n, t)
            for n, t in list(child.named_buffers(recurse=False)):
                new.register_buffer(n, t)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert(child)
    return module

