"""`stm-bench models`: the dispatcher finds the subcommand and a tiny real run writes CSV + PNG."""
import csv

import pytest

from stm_dist.cli import bench


def test_dispatcher_lists_and_rejects():
    assert "models" in bench.subcommands()
    with pytest.raises(SystemExit):
        bench.main(["no-such-benchmark"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        bench.main(["models", "--img-size", "40"])


def test_tiny_eager_run_writes_csv_and_png(tmp_path):
    rc = bench.main(["models", "--models", "unified_convnext_micro", "--modes", "eager", "--batch", "2",
                     "--img-size", "32", "--iters", "1", "--warmup", "1", "--threads", "1",
                     "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "models.csv")))
    assert len(rows) == 1 and rows[0]["model"] == "unified_convnext_micro" and not rows[0]["error"]
    assert float(rows[0]["img_per_s"]) > 0 and float(rows[0]["peak_mem_mib"]) > 0
    assert float(rows[0]["params_m"]) == pytest.approx(4.44, abs=0.01)
    assert (tmp_path / "models.png").stat().st_size > 1000
