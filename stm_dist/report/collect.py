"""Read run directories into RunSummary records.

A run directory is what stm-train writes: config.yaml (the resolved experiment), metrics.jsonl
(one JSON object per optimizer step, kind "train", and per evaluation, kind "eval", with
top1/top5 and top1_ema/top5_ema, or for detection runs (model.task detection) COCO bbox_AP /
segm_AP), train.log, and checkpoints/<tag>/COMPLETE markers (world size, ZeRO stage, precision). A resumed run appends to the same files; for a step seen twice
(re-run after a restart) the later record wins.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field

import yaml

from . import paper


class ReportError(ValueError):
    """A run directory that cannot be read; the message names the file (and line)."""


@dataclass
class RunSummary:
    name: str                    # run directory relative to the collected root
    run_dir: str
    model: str
    mixer: str | None
    size: str | None
    num_classes: int
    img_size: int
    status: str                  # finished | preempted | stopped | running
    steps: int                   # last optimizer step recorded
    final_loss: float | None
    evals: int
    eval_step: int | None        # step of the last evaluation
    top1: float | None           # last evaluation, live model
    top5: float | None
    top1_ema: float | None       # last evaluation, EMA weights
    top5_ema: float | None
    best_top1: float | None      # best over all evaluations
    best_top5: float | None
    best_top1_ema: float | None
    best_top5_ema: float | None
    img_s: float | None          # median global images/s over training steps
    params: int | None           # at 224 px with the run's number of classes (spec §4 counting)
    gflops: float | None
    world_size: int | None
    zero_stage: int | None
    precision: str | None
    dataset: str                 # what the run was evaluated on, from its shards' manifest
    imagenet1k: bool             # the 1000-class, 50,000-image ImageNet-1k val set
    paper_top1: float | None     # the paper's ImageNet-1k number; only for ImageNet-1k runs
    # Detection runs (model.task detection): COCO AP (%) of the last and the best evaluation,
    # every evaluation for the AP curves, and the paper's Mask R-CNN 1x numbers beside runs of
    # the 1x recipe evaluated on COCO val2017.
    task: str = "classification"
    schedule: str | None = None  # detection: "1x", "3x ms", or the epochs and scales
    bbox_AP: float | None = None
    segm_AP: float | None = None
    best_bbox_AP: float | None = None
    best_segm_AP: float | None = None
    coco: bool = False           # evaluated on COCO val2017 (80 classes, 5,000 images)
    paper_box_AP: float | None = None
    paper_mask_AP: float | None = None
    ap_curve: list = field(default_factory=list)  # [{step, epoch, bbox_AP, segm_AP}] per evaluation

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def best_any_top1(self) -> float | None:
        vals = [v for v in (self.best_top1, self.best_top1_ema) if v is not None]
        return max(vals) if vals else None


def _read_metrics(path: str) -> tuple[dict, dict]:
    """(train records by step, eval records by step). A torn last line (a run killed while
    writing) is ignored; a bad line anywhere else is an error naming it."""
    train, evals = {}, {}
    with open(path) as f:
        lines = f.read().split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind, step = rec["kind"], int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == last:
                break
            raise ReportError(f"{path}:{i + 1}: not a metrics record ({e}): {line[:120]!r}") from None
        if kind == "train":
            train[step] = rec
        elif kind == "eval":
            evals[step] = rec
    return train, evals


def _status(run_dir: str) -> str:
    path = os.path.join(run_dir, "train.log")
    status = "running"
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                if "] finished:" in line:
                    status = "finished"
                elif "] stopping after step" in line:
                    status = "preempted"
                elif "] stopping:" in line:
                    status = "stopped"
                elif "] model " in line:  # a (re)start
                    status = "running"
    return status


def _newest_marker(run_dir: str) -> dict:
    ckpt = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        return {}
    for tag in sorted(os.listdir(ckpt), reverse=True):
        path = os.path.join(ckpt, tag, "COMPLETE")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
    return {}


def _best(evals: dict, key: str):
    vals = [r[key] for r in evals.values() if r.get(key) is not None]
    return max(vals) if vals else None


IMAGENET1K_VAL = (1000, 50000)  # classes, validation images


def dataset_of(cfg: dict) -> tuple[str, bool]:
    """(label, is ImageNet-1k) of a run's validation data, from its shards' manifest. The
    paper's numbers are top-1 on the full ImageNet-1k val set, so only a 1000-class,
    50,000-image val split counts as comparable."""
    from stm_dist.data.manifest import ShardError, read_manifest

    data = cfg.get("data") or {}
    shards = data.get("val_shards") or data.get("train_shards") or ""
    try:
        man = read_manifest(shards, "val")
    except (ShardError, OSError, TypeError) as e:
        return f"unknown ({e})", False
    classes, samples = int(man["num_classes"]), int(man["num_samples"])
    if (classes, samples) == IMAGENET1K_VAL:
        return "ImageNet-1k", True
    root = str((man.get("source") or {}).get("root") or shards).rstrip("/")
    where = "/".join(root.split("/")[-2:])
    return f"{classes} classes, {samples} val images ({where})", False


COCO_VAL = (80, 5000)  # classes, images of val2017


def detection_dataset_of(cfg: dict) -> tuple[str, bool]:
    """(label, is COCO val2017) of a detection run's validation split, from its manifest."""
    from stm_dist.data.manifest import ShardError, read_manifest

    data = cfg.get("data") or {}
    shards = data.get("val_shards") or ""
    try:
        man = read_manifest(shards, "val")
    except (ShardError, OSError, TypeError) as e:
        return f"unknown ({e})", False
    classes, samples = int(man["num_classes"]), int(man["num_samples"])
    if (classes, samples) == COCO_VAL:
        return "COCO val2017", True
    root = str((man.get("source") or {}).get("root") or shards).rstrip("/")
    where = "/".join(root.split("/")[-2:])
    return f"{classes} categories, {samples} val images ({where})", False


