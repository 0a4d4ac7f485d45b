"""Everything a checkpoint restores beyond DeepSpeed's own files, as one object.

Position (step, epoch, step within the epoch), the data position (`DataFeed`), the random
streams, the sharded EMA and the loss scale. Each rank saves its
`state_dict()` as stm_rank<r>.pt; `load_state_dict()` takes every saved rank's state, so a run
can resume at another world size (the data slots and EMA slices are regrouped; the random
streams, which belong to ranks, are re-derived from the seed and step).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        # Only this process's device: another layout (1 node x 8 -> 2 x 4) must not index a
        # GPU that is not there.
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        c = s["cuda"]
        if isinstance(c, (list, tuple)):  # older checkpoints saved every visible device
            c = c[min(torch.cuda.current_device(), len(c) - 1)]
        torch.cuda.set_rng_state(c)


class TrainState:
    def __init__(self, feed, ema, runner, seed: int, rank: int, world: int):
        self.feed, self.ema, self.runner = feed, ema, runner
        self.seed, self.rank, self.world = seed, rank, world
        self.step = self.epoch = self.step_in_epoch = 0
        # The epoch whose evaluation had not finished when this state was saved (the epoch-end
        # checkpoint is written before its evaluation); a resume runs it first.
        self.eval_pending = None
        # Best validation top-1 so far, {'top1': .., 'top1_ema': ..} (run_eval.BestCheckpoints).
        self.best = {}

    def state_dict(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "loaders": self.feed.state_dict(),
            "rng": rng_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "runner": self.runner.state_dict(),
            "eval_pending": self.eval_pending,
            "best": dict(self.best),
        }

    def load_state_dict(self, clients: list[dict], where: str, log=print, new_ema=None):
        """`clients`: every saved rank's state, in rank order. `new_ema()` rebuilds the EMA from
        the loaded weights when the checkpoint holds none."""
        saved_world = len(clients)
        mine = clients[self.rank] if self.rank < saved_world else clients[0]
        self.step, self.epoch, self.step_in_epoch = mine["step"], mine["epoch"], mine["step_in_epoch"]
        self.feed.load_state_dict([c["loaders"] for c in clients], self.epoch, where)
        if self.ema is not None:
            states = [c.get("ema") for c in clients]
            if any(st is None or "frags" not in st for st in states):
                log("checkpoint has no sharded EMA state; EMA restarts from the loaded weights")
                self.ema = new_ema()
            else:
                self.ema.load_state_dict(states)
        self.runner.load_state_dict(mine.get("runner") or {})
        self.eval_pending = mine.get("eval_pending")
        self.best = dict(mine.get("best") or {})
        if saved_world == self.world:
            set_rng_state(mine["rng"])
        else:
            seed_all(self.seed + self.rank + 1000003 * self.step)
