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


# What a launch trains: a config file and the overrides every launch of a test module gets
# (the detection tests pass their own).
DIGITS = (os.path.join(REPO, "configs", "demo_digits.yaml"), BASE)


def train_cmd(procs: int, run_dir: str, shards: str, extra=(), recipe=DIGITS) -> list:
    config, base = recipe
    return [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(procs), "--master_port", str(free_port()),
            "--module", "stm_dist.cli.train", "--config", config,
            f"run.out_dir={run_dir}", f"data.train_shards={shards}", f"data.val_shards={shards}", *base, *extra]


def run_train(procs, run_dir, shards, extra=(), timeout=600, recipe=DIGITS):
    p = subprocess.run(train_cmd(procs, run_dir, shards, extra, recipe), env=env(), cwd=REPO, capture_output=True,
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


def run_cases(procs: int, cases: list, work_dir: str, timeout: int = 1500) -> dict:
    """Several stm-train runs in one launch of `procs` processes (cases_worker.py): `cases` is a
    list of {"name", "overrides"[, "config"]} (config defaults to the demo recipe). Returns
    {"cases": {name: {"exit" | "error", "traceback"}}, "started": [names], "code", "tail"}."""
    os.makedirs(work_dir, exist_ok=True)
    spec, result = os.path.join(work_dir, "cases.json"), os.path.join(work_dir, "result.jsonl")
    default = os.path.join(REPO, "configs", "demo_digits.yaml")
    with open(spec, "w") as f:
        json.dump([dict(c, config=c.get("config", default)) for c in cases], f)
    if os.path.exists(result):
        os.remove(result)
    cmd = [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(procs), "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "engine", "cases_worker.py"), "--cases", spec, "--result", result]
    try:
        p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
        tail, code = (p.stdout + p.stderr)[-4000:], p.returncode
    except subprocess.TimeoutExpired as e:
        tail, code = f"timed out after {e.timeout} s", None
    out = {"cases": {}, "started": [], "code": code, "tail": tail}
    if os.path.exists(result):
        with open(result) as f:
            for line in f:
                rec = json.loads(line)
                if "started" in rec:
                    out["started"].append(rec["started"])
                else:
                    out["cases"][rec["case"]] = rec
    return out


def case_ok(launch: dict, name: str) -> dict:
    """The case's record; an AssertionError naming the case (and why) unless it exited 0."""
    rec = launch["cases"].get(name)
    if rec is None:
        where = ("the launch died or hung inside it" if launch["started"][-1:] == [name]
                 else "the launch never reached it")
        raise AssertionError(f"{name}: no result ({where}); launch exit {launch['code']}:\n{launch['tail']}")
    if "error" in rec:
        raise AssertionError(f"{name} failed: {rec['error']}\n{rec['traceback']}")
    if rec["exit"] != 0:
        raise AssertionError(f"{name}: the trainer returned {rec['exit']}")
    return rec


def global_batches(run) -> dict:
    """step -> the keys of its global batch, in (rank, micro) order, the last time the step ran
    (data.record_keys: data_feed.py's sample_keys_rank<r>.jsonl)."""
    parts = {}
    for name in sorted(os.listdir(run)):
        if name.startswith("sample_keys_rank"):
            with open(os.path.join(run, name)) as f:
                for line in f:
                    r = json.loads(line)
                    parts[(r["step"], r["rank"], r["micro"])] = r["keys"]
    out = {}
    for (step, _, _), keys in sorted(parts.items()):
        out.setdefault(step, []).extend(keys)
    return out
