"""stm-analyze: the paper's analyses of a model beyond accuracy, on the validation shards.

    stm-analyze invariance --type translation --model unified_swin_tiny --checkpoint swin_t.pth \\
        --data shards/ --out analysis/swin_tiny
    stm-analyze erf --model ... --checkpoint ... --data ... --out ... [--images 50]
    stm-analyze robustness --model ... --checkpoint ... --data ... --out ... [--eps 0 1/255 2/255 4/255]

invariance  top-1, top-5, consistency with the untransformed prediction and soft cross-entropy to
            it, per level of translation (jitter 0..64 px step 4, 8 directions, seeded per
            image), pre_rotation / post_rotation (0..90 deg step 5, before / after the centre
            crop) or scale (crop ratio 0.2..1.95 step 0.125) -> OUT/invariance_<type>.json + .png
erf         effective receptive field of the last stage over --images images resized to
            1024 x 1024 (RepLKNet's size; --img-size) -> OUT/erf.json (our area ratios and
            RepLKNet's, each defined in the file), erf.png (log-scaled heatmap), erf_map.npy
robustness  FGSM and PGD-l_inf (--pgd-steps, step eps/4, random start) per --eps
            -> OUT/robustness.json + .png; the headline is top-1 under each eps alone, the
            accumulated number (every budget <= eps) is kept as acc1_accumulated
all         the invariance types of --types, then erf, then robustness, in one process (each
            launch costs seconds of imports): the same files as the three commands

Every JSON records its provenance (data and manifest hash, checkpoint and weights hash, seed,
image size, limit, attack settings): stm-report compares only results whose settings match.
Invariance runs in fp32 (the original used AMP).

--checkpoint takes what stm-eval takes (our exports, a run directory or checkpoint folder, the
original release files), or `random` for an untrained model (timing, tests). Run it plainly or
under `torchrun` / `deepspeed` to split the images: every image counts once and the numbers
equal the single-process run's exactly.
"""
import argparse
import json
import os
import sys
import time


ERF_HELP = """The effective receptive field of the last stage: the input gradient of its central output
pixel, over --images validation images, each resized as a whole to --img-size x --img-size.

The default size is RepLKNet's 1024 px. At 224 px the last stage of these stride-32 models is
7 x 7 and the fields of most mixers reach the image border, so the 99% area ratio is ~1 for every
mixer and the comparison loses its power; at 1024 px (a 32 x 32 map) they stay inside. It costs
~21x the FLOPs of 224 px per image (a micro model on one CPU thread: 3-11 s per image), fine for
50 images on a GPU; batches default to 8 images to bound the activation memory.

erf.json holds two statistics at t = 0.2, 0.3, 0.5, 0.99 (definitions in the file):
  area_ratio           ours: |gradient| summed over images; the smallest square centred on the
                       map's centre of mass holding >= t of the raw total, as a fraction of H x W
  replknet_area_ratio  RepLKNet's analyze_erf.py: relu(gradient) averaged over images,
                       log10(x + 1), divided by its max; the first square of side 3, 5, ...
                       centred on the image whose share is > t (null: none short of the image)
"""


