"""Build the DeepSpeed config from a ds_configs/ JSON and the experiment config.

The JSON chooses ZeRO stage and precision; everything the recipe owns (batch sizes, gradient
accumulation, clipping, optimizer hyper-parameters) is written here from the experiment config,
so the two can never disagree. Values for those keys already in the JSON are an error.
"""
from __future__ import annotations

import json

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


def precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build(cfg, world_size: int, accelerator: str, load_universal: bool = False) -> dict:
    path = cfg.deepspeed.config
    ds = load_json(path)
    for key in _OWNED:
        if key in ds:
            raise ConfigError(f"'deepspeed.config' {path}: remove '{key}'; it comes from the experiment "
                              f"config (train.global_batch / train.micro_batch / optim.clip_grad)")
    t, o = cfg.train, cfg.optim
    ds["train_batch_size"] = t.global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = grad_accum_steps(t.global_batch, t.micro_batch, world_size)
    ds["gradient_clipping"] = o.clip_grad
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"'deepspeed.config' {path}: optimizer.type must be AdamW (the recipe), "
                          f"got {opt.get('type')!r}")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    params.update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    # GPUs: DeepSpeed's FusedAdam. CPU: torch AdamW (DeepSpeed's fused CPU op is a JIT build away).
    params["torch_adam"] = accelerator != "cuda"
    if accelerator == "cuda" and "adam_w_mode" not in params:
        params["adam_w_mode"] = True
    if precision(ds) == "bf16" and "data_types" not in ds:
        # DeepSpeed casts parameters to bf16 but not buffers; BatchNorm then fails (PLATFORM.md).
        ds["data_types"] = {"buffer_dtype": "bf16"}
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds

