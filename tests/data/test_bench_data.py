"""`stm-bench data` on the small real-photo shards: it runs both backends and reports the one-off
build apart from each epoch's start-up, which one pipeline for the run keeps near zero."""
import pytest

from stm_dist.bench.data import add_arguments, run


def test_bench_data_reports_build_and_epoch_startup(unique_shards, capsys):
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--shards", str(unique_shards), "--batch", "4", "--img-size", "32", "--threads", "1", "--seconds", "0.3",
         "--no-randaug", "--repeats", "1"])
    res = run(args)
    for case in ("train/dali", "train/pil", "val/dali", "val/pil"):
        r = res[case]
        assert r["epochs"] >= 2 and r["images"] > 0 and r["img_per_s"] > 0
    d = res["train/dali"]
    # The old loader rebuilt its pipeline every epoch (~1 s here); now the next epoch's batches
    # are already prefetched when the previous epoch ends.
    assert d["epoch_startup_s"] < 0.1 and d["epoch_startup_s"] < d["build_s"], d
    assert res["val/pil"]["epoch_startup_s"] > d["epoch_startup_s"]  # a DataLoader per pass forks its worker
    out = capsys.readouterr().out
    assert "load average" in out and "train: DALI vs PIL" in out


def test_bench_data_cuda_needs_a_gpu(unique_shards):
    import argparse

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the cuda path runs instead of refusing")
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--shards", str(unique_shards), "--device", "cuda"])
    with pytest.raises(SystemExit, match="no CUDA device"):
        run(args)
