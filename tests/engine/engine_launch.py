"""Helpers of the engine tests: run stm-train under the real `deepspeed` launcher, read its
per-step records (resume_runs.py kills it). (A uniquely named module: every test folder has a
conftest.)"""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def demo_config_with_ds(tmp_path, base: str, **top_level):
    """The demo recipe with a copy of ds_configs/`base` whose top-level keys `top_level` replace."""
    from stm_dist.engine.config import load

    with open(os.path.join(REPO, "ds_configs", base)) as f:
        ds = json.load(f)
    ds.update(top_level)
    path = str(tmp_path / "ds.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    return load(os.path.join(REPO, "configs", "demo_digits.yaml"), [f"deepspeed.config={path}"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(single_process: bool = False) -> dict:
    """The launch environment; `single_process` drops launcher variables so a bare
    `python -m ...` makes its own world of one."""
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if single_process:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
    return e


# A micro model at 32 px with every stochastic part of the recipe on (mixup/cutmix, erasing,
# smoothing, EMA): resume must restore all of their random streams, not only the weights.
BASE = ["model.name=unified_convnext_micro", "model.num_classes=10", "model.img_size=32",
        "data.num_threads=1", "data.randaug=false", "data.eval_batch=100",
        "train.global_batch=16", "train.micro_batch=8", "train.log_every=1", "train.ema_decay=0.9",
        "schedule.epochs=2", "schedule.warmup_epochs=1", "optim.lr=2e-3",
        "checkpoint.every_steps=3", "checkpoint.keep_last=3"]


def train_cmd(procs: int, run_dir: str, shards: str, extra=()) -> list:
    return [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(procs), "--master_port", str(free_port()),
            "--module", "stm_dist.cli.train", "--config", os.path.join(REPO, "configs", "demo_digits.yaml"),
            f"run.out_dir={run_dir}", f"data.train_shards={shards}", f"data.val_shards={shards}", *BASE, *extra]


def run_train(procs, run_dir, shards, extra=(), timeout=600):
    p = subprocess.run(train_cmd(procs, run_dir, shards, extra), env=env(), cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"training failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p.stdout + p.stderr


def records(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def train_records(run_dir):
    return [r for r in records(run_dir) if r["kind"] == "train"]
