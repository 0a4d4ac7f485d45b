"""`stm-bench data`: images/s of the DALI CPU pipelines against the torch/PIL reader.

Both read the same shards with the same number of CPU threads (DALI threads = DataLoader
workers), both run the full recipe (train: random-resized-crop, flip, RandAugment m9/mstd0.5,
normalise; val: resize, centre crop, normalise). Per-epoch start-up (DALI builds a pipeline per
epoch, tracing RandAugment takes ~10-40 s; PIL forks its workers) is reported apart, summed
over epochs, and not counted in the rate.
Without --shards, a set is written from the real photos bundled with scikit-image and
scikit-learn at their native sizes (300-1000 px, ImageNet-like), repeated to --count samples.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

PHOTOS = ["chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "astronaut"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--shards", help="shard dir with train/val splits (default: build one from bundled photos)")
    p.add_argument("--count", type=int, default=1536, help="samples per split when building the photo set")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="DALI threads = PIL DataLoader workers")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case (at least one epoch)")
    p.add_argument("--no-randaug", action="store_true")
    p.add_argument("--json", help="also write the results here")
    return p


def write_photo_source(root: str, count: int) -> None:
    """ImageNet layout: ``count`` JPEGs per split cycling through the bundled photos (q 90)."""
    import numpy as np
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays = [getattr(skimage.data, n)() for n in PHOTOS] + list(load_sample_images().images)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    for split in ("train", "val"):
        lines = []
        for i in range(count):
            k = i % len(arrays)
            rel = f"{k}/img_{i:06d}.JPEG"
            os.makedirs(os.path.join(root, split, str(k)), exist_ok=True)
            a = np.ascontiguousarray(arrays[k][..., :3])
            if i >= len(arrays):  # a different crop per copy, so decode work varies like real data
                a = a[(i * 7) % 17 :, (i * 11) % 23 :]
            Image.fromarray(a).save(os.path.join(root, split, rel), quality=90)
            lines.append(f"{rel} {k}")
        with open(os.path.join(root, "meta", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _cpu_seconds() -> float:
    # This process's threads (DALI) plus reaped children (DataLoader workers exit, and are
    # reaped, at the end of each epoch).
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _rate(make, seconds: float) -> dict:
    """Whole epochs until ``seconds`` of steady state have been timed. Each epoch's first batch
    (DALI builds a pipeline per epoch, PIL starts its workers) is reported as start-up, apart:
    with ImageNet-sized epochs it is noise, with this small set it would dominate."""
    loader = make()
    images, timed, cpu, startup, epochs = 0, 0.0, 0.0, 0.0, 0
    while timed < seconds or not images:
        t0 = time.perf_counter()
        start = cpu0 = None
        for x, _ in loader:
            if start is None:
                startup += time.perf_counter() - t0
                start, cpu0 = time.perf_counter(), _cpu_seconds()
                continue
            images += x.shape[0]
        timed += time.perf_counter() - start
        cpu += _cpu_seconds() - cpu0
        epochs += 1
    return {"img_per_s": images / timed, "cpu_ms_per_img": 1000 * cpu / images, "images": images,
            "seconds": timed, "startup_s": startup, "epochs": epochs}


def run(args) -> dict:
    from stm_dist.data import build_train_loader, build_val_loader

    tmp = None
    shards = args.shards
    if shards is None:
        from data_tools.writer import create_shards

        tmp = tempfile.TemporaryDirectory(prefix="stm-bench-data-")
        write_photo_source(os.path.join(tmp.name, "src"), args.count)
        shards = os.path.join(tmp.name, "shards")
        for split in ("train", "val"):
            create_shards(os.path.join(tmp.name, "src"), split, shards, samples_per_shard=128,
                          workers=args.threads, progress=False)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    common = dict(img_size=args.img_size, num_threads=args.threads)
    results = {}
    for backend in ("dali", "pil"):
        results[f"train/{backend}"] = _rate(lambda: build_train_loader(
            shards, args.batch, randaug=not args.no_randaug, backend=backend, **common), args.seconds)
        results[f"val/{backend}"] = _rate(lambda: build_val_loader(shards, args.batch, backend=backend, **common),
                                          args.seconds)
    print(f"data pipelines, {args.threads} CPU threads, batch {args.batch}, {args.img_size} px, shards {shards}")
    print(f"{'case':<12}{'img/s':>10}{'CPU ms/img':>12}{'images':>9}{'startup s':>11}")
    for k, r in results.items():
        print(f"{k:<12}{r['img_per_s']:>10.1f}{r['cpu_ms_per_img']:>12.2f}{r['images']:>9d}{r['startup_s']:>11.1f}")
    # On a shared machine wall-clock rates follow the neighbours' load; CPU time per image does not.
    for split in ("train", "val"):
        d, p = results[f"{split}/dali"], results[f"{split}/pil"]
        results[f"{split}/speedup"] = {"img_per_s": d["img_per_s"] / p["img_per_s"],
                                       "cpu_per_img": p["cpu_ms_per_img"] / d["cpu_ms_per_img"]}
        print(f"{split}: DALI vs PIL: {d['img_per_s'] / p['img_per_s']:.2f}x img/s, "
              f"{p['cpu_ms_per_img'] / d['cpu_ms_per_img']:.2f}x less CPU per image")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if tmp:
        tmp.cleanup()
    return results


def main(argv=None):
    run(add_arguments(argparse.ArgumentParser(prog="stm-bench data", description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    main()
