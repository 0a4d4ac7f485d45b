"""Pack a source data set into shuffled, validated, atomically written webdataset shards.

Layout of ``OUT`` for split ``S``::

    S-000000.tar  S-000000.idx  ...   the shards and their DALI index files
    S_annotations.json                detection only: COCO ground truth of exactly what was written
    S.json                            the manifest, written last (its presence = split complete)
    .S.progress/plan.json             while running: settings a resumed run must agree with
    .S.progress/000000.json           while running: one record per finished shard (the commit)

Samples are assigned to shards by a seeded permutation before any decoding, so a shard's content
depends only on (source, seed, samples per shard) - not on --workers, not on interruptions. A
skipped input leaves its shard one sample short instead of shifting every later shard.

Two sample kinds share this one path: classification (``<key>.cls`` + ``<key>.jpg``, from
imagenet_src) and detection (``<key>.jpg`` + ``<key>.json``, from the COCO layout, coco_src).
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time

import numpy as np

from data_tools import TOOL_VERSION
from data_tools.coco_src import CocoSource, is_coco_layout, read_coco
from data_tools.imagenet_src import Source, read_source
from data_tools.shard_worker import CreateError, remove, run_tasks, sample_key, write_atomic, write_json_atomic

__all__ = ["CreateError", "create_shards", "sample_key", "shard_name"]

MANIFEST_FORMAT = "stm-shards/1"
# Test hook: exit abruptly (like a kill) halfway through the shard after N finished ones.
FAIL_ENV = "STM_SHARDS_FAIL_AFTER_SHARDS"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}"


def _plan(src: Source | CocoSource, seed: int, samples_per_shard: int) -> dict:
    plan = {
        "tool_version": TOOL_VERSION,
        "split": src.split,
        "source_root": src.root,
        "layout": src.layout,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "num_records": len(src.records),
        "records_sha256": src.fingerprint(),
    }
    if isinstance(src, CocoSource):
        plan["empty_images"] = src.empty_images
    return plan


def _check_same_plan(path: str, want: dict, what: str):
    with open(path) as f:
        have = json.load(f)
    have = have.get("plan", have)
    for k, v in want.items():
        if have.get(k) != v:
            raise CreateError(
                f"{path}: {what} was made with {k}={have.get(k)!r}, this run has {k}={v!r}; "
                f"use the same settings or another --out"
            )


def create_shards(
    src_root: str,
    split: str,
    out: str,
    *,
    samples_per_shard: int = 1000,
    workers: int = 1,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    empty_images: str = "auto",
) -> dict:
    """Write (or finish writing) the shards of ``split``; return the manifest.

    ``empty_images`` (COCO layout only, see coco_src): "auto", "keep" or "drop"."""
    if samples_per_shard < 1:
        raise CreateError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise CreateError(f"--workers must be >= 1, got {workers}")
    if is_coco_layout(src_root, split):
        src = read_coco(src_root, split, empty_images=empty_images, strict=strict)
    else:
        src = read_source(src_root, split)
    os.makedirs(out, exist_ok=True)
    lock = _lock(out, split)
    try:
        return _create_locked(src, split, out, samples_per_shard, workers, seed, strict, progress)
    finally:
        os.close(lock)  # releases the flock (workers holding a copy are gone by now)


def _lock(out: str, split: str) -> int:
    """Refuse a second `create` of the same split into the same folder while one runs.

    flock, not a pid file: the kernel drops the lock when the holder dies, so a killed run
    leaves no stale lock. The pid written inside is only there to name the other run.
    """
    path = os.path.join(out, f".{split}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 64).decode(errors="replace").strip().split("\n")[0] or "?"
        os.close(fd)
        raise CreateError(f"{path}: another `stm-shards create` (pid {other}) is writing split {split!r} "
                          f"into {out}; wait for it to finish or use another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _create_locked(src: Source | CocoSource, split: str, out: str, samples_per_shard: int, workers: int, seed: int,
                   strict: bool, progress: bool) -> dict:
    plan = _plan(src, seed, samples_per_shard)
    manifest_path = os.path.join(out, f"{split}.json")
    if os.path.exists(manifest_path):
        _check_same_plan(manifest_path, plan, "the finished split")
        with open(manifest_path) as f:
            return json.load(f)

    prog = os.path.join(out, f".{split}.progress")
    os.makedirs(prog, exist_ok=True)
    plan_path = os.path.join(prog, "plan.json")
    plan_writer = None
    if os.path.exists(plan_path):
        _check_same_plan(plan_path, plan, "the interrupted run")
    else:
        # Its fsync (ms to tens of ms on a busy disk) overlaps the permutation below; it is
        # joined before any worker starts, so no shard record can exist without its plan.
        plan_writer = _Background(write_json_atomic, plan_path, plan)

    n = len(src.records)
    order = np.random.default_rng(seed).permutation(n)
    num_shards = (n + samples_per_shard - 1) // samples_per_shard
    done: dict[int, dict] = {}
    for i in range(num_shards):
        rec_path = os.path.join(prog, f"{i:06d}.json")
        if not os.path.exists(rec_path):
            continue
        with open(rec_path) as f:
            rec = json.load(f)
        tar = os.path.join(out, f"{shard_name(split, i)}.tar")
        # A record is only written after its tar and index are in place, so a mismatch means
        # someone touched the files since: redo that shard.
        if rec["samples"] == 0 or (os.path.exists(tar) and os.path.getsize(tar) == rec["bytes"]):
            done[i] = rec
    todo = [i for i in range(num_shards) if i not in done]

    fail_after = int(os.environ.get(FAIL_ENV, "-1"))
    run = todo if fail_after < 0 else todo[: fail_after + 1]
    tasks = []
    kind = ("det",) if isinstance(src, CocoSource) else ()
    for k, i in enumerate(run):
        items = []
        for pos in range(i * samples_per_shard, min(n, (i + 1) * samples_per_shard)):
            r = src.records[order[pos]]
            items.append((pos, r.rel, r.label, src.path_of(r)))
        # The test hook stands in for a kill after `fail_after` finished shards, halfway through
        # the next one; later shards are not started so what is left on disk is exact.
        tasks.append((i, shard_name(split, i), out, prog, items, strict, k == fail_after) + kind)

    if plan_writer is not None:
        plan_writer.result()
    bar = _progress_bar(n, n - sum(len(t[4]) for t in tasks), f"{split} shards", progress)
    # fork: workers need no re-import of the caller's __main__ (which breaks under spawn for
    # `python -c`/stdin callers); they only run PIL, so no threads of the parent matter.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    die = False
    results = run_tasks(ctx, tasks, min(workers, len(tasks))) if tasks else (r for r in ())
    try:
        # Unordered: a shard's bytes depend only on its own inputs, so finishing order is free.
        for res in results:
            if res[0] == "error":
                raise CreateError(res[1])
            if res[0] == "die":
                die = True
                continue
            rec = res[1]
            done[rec["index"]] = rec
            bar.update(rec["samples"] + len(rec["skipped"]))
    except BaseException:
        # Stop the workers first (closing the generator terminates them), then leave no partial
        # shard behind (--strict, disk full, Ctrl-C); committed shards stay. A hard kill can
        # leave one; the next run overwrites it.
        results.close()
        for i in todo:
            remove(os.path.join(out, f".{shard_name(split, i)}.tar.tmp"))
        raise
    finally:
        bar.close()
    if die:
        os._exit(75)

    recs = [done[i] for i in range(num_shards)]
    manifest = _assemble_manifest(src, plan, recs)
    if isinstance(src, CocoSource):
        manifest.update(_detection_fields(src, recs, out))
    write_json_atomic(manifest_path, manifest)
    shutil.rmtree(prog, ignore_errors=True)
    return manifest


class _Background:
    """fn(*args) in a thread; result() joins it and re-raises its exception here."""

    def __init__(self, fn, *args):
        self._error = None

        def run():
            try:
                fn(*args)
            except BaseException as e:  # handed to the caller's thread
                self._error = e

        self._t = threading.Thread(target=run)
        self._t.start()

    def result(self):
        self._t.join()
        if self._error is not None:
            raise self._error


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, initial: int, desc: str, show: bool):
    if not show:
        return _NoBar()  # tqdm's import alone costs ~0.1 s (importlib.metadata): skip it
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc, smoothing=0.1)


def _detection_fields(src: CocoSource, recs: list[dict], out: str) -> dict:
    """Write the ground truth of what the shards hold; return the manifest's detection fields."""
    failed = {s["path"] for r in recs for s in r["skipped"]}  # file names are unique (coco_src)
    written = [r.image_id for r in src.records if r.rel not in failed]
    gt = src.ground_truth(written)
    gt_name = f"{src.split}_annotations.json"
    # Compact: for train2017 this is ~0.5 GB of JSON; indenting would add a third.
    write_atomic(os.path.join(out, gt_name), json.dumps(gt, separators=(",", ":")).encode())
    actions: dict[str, int] = {}
    for f in src.fixed:
        actions[f["action"]] = actions.get(f["action"], 0) + 1
    return {
        "task": "detection",
        "categories": [{"id": c["id"], "name": c["name"]} for c in src.categories],
        "annotations": gt_name,
        "empty_images": src.empty_images,
        "fixed": src.fixed,
        "annotation_counts": {"written": len(gt["annotations"]), **dict(sorted(actions.items()))},
    }


