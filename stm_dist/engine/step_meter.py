"""Per-step training numbers kept on the device and read once per log interval.

Reading a loss with `.item()` after every micro-step stalls the host until the GPU has caught
up, so the GPU idles while Python prepares the next step. Here each micro-step's loss and a
non-finite flag are added into small device tensors; every `log_every` steps one collective
(which also carries the preemption vote, so ranks agree on stopping after the same step)
brings them to the host, and the per-step records are written then.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StepMeter:
    def __init__(self, capacity: int, device, world: int):
        self.capacity = max(1, capacity)
        self.device = torch.device(device)
        self.world = world
        self._loss = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
        self._bad = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
        self._micro = 0
        self.pending: list[dict] = []
        self._t0 = time.perf_counter()
        self.last_data_share = 0.0

    def add_micro(self, loss: torch.Tensor):
        i = len(self.pending)
        self._loss[i] += loss.double()
        self._bad[i] += (~torch.isfinite(loss)).double()
        self._micro += 1

    def end_step(self, info: dict):
        """`info`: the host-side facts of the step just finished (step, epoch, lr, ...)."""
        self.pending.append(dict(info, micro_steps=self._micro))
        self._micro = 0

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.capacity

    def flush(self, stop_vote: bool) -> tuple[list[dict], bool, int | None]:
        """Collective. Returns (records with the rank-mean loss, any rank voted stop, first
        step with a non-finite loss on any rank or None)."""
        n = len(self.pending)
        packed = torch.cat([self._loss[:n], self._bad[:n],
                            torch.tensor([1.0 if stop_vote else 0.0], dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(packed)
        host = packed.cpu().tolist()
        dt = time.perf_counter() - self._t0
        records, first_bad = [], None
        now = time.time()
        for i, info in enumerate(self.pending):
            micro_total = info.pop("micro_steps") * self.world
            rec = dict(info, loss=host[i] / micro_total)
            rec.setdefault("time", now)  # the trainer stamps each step's end; this is the fallback
            if host[n + i] and first_bad is None:
                first_bad = rec["step"]
            records.append(rec)
        if records:
            per_step = dt / n
            data = sum(rec.get("data_s", 0.0) for rec in records)
            for rec in records:
                rec["img_s"] = rec.pop("batch") / per_step
            # Share of the interval's wall time spent waiting for input (host side).
            self.last_data_share = data / dt if dt > 0 else 0.0
        self.pending = []
        self._loss.zero_()
        self._bad.zero_()
        self._t0 = time.perf_counter()
        return records, host[2 * n] > 0, first_bad
