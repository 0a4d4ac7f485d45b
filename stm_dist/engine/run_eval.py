"""Evaluation during training: plain fp32 copies of the live and the EMA weights, each scored
on the validation shards with every image counted once across ranks."""
from __future__ import annotations

import torch

from .ema import gathered
from .evaluate import evaluate
from .model_setup import build_model


def eval_copy(cfg, module: torch.nn.Module, zero_stage: int, device, state: dict | None = None):
    """A fresh fp32 model holding `state`, or the engine module's current weights (gathered
    from the ZeRO 3 shards when needed)."""
    model = build_model(cfg, for_eval=True).to(device)
    if state is None:
        with gathered(module, zero_stage):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


def evaluate_run(cfg, module, zero_stage: int, ema, rank: int, world: int, device, on_cuda: bool) -> dict:
    """{top1, top5, loss} of the live weights, and `*_ema` of the EMA weights when there are some."""
    from stm_dist.data import build_val_loader, read_manifest

    expected = int(read_manifest(cfg.data.val_shards, "val")["num_samples"])
    results = {}
    models = [("", eval_copy(cfg, module, zero_stage, device))]
    if ema is not None:
        models.append(("_ema", eval_copy(cfg, module, zero_stage, device, ema.full_state())))
    for suffix, model in models:
        loader = build_val_loader(cfg.data.val_shards, cfg.data.eval_batch, rank=rank, world_size=world,
                                  img_size=cfg.model.img_size, crop_pct=cfg.data.crop_pct,
                                  device="cuda" if on_cuda else "cpu", num_threads=cfg.data.num_threads,
                                  backend=cfg.data.backend, dont_use_mmap=cfg.data.dont_use_mmap)
        r = evaluate(model, loader, device, expected_samples=expected)
        results.update({f"top1{suffix}": r["top1"], f"top5{suffix}": r["top5"], f"loss{suffix}": r["loss"]})
    return results


def dump_live_weights(module, zero_stage: int, rank: int, path: str):
    with gathered(module, zero_stage):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        torch.save(state, path)
