"""`make demo`: the main job end to end on a small real data set.

digits (scikit-learn) -> ImageNet layout -> shards -> 2-process DeepSpeed training (the real
`deepspeed` launcher) -> export of the consolidated weights -> stm-eval of the export -> top-1.
Every stage runs the same command a user would; the demo only strings them together.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

from stm_dist.engine.config import REPO_ROOT


def _env() -> dict:
    from stm_dist.engine.distributed import accelerator_name

    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    # The venv's tools (ninja, deepspeed) first in every process, or DeepSpeed rebuilds its ops.
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DS_ACCELERATOR", accelerator_name())
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, what: str, env: dict) -> float:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {what} failed (exit {proc.returncode})")
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stm-demo", description=__doc__)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "demo"))
    p.add_argument("--procs", type=int, default=2, help="training processes")
    p.add_argument("--keep", action="store_true", help="reuse an earlier demo's data and run (resumes)")
    p.add_argument("--min-top1", type=float, default=97.0, help="fail below this validation top-1")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for the training config")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    if os.path.isdir(out) and not a.keep:
        shutil.rmtree(out)
    src, shards, run_dir = (os.path.join(out, d) for d in ("source", "shards", "train"))
    model_path = os.path.join(out, "model.pth")
    env, py = _env(), sys.executable
    times = {}
    t_all = time.time()

    if not os.path.isdir(os.path.join(src, "meta")):
        times["data"] = _run([py, "-m", "data_tools.cli", "demo-source", "--out", src],
                             "write the digits as an ImageNet-layout source", env)
    t = 0.0
    for split in ("train", "val"):
        t += _run([py, "-m", "data_tools.cli", "create", "--src", src, "--split", split, "--out", shards,
                   "--samples-per-shard", "400", "--workers", "1", "--no-progress"],
                  f"shard the {split} split", env)
    times["shards"] = t

    config = os.path.join(REPO_ROOT, "configs", "demo_digits.yaml")
    overrides = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"run.out_dir={run_dir}"] + a.overrides
    launcher = os.path.join(os.path.dirname(py), "deepspeed")
    if not os.path.exists(launcher):
        launcher = shutil.which("deepspeed") or "deepspeed"
    times["train"] = _run([launcher, "--num_accelerators", str(a.procs), "--master_port", str(_port()),
                           "--module", "stm_dist.cli.train", "--config", config] + overrides,
                          f"train with DeepSpeed on {a.procs} processes", env)
    times["export"] = _run([py, "-m", "stm_dist.cli.export", run_dir, "-o", model_path], "export the weights", env)
    result = os.path.join(out, "eval.json")
    times["eval"] = _run([py, "-m", "stm_dist.cli.eval", "--model", "unified_convnext_micro",
                          "--checkpoint", model_path, "--data", shards, "--img-size", "32",
                          "--batch", "150", "--num-threads", "1", "--json", result],
                         "evaluate the exported weights", env)
    import json

    with open(result) as f:
        r = json.load(f)
    total = time.time() - t_all
    print("\n=== demo result")
    print("  " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f", total {total:.0f}s")
    print(f"  validation top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% on {r['samples']} images "
          f"(exported model {model_path})")
    if r["top1"] < a.min_top1:
        print(f"demo: top-1 {r['top1']:.2f}% is below the expected {a.min_top1}%", file=sys.stderr)
        return 1
    return 0


def _port() -> int:
    from stm_dist.engine.distributed import _free_port

    return _free_port()


if __name__ == "__main__":
    raise SystemExit(main())