def detection_schedule(cfg: dict) -> str:
    """'1x' (12 epochs, one scale: the paper's recipe), '3x ms' (36 epochs, multi-scale), else
    the epochs and the number of training scales."""
    epochs = int((cfg.get("schedule") or {}).get("epochs", 0))
    scales = len((cfg.get("detection") or {}).get("short_sides") or [800])
    known = {(12, False): "1x", (36, True): "3x ms", (36, False): "3x", (12, True): "1x ms"}
    return known.get((epochs, scales > 1), f"{epochs} epochs{' ms' if scales > 1 else ''}")


def _detection_fields(cfg: dict, model: str, evals: dict) -> dict:
    last = evals[max(evals)] if evals else {}
    dataset, coco = detection_dataset_of(cfg)
    schedule = detection_schedule(cfg)
    paper_ap = paper.paper_coco(model) if coco and schedule == "1x" else None
    curve = [{"step": s, "epoch": r.get("epoch"), "bbox_AP": r.get("bbox_AP"), "segm_AP": r.get("segm_AP")}
             for s, r in sorted(evals.items()) if r.get("bbox_AP") is not None]
    return dict(task="detection", schedule=schedule, dataset=dataset, coco=coco,
                bbox_AP=last.get("bbox_AP"), segm_AP=last.get("segm_AP"),
                best_bbox_AP=_best(evals, "bbox_AP"), best_segm_AP=_best(evals, "segm_AP"),
                paper_box_AP=paper_ap[0] if paper_ap else None, paper_mask_AP=paper_ap[1] if paper_ap else None,
                ap_curve=curve)


def summarize(run_dir: str, root: str, count_complexity: bool = True) -> RunSummary:
    cfg_path = os.path.join(run_dir, "config.yaml")
    try:
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
        model = cfg["model"]["name"]
        num_classes = int(cfg["model"].get("num_classes", 1000))
        img_size = int(cfg["model"].get("img_size", 224))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{cfg_path}: cannot read the run's model from it ({e})") from None
    train, evals = _read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    last_train = train[max(train)] if train else {}
    last_eval = evals[max(evals)] if evals else {}
    speeds = [r["img_s"] for r in train.values() if r.get("img_s")]
    detection = (cfg.get("model") or {}).get("task") == "detection"
    params = gflops = None
    if count_complexity and not detection:  # counted as a classifier at 224 px: not a detector's
        _load_mixer(cfg, cfg_path)
        params, gflops = _complexity(model, num_classes, cfg_path)
    marker = _newest_marker(run_dir)
    ms = paper.mixer_and_size(model)
    dataset, in1k = dataset_of(cfg) if not detection else ("", False)
    extra = _detection_fields(cfg, model, evals) if detection else {}
    if detection:
        dataset = extra.pop("dataset")
    return RunSummary(
        name=os.path.relpath(run_dir, root), run_dir=run_dir, model=model,
        mixer=ms[0] if ms else None, size=ms[1] if ms else None,
        num_classes=num_classes, img_size=img_size, status=_status(run_dir),
        steps=max(train) if train else 0, final_loss=last_train.get("loss"),
        evals=len(evals), eval_step=max(evals) if evals else None,
        top1=last_eval.get("top1"), top5=last_eval.get("top5"),
        top1_ema=last_eval.get("top1_ema"), top5_ema=last_eval.get("top5_ema"),
        best_top1=_best(evals, "top1"), best_top5=_best(evals, "top5"),
        best_top1_ema=_best(evals, "top1_ema"), best_top5_ema=_best(evals, "top5_ema"),
        img_s=statistics.median(speeds) if speeds else None, params=params, gflops=gflops,
        world_size=marker.get("world_size"), zero_stage=marker.get("zero_stage"),
        precision=marker.get("precision"), dataset=dataset, imagenet1k=in1k,
        paper_top1=paper.paper_top1(model) if in1k else None, **extra,
    )


def _load_mixer(cfg: dict, where: str) -> None:
    """A run of a mixer of one's own names its file (model.mixer_module): load it to count."""
    spec = (cfg.get("model") or {}).get("mixer_module")
    if spec:
        from stm_dist.models.registry import MixerError, load_mixer_module

        try:
            load_mixer_module(str(spec), source=f"{where}: model.mixer_module")
        except MixerError as e:
            raise ReportError(str(e)) from None


def _complexity(model: str, num_classes: int, where: str):
    from . import complexity

    try:
        return complexity.count(model, num_classes)
    except Exception as e:  # an unknown model name, or one that cannot run at 224
        raise ReportError(f"{where}: cannot build model '{model}' to count parameters/GFLOPs: {e}") from e


def find_run_dirs(root: str) -> list[str]:
    """Every folder under `root` (itself included) holding a config.yaml and a metrics.jsonl."""
    if not os.path.isdir(root):
        raise ReportError(f"runs directory not found: {root}")
    found = []
    for here, dirs, files in os.walk(root):
        if "config.yaml" in files and "metrics.jsonl" in files:
            found.append(here)
            dirs[:] = []  # a run's own subfolders (checkpoints, tensorboard) hold no runs
        else:
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "checkpoints_universal", "tensorboard"))
    return sorted(found)


def collect_runs(root: str, count_complexity: bool = True) -> list[RunSummary]:
    dirs = find_run_dirs(root)
    if not dirs:
        raise ReportError(f"no run directories (config.yaml + metrics.jsonl) under {root}")
    root = os.path.abspath(root)
    return [summarize(os.path.abspath(d), root, count_complexity) for d in dirs]
