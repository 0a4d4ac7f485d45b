"""`make demo`: the main job end to end on a small real data set.

digits (scikit-learn) -> ImageNet layout -> shards -> 2-process DeepSpeed training (the real
`deepspeed` launcher) -> export of the consolidated weights -> stm-eval of the export -> top-1.
Every stage runs the same command a user would; the demo only strings them together.

`--compare` (make compare): the paper's study in miniature on the same data: the five micro
mixers trained the same way (fewer epochs), each analysed with stm-analyze (invariance,
effective receptive field, adversarial robustness; a few dozen images each), then one stm-report
with the mixers side by side. Its output lands in runs/compare/report/.
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
    p.add_argument("--compare", action="store_true",
                   help="train the five micro mixers, analyse each and write the comparison report")
    p.add_argument("--compare-epochs", type=int, default=5, help="training epochs per mixer with --compare")
    p.add_argument("--analysis-images", type=int, default=30,
                   help="validation images per analysis with --compare (robustness uses half)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for the training config")
    a = p.parse_args(argv)
    if a.compare and a.out == p.get_default("out"):
        a.out = os.path.join(REPO_ROOT, "runs", "compare")
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

    if a.compare:
        return _compare(a, out, shards, env, times, t_all)
    times["train"] = _train(a, shards, env, run_dir, a.overrides)
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


def _train(a, shards: str, env: dict, run_dir: str, overrides: list, what: str = "") -> float:
    """stm-train of configs/demo_digits.yaml under the real `deepspeed` launcher."""
    py = sys.executable
    config = os.path.join(REPO_ROOT, "configs", "demo_digits.yaml")
    overrides = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"run.out_dir={run_dir}"] + overrides
    launcher = os.path.join(os.path.dirname(py), "deepspeed")
    if not os.path.exists(launcher):
        launcher = shutil.which("deepspeed") or "deepspeed"
    return _run([launcher, "--num_accelerators", str(a.procs), "--master_port", str(_port()),
                 "--module", "stm_dist.cli.train", "--config", config] + overrides,
                what or f"train with DeepSpeed on {a.procs} processes", env)


MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3")


def _compare(a, out: str, shards: str, env: dict, times: dict, t_all: float) -> int:
    """Train the five micro mixers, analyse each, write one report with them side by side."""
    import json

    py = sys.executable
    n = max(2, a.analysis_images)
    times.update(train=0.0, analyses=0.0)
    for mixer in MIXERS:
        model = f"unified_{mixer}_micro"
        run_dir = os.path.join(out, "train", model)
        times["train"] += _train(a, shards, env, run_dir, [f"model.name={model}", f"schedule.epochs={a.compare_epochs}"]
                                 + a.overrides, f"train {model} with DeepSpeed on {a.procs} processes")
        # The run's own best.pth (fp32, written at its evaluation) is what gets analysed: no
        # export step, whose DeepSpeed import cost ~10 s per model.
        path = os.path.join(run_dir, "best.pth")
        # Small budgets keep the five analyses inside the demo's minutes: the image counts, and
        # 5 PGD steps instead of the tool's default 10. The ERF is probed at 128 px (RepLKNet
        # probes 224 px models at 1024): at the 32 px training size every model sees the whole
        # image and the area ratios say nothing. One process for the three (`all`): each
        # launch costs ~7 s of imports; on 2 cores a second process saves less than it costs.
        times["analyses"] += _run(
            [py, "-m", "stm_dist.cli.analyze", "all", "--model", model, "--checkpoint", path, "--data", shards,
             "--batch", "16", "--num-threads", "0", "--out", os.path.join(out, "analyses", model),
             "--types", "translation", "--limit", str(n), "--img-size", "32", "--images", str(n),
             "--erf-img-size", "128", "--robustness-limit", str(n // 2), "--pgd-steps", "5"],
            f"{model}: invariance (translation), effective receptive field, FGSM / PGD robustness", env)
    report = os.path.join(out, "report")
    times["report"] = _run([py, "-m", "stm_dist.cli.report", os.path.join(out, "train"), "--analyses",
                            os.path.join(out, "analyses"), "-o", report], "the comparison report", env)
    with open(os.path.join(report, "report.json")) as f:
        r = json.load(f)
    # report.json groups each analysis' results by comparable settings (one group here)
    erf = {e["model"]: e["area_ratio"]["0.5"] for g in r["analyses"]["erf"] for e in g["results"]}
    pgd = {e["model"]: next((x["acc1"] for x in e["attacks"] if x["attack"] == "pgd" and x["eps"] > 0), None)
           for g in r["analyses"]["robustness"] for e in g["results"]}
    print("\n=== comparison (digits, micro models; not ImageNet-1k: the paper's numbers are not comparable)")
    for run in sorted(r["runs"], key=lambda x: MIXERS.index(x["mixer"]) if x["mixer"] in MIXERS else 9):
        top1 = max((v for v in (run["best_top1"], run["best_top1_ema"]) if v is not None), default=None)
        p = pgd.get(run["model"])
        print(f"  {run['model']:24s} top-1 {top1 if top1 is not None else float('nan'):6.2f}%  "
              f"ERF 50% area {erf.get(run['model'], float('nan')):.3f}  PGD 1/255 top-1 "
              f"{p if p is not None else float('nan'):.2f}%")
    print("  " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f", total {time.time() - t_all:.0f}s")
    print(f"  report: {os.path.join(report, 'report.md')}")
    return 0


def _port() -> int:
    from stm_dist.engine.distributed import _free_port

    return _free_port()


if __name__ == "__main__":
    raise SystemExit(main())
