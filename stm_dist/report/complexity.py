"""Parameters and GFLOPs of a model, counted the way spec §4 counts them: all parameters, and
`torch.utils.flop_counter.FlopCounterMode` on one 224x224 image in eval mode (conv, linear and
matmul only, 2 FLOPs per multiply-add)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def count(model_name: str, num_classes: int = 1000, img_size: int = 224) -> tuple[int, float]:
    """(parameters, GFLOPs) of `model_name` with `num_classes` outputs at `img_size`."""
    from torch.utils.flop_counter import FlopCounterMode

    from stm_dist.models import create_model

    model = create_model(model_name, num_classes=num_classes, img_size=img_size).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, img_size, img_size))
    return params, counter.get_total_flops() / 1e9
