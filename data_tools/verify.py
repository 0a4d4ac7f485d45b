"""Re-check written shards against their manifest: hashes, index vs tar, counts, decodability."""
from __future__ import annotations

import glob
import json
import os
import tarfile

from data_tools.image_check import BadImage, check_image
from data_tools.tar_index import parse_index, scan_tar, sha256_file


def _find_manifests(shard_dir: str) -> list[str]:
    found = sorted(p for p in glob.glob(os.path.join(shard_dir, "*.json")))
    out = []
    for p in found:
        try:
            with open(p) as f:
                if str(json.load(f).get("format", "")).startswith("stm-shards/"):
                    out.append(p)
        except (OSError, ValueError, AttributeError):
            continue
    return out


def _check_samples(path: str, samples, num_classes: int, full: bool, sample_every: int) -> list[str]:
    problems = []
    with open(path, "rb") as f:
        picks = range(len(samples)) if full else sorted({0, len(samples) - 1, *range(0, len(samples), sample_every)})
        for s in picks:
            members = {ext: (off, size, name) for ext, off, size, name in samples[s]}
            if set(members) != {"jpg", "cls"}:
                problems.append(f"sample {s}: members {sorted(members)} (want cls, jpg)")
                continue
            off, size, name = members["cls"]
            f.seek(off)
            text = f.read(size).decode("ascii", "replace").strip()
            if not text.isdigit() or int(text) >= num_classes:
                problems.append(f"{name}: label {text!r} not in [0, {num_classes})")
            off, size, name = members["jpg"]
            f.seek(off)
            try:
                _, conversion, _ = check_image(f.read(size))
            except BadImage as e:
                problems.append(f"{name}: {e}")
                continue
            if conversion:
                problems.append(f"{name}: not a JPEG DALI reads as stored ({conversion})")
    return problems


def verify_split(shard_dir: str, manifest_path: str, *, full: bool = False, log=print) -> list[tuple[str, str]]:
    """Return [(shard name, problem)]; empty means the split is sound."""
    with open(manifest_path) as f:
        man = json.load(f)
    split = man["split"]
    bad: list[tuple[str, str]] = []
    listed = {s["name"] for s in man["shards"]}
    for extra in sorted(glob.glob(os.path.join(shard_dir, f"{split}-*.tar"))):
        if os.path.basename(extra) not in listed:
            bad.append((os.path.basename(extra), "tar file not listed in the manifest"))
    total = 0
    for sh in man["shards"]:
        name = sh["name"]
        path = os.path.join(shard_dir, name)
        if not os.path.exists(path):
            bad.append((name, "missing"))
            continue
        problems = []
        size = os.path.getsize(path)
        if size != sh["bytes"]:
            problems.append(f"size {size} bytes, manifest says {sh['bytes']}")
        with open(path, "rb") as f:
            digest = sha256_file(f)
        if digest != sh["sha256"]:
            problems.append("sha256 differs from the manifest")
        try:
            samples = scan_tar(path)
        except (tarfile.TarError, OSError, EOFError) as e:
            bad.extend((name, p) for p in problems + [f"unreadable tar: {e}"])
            continue
        # tarfile stops quietly at a cut-off member; compare what it saw with the manifest.
        if len(samples) != sh["samples"]:
            problems.append(f"tar holds {len(samples)} samples, manifest says {sh['samples']}")
        ends = [off + size for s in samples for _, off, size, _ in s]
        if ends and max(ends) > os.path.getsize(path):
            problems.append("last member runs past the end of the file (truncated tar)")
        idx_path = os.path.join(shard_dir, sh["index_file"])
        try:
            with open(idx_path) as f:
                index = parse_index(f.read())
            if index != samples:
                first = next((k for k, (a, b) in enumerate(zip(index, samples)) if a != b), min(len(index), len(samples)))
                problems.append(f"index {sh['index_file']} does not match the tar (first difference at sample {first})")
        except (OSError, ValueError) as e:
            problems.append(f"index {sh['index_file']}: {e}")
        if not problems:
            problems = _check_samples(path, samples, man["num_classes"], full, max(1, len(samples) // 8))
        total += len(samples)
        bad.extend((name, p) for p in problems)
        log(f"{'ok ' if not problems else 'BAD'} {name}: {len(samples)} samples")
    if total != man["num_samples"] and not bad:
        bad.append((f"{split}.json", f"shards hold {total} samples, manifest says {man['num_samples']}"))
    return bad


def verify_dir(shard_dir: str, *, full: bool = False, log=print) -> list[tuple[str, str]]:
    manifests = _find_manifests(shard_dir)
    if not manifests:
        return [(shard_dir, "no stm-shards manifest (<split>.json) found")]
    bad = []
    for m in manifests:
        bad.extend(verify_split(shard_dir, m, full=full, log=log))
    return bad
