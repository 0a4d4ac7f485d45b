"""The model a run trains and evaluates: construction from the config, pretrained weights
(fine-tuning: a new head, EMA weights), SyncBatchNorm and memory format, optimizer parameter
groups (with layer-wise lr decay when asked)."""
from __future__ import annotations

from .config import ConfigError
from .step import prepare_model


def build_model(cfg, for_eval: bool = False):
    from stm_dist.models import create_model

    kw = {"num_classes": cfg.model.num_classes, "img_size": cfg.model.img_size,
          "layer_scale_init_value": cfg.model.layer_scale_init_value}
    if cfg.model.drop_path_rate is not None and not for_eval:
        kw["drop_path_rate"] = cfg.model.drop_path_rate
    return create_model(cfg.model.name, **kw)


def load_initial_weights(model, cfg, log=print):
    """model.pretrained into a freshly built model; a classifier of another class count is
    replaced (fine-tuning). Errors name the key and the file."""
    from stm_dist.models.pretrained import CheckpointError, load_pretrained

    try:
        report = load_pretrained(model, cfg.model.pretrained, use_ema=cfg.model.pretrained_ema, new_head=True)
    except CheckpointError as e:
        raise ConfigError(f"'model.pretrained': {e}") from None
    log(f"model.pretrained: {report.source}{' (EMA weights)' if report.ema else ''}"
        + (f", resized to the model: {', '.join(report.resized)}" if report.resized else ""))
    if report.new_head:
        log(report.head_line())
    return report


def train_param_groups(model, cfg, log=print) -> list:
    from stm_dist.models.param_groups import param_groups

    ld = cfg.optim.layer_decay
    try:
        groups = param_groups(model, weight_decay=cfg.optim.weight_decay, layer_decay=ld)
    except ValueError as e:
        raise ConfigError(f"'optim.layer_decay': {e}") from None
    if ld is not None:
        n = max(g["layer_id"] for g in groups) + 1
        log(f"optim.layer_decay {ld}: {n} layers, lr scale {ld ** (n - 1):.3g} (layer 0) .. 1 (layer {n - 1}), "
            f"{len(groups)} parameter groups")
    return groups


def build_train_model(cfg, world: int, channels_last: bool, log=print):
    """(model ready for DeepSpeed, optimizer parameter groups). Call after seeding: every rank
    must build identical initial weights."""
    model = build_model(cfg)
    if cfg.model.pretrained:
        load_initial_weights(model, cfg, log)
    model = prepare_model(model, world, channels_last)  # SyncBatchNorm, memory format
    return model, train_param_groups(model, cfg, log)
