"""stm-eval on detection weights: COCO box and mask AP of a Mask R-CNN with pycocotools, every image
of the split counted once across ranks (DetectionTask.evaluate, the evaluation training runs).

Sources (stm_dist.engine.detection_weights): a detection run directory or checkpoint folder (any
ZeRO stage), stm-export's detector export, a run's best.pth, or the paper's released mmdet 2.x
files (found by their keys; evaluated with mmdet's inference numerics, as --mmdet asks for any).
Writes OUT/eval.json = {"bbox_AP", "segm_AP" (COCO %, 0-100), "results": {"bbox": path, "segm":
path}, "annotations": path, ...} beside the COCO results files OUT/<split>_{bbox,segm}.json.
"""
from __future__ import annotations

import json
import os
import sys

def _config(args, info: dict):
    from stm_dist.engine.config import ExperimentConfig, validate

    det = info["detector"]
    cfg = ExperimentConfig()
    cfg.model.name, cfg.model.task, cfg.model.num_classes = info["model"], "detection", det["num_classes"]
    cfg.detection.head = det["head"]
    cfg.detection.short_sides = [float(args.short_side)] if args.short_side else [float(v) for v in det["short_sides"]]
    cfg.detection.max_size = int(args.max_size or det["max_size"])
    cfg.detection.size_divisor = int(det["size_divisor"])
    cfg.detection.mmdet_compat = bool(args.mmdet or det["mmdet_compat"])
    cfg.data.val_shards, cfg.data.eval_batch = args.data, args.batch or 2
    cfg.data.num_threads, cfg.data.backend = args.num_threads, args.backend
    validate(cfg, "stm-eval")
    return cfg


def run(args, warn) -> dict:
    from stm_dist.data.manifest import read_manifest
    from stm_dist.engine.detection_weights import load_detector_source, load_into
    from stm_dist.engine.distributed import init
    from stm_dist.engine.tasks.detection import DetectionTask

    rank, world, device = init(use_deepspeed=False)
    sd, info = load_detector_source(args.checkpoint, ema=args.ema, warn=warn, model=args.model)
    cfg = _config(args, info)
    classes = int(read_manifest(args.data, args.split)["num_classes"])
    if classes != cfg.model.num_classes:
        raise ValueError(f"{args.checkpoint} detects {cfg.model.num_classes} classes, {args.data}/{args.split}.json "
                         f"has {classes}: evaluate it on shards of the categories it was trained on")
    det = cfg.detection
    said = (f"detection: Mask R-CNN ({det.head} head, {cfg.model.num_classes} classes) on {cfg.model.name}, "
            f"short side {max(det.short_sides):g} / long side <= {det.max_size}, pad x{det.size_divisor}, "
            f"{'mmdet 2.x inference numerics' if det.mmdet_compat else 'our inference'}; "
            f"weights: {info['source']} ({info['detector']['layout']} layout{', EMA' if info['ema'] else ''})")
    if rank == 0:
        print(f"stm-eval: {said}", flush=True)
    task = DetectionTask(cfg)
    model = task.build_model(for_eval=True)
    load_into(model, sd, info["source"])
    del sd
    model.to(device).float().eval()
    loader = task.val_loader(rank, world, device.type == "cuda", split=args.split)
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.checkpoint)))[0]
    out = os.path.abspath(args.out or f"eval_{stem}_{args.split}")
    r = task.evaluate(model, loader, device, out_dir=out, stem=args.split)
    r.update(results=task.results_files(out, args.split), annotations=task.annotations(loader),
             model=cfg.model.name, checkpoint=os.path.abspath(args.checkpoint), split=args.split,
             images=int(loader.manifest["num_samples"]), world_size=world, ema=bool(info["ema"]),
             step=info.get("step"), input_config=said, head=det.head, num_classes=cfg.model.num_classes,
             short_side=max(det.short_sides), max_size=det.max_size, mmdet_compat=det.mmdet_compat,
             out_dir=out)
    return r


def report(r: dict, json_path: str | None):
    """Rank 0: the result line and eval.json (plus --json)."""
    path = os.path.join(r["out_dir"], "eval.json")
    for p in filter(None, (path, json_path)):
        with open(p + ".tmp", "w") as f:
            json.dump(r, f, indent=1)
        os.replace(p + ".tmp", p)
    extra = "  ".join(f"{k} {r[k]:.1f}" for k in ("bbox_AP50", "bbox_AP75", "segm_AP50", "segm_AP75") if k in r)
    print(f"{r['model']}: box AP {r['bbox_AP']:.2f}  mask AP {r['segm_AP']:.2f}  ({extra}; {r['images']} images, "
          f"{r['world_size']} process(es)); wrote {path}", flush=True)


def main_detection(args) -> int:
    """stm-eval's detection path (eval.py dispatches here)."""
    import torch.distributed as dist

    from stm_dist.engine.distributed import finish

    def warn(msg):
        print(f"stm-eval: {msg}", file=sys.stderr)

    try:
        r = run(args, warn)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"stm-eval: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        finish(1)
    if not dist.is_initialized() or dist.get_rank() == 0:
        report(r, args.json)
    finish(0)
    return 0
