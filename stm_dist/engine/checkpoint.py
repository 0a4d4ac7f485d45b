"""Checkpoints: DeepSpeed state plus our per-rank client state, a completion marker, retention,
finding the newest complete one, and conversion to DeepSpeed's universal format.

Layout under <run>/checkpoints/:
    step000001234/                  DeepSpeed's files (model, optimizer partitions)
        stm_rank<r>.pt              our state for rank r: step, epoch, data iterators, RNG, EMA (rank 0)
        COMPLETE                    JSON written by rank 0 after every rank finished and every file
                                    was fsync'ed: step, world size, ZeRO stage, the recipe, the size
                                    and sha256 of every file
A checkpoint without COMPLETE, or whose files no longer have the recorded sizes (torn copy,
truncated file) or, when resuming, checksums (bit flips), is skipped with a message naming the
file, and the previous one is used.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from data_tools.tar_index import sha256_path

from .distributed import barrier

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _files(tag_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != MARKER and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)




def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_manifest(tag_dir: str) -> tuple[dict, dict]:
    """Flush every file (and the folders) to disk, then (sizes, sha256) per file."""
    sizes, hashes = {}, {}
    for rel in _files(tag_dir):
        full = os.path.join(tag_dir, rel)
        _fsync(full)
        sizes[rel] = os.path.getsize(full)
        hashes[rel] = sha256_path(full)
    for root, _, _ in os.walk(tag_dir):
        _fsync(root)
    return sizes, hashes


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
        sizes, hashes = _durable_manifest(tag_dir)
        marker = dict(meta, step=step, files=sizes, sha256=hashes)
        tmp = os.path.join(tag_dir, MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(tag_dir, MARKER))
        _fsync(tag_dir)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


def _check(tag_dir: str, verify: bool = False):
    """(marker dict, None) for a complete checkpoint, (None, reason) otherwise. `verify` also
    re-hashes every file against the marker (a bit flip keeps the size)."""
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
    if verify:
        for rel, digest in marker.get("sha256", {}).items():
            if sha256_path(os.path.join(tag_dir, rel)) != digest:
                return None, f"file {rel} does not match its checksum (changed on disk after it was written)"
    return marker, None


def _tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir)
                  if t.startswith("step") and t[4:].isdigit() and os.path.isdir(os.path.join(ckpt_dir, t)))


def latest_complete(ckpt_dir: str, warn=print, verify: bool = False, before: str | None = None):
    """The newest complete checkpoint (older than tag `before` when given) as (tag, marker), or
    None. Skipped ones are reported."""
    for tag in reversed(_tags(ckpt_dir)):
        if before is not None and tag >= before:
            continue
        marker, reason = _check(os.path.join(ckpt_dir, tag), verify=verify)
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
    universal = os.path.join(os.path.dirname(ckpt_dir), "checkpoints_universal")
    for t in tags:
        if t not in keep and oldest_kept is not None and t < oldest_kept:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
            # A conversion for another world size goes with the checkpoint it came from.
            shutil.rmtree(os.path.join(universal, t), ignore_errors=True)


def locate(path: str, warn=print) -> tuple[str, str, dict]:
    """Accept a run dir, its checkpoints/ dir or one checkpoint's folder; return
    (checkpoints dir, tag, COMPLETE marker) of the newest complete checkpoint there."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MARKER)) or os.path.basename(path).startswith("step"):
        marker, reason = _check(path, verify=True)
        if marker is None:
            raise FileNotFoundError(f"checkpoint {path} is not complete: {reason}")
        return os.path.dirname(path), os.path.basename(path), marker
    for cdir in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(cdir):
            found = latest_complete(cdir, warn=warn, verify=True)
            if found:
                return cdir, found[0], found[1]
    raise FileNotFoundError(f"no complete checkpoint under {path} (expected a run directory, its "
                            f"checkpoints/ folder or a step* checkpoint folder)")


def decide_resume(ckpt_dir: str, resume_from: str | None, rank: int, warn=print):
    """Collective: (checkpoints dir, (tag, marker) or None), chosen by rank 0 for every rank.
    The run's own newest complete checkpoint wins; else `resume_from` (a run dir or one
    checkpoint's folder) when given."""
    import torch.distributed as dist

    from .config import ConfigError

    choice = [None]
    if rank == 0:
        try:
            found = latest_complete(ckpt_dir, warn=warn, verify=True)
            if found is not None:
                choice = [(ckpt_dir, found)]
            elif resume_from:
                src, tag, marker = locate(resume_from, warn=warn)
                warn(f"starting from {os.path.join(src, tag)} (--resume)")
                choice = [(src, (tag, marker))]
            else:
                choice = [(ckpt_dir, None)]
        except (OSError, ValueError) as e:  # every rank must hear of it, or the others wait forever
            choice = [("error", f"'run.resume_from': {e}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0][0] == "error":
        raise ConfigError(choice[0][1])
    return choice[0]


def best_files(run_dir: str) -> list[str]:
    """The run's best-by-top-1 weights and their JSON (run_eval.BestCheckpoints: best.pth,
    best_ema.pth, each with a .json beside it)."""
    return sorted(f for f in os.listdir(run_dir) if f.startswith("best") and f.endswith((".pth", ".pth.json"))
                  and os.path.isfile(os.path.join(run_dir, f)))


def move_aside(run_dir: str) -> str | None:
    """Rename the run's checkpoint folders to *.moved-<time> and put its best*.pth/.json inside
    the first of them (never delete); return the new name of the first."""
    import time

    if not os.path.isdir(run_dir):  # --fresh on a new run: nothing to move
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while any(os.path.exists(os.path.join(run_dir, f"{d}.moved-{stamp}"))
              for d in ("checkpoints", "checkpoints_universal")):
        n += 1  # a second --fresh within the same second: never merge into (or overwrite) the first
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    moved = None
    for name in ("checkpoints", "checkpoints_universal"):
        src = os.path.join(run_dir, name)
        if os.path.isdir(src) and os.listdir(src):
            dst = f"{src}.moved-{stamp}"
            os.replace(src, dst)
            moved = moved or dst
    best = best_files(run_dir)
    if best:
        # A fresh run must not inherit the old run's best: its first evaluation would compare
        # against the old top-1, and a reader would take the old weights for the new run's.
        moved = moved or os.path.join(run_dir, f"checkpoints.moved-{stamp}")
        os.makedirs(moved, exist_ok=True)
        for f in best:
            os.replace(os.path.join(run_dir, f), os.path.join(moved, f))
    return moved


def readable(tag_dir: str, rank: int, world: int) -> str | None:
    """Unpickle this rank's share of the checkpoint's files (every world-th one; tensors stay
    memory-mapped, so this reads little): a corrupt file whose hash was never recorded is found
    here, before DeepSpeed's loader, which can fail on one rank inside its collectives.
    Returns a message naming the first unreadable file, or None."""
    for i, rel in enumerate(_files(tag_dir)):
        if i % world != rank or not rel.endswith(".pt"):
            continue
        path = os.path.join(tag_dir, rel)
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            try:  # not a zip-format file (older torch.save): only a full read can tell
                torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                return f"file {rel} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


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
