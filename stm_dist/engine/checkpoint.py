"""Checkpoints: DeepSpeed state plus our per-rank client state, a completion marker, retention,
finding the newest complete one, and conversion to DeepSpeed's universal format.

Layout under <run>/checkpoints/:
    step000001234/                  DeepSpeed's files (model, optimizer partitions)
        stm_rank<r>.pt              our state for rank r: step, epoch, data iterators, RNG, EMA (rank 0)
        COMPLETE                    JSON written by rank 0 after every rank finished: step, world
                                    size, ZeRO stage, config hash and the size of every file
A checkpoint without COMPLETE, or whose files no longer have the recorded sizes (torn copy,
truncated file), is skipped with a message and the previous one is used.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from .distributed import barrier

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _file_sizes(tag_dir: str) -> dict:
    sizes = {}
    for root, _, files in os.walk(tag_dir):
        for f in files:
            full = os.path.join(root, f)
            rel = os.path.relpath(full, tag_dir)
            if rel != MARKER:
                sizes[rel] = os.path.getsize(full)
    return sizes


def save(engine, ckpt_dir: str, step: int, client: dict, meta: dict, keep_last: int, rank: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # a torn leftover from a killed run at the same step
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"stm_step": step})
    _atomic_save(client, os.path.join(tag_dir, f"stm_rank{rank}.pt"))
    barrier()
    if rank == 0:
        marker = dict(meta, step=step, files=_file_sizes(tag_dir))
        tmp = os.path.join(tag_dir, MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
        os.replace(tmp, os.path.join(tag_dir, MARKER))
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


def _check(tag_dir: str):
    """(marker dict, None) for a complete checkpoint, (None, reason) otherwise."""
    path = os.path.join(tag_dir, MARKER)
    if not os.path.isfile(path):
        return None, "no COMPLETE marker (saving was interrupted)"
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return None, f"unreadable COMPLETE marker ({e})"
    for rel, size in marker.get("files", {}).items():
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full):
            return None, f"file {rel} is missing"
        if os.path.getsize(full) != size:
            return None, f"file {rel} has {os.path.getsize(full)} bytes, {size} were written"
    return marker, None


def _tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir)
                  if t.startswith("step") and t[4:].isdigit() and os.path.isdir(os.path.join(ckpt_dir, t)))


def latest_complete(ckpt_dir: str, warn=print):
    """The newest complete checkpoint as (tag, marker), or None. Skipped ones are reported."""
    for tag in reversed(_tags(ckpt_dir)):
        marker, reason = _check(os.path.join(ckpt_dir, tag))
        if marker is not None:
            return tag, marker
        warn(f"skipping checkpoint {os.path.join(ckpt_dir, tag)}: {reason}")
    return None


def prune(ckpt_dir: str, keep_last: int):
    """Keep the newest `keep_last` complete checkpoints; drop older ones (complete or torn)."""
    tags = _tags(ckpt_dir)
    complete = [t for t in tags if _check(os.path.join(ckpt_dir, t))[0] is not None]
    keep = set(complete[-keep_last:])
    oldest_kept = min(keep) if keep else None
    for t in tags:
        if t not in keep and oldest_kept is not None and t < oldest_kept:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def load_client(tag_dir: str, rank: int) -> dict:
    path = os.path.join(tag_dir, f"stm_rank{rank}.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint client state {path}: {e}") from e


def load_all_clients(tag_dir: str, world_size: int) -> list[dict]:
    return [load_client(tag_dir, r) for r in range(world_size)]


def to_universal(ckpt_dir: str, tag: str, universal_dir: str, zero_stage: int, log=print) -> str:
    """Convert one checkpoint for loading at another world size (DeepSpeed's ds_to_universal).
    Runs once; a finished conversion carries its own marker. Returns the output folder."""
    out = os.path.join(universal_dir, tag)
    done = os.path.join(out, MARKER)
    if os.path.isfile(done):
        return out
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(universal_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", os.path.join(ckpt_dir, tag), "--output_folder", out,
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage in (1, 2):
        cmd.append("--inject_missing_state")
    log(f"converting {os.path.join(ckpt_dir, tag)} to a universal checkpoint in {out}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed for {os.path.join(ckpt_dir, tag)} "
                           f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(done, "w") as f:
        json.dump({"source": os.path.join(ckpt_dir, tag)}, f)
    return out
