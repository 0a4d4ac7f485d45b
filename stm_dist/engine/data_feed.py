"""This rank's input for every optimizer step: `accum` micro-batches of the global batch.

Data sharding is by *micro-batch slot*, not by rank: a global batch is `global_batch /
micro_batch` slots, slot k reads shard k of that many, and rank r runs slots
r*accum .. r*accum+accum-1 as its accumulation micro-steps. The global batch of every step is
therefore the same whatever the world size, which is what lets a run saved on 2 processes
continue on 1 (or 8) with the same data and the same loss.
"""
from __future__ import annotations

from .config import ConfigError


class DataFeed:
    def __init__(self, cfg, rank: int, accum: int, device: str):
        from stm_dist.data import build_train_loader

        t = cfg.train
        self.accum = accum
        self.num_slots = t.global_batch // t.micro_batch
        self.slots = [rank * accum + j for j in range(accum)]
        self.loaders = [
            build_train_loader(cfg.data.train_shards, t.micro_batch, rank=slot, world_size=self.num_slots,
                               seed=t.seed, img_size=cfg.model.img_size, device=device,
                               num_threads=cfg.data.num_threads, randaug=cfg.data.randaug,
                               backend=cfg.data.backend)
            for slot in self.slots
        ]
        self._iters = None

    def set_epoch(self, epoch: int):
        """Call at an epoch's first step; a resumed mid-epoch position is kept (loader contract)."""
        for ld in self.loaders:
            ld.set_epoch(epoch)
        self._iters = None

    def next_step(self) -> list:
        """The `accum` (images, labels) micro-batches of this rank for the next optimizer step."""
        if self._iters is None:
            self._iters = [iter(ld) for ld in self.loaders]
        return [next(it) for it in self._iters]

    def end_epoch(self):
        self._iters = None

    def state_dict(self) -> dict:
        return {slot: ld.state_dict() for slot, ld in zip(self.slots, self.loaders)}

    def load_state_dict(self, saved: list[dict], epoch: int, where: str):
        """`saved`: every saved rank's `state_dict()`, in rank order (slots are regrouped, so the
        world size may change)."""
        slot_states = {}
        for s in saved:
            slot_states.update(s)
        for slot, ld in zip(self.slots, self.loaders):
            if slot not in slot_states:
                raise ConfigError(f"checkpoint {where} has no data-iterator state for micro-batch slot {slot}: "
                                  f"train.global_batch / train.micro_batch changed since it was saved; resume "
                                  f"with the saved train.micro_batch (the world size may change)")
            ld.set_epoch(epoch)
            ld.load_state_dict(slot_states[slot])
        self._iters = None
