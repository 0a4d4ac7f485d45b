"""stm-shards: create, verify, demo-source and demo-coco commands."""
from __future__ import annotations

import argparse
import os
import sys


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _create(a) -> int:
    from data_tools.imagenet_src import SourceError
    from data_tools.writer import CreateError, create_shards

    try:
        man = create_shards(a.src, a.split, a.out, samples_per_shard=a.samples_per_shard, workers=a.workers,
                            seed=a.seed, strict=a.strict, progress=not a.no_progress,
                            empty_images=a.empty_images)
    except (CreateError, SourceError) as e:
        print(f"stm-shards create: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder itself: not creatable, not writable, disk full
        print(f"stm-shards create: error: {e.filename or a.out}: {e.strerror or e}; choose a writable --out",
              file=sys.stderr)
        return 2
    c = man["counts"]
    print(f"{a.split}: {c['samples']} samples in {len(man['shards'])} shards, {man['num_classes']} classes, "
          f"{c['skipped']} skipped, {c['reencoded']} re-encoded -> {os.path.join(a.out, a.split + '.json')}")
    _list("skipped", [(s["path"], s["reason"]) for s in man["skipped"]])
    if man.get("task") == "detection":
        n = man["annotation_counts"]
        print(f"{a.split}: {n['written']} annotations, {n.get('clipped', 0)} clipped, {n.get('dropped', 0)} "
              f"dropped; images without annotations: {man['empty_images']} -> "
              f"{os.path.join(a.out, man['annotations'])}")
        _list("", [(f"{f['path'] or '?'} annotation {f['annotation_id']}", f"{f['action']}: {f['reason']}")
                   for f in man["fixed"]])
    return 0


def _list(what: str, rows: list, most: int = 20):
    for name, why in rows[:most]:
        print(f"  {what + ' ' if what else ''}{name}: {why}")
    if len(rows) > most:
        print(f"  ... {len(rows) - most} more in the manifest")


def _verify(a) -> int:
    from data_tools.verify import verify_dir

    bad = verify_dir(a.dir, full=a.full, log=(lambda *_: None) if a.quiet else print)
    for name, problem in bad:
        print(f"BAD {name}: {problem}", file=sys.stderr)
    print("verify: " + ("OK" if not bad else f"{len(bad)} problem(s) in {len({n for n, _ in bad})} file(s)"))
    return 1 if bad else 0


def _demo(a) -> int:
    from data_tools.demo_data import write_demo_source

    counts = write_demo_source(a.out, size=a.size)
    print(f"wrote the digits demo source to {a.out}: {counts}")
    return 0


def _demo_coco(a) -> int:
    from data_tools.demo_coco import write_demo_coco

    counts = write_demo_coco(a.out, train_images=a.train_images, val_images=a.val_images, seed=a.seed,
                             min_digits=a.min_digits, max_digits=a.max_digits, digit_sizes=(a.min_size, a.max_size),
                             canvas_sizes=(a.min_canvas, a.max_canvas), max_hidden=a.max_hidden)
    print(f"wrote the digits-on-photos COCO demo to {a.out}: " + ", ".join(
        f"{s}: {n['images']} images, {n['annotations']} digits ({n['dropped_hidden']} hidden ones dropped)"
        for s, n in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stm-shards", description="Webdataset shards for DALI, validated at write time")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="shard a source split (resumes an interrupted run)")
    c.add_argument("--src", required=True, help="ROOT with meta/{split}.txt or {split}/{class}/ folders "
                   "(classification), or annotations/instances_{split}.json and {split}/ (COCO detection)")
    c.add_argument("--split", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--samples-per-shard", type=int, default=1000)
    # All usable cores: the parent only collects per-shard records now, so it needs no core of its own.
    c.add_argument("--workers", type=int, default=_cores())
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--strict", action="store_true", help="fail on the first unusable input instead of skipping it")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--empty-images", choices=("auto", "keep", "drop"), default="auto",
                   help="COCO only: images without annotations; auto drops them from splits named train* "
                        "(as mmdet's filter_empty_gt) and keeps them elsewhere (evaluation counts them)")
    c.set_defaults(func=_create)
    v = sub.add_parser("verify", help="check shards against their manifest; non-zero exit names bad shards")
    v.add_argument("dir")
    v.add_argument("--full", action="store_true", help="decode every sample, not a subset")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_verify)
    d = sub.add_parser("demo-source", help="write the scikit-learn digits as a small ImageNet-layout data set")
    d.add_argument("--out", required=True)
    d.add_argument("--size", type=int, default=32, help="side length the 8x8 digits are upscaled to")
    d.set_defaults(func=_demo)
    g = sub.add_parser("demo-coco", help="write a small instance-segmentation set in the COCO layout: scikit-learn "
                       "digits pasted onto scikit-image photos, with exact boxes and masks")
    g.add_argument("--out", required=True, help="ROOT; gets annotations/instances_{train,val}.json, train/, val/")
    from data_tools.demo_coco import DEFAULTS as D

    g.add_argument("--train-images", type=int, default=D["train_images"])
    g.add_argument("--val-images", type=int, default=D["val_images"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-digits", type=int, default=D["min_digits"], help="digits pasted per image, at least")
    g.add_argument("--max-digits", type=int, default=D["max_digits"])
    g.add_argument("--min-size", type=int, default=D["min_size"], help="digit side in pixels, at least")
    g.add_argument("--max-size", type=int, default=D["max_size"])
    g.add_argument("--min-canvas", type=int, default=D["min_canvas"], help="image side in pixels, at least")
    g.add_argument("--max-canvas", type=int, default=D["max_canvas"])
    g.add_argument("--max-hidden", type=float, default=D["max_hidden"],
                   help="a digit may cover at most this fraction of an earlier one (1: any; fully hidden "
                        "ones are dropped)")
    g.set_defaults(func=_demo_coco)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
