"""A restart never silently trains something else: stm-train as one plain process refuses a
changed recipe in the same run directory (naming the keys, both values), continues it only with
run.allow_recipe_change=true, branches with --resume and moves checkpoints aside with --fresh."""
import json
import os
import subprocess
import sys

import pytest

from engine_launch import BASE, REPO, env, train_records

pytestmark = pytest.mark.slow


def _train(run_dir, shards, extra, cli=()):
    e = env(single_process=True)
    cmd = [sys.executable, "-m", "stm_dist.cli.train", "--config", os.path.join(REPO, "configs", "demo_digits.yaml"),
           *cli, f"run.out_dir={run_dir}", f"data.train_shards={shards}", f"data.val_shards={shards}", *BASE,
           "checkpoint.every_steps=1", *extra]
    return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_changed_recipe_is_refused_then_allowed_branched_or_fresh(digits_shards, tmp_path):
    run = str(tmp_path / "a")
    p = _train(run, digits_shards, ["schedule.max_steps=1"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    p = _train(run, digits_shards, ["schedule.max_steps=2", "optim.lr=5e-3"])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "was trained with another recipe" in p.stderr and "optim.lr: 0.002 -> 0.005" in p.stderr
    assert "Traceback" not in p.stderr
    assert [r["step"] for r in train_records(run)] == [1]  # nothing trained

    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero1_fp32.json")))
    ds["zero_optimization"]["stage"] = 2
    (tmp_path / "z2.json").write_text(json.dumps(ds))
    p = _train(run, digits_shards, ["schedule.max_steps=2", f"deepspeed.config={tmp_path / 'z2.json'}"])
    assert p.returncode == 2 and "deepspeed.json.zero_optimization" in p.stderr, p.stderr[-2000:]

    # Execution details (here the logging cadence) are not the recipe.
    p = _train(run, digits_shards, ["schedule.max_steps=2", "optim.lr=5e-3", "run.allow_recipe_change=true",
                                    "train.log_every=2"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = open(os.path.join(run, "train.log")).read()
    assert "run.allow_recipe_change=true: continuing" in log and "optim.lr: 0.002 -> 0.005" in log
    assert [r["step"] for r in train_records(run)] == [1, 2]
    history = open(os.path.join(run, "config_history.yaml")).read()
    assert history.count("--- # started") == 4  # every start is recorded, none overwritten


    # A bit flipped (not truncated) in the newest checkpoint: skipped, naming the file, and the
    # previous one is loaded.
    victim = os.path.join(run, "checkpoints", "step000000002", "stm_rank0.pt")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(bytes(data))
    p = _train(run, digits_shards, ["schedule.max_steps=3", "optim.lr=5e-3", "run.allow_recipe_change=true"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = open(os.path.join(run, "train.log")).read()
    assert "file stm_rank0.pt does not match its checksum" in log and "step000000002" in log
    assert [r["step"] for r in train_records(run)][-2:] == [2, 3]  # resumed from step 1

    branch = str(tmp_path / "b")
    p = _train(branch, digits_shards, ["schedule.max_steps=4", "optim.lr=5e-3"], cli=["--resume", run])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert [r["step"] for r in train_records(branch)] == [4]  # continued from run's step 3
    p = _train(run, digits_shards, ["schedule.max_steps=1", "optim.lr=7e-3"], cli=["--fresh"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    moved = [d for d in os.listdir(run) if d.startswith("checkpoints.moved-")]
    assert len(moved) == 1 and os.listdir(os.path.join(run, moved[0]))  # set aside, not deleted
