"""`stm-bench shards`: `stm-shards create` throughput against plain `tar` of the same files.

`tar` only copies bytes; create also decodes every image (to keep bad files out of the shards),
shuffles across shards, hashes and indexes. The gap is the price of that validation.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--src", help="ImageNet-layout source (default: bundled photos, see stm-bench data)")
    p.add_argument("--split", default="train")
    p.add_argument("--count", type=int, default=1000, help="images when building the photo source")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--samples-per-shard", type=int, default=256)
    return p


def _size(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def run(args) -> dict:
    from data_tools.writer import create_shards
    from stm_dist.bench.data import write_photo_source

    with tempfile.TemporaryDirectory(prefix="stm-bench-shards-") as tmp:
        src = args.src
        if src is None:
            src = os.path.join(tmp, "src")
            write_photo_source(src, args.count)
        split_dir = os.path.join(src, args.split)
        mb = _size(split_dir) / 2**20
        t = time.perf_counter()
        subprocess.run(["tar", "cf", os.path.join(tmp, "plain.tar"), "-C", src, args.split], check=True)
        t_tar = time.perf_counter() - t
        out = os.path.join(tmp, "shards")
        t = time.perf_counter()
        man = create_shards(src, args.split, out, samples_per_shard=args.samples_per_shard, workers=args.workers,
                            progress=False)
        t_create = time.perf_counter() - t
        n = man["counts"]["records"]
        shutil.rmtree(out)
    res = {"images": n, "MB": mb, "tar_s": t_tar, "create_s": t_create, "workers": args.workers,
           "tar_img_per_s": n / t_tar, "create_img_per_s": n / t_create}
    print(f"{n} images, {mb:.1f} MB, split {args.split!r}, create --workers {args.workers}")
    print(f"tar cf          {t_tar:7.2f} s  {n / t_tar:9.1f} img/s  {mb / t_tar:7.1f} MB/s")
    print(f"stm-shards      {t_create:7.2f} s  {n / t_create:9.1f} img/s  {mb / t_create:7.1f} MB/s")
    print(f"create / tar time = {t_create / t_tar:.1f}x")
    return res


def main(argv=None):
    run(add_arguments(argparse.ArgumentParser(prog="stm-bench shards", description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    main()
