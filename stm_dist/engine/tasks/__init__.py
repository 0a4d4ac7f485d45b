"""What the training loop asks of a task, so classification and detection share one loop,
one checkpoint format, one precision and resume path.

A task (`task_for(cfg)`) answers:
    build_model(for_eval=False)            the nn.Module a run trains / a fresh eval copy
    load_initial_weights(model, log)       model.pretrained into it (ConfigError naming the file)
    param_groups(model, log)               optimizer groups (weight decay rules, layer decay)
    fetch_units(model)                     the modules ZeRO 3 gathers as one unit (ds_setup)
    train_loader(rank, world, accum, device)   the epoch-plan loader (stm_dist.data contract)
    prepare(micro_batch)                   host-side batch step (mixup/cutmix) -> (inputs, targets)
    forward_loss(engine, inputs, targets, device, precision, channels_last) -> scalar loss
    val_loader(rank, world, on_cuda)       the validation loader, kept for the whole run
    evaluate(model, loader, device, out_dir, step) -> {metric: value}, summed over ranks
    metric                                 the key of evaluate's result that picks best.pth
    describe_eval(results, suffix)         one log line of the results
The engine never learns what a batch holds: images and labels, or images and boxes.
"""
from __future__ import annotations

TASKS = ("classification", "detection")


def task_for(cfg):
    kind = cfg.model.task
    if kind == "detection":
        from .detection import DetectionTask

        return DetectionTask(cfg)
    from .classification import ClassificationTask

    return ClassificationTask(cfg)
