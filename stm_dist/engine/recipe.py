"""What a run trains (its recipe) as opposed to how and where it runs.

A restart in the same run directory continues the checkpoint only if the recipe is unchanged:
every config default puts runs under `runs/<model>`, so a second experiment with another lr
would otherwise silently continue the first. The recipe is the experiment config minus
execution details (world size and micro-batch never appear in it: gradient accumulation is
derived; paths, thread counts, logging, checkpoint cadence, compile/memory-format switches),
plus the *contents* of the DeepSpeed JSON (the ZeRO stage and precision live there).
"""
from __future__ import annotations

import hashlib
import json

# (section, key) pairs that say how or where a run executes, not what it learns.
EXECUTION_KEYS = {
    ("model", "pretrained"),  # a path: the weights it names are checked by loading them
    ("data", "train_shards"), ("data", "val_shards"), ("data", "num_threads"), ("data", "eval_batch"),
    ("data", "backend"), ("data", "dont_use_mmap"), ("data", "record_keys"),
    ("data", "source_workers"), ("data", "train_split"), ("data", "val_split"),
    ("train", "micro_batch"), ("train", "log_every"), ("train", "compile"), ("train", "channels_last"),
    ("schedule", "max_steps"),
    ("deepspeed", "config"),  # the path; its contents are compared instead
}
EXECUTION_SECTIONS = {"run", "checkpoint"}
# DeepSpeed JSON keys that only tune communication or logging.
DS_EXECUTION_KEYS = {"steps_per_print", "wall_clock_breakdown", "comms_logger", "flops_profiler",
                     "tensorboard", "csv_monitor", "wandb"}
DS_ZERO_EXECUTION_KEYS = {"overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
                          "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                          "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size"}


def recipe(cfg) -> dict:
    """Flat {'section.key': value} of everything that decides what is trained."""
    from .ds_setup import load_json

    out = {}
    for sec, values in cfg.to_dict().items():
        if sec in EXECUTION_SECTIONS:
            continue
        for key, v in values.items():
            if (sec, key) not in EXECUTION_KEYS:
                out[f"{sec}.{key}"] = v
    try:
        ds = load_json(cfg.deepspeed.config)
    except Exception:  # a missing file is reported by check_paths with the key's name
        ds = {}
    for key, v in sorted(ds.items()):
        if key in DS_EXECUTION_KEYS:
            continue
        if key == "zero_optimization" and isinstance(v, dict):
            v = {k: x for k, x in v.items() if k not in DS_ZERO_EXECUTION_KEYS}
        out[f"deepspeed.json.{key}"] = v
    return out


def recipe_hash(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()[:16]


def schema_defaults() -> dict:
    """{'section.key': default} of the config schema itself."""
    from .config import ExperimentConfig

    return {f"{sec}.{k}": v for sec, values in ExperimentConfig().to_dict().items() for k, v in values.items()}


def differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every key whose value differs (or exists on one side only).

    A key the saved recipe lacks but whose value now is the schema's default is no difference:
    a newer version added the setting, and its default is what the saved run did."""
    missing = object()
    defaults = schema_defaults()
    lines = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, missing), now.get(key, missing)
        if a is missing and key in defaults and b == defaults[key]:
            continue
        if a != b:
            fa = "(absent)" if a is missing else json.dumps(a, default=str)
            fb = "(absent)" if b is missing else json.dumps(b, default=str)
            lines.append(f"{key}: {fa} -> {fb}")
    return lines
