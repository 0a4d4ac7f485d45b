"""A run directory's checkpoints as the trainer sees them: its first config and config history,
the one resume decision for all ranks, the recipe guard, saving and loading the training state.
The files themselves (markers, hashes, pruning, universal conversion) are checkpoint.py's."""
from __future__ import annotations

import json
import os
import time

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import flat_params
from . import recipe as recipe_mod
from .distributed import barrier


def prepare_run_dir(cfg, run_dir: str, rank: int):
    """Rank 0: move old checkpoints aside for --fresh, keep the first config.yaml, append this
    start to config_history.yaml. Returns where --fresh moved checkpoints (or None)."""
    moved = None
    if rank == 0:
        if cfg.run.fresh:
            moved = ckpt.move_aside(run_dir)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        first = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(first):  # the run's first config stays; every start is appended below
            config_mod.dump(cfg, first)
        config_mod.append_history(cfg, os.path.join(run_dir, "config_history.yaml"),
                                  time.strftime("%Y-%m-%d %H:%M:%S %z"))
    barrier()
    return moved


class RunCheckpoints:
    def __init__(self, cfg, run_dir: str, rank: int, world: int, log):
        self.cfg, self.run_dir, self.rank, self.world, self.log = cfg, run_dir, rank, world, log
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.recipe = recipe_mod.recipe(cfg)
        self.recipe_hash = recipe_mod.recipe_hash(self.recipe)
        # One decision for all ranks: rank 0 reads the directory and tells the others (node-local
        # disks or NFS attribute caches can show ranks different listings).
        self.src_dir, self.resume = ckpt.decide_resume(self.ckpt_dir, cfg.run.resume_from, rank, warn=log.info)
        if self.resume:
            self._check_recipe(*self.resume)

    def _check_recipe(self, tag: str, marker: dict):
        where = os.path.join(self.src_dir, tag)
        if "recipe" not in marker:  # written before recipes were recorded
            if marker.get("config_hash") != self.recipe_hash:
                self.log.info(f"warning: {where} records no recipe to compare; continuing it")
            return
        diffs = recipe_mod.differences(marker["recipe"], self.recipe)
        if not diffs:
            return
        listing = "\n  ".join(diffs)
        if self.cfg.run.allow_recipe_change:
            self.log.info(f"run.allow_recipe_change=true: continuing {where} with a changed recipe:\n  {listing}")
            return
        raise config_mod.ConfigError(
            f"{where} was trained with another recipe (saved -> now):\n  {listing}\n"
            f"Use another run.out_dir, pass --fresh to move these checkpoints aside, or set "
            f"run.allow_recipe_change=true to continue with the change.")

    def prepare_load(self) -> tuple[str | None, bool]:
        """(directory DeepSpeed loads from, whether it is a universal conversion)."""
        if not self.resume:
            return None, False
        marker = self.resume[1]
        # ZeRO 0 saves whole (replicated) optimizer state, which loads at any world size;
        # DeepSpeed's universal conversion would fail on it (no per-rank optimizer files).
        if int(marker["world_size"]) == self.world or int(marker["zero_stage"]) == 0:
            return self.src_dir, False
        load_dir = os.path.join(self.run_dir, "checkpoints_universal")
        if self.rank == 0:
            ckpt.to_universal(self.src_dir, self.resume[0], load_dir, int(marker["zero_stage"]), log=self.log.info)
        barrier()
        return load_dir, True

    def save(self, engine, state, zero_stage: int, precision: str) -> str:
        meta = {"world_size": self.world, "zero_stage": zero_stage, "precision": precision,
                "model": self.cfg.model.name, "epoch": state.epoch, "config_hash": self.recipe_hash,
                "recipe": self.recipe}
        layout = flat_params.layout_of(engine.module)
        if layout is not None:  # stm-export and a resume need it to read the flat ZeRO 3 tensors
            meta["param_layout"] = layout.to_json()
        client = dict(state.state_dict(), config_hash=self.recipe_hash, config=self.cfg.to_dict())
        tag = ckpt.save(engine, self.ckpt_dir, state.step, client, meta, self.cfg.checkpoint.keep_last, self.rank)
        self.log.info(f"saved checkpoint {tag} (epoch {state.epoch}, step {state.step})")
        return tag

    def load(self, engine, state, load_dir: str, universal: bool, new_ema):
        """Collective. A checkpoint that any rank fails to load (an unreadable file, an error
        inside DeepSpeed's loader or in our state) is given up by every rank together, and the
        previous complete one is loaded instead."""
        while True:
            tag, marker = self.resume
            tag_dir = os.path.join(self.src_dir, tag)
            errors = _gather(self._try_load(engine, state, load_dir, universal, tag, marker, new_ema))
            failed = [(r, e) for r, e in enumerate(errors) if e is not None and e[0] != "peer"]
            if not failed:
                break
            config_errors = [e[1] for _, e in failed if e[0] == "config"]
            if config_errors:  # the user's setting, not the files: an older checkpoint would not help
                raise config_mod.ConfigError(config_errors[0])
            rank, (_, why) = failed[0]
            self.resume = self._previous(tag)
            if self.resume is None:
                raise RuntimeError(f"cannot load checkpoint {tag_dir}: {why} (rank {rank}); no earlier "
                                   f"complete checkpoint in {self.src_dir} to fall back to")
            self.log.info(f"cannot load checkpoint {tag_dir}: {why} (rank {rank}); falling back to "
                          f"{os.path.join(self.src_dir, self.resume[0])}")
            self._check_recipe(*self.resume)
            load_dir, again_universal = self.prepare_load()
            if again_universal != universal:  # DeepSpeed's load_universal is fixed when the engine is built
                raise RuntimeError(f"cannot load checkpoint {tag_dir}: {why}; the previous one, "
                                   f"{self.resume[0]}, was saved at another world size: restart to load it")
        saved_world = int(marker["world_size"])
        self.log.info(f"resumed from {tag_dir} at epoch {state.epoch}, step {state.step}"
                      + (f" (saved by {saved_world} processes, loaded via universal checkpoint)" if universal else ""))

    def _try_load(self, engine, state, load_dir: str, universal: bool, tag: str, marker: dict, new_ema):
        """None, or (kind, message) with kind 'config' (a setting), 'files', or 'peer' (this
        rank's files are fine, another rank's are not)."""
        tag_dir = os.path.join(self.src_dir, tag)
        why = ckpt.readable(tag_dir, self.rank, self.world)
        # Agree before DeepSpeed's loader: it runs collectives, and a rank that gave up alone
        # would meet the others' loader collectives with its own gather.
        if any(w is not None for w in _gather(why)):
            return ("files", why) if why is not None else ("peer", None)
        mismatch = _layout_mismatch(marker.get("param_layout"), flat_params.layout_of(engine.module))
        if mismatch:
            return "config", f"{tag_dir}: {mismatch}"
        groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        try:
            path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if universal:
                # DeepSpeed's ZeRO-3 universal loader gives every parameter group the settings of
                # the saved group 0 (weight_decay, our lr_scale and decays flags), so norms and
                # biases would be decayed after a world-size change; the groups are the recipe's,
                # exactly as this start built them: keys it adds are dropped too (the schedule
                # sets `decays` on its first step, so group 0's True reached every group).
                for g, saved in zip(engine.optimizer.param_groups, groups):
                    for key in [k for k in g if k != "params" and k not in saved]:
                        del g[key]
                    g.update(saved)
                _unshare_step_counts(engine.optimizer)
        except Exception as e:
            return "files", f"DeepSpeed's load_checkpoint failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        if path is None:
            return "files", f"DeepSpeed found nothing to load in {os.path.join(load_dir, tag)}"
        try:
            clients = ckpt.load_all_clients(tag_dir, int(marker["world_size"]))
            state.load_state_dict(clients, tag_dir, log=self.log.info, new_ema=new_ema)
        except config_mod.ConfigError as e:
            return "config", str(e)
        except Exception as e:
            return "files", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return None

    def _previous(self, tag: str):
        """Collective: rank 0's choice of the newest complete checkpoint older than `tag`."""
        choice = [None]
        if self.rank == 0:
            choice = [ckpt.latest_complete(self.src_dir, warn=self.log.info, verify=True, before=tag)]
        return _broadcast(choice)

    def eval_recorded(self, step: int) -> bool:
        """Collective: whether metrics.jsonl (rank 0's) already holds an evaluation at `step`."""
        found = [False]
        if self.rank == 0:
            path = os.path.join(self.run_dir, "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        if line.endswith("\n") and '"eval"' in line:
                            rec = json.loads(line)
                            found[0] = found[0] or (rec.get("kind") == "eval" and rec.get("step") == step)
        return bool(_broadcast(found))


def _unshare_step_counts(zero_optimizer):
    """DeepSpeed's ZeRO-3 universal loader sets every flat partition's Adam `step` to one and the
    same tensor. torch's AdamW (fused or foreach) increments each group's step tensors in place,
    so with two groups (decay, no_decay) that one counter went up twice per step and the bias
    correction of every step after a world-size change was wrong (docs/scaling.md: the drift)."""
    state = getattr(getattr(zero_optimizer, "optimizer", None), "state", None) or {}
    seen = set()
    for st in state.values():
        step = st.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                st["step"] = step.clone()
            seen.add(id(st["step"]))


def _layout_mismatch(saved: dict | None, live) -> str | None:
    """Why DeepSpeed's partitions of a checkpoint cannot be this engine's (None: they can)."""
    live = live.to_json() if live is not None else None
    if saved == live:
        return None
    if saved and live:
        return ("its flat ZeRO 3 parameters (zero3_fetch_unit 'flat') group the model's parameters "
                "differently from this run's (another model or other optimizer parameter groups)")
    def unit(layout):
        return "'flat'" if layout else "'block' or 'module'"
    return (f"its ZeRO 3 parameters were saved with zero3_fetch_unit {unit(saved)}, this run uses "
            f"{unit(live)} (deepspeed.config); DeepSpeed's partitions of one layout cannot be loaded "
            f"into the other: resume with the fetch unit it was saved with")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(value: list):
    if _distributed():
        import torch.distributed as dist

        dist.broadcast_object_list(value, src=0)
    return value[0]


def _gather(value) -> list:
    """Every rank's `value`, in rank order."""
    if not _distributed():
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
