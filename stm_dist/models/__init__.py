"""The unified STM backbones: one meta-architecture, five spatial token mixers.

Light on purpose: importing this never pulls in DeepSpeed, DALI or the training engine.
"""
from .meta_arch import MetaArch
from .param_groups import decay_split, param_groups
from .pretrained import CheckpointError, LoadReport, load_pretrained
from .registry import create_model, list_models, model_config, resolve_name

__all__ = ["MetaArch", "create_model", "list_models", "model_config", "resolve_name",
           "load_pretrained", "LoadReport", "CheckpointError", "param_groups", "decay_split"]
