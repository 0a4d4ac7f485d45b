"""`stm-bench shards`: `stm-shards create` throughput against plain `tar` of the same files.

`tar` only copies bytes; create also decodes every image (to keep bad files out of the shards),
shuffles across shards, hashes and indexes. The gap is the price of that validation: the
validating decode (entropy decoding at 1/8 scale) is most of create's CPU time per image.

``--baseline DIR`` times another version of the tool beside this one, interleaved, so both see the
same load on a shared box: DIR holds its ``data_tools`` package, e.g.
``mkdir /tmp/old && git archive REV data_tools | tar -x -C /tmp/old``. Each run is a fresh process
timing only its create call (wall, and CPU of it and its workers). On a loaded box compare the
CPU per image: wall time there also depends on how many processes each version keeps busy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--src", help="ImageNet-layout source (default: bundled photos, see stm-bench data)")
    p.add_argument("--split", default="train")
    p.add_argument("--count", type=int, default=1000, help="images when building the photo source")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of each; medians are reported")
    p.add_argument("--baseline", help="folder holding another version's data_tools package to time beside this one")
    return p


_CHILD = """
import json, os, sys, time
from data_tools.writer import create_shards
def cpu():
    t = os.times()  # this process and its reaped workers (the pool is joined before return)
    return t.user + t.system + t.children_user + t.children_system
src, split, out, sps, workers = sys.argv[1:6]
t, c = time.perf_counter(), cpu()
man = create_shards(src, split, out, samples_per_shard=int(sps), workers=int(workers), progress=False)
print(json.dumps({"wall": time.perf_counter() - t, "cpu": cpu() - c, "n": man["counts"]["records"]}))
"""


def _time_create(pkg_root, src, split, out, args) -> dict:
    env = dict(os.environ, PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHILD, src, split, out, str(args.samples_per_shard),
                        str(args.workers)], env=env, capture_output=True, text=True, cwd=pkg_root)
    if r.returncode:
        raise RuntimeError(f"create under {pkg_root} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _size(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def run(args) -> dict:
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
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        versions = [("stm-shards", here)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
        times = {name: [] for name, _ in versions}
        n = 0
        load0 = os.getloadavg()[0]
        for _ in range(max(1, args.repeats)):
            for name, root in versions:
                out = os.path.join(tmp, "shards")
                r = _time_create(root, src, args.split, out, args)
                times[name].append((r["wall"], r["cpu"]))
                n = r["n"]
                shutil.rmtree(out)
    load1 = os.getloadavg()[0]
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    t_create = med["stm-shards"][0]
    res = {"images": n, "MB": mb, "tar_s": t_tar, "create_s": t_create, "workers": args.workers,
           "tar_img_per_s": n / t_tar, "create_img_per_s": n / t_create,
           "create_cpu_ms_per_img": 1e3 * med["stm-shards"][1] / n, "load_before": load0, "load_after": load1}
    if args.baseline:
        res.update(baseline_s=med["baseline"][0], baseline_img_per_s=n / med["baseline"][0],
                   baseline_cpu_ms_per_img=1e3 * med["baseline"][1] / n)
    print(f"{n} images, {mb:.1f} MB, split {args.split!r}, create --workers {args.workers}; 1-min load average "
          f"{load0:.1f} before, {load1:.1f} after ({os.cpu_count()} cores)")
    print(f"tar cf          {t_tar:7.2f} s  {n / t_tar:9.1f} img/s  {mb / t_tar:7.1f} MB/s")
    for name, (w, c) in med.items():
        print(f"{name:<15} {w:7.2f} s  {n / w:9.1f} img/s  {mb / w:7.1f} MB/s  CPU {1e3 * c / n:.2f} ms/img"
              f"  (median of {len(times[name])})")
    print(f"create / tar time = {t_create / t_tar:.1f}x")
    if args.baseline:
        print(f"stm-shards / baseline throughput = {med['baseline'][0] / t_create:.2f}x, "
              f"CPU per image {med['baseline'][1] / med['stm-shards'][1]:.2f}x less")
    return res


def main(argv=None):
    run(add_arguments(argparse.ArgumentParser(prog="stm-bench shards", description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    main()
