"""model.num_classes below the shards' class count is a config error before any process trains,
naming both numbers and the manifest (it used to fail at step 1 with `labels outside [0, 5)`)."""
import os
import subprocess
import sys

import pytest

from engine_launch import BASE, REPO, env
from stm_dist.engine.config import ConfigError, check_paths, load

DEMO = os.path.join(REPO, "configs", "demo_digits.yaml")


def test_check_paths_refuses_fewer_classes_than_the_manifest(digits_shards):
    cfg = load(DEMO, [f"data.train_shards={digits_shards}", f"data.val_shards={digits_shards}", "model.num_classes=5"])
    manifest = os.path.join(digits_shards, "train.json")
    with pytest.raises(ConfigError, match=rf"'model.num_classes' is 5 .*{manifest} .*10 classes"):
        check_paths(cfg)
    # Evaluation only: the val manifest is the one checked.
    with pytest.raises(ConfigError, match=rf"{os.path.join(digits_shards, 'val.json')}"):
        check_paths(cfg, need_train=False)
    for ok in (10, 12):  # as many classes, or more (a head wider than the data set is allowed)
        check_paths(load(DEMO, [f"data.train_shards={digits_shards}", f"data.val_shards={digits_shards}",
                                f"model.num_classes={ok}"]))


def test_stm_train_refuses_before_training(digits_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "stm_dist.cli.train", "--config", DEMO, f"run.out_dir={run}",
           f"data.train_shards={digits_shards}", f"data.val_shards={digits_shards}", *BASE, "model.num_classes=5"]
    p = subprocess.run(cmd, env=env(single_process=True), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "config error: 'model.num_classes' is 5" in p.stderr and "10 classes" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(run / "metrics.jsonl") and not os.path.exists(run / "checkpoints")


def test_split_names_are_the_configured_ones(digits_shards, tmp_path):
    """COCO's shards are train2017.json / val2017.json: data.train_split / data.val_split name the
    manifests every reader opens (here the class-count check, which names the file it read)."""
    import shutil

    renamed = tmp_path / "shards"
    shutil.copytree(digits_shards, renamed)
    os.rename(renamed / "train.json", renamed / "train2017.json")
    base = [f"data.train_shards={renamed}", f"data.val_shards={renamed}", "model.num_classes=5",
            "data.train_split=train2017"]
    with pytest.raises(ConfigError, match=rf"{os.path.join(str(renamed), 'train2017.json')} .*10 classes"):
        check_paths(load(DEMO, base))
