"""stm-eval: top-1/top-5 of a model, or COCO box/mask AP of a detector, on a shard set; every
validation image counted exactly once across ranks (run it plainly, or under `deepspeed` /
`torchrun` to split the set).

    stm-eval --model unified_swin_tiny --checkpoint swin_t.pth --data shards/
    --checkpoint accepts our exports, a run directory / checkpoint folder (consolidated on the fly)
    and the original release files ({'model': ..., 'model_ema': ...}).

The input size and crop are the checkpoint's (an export's pretrained_cfg, a run directory's
config) unless --img-size / --crop-pct are given; the first line printed says which were used.

Detection (Mask R-CNN; --task detection, or found from the checkpoint: a detection run, a
detector export, a file of detector tensors):
    stm-eval --model unified_swin_tiny --checkpoint runs/mask_rcnn_unified_swin_tiny_1x --data coco/
    stm-eval --model unified_swin_tiny --checkpoint mask_rcnn_unified_swin_tiny_1x.pth --data coco/ --mmdet
    torchrun --nproc_per_node 8 -m stm_dist.cli.eval ...   (every image once across the 8 ranks)
The paper's released mmdet files are recognised by their keys and evaluated with mmdet 2.x's
inference numerics (--mmdet asks for those with any weights). Head, class count and input scale
come from the weights and the run's config (else 1333x800); --out DIR receives eval.json (box and
mask AP, the paths below) and the COCO results JSON <split>_bbox.json / <split>_segm.json.
"""
import argparse
import json
import os
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="stm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (stm_dist.models.list_models())")
    p.add_argument("--checkpoint", required=True, help=".pth file, run directory or checkpoint folder")
    p.add_argument("--data", required=True, help="shard directory holding the 'val' split")
    p.add_argument("--split", default="val")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: the checkpoint's: an export's pretrained_cfg, a run's config; else 224)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="centre-crop fraction (default: the checkpoint's, as --img-size; else 0.875)")
    p.add_argument("--batch", type=int, default=None, help="per-process batch size (default 256; detection 2)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the shard manifest's class count")
    p.add_argument("--label-map", default=None, help="file of class indices when the head has more classes")
    p.add_argument("--backend", default="dali", choices=["dali", "pil"])
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    det = p.add_argument_group("detection")
    det.add_argument("--task", choices=["classification", "detection"], default=None,
                     help="default: detection for a detection run, a detector export or detector tensors")
    det.add_argument("--mmdet", action="store_true",
                     help="mmdet 2.x inference numerics (mask pasting; implied for the paper's released mmdet files)")
    det.add_argument("--out", default=None,
                     help="folder for eval.json and the COCO results JSON (default ./eval_<checkpoint>_<split>)")
    det.add_argument("--short-side", type=int, default=None, help="test scale's short side (default: the run's, else 800)")
    det.add_argument("--max-size", type=int, default=None, help="test scale's long-side cap (default: the run's, else 1333)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _state_dict(args):
    from stm_dist.engine.export import consolidate, locate

    if os.path.isdir(args.checkpoint):
        ckpt_dir, tag, marker = locate(args.checkpoint, warn=lambda m: print(f"stm-eval: {m}", file=sys.stderr))
        _same_model(args, marker.get("model"), os.path.join(ckpt_dir, tag))
        return consolidate(ckpt_dir, tag, marker, ema=args.ema)
    sidecar = args.checkpoint + ".json"  # written by stm-export
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            _same_model(args, json.load(f).get("model"), args.checkpoint)
    return args.checkpoint


def _same_model(args, saved, where):
    from stm_dist.models.registry import resolve_name

    if saved and resolve_name(saved) != resolve_name(args.model):
        raise ValueError(f"{where} holds weights of {saved}, not {args.model}: run with --model {saved}")


def _input_config(args, warn) -> tuple:
    """(img_size, crop_pct, one line saying which were used and where from): the flags, else what
    the checkpoint records (an export of a 32-px run is evaluated at 32 px), else 224 / 0.875."""
    from stm_dist.engine.export import recorded_input

    recorded = {}
    if args.img_size is None or args.crop_pct is None:
        try:
            recorded = recorded_input(args.checkpoint, warn=warn)
        except (OSError, KeyError, ValueError, RuntimeError):
            recorded = {}  # loading the weights names the problem with the file
    chosen = {}
    for key, flag, default in (("img_size", "--img-size", 224), ("crop_pct", "--crop-pct", 0.875)):
        given = getattr(args, key)
        if given is not None:
            chosen[key] = (given, flag)
        elif key in recorded:
            chosen[key] = (type(default)(recorded[key]), f"from {recorded['source']}")
        else:
            chosen[key] = (default, "default: the checkpoint records none")
    (size, size_from), (crop, crop_from) = chosen["img_size"], chosen["crop_pct"]
    said = (f"img_size {size}, crop_pct {crop} ({size_from})" if size_from == crop_from
            else f"img_size {size} ({size_from}), crop_pct {crop} ({crop_from})")
    return size, crop, said


def run(args) -> dict:
    import torch

    from stm_dist.data import build_val_loader, read_manifest
    from stm_dist.engine.distributed import init
    from stm_dist.engine.evaluate import evaluate
    from stm_dist.models import create_model
    from stm_dist.models.pretrained import load_pretrained

    from stm_dist.cli.run_mixer import load_run_mixer

    load_run_mixer(args.checkpoint)  # a run of a mixer of one's own names its file in its recipe
    rank, world, device = init(use_deepspeed=False)
    manifest = read_manifest(args.data, args.split)
    num_classes = args.num_classes or int(manifest["num_classes"])
    img_size, crop_pct, said = _input_config(args, warn=lambda m: print(f"stm-eval: {m}", file=sys.stderr))
    if rank == 0:
        print(f"stm-eval: {said}; num_classes {num_classes} "
              f"({'--num-classes' if args.num_classes else 'the shard manifest'})", flush=True)
    model = create_model(args.model, num_classes=num_classes, img_size=img_size)
    load_pretrained(model, _state_dict(args), label_map=args.label_map,
                    use_ema=args.ema and not os.path.isdir(args.checkpoint))
    model.to(device).float()
    loader = build_val_loader(args.data, args.batch or 256, rank=rank, world_size=world, img_size=img_size,
                              crop_pct=crop_pct, device="cuda" if device.type == "cuda" else "cpu",
                              num_threads=args.num_threads, backend=args.backend)
    with torch.no_grad():
        r = evaluate(model, loader, device, expected_samples=int(manifest["num_samples"]))
    r.update(model=args.model, checkpoint=os.path.abspath(args.checkpoint), world_size=world, ema=args.ema,
             img_size=img_size, crop_pct=crop_pct, num_classes=num_classes, input_config=said)
    return r


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.cli.eval_detection import main_detection
    from stm_dist.engine.detection_weights import guess_task
    from stm_dist.engine.distributed import finish

    if (args.task or guess_task(args.checkpoint, warn=lambda m: None)) == "detection":
        return main_detection(args)

    try:
        r = run(args)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"stm-eval: {e}", file=sys.stderr)
        finish(1)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{r['model']}: top-1 {r['top1']:.3f}%  top-5 {r['top5']:.3f}%  loss {r['loss']:.4f}  "
              f"({r['samples']} images, {r['world_size']} process(es))", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
    finish(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
