"""The mixer of one's own that a checkpoint's run was trained with, found from the checkpoint.

A run of an external mixer records its file in its recipe (`model.mixer_module` in the run
directory's config.yaml). stm-eval and stm-analyze are given a checkpoint, not the recipe: this
finds the recipe beside it (the run directory itself, its checkpoints/ folder or a tag inside
it, or best*.pth in the run directory) and imports the mixer, so no STM_MIXER_MODULES is needed.
"""
from __future__ import annotations

import os


def _run_configs(checkpoint: str):
    here = os.path.abspath(checkpoint)
    start = here if os.path.isdir(here) else os.path.dirname(here)
    for d in (start, os.path.dirname(start), os.path.dirname(os.path.dirname(start))):
        path = os.path.join(d, "config.yaml")
        if os.path.isfile(path):
            yield path


def load_run_mixer(checkpoint: str) -> str | None:
    """Import the `model.mixer_module` of the nearest run config of `checkpoint`, if it names one.
    Returns the spec loaded, or None. Raises ValueError naming the config for a missing file."""
    import yaml

    for path in _run_configs(checkpoint):
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue  # not a run config we can read: the checkpoint still loads without it
        spec = (cfg.get("model") or {}).get("mixer_module") if isinstance(cfg, dict) else None
        if not spec:
            return None  # the nearest run config is the run's: it names no mixer of its own
        from stm_dist.models.registry import MixerError, load_mixer_module

        try:
            load_mixer_module(str(spec), source=f"{path}: model.mixer_module")
        except MixerError as e:
            raise ValueError(str(e)) from None
        return str(spec)
    return None
