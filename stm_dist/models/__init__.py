"""The unified STM backbones: one meta-architecture, five spatial token mixers (and yours:
`register_mixer`, docs/mixers.md). Importing this registers every model with timm too.

Light on purpose: importing this never pulls in DeepSpeed, DALI or the training engine.
"""
from .meta_arch import MetaArch
from .param_groups import decay_split, param_groups
from .pretrained import CheckpointError, LoadReport, load_pretrained
from .registry import (MixerError, create_model, list_models, load_mixer_module, mixer_of, mixers,
                       model_config, register_mixer, resolve_name)

# The built-in mixers register themselves (registry.register_mixer) when their files load.
from . import halo, pvt, swin, convnext, dcnv3  # noqa: E402,F401  isort:skip
from .registry import load_plugins as _load_plugins  # noqa: E402

_load_plugins()  # STM_MIXER_MODULES and `stm_dist.mixers` entry points: after the built-ins

__all__ = ["MetaArch", "create_model", "list_models", "model_config", "resolve_name", "register_mixer",
           "mixers", "mixer_of", "load_mixer_module", "MixerError",
           "load_pretrained", "LoadReport", "CheckpointError", "param_groups", "decay_split"]