def _assemble_manifest(src: Source | CocoSource, plan: dict, recs: list[dict]) -> dict:
    reencoded: dict[str, int] = {}
    class_counts = [0] * len(src.classes)
    skipped = list(getattr(src, "skipped", ()))  # images the source itself could not use (COCO)
    for r in recs:
        for k, v in r["reencoded"].items():
            reencoded[k] = reencoded.get(k, 0) + v
        for k, v in r["class_counts"].items():
            class_counts[int(k)] += v
        skipped.extend(r["skipped"])
    return {
        "format": MANIFEST_FORMAT,
        "task": "classification",
        "plan": plan,
        "split": src.split,
        "seed": plan["seed"],
        "tool_version": TOOL_VERSION,
        "source": {"root": src.root, "layout": src.layout, "num_records": len(src.records)},
        "num_samples": sum(r["samples"] for r in recs),
        "num_classes": len(src.classes),
        "classes": src.classes,
        "class_counts": class_counts,
        "counts": {
            "records": len(src.records),
            "samples": sum(r["samples"] for r in recs),
            "skipped": len(skipped),
            "reencoded": sum(reencoded.values()),
            "reencoded_by_kind": dict(sorted(reencoded.items())),
        },
        "skipped": skipped,
        "shards": [
            {"name": r["name"], "index_file": r["name"][:-4] + ".idx", "samples": r["samples"],
             "bytes": r["bytes"], "sha256": r["sha256"]}
            for r in recs
            if r["samples"]
        ],
        "created_unix": int(time.time()),
        "python": sys.version.split()[0],
    }
