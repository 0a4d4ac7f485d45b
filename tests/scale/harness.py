"""Helpers of the scale tests: the environment launched processes need, the tiny training
recipe every test uses, and reading a run's metrics back."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """A console script of this package, from the venv running the tests."""
    path = os.path.join(BIN, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: run `pip install --no-build-isolation --no-deps -e .` in {REPO}")
    return path


def launch_env(**extra) -> dict:
    """Environment for launchers and ranks: the venv first on PATH (PLATFORM.md: mixing ninjas
    rebuilds DeepSpeed ops), DeepSpeed's CPU accelerator, one OpenMP thread per rank."""
    env = dict(os.environ)
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tiny_overrides(shards: str, max_steps: int, micro_batch: int = 32) -> list[str]:
    """A micro model on 32 px digits for a few steps: long enough to train, short for CI."""
    return [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_threads=1",
            "model.num_classes=10", "model.img_size=32", "data.randaug=false", "data.eval_batch=150",
            "augment.mixup=0.0", "augment.cutmix=0.0", "augment.reprob=0.0",
            "train.global_batch=32", f"train.micro_batch={micro_batch}", "train.log_every=1",
            "train.ema_decay=0.9", "schedule.epochs=1", "schedule.warmup_epochs=0",
            f"schedule.max_steps={max_steps}", "optim.lr=2.0e-3", "checkpoint.every_steps=0",
            "deepspeed.config=ds_configs/zero1_fp32.json"]


def read_metrics(run_dir: str) -> tuple[dict, dict]:
    """(train loss by step, eval records by step); later records for a step win (resumes)."""
    import json

    train, evals = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                train[rec["step"]] = rec["loss"]
            elif rec["kind"] == "eval":
                evals[rec["step"]] = rec
    return train, evals
