"""The train loader's position in the epoch plan, shared by the DALI and PIL backends.

A backend supplies one stream of micro-batches that runs through the plan from a start position
across epoch ends (one DALI pipeline, or one DataLoader, for the whole run); this class counts
what it has handed out, so the position saved is exact although the stream reads ahead.
"""
from __future__ import annotations

from stm_dist.data.epoch_plan import EpochPlan, SampleTable
from stm_dist.data.manifest import ShardError, read_manifest, shard_files

STATE_FORMAT = "epoch-plan/1"


class PlanTrainLoader:
    backend = ""

    def __init__(self, shard_dir, batch_size, *, rank=0, world_size=1, accum=1, seed=0, img_size=224, device="cpu",
                 num_threads=2, randaug=True, split="train", dont_use_mmap=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if accum < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        man = read_manifest(shard_dir, split)
        tars, idxs, _ = shard_files(shard_dir, split, man)
        self.table = SampleTable(tars, idxs)
        self.num_samples, self.num_classes = int(man["num_samples"]), int(man["num_classes"])
        if len(self.table) != self.num_samples:
            raise ShardError(f"{shard_dir}/{split}.json says {self.num_samples} samples, its .idx files list "
                             f"{len(self.table)}: re-run `stm-shards create`")
        self.batch_size, self.rank, self.world_size, self.accum, self.seed = batch_size, rank, world_size, accum, seed
        self.global_batch = batch_size * world_size * accum
        self.img_size, self.device, self.num_threads, self.randaug = img_size, device, num_threads, randaug
        self.dont_use_mmap = dont_use_mmap
        self.plan = EpochPlan(self.num_samples, self.global_batch, seed)
        self.steps = self.plan.steps
        if self.steps == 0:
            raise ShardError(f"{shard_dir}/{split}.json: {self.num_samples} samples cannot fill one global batch of "
                             f"{self.global_batch} ({batch_size} x {world_size} ranks x {accum} accumulation)")
        self.epoch = self.step = self.micro = 0  # the next micro-batch to hand out
        self.last_step = None  # (epoch, step) of the last step `next_step` returned

    def __len__(self):
        return self.steps

    # ------------------------------------------------------------ the backend's part
    def _reposition(self):
        """Drop the stream: the next fetch starts one at (epoch, step, micro)."""
        raise NotImplementedError

    def _fetch(self):
        """The next (images, labels) micro-batch of the stream."""
        raise NotImplementedError

    def close(self):
        """End the stream now (PIL: its worker processes); the next batch starts a new one."""
        self._reposition()

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "img_size": self.img_size, "randaug": self.randaug}

    # ------------------------------------------------------------ position
    def micro_indices(self, epoch: int, step: int, j: int):
        """Sample indices of this rank's micro-batch ``j`` of global batch ``step``."""
        return self.plan.micro(epoch, step, self.rank * self.accum + j, self.batch_size)

    def positions(self, epoch: int, step: int, micro: int):
        """(sample index, epoch) of this rank's stream through the plan from a position, across
        epoch ends (never exhausted: the loader counts what it hands out)."""
        while True:
            while step < self.steps:
                for j in range(micro, self.accum):
                    for i in self.micro_indices(epoch, step, j):
                        yield int(i), epoch
                step, micro = step + 1, 0
            epoch, step = epoch + 1, 0

    def keys(self, epoch: int, step: int) -> list[list[str]]:
        """webdataset ``__key__`` of every sample of this rank's micro-batches of one step."""
        return [self.table.keys(self.micro_indices(epoch, step, j)) for j in range(self.accum)]

    def _seek(self, epoch: int, step: int):
        self.epoch, self.step, self.micro = epoch, step, 0
        self._reposition()

    def set_epoch(self, epoch: int):
        """Make ``epoch`` current, from its start; a no-op if it already is (a resumed position is
        kept) or if the previous epoch was just finished (the stream is already there)."""
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        if epoch == self.epoch + 1 and self.step >= self.steps and self.micro == 0:
            self.epoch, self.step = epoch, 0
            return
        self._seek(epoch, 0)

    def _advance(self):
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.step = 0, self.step + 1

    def _roll(self):
        if self.step >= self.steps:
            self.epoch, self.step, self.micro = self.epoch + 1, 0, 0

    def next_step(self) -> list:
        """This rank's ``accum`` micro-batches of the next global batch (the next epoch's first
        one after an epoch's last)."""
        if self.micro:
            raise RuntimeError(f"next_step() after {self.micro} micro-batch(es) of step {self.step} were iterated")
        self._roll()
        self.last_step = (self.epoch, self.step)
        out = []
        for _ in range(self.accum):
            out.append(self._fetch())
            self._advance()
        return out

    def __iter__(self):
        """The rest of the current epoch's micro-batches (the next epoch if it is finished)."""
        self._roll()
        while self.step < self.steps:
            batch = self._fetch()
            self._advance()
            yield batch

    # ------------------------------------------------------------ the elastic data position
    def state_dict(self) -> dict:
        """(epoch, samples consumed of its plan) plus what the plan depends on; the same on every
        rank, and valid at any world size and micro-batch with the same global batch."""
        if self.micro:
            raise RuntimeError(f"loader state asked in the middle of step {self.step} ({self.micro} of "
                               f"{self.accum} micro-batches handed out): save between steps")
        return {"format": STATE_FORMAT, "epoch": self.epoch, "samples": self.step * self.global_batch,
                "global_batch": self.global_batch, "num_samples": self.num_samples, "seed": self.seed,
                "shards": self.table.fingerprint(), "pipeline": self.describe()}

    def load_state_dict(self, sd: dict):
        if sd.get("format") != STATE_FORMAT:
            raise ValueError("loader state was saved by the per-slot loaders of an earlier version (no epoch "
                             "plan), whose position cannot be mapped onto the plan: start the run afresh (--fresh)")
        what = {"global_batch": "train.global_batch", "num_samples": "samples in the shards", "seed": "train.seed",
                "shards": "shard set (names and sample counts)"}
        for k, name in what.items():
            have = getattr(self, k) if k != "shards" else self.table.fingerprint()
            if sd.get(k) != have:
                raise ValueError(f"loader state was saved with {name} = {sd.get(k)!r}, this run has {have!r}: "
                                 f"its data position means nothing here; resume with the saved setting")
        samples = int(sd["samples"])
        if samples % self.global_batch:
            raise ValueError(f"loader state holds {samples} samples consumed, not a whole number of global "
                             f"batches of {self.global_batch}")
        epoch, step = int(sd["epoch"]), samples // self.global_batch
        if step >= self.steps:
            epoch, step = epoch + 1, 0
        self._seek(epoch, step)
