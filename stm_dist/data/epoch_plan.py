"""Who reads what, when: the sharding arithmetic both backends share, so their contracts agree.

Train, epoch ``e``: the shard files are put in an order drawn from (seed, e); the concatenated
sample sequence is cut into ``world_size`` contiguous slices (DALI's ``shard_id/num_shards``
rule) and rank r reads slice ``(r + e) % world_size``, shuffled. Every rank runs
``(num_samples // world_size) // batch_size`` steps (drop_last; the smallest slice decides), so
no sample is read twice in an epoch and all ranks agree on the epoch length.

Val: the files in manifest order, rank r reads slice r in order; the slices partition the data
(no padding with duplicates), so accuracy summed over ranks is exact.
"""
from __future__ import annotations

import numpy as np


def slice_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of slice ``shard_id``; the same integer rule DALI's readers use."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    return (num_samples // world_size) // batch_size


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A 31-bit seed for (seed, epoch, rank, stream); DALI wants non-negative int32-ish seeds."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, stream])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def file_order(num_files: int, seed: int, epoch: int) -> list[int]:
    """Order of the shard files in ``epoch``; identical on every rank (rank-independent seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, 0x5EED]))
    return [int(i) for i in rng.permutation(num_files)]


def train_slice_id(rank: int, world_size: int, epoch: int) -> int:
    return (rank + epoch) % world_size
