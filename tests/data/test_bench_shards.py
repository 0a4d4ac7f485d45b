"""`stm-bench shards` runs create beside tar (and beside another version) and reports both."""
import os

from stm_dist.bench.shards import add_arguments, run
from tests.data.conftest import REPO


def test_bench_shards_times_create_tar_and_a_baseline(capsys):
    import argparse

    # This checkout as its own baseline: the harness is what is under test, not the speed.
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--count", "12", "--samples-per-shard", "5", "--workers", "2", "--baseline", REPO])
    res = run(args)
    out = capsys.readouterr().out
    assert res["images"] == 12 and res["create_s"] > 0 and res["baseline_s"] > 0 and res["tar_s"] > 0
    assert res["create_cpu_ms_per_img"] > 0 and res["load_before"] >= 0
    assert "stm-shards / baseline throughput" in out and "load average" in out
    assert os.path.isdir(os.path.join(REPO, "data_tools"))
