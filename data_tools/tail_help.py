"""Idle shard workers validate the tail of a busy worker's shard, so the last shards end together.

A shard stays one task, written by one worker in sample order (its bytes never change), but near
the end of a run some workers have no task left while others are mid-shard: with 4 shards on 2
workers, one worker's two shards were measured 0.1 s (~15%) slower than the other's, a core idle
all that time. The validating decode is ~85% of a sample's CPU and its outcome is one small
verdict, so an idle worker claims samples from the *back* of a busy shard (the owner works from the
front), decodes them and posts "passes as-is" or "owner, look yourself". The owner then re-reads
such a file from the page cache and writes it without decoding, if its (size, mtime, inode) is
still what the helper saw. Only verdicts cross processes, never image bytes, so memory stays
bounded; a conversion or a bad file is always redone by the owner, so its messages and --strict
behave exactly as without help.

Shared memory is inherited through fork; with another start method there is no board and no help.
"""
from __future__ import annotations

import time

PENDING, PASSES, OWNER_CHECKS = 0, 1, 2
# Head fields per worker slot: generation (bumped per published shard), task number (-1: none),
# samples, front (next sample the owner takes), back (samples >= back are claimed by helpers).
_GEN, _TASK, _N, _FRONT, _BACK = range(5)
_HEAD = 5
_MIN_LEFT = 2  # leave the last couple to the owner: it would only wait on a helper for them


class TailBoard:
    def __init__(self, ctx, workers: int, max_items: int):
        self.lock = ctx.Lock()
        self.max_items = max(1, max_items)
        self.head = ctx.RawArray("q", workers * _HEAD)
        self.verdict = ctx.RawArray("b", workers * self.max_items)
        self.stamp = ctx.RawArray("q", workers * self.max_items * 3)
        for s in range(workers):
            self.head[s * _HEAD + _TASK] = -1
        self.workers = workers

    # -- the owner's side
    def publish(self, slot: int, task_no: int, n: int):
        h, base = slot * _HEAD, slot * self.max_items
        with self.lock:
            for k in range(n):
                self.verdict[base + k] = PENDING
            self.head[h + _GEN] += 1
            self.head[h + _TASK], self.head[h + _N] = task_no, n
            self.head[h + _FRONT], self.head[h + _BACK] = 0, n

    def take(self, slot: int, k: int) -> bool:
        """True: sample k is the owner's to validate; False: a helper has it (see verdict_of)."""
        h = slot * _HEAD
        with self.lock:
            if k < self.head[h + _BACK]:
                self.head[h + _FRONT] = k + 1
                return True
            return False

    def verdict_of(self, slot: int, k: int):
        """Wait for a helper's verdict on sample k: (verdict, (size, mtime_ns, inode))."""
        i = slot * self.max_items + k
        while True:
            with self.lock:  # the lock orders the helper's stamp write before its verdict
                v = self.verdict[i]
                if v != PENDING:
                    return v, tuple(self.stamp[3 * i : 3 * i + 3])
            time.sleep(0.0002)  # a helper is mid-decode (~1 ms); a dead one stops the run

    def withdraw(self, slot: int):
        with self.lock:
            self.head[slot * _HEAD + _TASK] = -1

    # -- the helper's side
    def claim(self):
        """The busiest shard's last unclaimed sample: (slot, generation, task_no, k) or None."""
        best, best_left = None, _MIN_LEFT - 1
        with self.lock:
            for s in range(self.workers):
                h = s * _HEAD
                left = self.head[h + _BACK] - self.head[h + _FRONT]
                if self.head[h + _TASK] >= 0 and left > best_left:
                    best, best_left = s, left
            if best is None:
                return None
            h = best * _HEAD
            self.head[h + _BACK] -= 1
            return best, self.head[h + _GEN], self.head[h + _TASK], self.head[h + _BACK]

    def post(self, slot: int, gen: int, k: int, verdict: int, stamp):
        i = slot * self.max_items + k
        with self.lock:
            # A shard withdrawn meanwhile (an error, the test hook) may have been replaced by the
            # owner's next one in the same slot: a stale verdict must not land there.
            if self.head[slot * _HEAD + _GEN] != gen:
                return
            self.stamp[3 * i : 3 * i + 3] = list(stamp)
            self.verdict[i] = verdict

    def busy(self, num_tasks: int) -> bool:
        """Whether some shard is on the board or still to come (taken, not yet published)."""
        with self.lock:
            published = sum(self.head[s * _HEAD + _GEN] for s in range(self.workers))
            active = any(self.head[s * _HEAD + _TASK] >= 0 for s in range(self.workers))
        return active or published < num_tasks


def help_until_done(board: TailBoard, tasks, validate) -> None:
    """Run by a worker that found no task left: validate others' tails until no shard needs it.

    ``validate(path) -> (verdict, stamp)``."""
    while True:
        c = board.claim()
        if c is None:
            if not board.busy(len(tasks)):
                return
            time.sleep(0.001)  # shards in flight have only their last samples left, or are starting
            continue
        slot, gen, task_no, k = c
        path = tasks[task_no][4][k][3]
        verdict, stamp = validate(path)
        board.post(slot, gen, k, verdict, stamp)
