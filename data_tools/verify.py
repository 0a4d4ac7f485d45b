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
        if p.endswith("_annotations.json") and os.path.exists(p[: -len("_annotations.json")] + ".json"):
            continue  # a detection split's ground truth (train2017's is ~0.5 GB: not parsed to be skipped)
        try:
            with open(p) as f:
                if str(json.load(f).get("format", "")).startswith("stm-shards/"):
                    out.append(p)
        except (OSError, ValueError, AttributeError):
            continue
    return out


def _check_label(text: str, name: str, num_classes: int) -> list[str]:
    text = text.strip()
    if not text.isdigit() or int(text) >= num_classes:
        return [f"{name}: label {text!r} not in [0, {num_classes})"]
    return []


def _check_annotations(text: str, name: str, category_ids: set):
    """(problems, (width, height) or None) of a detection sample's JSON (data_tools/coco_src.py)."""
    try:
        d = json.loads(text)
        w, h, anns = d["width"], d["height"], d["annotations"]
        _ = d["image_id"], d["file_name"]
    except (ValueError, TypeError, KeyError) as e:
        return [f"{name}: not a detection sample's JSON ({type(e).__name__}: {e})"], None
    problems = []
    for k, a in enumerate(anns):
        try:
            x, y, bw, bh = a["bbox"]
            _ = a["id"], a["iscrowd"], a["segmentation"], a["area"]
            if a["category_id"] not in category_ids:
                problems.append(f"{name}: annotation {a['id']}: category_id {a['category_id']} not in the manifest")
            # Writing clipped every box to the image: anything else is a damaged or foreign sample.
            if not (bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6):
                problems.append(f"{name}: annotation {a['id']}: box {a['bbox']} not inside the {w}x{h} image")
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{name}: annotations[{k}] malformed ({type(e).__name__}: {e})")
    return problems, (w, h)


def _check_samples(path: str, samples, man: dict, full: bool, sample_every: int) -> list[str]:
    problems = []
    det = man.get("task") == "detection"
    want = {"jpg", "json"} if det else {"jpg", "cls"}
    category_ids = {c["id"] for c in man.get("categories", ())}
    with open(path, "rb") as f:
        picks = range(len(samples)) if full else sorted({0, len(samples) - 1, *range(0, len(samples), sample_every)})
        for s in picks:
            members = {ext: (off, size, name) for ext, off, size, name in samples[s]}
            if set(members) != want:
                problems.append(f"sample {s}: members {sorted(members)} (want {', '.join(sorted(want))})")
                continue
            off, size, name = members["json" if det else "cls"]
            f.seek(off)
            text = f.read(size).decode("utf-8", "replace")
            if det:
                found, annotated_size = _check_annotations(text, name, category_ids)
            else:
                found, annotated_size = _check_label(text, name, man["num_classes"]), None
            problems += found
            off, size, name = members["jpg"]
            f.seek(off)
            try:
                _, conversion, image_size = check_image(f.read(size))
            except BadImage as e:
                problems.append(f"{name}: {e}")
                continue
            if conversion:
                problems.append(f"{name}: not a JPEG DALI reads as stored ({conversion})")
            if annotated_size and tuple(annotated_size) != image_size:
                problems.append(f"{name}: image is {image_size[0]}x{image_size[1]}, its annotations say "
                                f"{annotated_size[0]}x{annotated_size[1]}")
    return problems


def _check_ground_truth(shard_dir: str, man: dict) -> list[tuple[str, str]]:
    """The COCO file written beside detection shards must hold one image per written sample."""
    name = man["annotations"]
    try:
        with open(os.path.join(shard_dir, name)) as f:
            gt = json.load(f)
        images, anns = gt["images"], gt["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [(name, f"unreadable ground truth: {e}")]
    bad = []
    if len(images) != man["num_samples"]:
        bad.append((name, f"{len(images)} images, the manifest has {man['num_samples']} samples"))
    if len(anns) != man["annotation_counts"]["written"]:
        bad.append((name, f"{len(anns)} annotations, the manifest says {man['annotation_counts']['written']}"))
    return bad


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
            problems = _check_samples(path, samples, man, full, max(1, len(samples) // 8))
        total += len(samples)
        bad.extend((name, p) for p in problems)
        log(f"{'ok ' if not problems else 'BAD'} {name}: {len(samples)} samples")
    if man.get("task") == "detection":
        bad.extend(_check_ground_truth(shard_dir, man))
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
