"""Build the DeepSpeed config from a ds_configs/ JSON and the experiment config, and the engine.

The JSON chooses ZeRO stage and precision; everything the recipe owns (batch sizes, gradient
accumulation, clipping, optimizer hyper-parameters) is written here from the experiment config,
so the two can never disagree. Values for those keys already in the JSON are an error, and so
are a `scheduler` section (the schedule is ours, per iteration) and `data_types` values that
would change the precision design; `data_types` values that agree with it are passed on.
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
    # ZeRO 3 only: "flat" / "block" gather each residual block's parameters as one unit (FETCH_UNIT_KEY).
    fetch_unit: str = "module"


# data_types values that cannot fight the precision design (engine/precision.py), per mode:
# the fp32/bf16/fp16 modes keep an fp32 module (master weights, gradients, their reduction,
# BatchNorm statistics); pure_bf16 is DeepSpeed's bf16 mode, whose buffers must be bf16 too.
_DATA_TYPES = {
    "grad_accum_dtype": {"pure_bf16": ("bf16", "fp32"), "*": ("fp32",)},
    "param_dtype": {"pure_bf16": ("bf16",), "*": ("fp32",)},
    "buffer_dtype": {"pure_bf16": ("bf16",), "*": ("fp32",)},
}
_WHY_FP32 = ("the {mode} mode keeps DeepSpeed's module in fp32 (master weights, gradient accumulation and "
             "all-reduce, BatchNorm statistics) and runs only the forward under autocast (engine/precision.py)")


def _check_sections(ds: dict, path: str):
    """Refuse a DeepSpeed `scheduler`, and `data_types` values that would fight our precision."""
    if "scheduler" in ds:
        kind = (ds["scheduler"] or {}).get("type") if isinstance(ds["scheduler"], dict) else ds["scheduler"]
        raise ConfigError(
            f"'deepspeed.config' {path}: remove 'scheduler' (type {kind!r}): stm-train sets the learning rate and "
            f"weight decay itself at every iteration (engine/schedule.py) from optim.lr, optim.min_lr, "
            f"optim.warmup_init_lr, optim.weight_decay(_end), schedule.epochs and schedule.warmup_epochs/"
            f"warmup_steps; a DeepSpeed scheduler would overwrite that schedule at every step")
    types = ds.get("data_types")
    if types is None:
        return
    if not isinstance(types, dict):
        raise ConfigError(f"'deepspeed.config' {path}: 'data_types' must be an object, got {types!r}")
    mode = precision_name(ds)
    for key, value in types.items():
        if key == "keep_in_fp32_modules":
            continue  # names buffers DeepSpeed's bf16/fp16 cast keeps in fp32: never less precision
        if key not in _DATA_TYPES:
            raise ConfigError(f"'deepspeed.config' {path}: unknown key 'data_types.{key}' (allowed: "
                              f"{', '.join(sorted(_DATA_TYPES))}, keep_in_fp32_modules)")
        allowed = _DATA_TYPES[key].get(mode, _DATA_TYPES[key]["*"])
        if value not in allowed:
            why = (_WHY_FP32.format(mode=mode) if mode != "pure_bf16" else
                   "pure_bf16 is DeepSpeed's bf16 mode: parameters and buffers (BatchNorm) are bf16")
            raise ConfigError(f"'deepspeed.config' {path}: 'data_types.{key}' is {value!r}; with "
                              f"mixed_precision.dtype {mode!r} it may only be {' or '.join(map(repr, allowed))} "
                              f"({why}); remove it or choose another mixed_precision.dtype")


# Ours, removed before DeepSpeed sees the JSON. "block": every residual block of the model
# (model.stages[i][j]), each downsample layer after the stem and the conv/pooling heads is a
# DeepSpeed "z3 leaf", so ZeRO 3 gathers all of a unit's parameters in one all-gather and runs
# its fetch/release hooks once per unit instead of once per sub-module (LayerNorm, each
# conv/linear, the layer-scale gammas): on 2 gloo processes those per-module hooks and
# collectives cost as much as this model's compute (docs/perf.md). "flat" (the default): the
# same units, and each unit's parameters one flat tensor per optimizer group
# (engine/flat_params.py), so DeepSpeed's per-tensor work runs for 60 tensors instead of 302 at
# convnext micro. "module" is DeepSpeed's default. DeepSpeed's own
# `stage3_module_granularity_threshold` cannot pick these units: it chooses modules top-down and
# always takes the stem first, whose input needs no gradient, so its full backward hook fires
# before the stem's weight gradients exist and backward fails.
FETCH_UNIT_KEY = "zero3_fetch_unit"
_FETCH_UNITS = ("flat", "block", "module")


def _fetch_unit(ds: dict, path: str, stage: int) -> str:
    """Read (and remove) FETCH_UNIT_KEY; absent means "flat" at ZeRO 3."""
    if FETCH_UNIT_KEY not in ds:
        return "flat" if stage == 3 else "module"
    unit = ds.pop(FETCH_UNIT_KEY)
    if unit not in _FETCH_UNITS:
        raise ConfigError(f"'deepspeed.config' {path}: '{FETCH_UNIT_KEY}' is {unit!r}; choose "
                          f"{', '.join(map(repr, _FETCH_UNITS[:-1]))} or {_FETCH_UNITS[-1]!r}")
    if stage != 3:
        raise ConfigError(f"'deepspeed.config' {path}: '{FETCH_UNIT_KEY}' only applies to ZeRO stage 3 "
                          f"(zero_optimization.stage is {stage}); remove it")
    return unit


def fetch_units(model) -> list:
    """The modules ZeRO 3 fetches as one unit (see FETCH_UNIT_KEY): every residual block, each
    downsample layer after the stem and the conv/pooling head (a few small modules each whose
    own hooks cost more than their compute).

    The stem stays per-module: its input needs no gradient, so a leaf stem's full backward
    hook would release its weights before their gradients exist. None under gradient
    checkpointing: a leaf's gradients are reduced from its full backward hook, which a
    recomputed block would fire before its recomputed backward is done."""
    stages = getattr(model, "stages", None)
    if stages is None or getattr(model, "grad_checkpointing", False):
        return []
    units = [block for stage in stages for block in stage]
    units += list(getattr(model, "downsample_layers", []))[1:]
    units += [getattr(model, name, None) for name in ("conv_head", "avg_head")]
    return [u for u in units if u is not None and len(list(u.children()))]


def check(cfg):
    """The DeepSpeed JSON's errors, before any process group starts (no engine is built)."""
    path = cfg.deepspeed.config
    ds = load_json(path)
    _check_owned(ds, path)
    _check_sections(ds, path)
    _fetch_unit(ds, path, zero_stage(ds))
    import warnings

    with warnings.catch_warnings():  # the pure_bf16 warning is given once, by build()
        warnings.simplefilter("ignore")
        precision_mod.parse(ds, path)