def build_parser():
    p = argparse.ArgumentParser(prog="stm-analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the subcommand
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="{invariance,erf,robustness,all}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="registered model name (stm_dist.models.list_models())")
    common.add_argument("--checkpoint", required=True, help=".pth file, run directory, checkpoint folder or 'random'")
    common.add_argument("--data", required=True, help="shard directory holding the validation split")
    common.add_argument("--out", required=True, help="folder for the JSON result and PNG plots")
    common.add_argument("--split", default="val")
    common.add_argument("--img-size", type=int, default=None,
                        help="input size (default 224; erf: 1024, see `stm-analyze erf --help`)")
    common.add_argument("--crop-pct", type=float, default=0.875,
                        help="centre-crop fraction of invariance and robustness (erf resizes the whole image)")
    common.add_argument("--limit", type=int, default=None, help="only the first N validation images")
    common.add_argument("--batch", type=int, default=None,
                        help="images per batch, the same batches on any number of processes (default 32; erf: 8)")
    common.add_argument("--num-threads", type=int, default=2, help="data loader worker processes")
    common.add_argument("--ema", action="store_true", help="the EMA weights of the checkpoint")
    common.add_argument("--num-classes", type=int, default=None, help="default: the shard manifest's class count")
    common.add_argument("--label-map", default=None, help="file of class indices when the head has more classes")
    common.add_argument("--seed", type=int, default=0, help="jitter directions, PGD starts, random init")
    common.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    inv = sub.add_parser("invariance", parents=[common], help="translation / rotation / scale invariance")
    inv.add_argument("--type", required=True, choices=["translation", "pre_rotation", "post_rotation", "scale"])
    erf = argparse.ArgumentParser(add_help=False)
    erf.add_argument("--images", type=int, default=50, help="validation images summed (default 50)")
    rob = argparse.ArgumentParser(add_help=False)
    rob.add_argument("--eps", nargs="+", default=None,
                     help="l_inf budgets in pixel units of [0, 1]; fractions accepted (default 0 1/255 2/255 4/255)")
    rob.add_argument("--pgd-steps", type=int, default=10)
    rob.add_argument("--pgd-step-size", default=None, help="default eps/4 (a number or fraction)")
    sub.add_parser("erf", parents=[common, erf], help="effective receptive field of the last stage",
                   description=ERF_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("robustness", parents=[common, rob], help="FGSM and PGD-l_inf accuracy vs eps")
    every = sub.add_parser("all", parents=[common, erf, rob],
                           help="invariance (--types), erf and robustness in one process")
    every.add_argument("--types", nargs="+", default=["translation"],
                       choices=["translation", "pre_rotation", "post_rotation", "scale"], help="invariance types")
    every.add_argument("--erf-img-size", type=int, default=None,
                       help="erf input size (default 1024, RepLKNet's: at 224 px the fields fill the image)")
    every.add_argument("--robustness-limit", type=int, default=None,
                       help="robustness images (default --limit): attacks cost many passes per image")
    return p


def with_defaults(args):
    """Fill the per-analysis defaults of --img-size and --batch (erf: 1024 px, batches of 8)."""
    from stm_dist.analysis.options import ERF_BATCH, ERF_IMG_SIZE

    erf = args.analysis == "erf"
    if args.img_size is None:
        args.img_size = ERF_IMG_SIZE if erf else 224
    if args.batch is None:
        args.batch = ERF_BATCH if erf else 32
    return args


def expand(args) -> list:
    """The single-analysis argument sets that `stm-analyze all` stands for (others: itself)."""
    if args.analysis != "all":
        return [with_defaults(args)]
    from stm_dist.analysis.options import ERF_IMG_SIZE

    base = {k: v for k, v in vars(args).items() if k not in ("analysis", "types", "erf_img_size", "robustness_limit")}
    out = [argparse.Namespace(**base, analysis="invariance", type=t) for t in args.types]
    out.append(argparse.Namespace(**dict(base, img_size=args.erf_img_size or ERF_IMG_SIZE), analysis="erf"))
    out.append(argparse.Namespace(**dict(base, limit=args.robustness_limit or args.limit), analysis="robustness"))
    return [with_defaults(a) for a in out]


def run(args, checked: dict | None = None) -> tuple[dict, list]:
    """Compute the analysis; on rank 0 write DIR/<name>.json and the plots. (result, files)."""
    import numpy as np

    from stm_dist.analysis import plots
    from stm_dist.analysis.options import check
    from stm_dist.analysis.runner import Normalized, ValImages, init_distributed, load_model
    from stm_dist.models.registry import resolve_name

    from stm_dist.cli.run_mixer import load_run_mixer

    from stm_dist.analysis.provenance import provenance

    args = with_defaults(args)
    checked = checked or check(args)
    if args.checkpoint != "random":
        load_run_mixer(args.checkpoint)  # a run of a mixer of one's own names its file in its recipe
    resolve_name(args.model)  # an unknown name fails before the process group starts
    manifest, eps, step = checked["manifest"], checked.get("eps"), checked.get("step_size")
    rank, world, device = init_distributed()
    # stm-eval's checkpoint resolution: exports (checked against their stm-export sidecar), run
    # directories and checkpoint folders (consolidated), original release files
    from stm_dist.cli.eval import _state_dict as eval_checkpoint

    source = "random" if args.checkpoint == "random" else eval_checkpoint(args)
    model = load_model(args.model, source, args.num_classes or int(manifest["num_classes"]), args.img_size,
                       use_ema=args.ema and not os.path.isdir(args.checkpoint), label_map=args.label_map,
                       seed=args.seed)
    model.requires_grad_(False).to(device)
    kw = dict(batch=args.batch, rank=rank, world=world, split=args.split, num_workers=args.num_threads, device=device)
    t0 = time.time()
    extra_files = {}
    if args.analysis == "invariance":
        from stm_dist.analysis.invariance import run_invariance
        from stm_dist.analysis.transforms import InvarianceViews

        views = InvarianceViews(args.type, args.img_size, args.crop_pct, seed=args.seed)
        data = ValImages(args.data, views, limit=args.limit, **kw)
        result = run_invariance(model, data, views, rank)
        name = f"invariance_{args.type}"
        settings = {"type": args.type, "levels": views.levels}
    elif args.analysis == "erf":
        from stm_dist.analysis.erf import erf_transform, run_erf

        tf = erf_transform(args.img_size)
        limit = min(args.images, args.limit) if args.limit else args.images
        data = ValImages(args.data, lambda img, i: tf(img), limit=limit, **kw)
        result = run_erf(model, data, rank)
        extra_files["erf_map.npy"] = result.pop("map")
        extra_files["erf_map_relu.npy"] = result.pop("map_relu")
        name = "erf"
        settings = {"images": args.images, "crop_pct": None,  # not cropped: the whole image resized
                    "input": "whole image resized to img_size x img_size (bicubic), as RepLKNet"}
    else:
        from torchvision import transforms as T

        from stm_dist.analysis.robustness import run_robustness
        from stm_dist.data.pil_reader import val_transform

        # the eval view without its Normalize: pixels in [0, 1]; Normalized() applies it
        tf = T.Compose(val_transform(args.img_size, args.crop_pct).transforms[:-1])
        data = ValImages(args.data, lambda img, i: tf(img), limit=args.limit, **kw)
        result = run_robustness(Normalized(model).to(device), data, eps, steps=args.pgd_steps, step_size=step,
                                seed=args.seed, rank=rank)
        name = "robustness"
        settings = {"attack": {"eps": sorted(set(eps)), "pgd_steps": args.pgd_steps,
                               "pgd_step_size": "eps/4" if step is None else step, "pgd_random_start": True,
                               "norm": "l_inf", "space": "pixels in [0, 1]"}}
    seconds = time.time() - t0
    result = {"model": args.model, **result, "checkpoint": args.checkpoint, "data": os.path.abspath(args.data),
              "img_size": args.img_size, "world_size": world, "seconds": seconds,
              "seconds_per_image": seconds / max(1, result["num_images"]),
              # hashing the checkpoint and weights: only the writer needs it
              "provenance": provenance(args, manifest, model, **settings) if rank == 0 else None}
    files = []
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        files.append(path)
        png = os.path.join(args.out, f"{name}.png")
        if name.startswith("invariance"):
            files.append(plots.invariance_figure([result], png))
        elif name == "erf":
            np.save(os.path.join(args.out, "erf_map.npy"), extra_files["erf_map.npy"])
            np.save(os.path.join(args.out, "erf_map_relu.npy"), extra_files["erf_map_relu.npy"])
            files += [os.path.join(args.out, "erf_map.npy"), os.path.join(args.out, "erf_map_relu.npy"),
                      plots.erf_figure([extra_files["erf_map.npy"]], [args.model], png)]
        else:
            files.append(plots.robustness_figure([result], png))
    return result, files


def _summary(r: dict) -> str:
    if "levels" in r:
        last = r["levels"][-1]
        return (f"standard top-1 {r['standard']['acc1']:.2f}%; at level {last['level']}: top-1 {last['acc1']:.2f}%, "
                f"consistency {last['consistency']:.2f}%")
    if "area_ratio" in r:
        theirs = r.get("replknet_area_ratio", {})
        return ("area ratio (ours) " + ", ".join(f"{k}: {v:.4f}" for k, v in r["area_ratio"].items())
                + "; RepLKNet's " + ", ".join(f"{k}: " + ("n/a" if v is None else f"{v:.4f}")
                                               for k, v in theirs.items()))
    pgd = [a for a in r["attacks"] if a["attack"] == "pgd"]
    return (f"clean top-1 {r['clean_acc1']:.2f}%; PGD at each eps alone "
            + ", ".join(f"eps {a['eps'] * 255:g}/255: {a['acc1']:.2f}%" for a in pgd))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stm_dist.analysis.options import AnalysisError, check
    from stm_dist.data.manifest import ShardError

    try:  # torch-free checks first: bad input is named at once, with no process group to end
        jobs = [(a, check(a)) for a in expand(args)]
    except (AnalysisError, ShardError) as e:
        print(f"stm-analyze: {e}", file=sys.stderr)
        return 1
    from stm_dist.engine.distributed import finish
    from stm_dist.models.pretrained import CheckpointError

    for job, checked in jobs:
        try:
            r, files = run(job, checked)
        except KeyError as e:  # unknown model: its message is the first argument
            print(f"stm-analyze: {e.args[0] if e.args else e}", file=sys.stderr)
            finish(1)
        except (FileNotFoundError, CheckpointError, ValueError, RuntimeError) as e:
            print(f"stm-analyze: {e}", file=sys.stderr)
            finish(1)
        if files:
            print(f"{r['model']} {job.analysis}: {_summary(r)} ({r['num_images']} images, {r['world_size']} "
                  f"process(es), {r['seconds']:.1f}s) -> {', '.join(files)}", flush=True)
    finish(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
