"""The shard writer's memory does not grow with the data set when the output disk is slow, and
its hand-built tar headers are byte-for-byte what tarfile writes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.data.conftest import PY, real_photos, subprocess_env

SLOW_WRITE_S = 0.02  # per sample: ~10x the decode time, so unbounded queueing would show


def _photo_source(root, n):
    """ImageNet layout with ``n`` real photos (~60-100 KB each), a different crop per copy."""
    photos = [a for _, a in real_photos(480)]
    lines = []
    for i in range(n):
        a = photos[i % len(photos)]
        a = np.ascontiguousarray(a[(i * 7) % 13 :, (i * 5) % 11 :])
        rel = f"c{i % 3}/img_{i:05d}.JPEG"
        os.makedirs(os.path.join(root, "train", f"c{i % 3}"), exist_ok=True)
        Image.fromarray(a).save(os.path.join(root, "train", rel), quality=95)
        lines.append(f"{rel} {i % 3}")
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    with open(os.path.join(root, "meta", "train.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _measure(src, out):
    """Run in a fresh process: create with a slow output; print the parent's traced peak and the
    workers' peak RSS."""
    import resource
    import time
    import tracemalloc

    import tqdm  # noqa: F401  imported before tracing: a one-off cost, not the writer's

    from data_tools import tar_index
    from data_tools.writer import create_shards

    fast = tar_index.ShardWriter.add_sample

    def slow(self, key, members):  # a slow disk: the workers' writes block, reading does not
        time.sleep(SLOW_WRITE_S)
        return fast(self, key, members)

    tar_index.ShardWriter.add_sample = slow  # fork start method: the workers inherit it
    tracemalloc.start()
    man = create_shards(src, "train", out, samples_per_shard=8, workers=2, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"parent_peak": peak, "workers_rss": kids, "samples": man["num_samples"],
                      "bytes": sum(s["bytes"] for s in man["shards"])}))


@pytest.mark.skipif(sys.platform != "linux", reason="relies on the fork start method and ru_maxrss in KiB")
def test_peak_memory_flat_in_images_on_slow_output(tmp_path):
    res = {}
    for n in (48, 96):
        src = tmp_path / f"src{n}"
        _photo_source(src, n)
        r = subprocess.run([PY, "-c", "import sys; from tests.data.test_writer_memory import _measure; "
                            "_measure(sys.argv[1], sys.argv[2])", str(src), str(tmp_path / f"out{n}")],
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        res[n] = json.loads(r.stdout.strip().splitlines()[-1])
        assert res[n]["samples"] == n
    small, big = res[48], res[96]
    # The output really doubled (several MB), so a writer that queued images would show it ...
    assert big["bytes"] > 1.8 * small["bytes"] and small["bytes"] > 2_000_000
    # ... but neither the parent nor the workers hold more for twice the images.
    assert big["parent_peak"] < 1.2 * small["parent_peak"], res
    assert big["parent_peak"] < 0.25 * big["bytes"], res
    assert big["workers_rss"] < 1.2 * small["workers_rss"], res


def test_tar_header_matches_tarfile():
    from data_tools.tar_index import _header, _tarfile_header

    for name in ("a.cls", "00000001_n01440764_10026.jpg", "k" * 95 + ".jpg"):
        for size in (0, 1, 511, 512, 123_456, 8**11 - 1):
            assert _header(name, size) == _tarfile_header(name, size), (name, size)
    with pytest.raises(ValueError, match="too long"):
        _header("k" * 100, 1)
