"""`make demo-detection`: the paper's pretrain -> downstream pipeline end to end, at demo scale.

The classification demo's export (runs/demo/model.pth; `make demo` runs first when it is missing)
-> `stm-shards demo-coco` (scikit-learn digits pasted on scikit-image's photographs, exact boxes
and masks) -> `stm-shards create` of its train and val splits -> `stm-train` of
configs/detection/demo_coco.yaml (Mask R-CNN, slim heads, on a U-ConvNeXt micro backbone
initialised from that export) with 2 DeepSpeed processes, which evaluates COCO box/mask AP at the
end -> runs/demo_detection/eval.json:
  {"bbox_AP", "segm_AP" (COCO %, 0-100), "results": {"bbox": path, "segm": path}, "annotations": path}
(the COCO results JSON files of that evaluation and the ground truth they were scored against).
Every stage runs the command a user would; the demo only strings them together.
"""
import argparse
import json
import os
import shutil
import sys
import time

from data_tools.demo_coco import DEFAULTS as DEMO_COCO_DEFAULTS
from stm_dist.cli.demo import _env, _port, _run
from stm_dist.engine.config import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "configs", "detection", "demo_coco.yaml")
# What `stm-shards demo-coco` writes for the demo (its --help explains each). Small canvases keep a
# step cheap on 2 cores (the backbone's cost follows the pixels); 3-6 digits an image give the heads
# more objects per step at no extra backbone cost; digits of 32-80 px sit at the anchors' sizes
# (32 px and up) and at the classification demo's scale, so its weights transfer; a digit hides at
# most a quarter of another (occlusion stays; at one half many digits were guesses even to a reader).
# The values are stm-shards demo-coco's defaults (data_tools.demo_coco.DEFAULTS).
DATA = {k.replace("_", "-"): v for k, v in DEMO_COCO_DEFAULTS.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stm_dist.cli.demo_detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "demo_detection"))
    p.add_argument("--procs", type=int, default=2, help="training processes")
    p.add_argument("--pretrained", default=os.path.join(REPO_ROOT, "runs", "demo", "model.pth"),
                   help="classification weights for the backbone (default: the classification demo's "
                        "export, made by running it when missing); 'none' trains the backbone from scratch")
    p.add_argument("--keep", action="store_true", help="reuse an earlier run's data and run directory (resumes)")
    p.add_argument("--min-bbox-ap", type=float, default=50.0, help="fail below this validation box AP")
    p.add_argument("--min-segm-ap", type=float, default=45.0, help="fail below this validation mask AP")
    for k, v in DATA.items():
        p.add_argument(f"--{k}", type=type(v), default=v, help=f"stm-shards demo-coco --{k} (default {v})")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for the training config")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    env, py = _env(), sys.executable
    times = {}

    pretrained = None if a.pretrained.lower() == "none" else os.path.abspath(a.pretrained)
    if pretrained and not os.path.exists(pretrained):
        default = os.path.join(REPO_ROOT, "runs", "demo", "model.pth")
        if pretrained != default:
            raise SystemExit(f"demo-detection: --pretrained {pretrained} does not exist")
        # Not counted in the detection demo's own minutes (printed apart).
        times["classification demo"] = _run([py, "-m", "stm_dist.cli.demo"],
                                            "make demo: the classification demo, whose export the backbone starts from",
                                            env)
    t_all = time.time()
    if os.path.isdir(out) and not a.keep:
        shutil.rmtree(out)
    src, shards, run_dir = (os.path.join(out, d) for d in ("source", "shards", "train"))

    if not os.path.isfile(os.path.join(src, "annotations", "instances_val.json")):
        data_args = [x for k in DATA for x in (f"--{k}", str(getattr(a, k.replace("-", "_"))))]
        times["data"] = _run([py, "-m", "data_tools.cli", "demo-coco", "--out", src] + data_args,
                             "write digits on photographs as a COCO-layout source", env)
    t = 0.0
    for split in ("train", "val"):
        t += _run([py, "-m", "data_tools.cli", "create", "--src", src, "--split", split, "--out", shards,
                   "--workers", "1", "--no-progress"], f"shard the {split} split", env)
    times["shards"] = t

    overrides = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"run.out_dir={run_dir}",
                 f"model.pretrained={pretrained or ''}"] + a.overrides
    launcher = os.path.join(os.path.dirname(py), "deepspeed")
    if not os.path.exists(launcher):
        launcher = shutil.which("deepspeed") or "deepspeed"
    times["train + eval"] = _run(
        [launcher, "--num_accelerators", str(a.procs), "--master_port", str(_port()),
         "--module", "stm_dist.cli.train", "--config", CONFIG] + overrides,
        f"fine-tune Mask R-CNN with DeepSpeed on {a.procs} processes, then COCO box/mask AP on the val split", env)

    r = write_result(out, run_dir, shards, pretrained)
    detection_s = time.time() - t_all
    load = os.getloadavg()
    print("\n=== detection demo result")
    print("  " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
          + f"; detection total {detection_s:.0f}s (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
            f"on {os.cpu_count()} cores)")
    print(f"  validation box AP {r['bbox_AP']:.1f}, mask AP {r['segm_AP']:.1f} (COCO %, step {r['step']}); "
          f"backbone from {pretrained or 'scratch'}")
    print(f"  {os.path.join(out, 'eval.json')}")
    low = [f"{name} {r[key]:.1f} is below the expected {floor}" for name, key, floor in
           (("box AP", "bbox_AP", a.min_bbox_ap), ("mask AP", "segm_AP", a.min_segm_ap)) if r[key] < floor]
    if low:
        print("demo-detection: " + "; ".join(low), file=sys.stderr)
        return 1
    return 0


def write_result(out: str, run_dir: str, shards: str, pretrained) -> dict:
    """eval.json from the run's last evaluation (metrics.jsonl) and the files it wrote."""
    rec = None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                x = json.loads(line)
                if x.get("kind") == "eval":
                    rec = x
    if rec is None:
        raise SystemExit(f"demo-detection: {run_dir}/metrics.jsonl holds no evaluation")
    with open(os.path.join(shards, "val.json")) as f:
        gt = os.path.join(shards, json.load(f)["annotations"])
    results = {k: os.path.join(run_dir, "eval", f"step{rec['step']}_{k}.json") for k in ("bbox", "segm")}
    for path in list(results.values()) + [gt]:
        if not os.path.isfile(path):
            raise SystemExit(f"demo-detection: the evaluation's file {path} is missing")
    r = {"bbox_AP": rec["bbox_AP"], "segm_AP": rec["segm_AP"], "results": results, "annotations": gt,
         "step": rec["step"], "pretrained": pretrained}
    r.update({k: rec[k] for k in ("bbox_AP50", "bbox_AP75", "segm_AP50", "segm_AP75") if k in rec})
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    raise SystemExit(main())
