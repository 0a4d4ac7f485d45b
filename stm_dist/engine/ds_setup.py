"""Build the DeepSpeed config from a ds_configs/ JSON and the experiment config, and the engine.

The JSON chooses ZeRO stage and precision; everything the recipe owns (batch sizes, gradient
accumulation, clipping, optimizer hyper-parameters) is written here from the experiment config,
so the two can never disagree. Values for those keys already in the JSON are an error.
Precision is ours (engine/precision.py): DeepSpeed runs in fp32 mode unless `pure_bf16`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import precision as precision_mod
from .config import ConfigError

_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping")


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"'train.global_batch' ({global_batch}) is not a multiple of train.micro_batch x world size "
            f"({micro_batch} x {world_size} = {per_step}); change train.micro_batch or the number of processes")
    return global_batch // per_step


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"'deepspeed.config': no such file: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"'deepspeed.config' {path}: not valid JSON ({e})") from None
    # Keys starting with '_' are comments.
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def precision_name(ds: dict) -> str:
    """The precision a raw ds_configs/ JSON asks for (without validating it)."""
    return (ds.get(precision_mod.SECTION) or {}).get("dtype", "fp32")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


@dataclass
class Built:
    ds: dict  # what DeepSpeed gets
    precision: precision_mod.Precision
    zero_stage: int
    # ZeRO 0 (not pure_bf16): we create the optimizer (torch fused AdamW, which skips a step
    # on the device when told a gradient is non-finite) and clip ourselves; DeepSpeed's own
    # ZeRO-0 path would clip with a host sync and apply a NaN step.
    own_optimizer: bool


def build(cfg, world_size: int, accelerator: str, load_universal: bool = False) -> Built:
    path = cfg.deepspeed.config
    ds = load_json(path)
    for key in _OWNED:
        if key in ds:
            raise ConfigError(f"'deepspeed.config' {path}: remove '{key}'; it comes from the experiment "
                              f"config (train.global_batch / train.micro_batch / optim.clip_grad)")
    prec = precision_mod.parse(ds, path)
    stage = zero_stage(ds)
    t, o = cfg.train, cfg.optim
    ds["train_batch_size"] = t.global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = grad_accum_steps(t.global_batch, t.micro_batch, world_size)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"'deepspeed.config' {path}: optimizer.type must be AdamW (the recipe), "
                          f"got {opt.get('type')!r}")
    own = stage == 0 and prec.name != "pure_bf16"
    if own:
        ds.pop("optimizer")
        ds["gradient_clipping"] = 0.0
    else:
        ds["gradient_clipping"] = o.clip_grad
        opt["type"] = "AdamW"
        params = opt.setdefault("params", {})
        params.update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        # GPUs: DeepSpeed's FusedAdam. CPU: torch AdamW (DeepSpeed's fused CPU op is a JIT build away).
        params["torch_adam"] = accelerator != "cuda"
        if accelerator == "cuda" and "adam_w_mode" not in params:
            params["adam_w_mode"] = True
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return Built(ds, prec, stage, own)


def initialize(built: Built, model, groups, cfg):
    """deepspeed.initialize with our optimizer at ZeRO 0; returns (engine, optimizer)."""
    import deepspeed
    import torch

    optimizer = None
    if built.own_optimizer:
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=True)
        groups = None
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                   config=built.ds)
    return engine, optimizer
