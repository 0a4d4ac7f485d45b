"""Find a split's shards and read its manifest (written by ``stm-shards create``)."""
from __future__ import annotations

import json
import os


class ShardError(ValueError):
    """The shard directory is missing, incomplete or inconsistent; the message names the file."""


def read_manifest(shard_dir: str, split: str) -> dict:
    """The manifest ``{shard_dir}/{split}.json``: num_samples, num_classes, classes, counts, shards..."""
    path = os.path.join(shard_dir, f"{split}.json")
    if not os.path.exists(path):
        partial = os.path.isdir(os.path.join(shard_dir, f".{split}.progress"))
        hint = " (an interrupted `stm-shards create` left it unfinished: re-run it)" if partial else ""
        raise ShardError(f"{path}: no manifest for split {split!r}{hint}")
    try:
        with open(path) as f:
            man = json.load(f)
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not str(man.get("format", "")).startswith("stm-shards/"):
        raise ShardError(f"{path}: not an stm-shards manifest (format={man.get('format')!r})")
    for key in ("num_samples", "num_classes", "shards"):
        if key not in man:
            raise ShardError(f"{path}: manifest lacks {key!r}")
    return man


def shard_files(shard_dir: str, split: str, man: dict | None = None) -> tuple[list[str], list[str], list[int]]:
    """(tar paths, index paths, samples per shard) in manifest order; every file must exist."""
    man = man or read_manifest(shard_dir, split)
    tars, idxs, counts = [], [], []
    for sh in man["shards"]:
        tar = os.path.join(shard_dir, sh["name"])
        idx = os.path.join(shard_dir, sh["index_file"])
        for p in (tar, idx):
            if not os.path.exists(p):
                raise ShardError(f"{p}: listed in {split}.json but missing")
        tars.append(tar)
        idxs.append(idx)
        counts.append(int(sh["samples"]))
    if not tars:
        raise ShardError(f"{os.path.join(shard_dir, split + '.json')}: split has no shards")
    return tars, idxs, counts
