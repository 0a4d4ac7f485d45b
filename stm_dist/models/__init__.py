"""The unified STM backbones: one meta-architecture, five spatial token mixers.

Light on purpose: importing this never pulls in DeepSpeed, DALI or the training engine.
"""
from .meta_arch import MetaArch
from .registry import create_model, list_models, model_config, resolve_name

__all__ = ["MetaArch", "create_model", "list_models", "model_config", "resolve_name"]