def _check_owned(ds: dict, path: str):
    for key in _OWNED:
        if key in ds:
            raise ConfigError(f"'deepspeed.config' {path}: remove '{key}'; it comes from the experiment "
                              f"config (train.global_batch / train.micro_batch / optim.clip_grad)")


def build(cfg, world_size: int, accelerator: str, load_universal: bool = False) -> Built:
    path = cfg.deepspeed.config
    ds = load_json(path)
    _check_owned(ds, path)
    _check_sections(ds, path)
    prec = precision_mod.parse(ds, path)
    stage = zero_stage(ds)
    unit = _fetch_unit(ds, path, stage)
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
        # GPUs: DeepSpeed's FusedAdam. CPU: torch AdamW (DeepSpeed's fused CPU op is a JIT build away),
        # its fused kernel: one pass over each flat partition instead of a dozen elementwise ops.
        params["torch_adam"] = accelerator != "cuda"
        if params["torch_adam"]:
            params.setdefault("fused", True)
        if accelerator == "cuda" and "adam_w_mode" not in params:
            params["adam_w_mode"] = True
    if stage == 3 and accelerator != "cuda":
        # ZeRO 3 on gloo: one all-reduce of the contiguous gradient bucket, each rank then keeps
        # its slice, instead of DeepSpeed's reduce-scatter path, which pads and concatenates
        # every gradient tensor into a second buffer first (measured 0.55 -> 0.50 CPU s/step,
        # docs/perf.md). On NCCL a reduce-scatter moves half the bytes, so GPUs keep it.
        ds["zero_optimization"].setdefault("reduce_scatter", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return Built(ds, prec, stage, own, unit)


# DeepSpeed 0.19's ZeRO stages import its Muon optimizer module while they initialise (an
# isinstance check) and at the first gradient reduction, and that import torch.compile-decorates
# Muon's kernels, which loads torch._dynamo and torch._inductor: 2-5 s of every rank's start-up
# (more than torch itself on a loaded box) for an optimizer this engine never uses (build()
# refuses any optimizer but AdamW). Stand-ins with the names DeepSpeed asks for keep those
# checks answering "not Muon" without the import.
_MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def skip_muon_import() -> bool:
    """Install the stand-ins unless the real modules are already loaded; True if installed."""
    import sys
    import types

    if any(name in sys.modules for name in _MUON_MODULES):
        return False

    class MuonWithAuxAdam:  # nothing is ever an instance: this engine's optimizer is AdamW
        pass

    def _not_used(*args, **kwargs):
        raise RuntimeError("stm_dist: DeepSpeed's Muon was stubbed out (the engine trains with AdamW only)")

    for name in _MUON_MODULES:
        mod = types.ModuleType(name, "stand-in: see stm_dist.engine.ds_setup.skip_muon_import")
        mod.MuonWithAuxAdam = MuonWithAuxAdam
        mod.muon_update = mod.adam_update = _not_used
        sys.modules[name] = mod
    return True


def initialize(built: Built, model, groups, cfg, find_units=None):
    """deepspeed.initialize with our optimizer at ZeRO 0; returns (engine, optimizer).
    `find_units(model)`: the ZeRO 3 fetch units (default `fetch_units`: the unified models')."""
    skip_muon_import()
    import deepspeed
    import torch

    optimizer = None
    if built.own_optimizer:
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=True)
        groups = None
    if built.zero_stage == 3 and built.fetch_unit in ("flat", "block"):
        from deepspeed.utils import set_z3_leaf_module

        units = (find_units or fetch_units)(model)
        if built.fetch_unit == "flat":
            from .flat_params import flatten

            groups = flatten(model, units, groups)
        for unit in units:
            set_z3_leaf_module(unit, True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                   config=built.ds)
    return engine, optimizer
