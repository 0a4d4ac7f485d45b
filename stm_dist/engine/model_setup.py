"""The model a run trains and evaluates: built by the run's task (classification or detection,
engine/tasks/), its initial weights (model.pretrained), SyncBatchNorm and memory format, and
the optimizer's parameter groups."""
from __future__ import annotations

from .step import prepare_model
from .tasks import task_for


def build_model(cfg, for_eval: bool = False):
    return task_for(cfg).build_model(for_eval=for_eval)


def build_train_model(cfg, world: int, channels_last: bool, log=print, task=None):
    """(model ready for DeepSpeed, optimizer parameter groups). Call after seeding: every rank
    must build identical initial weights."""
    task = task or task_for(cfg)
    model = task.build_model()
    if cfg.model.pretrained:
        task.load_initial_weights(model, log)
    model = prepare_model(model, world, channels_last)  # SyncBatchNorm, memory format
    return model, task.param_groups(model, log)
