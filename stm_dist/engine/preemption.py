"""Stop-and-requeue on a scheduler's warning signal.

slurm/train.sbatch asks slurm for USR1 two minutes before the time limit (and slurm sends TERM
when it preempts or cancels a job); the batch script forwards it to every rank as USR1. A rank
only records the signal here; the trainer asks `agreed()` after each optimizer step, and since
ranks receive the signal at slightly different moments, the answer is reduced over all ranks so
that every rank stops after the same step, saves the same checkpoint and exits with
EXIT_PREEMPTED. The batch script requeues on that status and nothing else, so a run that
finishes is never requeued.
"""
from __future__ import annotations

import signal

from .distributed import all_reduce_sum

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_PREEMPTED = 75

_received: list[str] = []


def _on_signal(signum, frame):
    _received.append(signal.Signals(signum).name)


def install():
    """Record USR1 and TERM instead of dying on them (call once, from the main thread)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def received() -> str | None:
    """Name of the first signal this rank received, or None."""
    return _received[0] if _received else None


def agreed() -> bool:
    """Collective: True on every rank when any rank has received a stop signal."""
    return all_reduce_sum([1.0 if _received else 0.0])[0] > 0
