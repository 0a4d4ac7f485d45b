"""Helpers of the resume tests: a digits subset whose epoch is a few steps (so epoch-end
checkpoints and evaluations come early), a launch that SIGKILLs when a condition holds, and
damage done to a checkpoint file."""
import os
import signal
import subprocess
import time

from engine_launch import DIGITS, env, records, train_cmd, REPO

TRAIN_SAMPLES = 96  # 6 steps of global batch 16 per epoch


def write_short_epoch_shards(root: str) -> str:
    """The real digits, train split cut to its first TRAIN_SAMPLES (every class is in them:
    the list is ordered by the data set's index, which cycles through the digits); val whole."""
    from data_tools.demo_data import write_demo_source
    from data_tools.writer import create_shards

    src = os.path.join(root, "source")
    write_demo_source(src, size=32)
    listing = os.path.join(src, "meta", "train.txt")
    with open(listing) as f:
        lines = f.read().splitlines()[:TRAIN_SAMPLES]
    assert len({ln.split()[1] for ln in lines}) == 10
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = os.path.join(root, "shards")
    for split in ("train", "val"):
        create_shards(src, split, out, samples_per_shard=400, progress=False)
    return out


def complete(run_dir: str, step: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"step{step:09d}", "COMPLETE"))


def run_and_kill_when(procs, run_dir, shards, condition, extra=(), timeout=600, recipe=DIGITS):
    """Start training; SIGKILL the whole launcher process group as soon as `condition(run_dir)`
    holds (polled every 20 ms). Returns the run's metrics records at the moment of the kill."""
    log = open(run_dir.rstrip("/") + ".killed.log", "a")
    p = subprocess.Popen(train_cmd(procs, run_dir, shards, extra, recipe), env=env(), cwd=REPO, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if condition(run_dir):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return records(run_dir)
            if p.poll() is not None:
                raise AssertionError(f"training ended (exit {p.returncode}) before the kill point; "
                                     f"see {log.name}")
            time.sleep(0.02)
        raise AssertionError("timed out waiting for the kill point")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()


def damage(path: str, how: str):
    """Damage a checkpoint file the way storage does: `truncate` it to half (a torn write), or
    `flip` one bit in its middle (same size: only the recorded checksum can tell)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
            return
        assert how == "flip", how
        f.seek(size // 2)
        byte = f.read(1)[0]
        f.seek(size // 2)
        f.write(bytes([byte ^ 0x10]))
