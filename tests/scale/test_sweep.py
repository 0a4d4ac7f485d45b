"""Sweep files expand to a fixed, numbered list of runs; bad files fail naming the key."""
from __future__ import annotations

import os
import subprocess

import pytest

from harness import REPO, tool
from stm_dist.report import paper
from stm_dist.sweep import SweepError, load

PAPER = os.path.join(REPO, "sweeps", "paper.yaml")


def test_paper_sweep_is_the_20_trainings(tmp_path):
    tasks = load(PAPER).tasks(runs_root=str(tmp_path))
    assert len(tasks) == 20
    # Every (size, mixer) cell of the paper's table exactly once, each with its own recipe file.
    assert {paper.mixer_and_size(t.model) for t in tasks} == {(m, s) for m in paper.MIXERS for s in paper.SIZES}
    assert len({t.run_dir for t in tasks}) == 20
    for t in tasks:
        assert os.path.isfile(t.config) and os.path.basename(t.config) == f"{t.model}.yaml"
        assert t.run_dir == os.path.join(str(tmp_path), "paper", t.model)
        assert t.train_args()[-1] == f"run.out_dir={t.run_dir}"


def test_grid_expansion_is_stable_and_ordered(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(f"name: g\nconfigs: {REPO}/configs\nmodels: [unified_swin_tiny, unified_pvt_tiny]\n"
                 "overrides: [train.seed=1]\ngrid:\n  optim.lr: [1.0e-3, 2.0e-3]\n  train.ema: [true, false]\n")
    tasks = load(str(f)).tasks(runs_root="/r")
    assert len(tasks) == 8
    assert [t.model for t in tasks] == ["unified_swin_tiny"] * 4 + ["unified_pvt_tiny"] * 4
    assert tasks[1].overrides == ["train.seed=1", "optim.lr=0.001", "train.ema=false"]
    assert tasks[1].run_dir == "/r/g/unified_swin_tiny__optim.lr=0.001__train.ema=False"
    assert [t.run_dir for t in load(str(f)).tasks(runs_root="/r")] == [t.run_dir for t in tasks]


@pytest.mark.parametrize("body, message", [
    ("models: [unified_swin_tiny]\nmodel: x\n", "unknown key(s) ['model']"),
    ("models: [unified_swin_huge]\n", "model 'unified_swin_huge' has no config"),
    ("models: [unified_swin_tiny]\noverrides: [lr=3]\n", "override 'lr=3'"),
    ("models: [unified_swin_tiny]\noverrides: [run.out_dir=/x]\n", "must not set run.out_dir"),
    ("models: [unified_swin_tiny, unified_swin_tiny]\n", "more than once"),
    ("models: [unified_swin_tiny]\ngrid: {optim.lr: []}\n", "grid key 'optim.lr'"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text(f"configs: {REPO}/configs\n" + body)
    with pytest.raises(SweepError) as e:
        load(str(f)).tasks()
    assert message in str(e.value) and str(f) in str(e.value)


def test_cli_task_and_index_out_of_range(tmp_path):
    env = dict(os.environ, STM_RUNS_ROOT=str(tmp_path))
    ok = subprocess.run([tool("stm-sweep"), "task", PAPER, "7"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split("\n")[:2] == ["--config", os.path.join(REPO, "configs", "unified_swin_tiny.yaml")]
    bad = subprocess.run([tool("stm-sweep"), "task", PAPER, "20"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "valid indices 0-19" in bad.stderr
    count = subprocess.run([tool("stm-sweep"), "expand", PAPER, "--count"], capture_output=True, text=True)
    assert count.stdout.strip() == "20"
