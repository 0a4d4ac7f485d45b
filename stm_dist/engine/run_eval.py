"""Evaluation during training: plain fp32 copies of the live and the EMA weights, each scored
by the run's task on the validation shards with every image counted once across ranks; the
best of each by the task's metric (top-1, box AP) is kept as best.pth / best_ema.pth in the run
directory."""
from __future__ import annotations

import json
import os

import torch

from .ema import gathered
from .flat_params import unflatten
from .tasks import task_for


def eval_copy(cfg, module: torch.nn.Module, zero_stage: int, device, state: dict | None = None, task=None):
    """A fresh fp32 model holding `state`, or the engine module's current weights (gathered
    from the ZeRO 3 shards when needed)."""
    model = (task or task_for(cfg)).build_model(for_eval=True).to(device)
    if state is None:
        with gathered(module, zero_stage):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state = unflatten(module, state)  # the EMA's keys are the module's: flat at ZeRO 3
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


class BestCheckpoints:
    """best.pth (live weights) and best_ema.pth (EMA weights), each rewritten when its metric
    (`metric`: top1, or bbox_AP for detection) improves: plain fp32 state dicts in the model's key
    layout (load_pretrained / stm-eval read them), each with a `<file>.json` (model, step, epoch,
    the evaluation's results). They live in the run directory, outside checkpoints/ and its
    keep-last-K rotation.

    The best value so far is part of the training state (`state.best`). A checkpoint is saved
    before the evaluation of the same step, so the JSON files also count: a best recorded at or
    before the step this start resumed from belongs to this run's history; one recorded later
    was written by a start whose steps were discarded, and is beaten by any new evaluation."""

    NAMES = {"": "best", "_ema": "best_ema"}

    def __init__(self, run_dir: str, rank: int, model_name: str, state, start_step: int, log=print,
                 metric: str = "top1"):
        self.run_dir, self.rank, self.model_name, self.state, self.log = run_dir, rank, model_name, state, log
        self.metric = metric
        for suffix, name in self.NAMES.items():
            rec = self.read(os.path.join(run_dir, f"{name}.pth.json"))
            key = f"{metric}{suffix}"
            if rec and rec.get("step", start_step + 1) <= start_step and key in rec:
                if rec[key] > self.state.best.get(key, -1.0):
                    self.state.best[key] = rec[key]

    @staticmethod
    def read(path: str) -> dict | None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def offer(self, suffix: str, model: torch.nn.Module, results: dict):
        """Keep `model` (already evaluated: results hold its {metric}{suffix}) if it is the best yet."""
        key = f"{self.metric}{suffix}"
        value, was = results[key], self.state.best.get(key)
        if was is not None and value <= was:
            return
        self.state.best[key] = value  # every rank: the training state saved next holds it
        if self.rank != 0:
            return
        name = self.NAMES[suffix]
        path = os.path.join(self.run_dir, f"{name}.pth")
        sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        info = {"kind": name, "model": self.model_name, "ema": suffix == "_ema", "step": results["step"],
                "epoch": results["epoch"], key: value}
        info.update({k: v for k, v in results.items() if k.endswith(suffix) and k not in info
                     and isinstance(v, (int, float)) and (suffix or not k.endswith("_ema"))})
        # Weights first, then their description: a crash in between leaves better weights
        # described by the older (lower) top-1, never the reverse.
        torch.save(sd, path + ".tmp")
        with open(path + ".json.tmp", "w") as f:
            json.dump(info, f, indent=1)
        os.replace(path + ".tmp", path)
        os.replace(path + ".json.tmp", path + ".json")
        label = "top-1" if self.metric == "top1" else self.metric
        self.log(f"new best{' EMA' if suffix else ''} {label} {value:.3f}"
                 + (f" (was {was:.3f})" if was is not None else "") + f" at step {results['step']}: wrote {path}")


def val_loader(cfg, rank: int, world: int, on_cuda: bool, task=None):
    """The run's validation loader. Keep it: the loaders serve any number of passes (DALI resets
    its pipeline, PIL keeps its workers), so an evaluation does not rebuild a pipeline per copy."""
    return (task or task_for(cfg)).val_loader(rank, world, on_cuda)


def evaluate_run(cfg, module, zero_stage: int, ema, rank: int, world: int, device, on_cuda: bool,
                 step: int = 0, epoch: int = 0, best: BestCheckpoints | None = None, loader=None,
                 task=None, out_dir: str | None = None) -> dict:
    """The task's results ({top1, top5, loss} or {bbox_AP, segm_AP, ...}) of the live weights,
    and `*_ema` of the EMA weights when there are some. With `best`, the evaluated copies that
    improve on the best are written as best*.pth. `loader`: the run's val_loader (built here
    when not given); `out_dir`: where a task writes files of its own (detection: the COCO
    results JSON)."""
    task = task or task_for(cfg)
    loader = loader or task.val_loader(rank, world, on_cuda)
    results = {}
    sources = [("", None)] + ([("_ema", ema)] if ema is not None else [])
    for suffix, src in sources:
        # The EMA's full_state is a collective: every rank builds both copies in the same order.
        model = eval_copy(cfg, module, zero_stage, device, src.full_state() if src is not None else None, task)
        r = task.evaluate(model, loader, device, out_dir=out_dir, step=step, suffix=suffix)
        results.update({f"{k}{suffix}": v for k, v in r.items()})
        if best is not None:
            best.offer(suffix, model, dict(results, step=step, epoch=epoch))
        del model
    return results


def lr_groups(optimizer) -> list:
    """The optimizer's groups as the schedule last set them (name, layer id, lr scale, lr, wd)."""
    out = []
    for i, g in enumerate(optimizer.param_groups):
        out.append({"name": g.get("group_name", str(i)), "layer_id": g.get("layer_id"),
                    "lr_scale": g.get("lr_scale", 1.0), "lr": g["lr"], "weight_decay": g.get("weight_decay")})
    return out


def dump_live_weights(module, zero_stage: int, rank: int, path: str):
    with gathered(module, zero_stage):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        torch.save(unflatten(module, state), path)
