"""The model a run trains and evaluates: construction from the config, pretrained weights,
SyncBatchNorm and memory format, optimizer parameter groups."""
from __future__ import annotations

from .step import prepare_model


def build_model(cfg, for_eval: bool = False):
    from stm_dist.models import create_model

    kw = {"num_classes": cfg.model.num_classes, "img_size": cfg.model.img_size,
          "layer_scale_init_value": cfg.model.layer_scale_init_value}
    if cfg.model.drop_path_rate is not None and not for_eval:
        kw["drop_path_rate"] = cfg.model.drop_path_rate
    return create_model(cfg.model.name, **kw)


def build_train_model(cfg, world: int, channels_last: bool, log=print):
    """(model ready for DeepSpeed, optimizer parameter groups). Call after seeding: every rank
    must build identical initial weights."""
    from stm_dist.models.param_groups import param_groups

    model = build_model(cfg)
    if cfg.model.pretrained:
        from stm_dist.models.pretrained import load_pretrained

        load_pretrained(model, cfg.model.pretrained)
    model = prepare_model(model, world, channels_last)  # SyncBatchNorm, memory format
    groups = param_groups(model, weight_decay=cfg.optim.weight_decay)
    return model, groups
