"""This rank's input for every optimizer step: its `accum` micro-batches of the global batch.

The data follow one epoch plan (stm_dist/data/epoch_plan.py), the same on every rank: epoch e
is a permutation of all training samples drawn from (train.seed, e), cut into
`num_samples // train.global_batch` global batches (drop_last; detection's aspect-grouped
plan cuts each group separately, so it can have fewer: an epoch is `len(loader)` steps);
micro-batch k of a global batch is its samples [k*micro_batch, (k+1)*micro_batch), and rank r
runs micro-batches r*accum .. r*accum+accum-1 as its accumulation micro-steps. Each sample's augmentation is drawn
from (seed, epoch, sample), so the global batch of every step, pixels included (up to decoder
kernels: DALI CPU vs GPU vs PIL), is the same whatever the world size and micro-batch.

The saved position is elastic: (epoch, samples consumed of the epoch's plan), identical on every
rank; a run saved at one world size / micro-batch resumes at any other (same global batch) on the
very same samples in the very same global batches. One train loader per rank for the whole run
(one DALI pipeline: no rebuild between epochs).

Contract for tests and tools: with `data.record_keys: true` every rank appends, for every step it
runs, one JSON line per micro-batch to `<run_dir>/sample_keys_rank<r>.jsonl`:
    {"step": s, "rank": r, "micro": j, "keys": [...]}
`step` is the 1-based step number of metrics.jsonl, `micro` j in [0, accum) (its place in the
global batch is k = r*accum + j), `keys` the webdataset `__key__`s of its samples in batch order.
The global batch of step s is the concatenation over (rank, micro) in that order. A resumed run
appends; steps run after the last checkpoint before a kill appear twice (the rerun's lines come
later in the file: take the last line per (step, rank, micro)).
"""
from __future__ import annotations

import json
import os

from .config import ConfigError


class DataFeed:
    def __init__(self, cfg, rank: int, accum: int, device: str, run_dir: str | None = None, task=None):
        from .tasks import task_for

        t, d = cfg.train, cfg.data
        world = t.global_batch // (t.micro_batch * accum)
        self.rank, self.accum = rank, accum
        self.loader = (task or task_for(cfg)).train_loader(rank, world, accum, device)
        self._keys_file = None
        if getattr(d, "record_keys", False):
            run_dir = run_dir or cfg.run.out_dir
            os.makedirs(run_dir, exist_ok=True)
            self._keys_file = open(os.path.join(run_dir, f"sample_keys_rank{rank}.jsonl"), "a", buffering=1)

    def set_epoch(self, epoch: int):
        """Call at an epoch's first step; a resumed mid-epoch position is kept (loader contract)."""
        self.loader.set_epoch(epoch)

    def next_step(self) -> list:
        """The `accum` micro-batches ((images, labels), or (images, targets)) of this rank for the
        next optimizer step."""
        out = self.loader.next_step()
        if self._keys_file is not None:
            epoch, step = self.loader.last_step
            s = epoch * len(self.loader) + step + 1
            for j, keys in enumerate(self.loader.keys(epoch, step)):
                self._keys_file.write(json.dumps({"step": s, "rank": self.rank, "micro": j, "keys": keys}) + "\n")
        return out

    def end_epoch(self):
        """Nothing to do: the loader's stream runs on into the next epoch."""

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, saved: list[dict], epoch: int, where: str):
        """`saved`: every saved rank's `state_dict()`, in rank order. They hold the same global
        position, so any world size and micro-batch can continue from it."""
        first = saved[0]
        if not isinstance(first, dict) or "format" not in first:
            raise ConfigError(f"checkpoint {where} holds per-micro-batch-slot data states from an earlier version, "
                              f"whose position cannot be mapped onto the epoch plan: start the run afresh (--fresh)")
        for r, s in enumerate(saved[1:], 1):
            if (s.get("epoch"), s.get("samples")) != (first.get("epoch"), first.get("samples")):
                raise ConfigError(f"checkpoint {where}: ranks 0 and {r} saved different data positions "
                                  f"({first.get('epoch')}, {first.get('samples')}) vs ({s.get('epoch')}, "
                                  f"{s.get('samples')}); the checkpoint is damaged")
        try:
            self.loader.load_state_dict(first)
        except ValueError as e:
            raise ConfigError(f"checkpoint {where}: {e}") from None
        if self.loader.epoch != epoch:
            raise ConfigError(f"checkpoint {where}: the data position is in epoch {self.loader.epoch}, the training "
                              f"state in epoch {epoch}; the checkpoint is damaged")

    def close(self):
        if self._keys_file is not None:
            self._keys_file.close()
            self._keys_file = None
