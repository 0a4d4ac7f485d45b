"""`stm-bench data`: images/s of the DALI CPU pipelines against the torch/PIL reader.

Both read the same shards with the same number of CPU threads (DALI threads = DataLoader
workers), both run the full recipe (train: random-resized-crop, flip, RandAugment m9/mstd0.5,
normalise; val: resize, centre crop, normalise). The one-off build (DALI traces its graph, ~10 s
with RandAugment; PIL forks its workers) and each later epoch's start-up (the extra wait of its
first batch; ~0 with one pipeline for the run) are reported apart and not counted in the rate.
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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: DALI decodes on the GPU (nvJPEG), PIL batches are copied to it")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of every case; medians are reported")
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
    """CPU time of this process tree: its threads (DALI), its live children (DataLoader workers,
    persistent for the run) and the children already reaped."""
    import psutil

    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:  # exited (and reaped: counted above) meanwhile
            pass
    return total


def _epoch_startup(loader, pause: float, sync) -> float:
    """Extra wait for an epoch's first batch when the consumer was busy for ``pause`` seconds
    before it (as a training step is), over the wait after the same pause in mid-epoch. With the
    batches prefetched during the pause both are ~0; an epoch that rebuilds or restarts its
    pipeline pays that on top. Load-insensitive where the raw wait between batches is not."""
    time.sleep(pause)
    it = iter(loader)  # the loader stands at an epoch's end: this is the next epoch
    t = time.perf_counter()
    x, _ = next(it)
    sync(x)
    at_start = time.perf_counter() - t
    next(it)
    time.sleep(pause)
    t = time.perf_counter()
    x, _ = next(it)
    sync(x)
    mid = time.perf_counter() - t
    for _ in it:  # to the epoch's end again
        pass
    return at_start - mid


def _rate(make, seconds: float, sync) -> dict:
    """Whole epochs until ``seconds`` of steady state (and at least 2 epochs) have been timed.

    ``build_s``: from building the loader to its first batch (DALI traces and builds its graph,
    PIL forks its workers), once per run, not counted in the rate. ``epoch_startup_s``: what
    each later epoch costs on top of its images (`_epoch_startup`, mean of two probes)."""
    t0 = time.perf_counter()
    loader = make()
    build = None
    images, timed, cpu, epochs = 0, 0.0, 0.0, 0
    steady = []
    while timed < seconds or epochs < 2:
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        last = start
        for x, _ in loader:
            sync(x)
            now = time.perf_counter()
            if build is None:
                build = now - t0
                start, cpu0, last = now, _cpu_seconds(), now
                continue
            steady.append(now - last)
            last = now
            images += x.shape[0]
        timed += last - start
        cpu += _cpu_seconds() - cpu0
        epochs += 1
    steady.sort()
    median = steady[len(steady) // 2]
    startup = sum(_epoch_startup(loader, 3 * median, sync) for _ in range(2)) / 2
    if hasattr(loader, "close"):
        loader.close()  # the PIL workers stop now, not when the garbage collector gets to them
    return {"img_per_s": images / timed, "cpu_ms_per_img": 1000 * cpu / images, "images": images,
            "seconds": timed, "build_s": build, "epoch_startup_s": startup, "batch_s": median, "epochs": epochs}


def _median_run(rs: list[dict]) -> dict:
    out = {}
    for k in rs[0]:
        vals = sorted(r[k] for r in rs)
        out[k] = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    out["repeats"] = len(rs)
    return out


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
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("stm-bench data: --device cuda but no CUDA device is visible")

        def sync(x):  # the GPU's work for the batch is part of its time
            torch.cuda.synchronize()
    else:
        def sync(x):
            pass
    common = dict(img_size=args.img_size, num_threads=args.threads, device=device)
    load0 = os.getloadavg()[0]
    runs = {}
    # Interleaved repeats (dali, pil, dali, pil, ...), medians reported: on a shared machine the
    # neighbours' load drifts, and a fixed order would hand one backend the quieter minutes.
    for _ in range(args.repeats):
        for split in ("train", "val"):
            for backend in ("dali", "pil"):
                if split == "train":
                    def make():
                        return build_train_loader(shards, args.batch, randaug=not args.no_randaug, backend=backend,
                                                  **common)
                else:
                    def make():
                        return build_val_loader(shards, args.batch, backend=backend, **common)
                runs.setdefault(f"{split}/{backend}", []).append(_rate(make, args.seconds, sync))
    results = {k: _median_run(v) for k, v in runs.items()}
    load1 = os.getloadavg()[0]
    print(f"data pipelines on {device}, {args.threads} CPU threads, batch {args.batch}, {args.img_size} px, "
          f"shards {shards}; 1-min load average {load0:.1f} before, {load1:.1f} after ({os.cpu_count()} cores)")
    print(f"{'case':<12}{'img/s':>10}{'CPU ms/img':>12}{'images':>9}{'build s':>9}{'epoch start s':>15}")
    for k, r in results.items():
        print(f"{k:<12}{r['img_per_s']:>10.1f}{r['cpu_ms_per_img']:>12.2f}{int(r['images']):>9d}{r['build_s']:>9.2f}"
              f"{r['epoch_startup_s']:>15.3f}")
    # On a shared machine wall-clock rates follow the neighbours' load; CPU time per image does not.
    for split in ("train", "val"):
        d, p = results[f"{split}/dali"], results[f"{split}/pil"]
        results[f"{split}/speedup"] = {"img_per_s": d["img_per_s"] / p["img_per_s"],
                                       "cpu_per_img": p["cpu_ms_per_img"] / d["cpu_ms_per_img"]}
        print(f"{split}: DALI vs PIL: {d['img_per_s'] / p['img_per_s']:.2f}x img/s, "
              f"{p['cpu_ms_per_img'] / d['cpu_ms_per_img']:.2f}x less CPU per image")
    results["load_average"] = [load0, load1]
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
