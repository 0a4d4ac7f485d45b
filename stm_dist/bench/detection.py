"""`stm-bench detection`: training images/s of Mask R-CNN in our engine (the trainer's DeepSpeed
engine and step through the detection task) against a plain torch DDP loop on the same detector
and the same batches, N processes each under the real launcher; and inference images/s.

Both loops do the same work per step: set the LR, forward under the same autocast, sum the
detector's losses, backward, fused AdamW step (the recipe's: no clipping, mmdet's no-decay
groups). The micro-batches (demo-coco images through the detection input pipeline, or --data
shards) are made once before timing, so the number is the engine's cost, not the input's.
Inference: the trained model in eval mode over pre-made val batches (forward, and forward plus
the COCO results conversion evaluation does), all ranks together. Besides wall-clock numbers
the bench reports CPU seconds per step (mean over ranks) and the 1-minute load average: on a
shared box the wall clock also counts waiting to be scheduled.
"""
import argparse
import json
import os
import tempfile
import time

from stm_dist.bench.worker_launch import finish_worker, launch

MODES = ("torch", "zero0", "zero1", "zero2", "zero3")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="unified_convnext_micro", help="the detection backbone")
    p.add_argument("--head", default="slim", choices=["slim", "full"])
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--max-size", type=int, default=384)
    p.add_argument("--micro-batch", type=int, default=2, help="images per process per step")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--eval-images", type=int, default=16, help="val images timed in eval mode (all ranks)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the same autocast precision for the plain loop and the engine")
    p.add_argument("--modes", default="torch,zero2", help=f"comma-separated subset of {MODES}")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the modes round-robin this many times and report each mode's median (noisy machines)")
    p.add_argument("--data", default=None, help="detection shard dir (train + val); default: a demo-coco set")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _config(args, mode: str):
    from stm_dist import package_data
    from stm_dist.engine.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.model.name, cfg.model.task, cfg.model.drop_path_rate = args.model, "detection", 0.0
    cfg.detection.head, cfg.detection.short_sides, cfg.detection.max_size = args.head, [float(args.short_side)], args.max_size
    cfg.data.train_shards = cfg.data.val_shards = args.data
    cfg.data.num_threads, cfg.data.eval_batch = 1, args.micro_batch
    cfg.train.micro_batch = args.micro_batch
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad = 1e-4, 0.05, 0.0
    if mode != "torch":
        cfg.deepspeed.config = os.path.join(package_data.folder("ds_configs") or "ds_configs",
                                            f"{mode}_{args.precision}.json")
    return cfg


def _batches(task, rank, world, n):
    """This rank's first `n` training micro-batches (epochs roll over), its val batches and the
    categories."""
    loader = task.train_loader(rank, world, 1, "cpu")
    train = [loader.next_step()[0] for _ in range(n)]
    loader.close()
    val_loader = task.val_loader(rank, world, False)
    return train, list(val_loader), val_loader.categories


def _worker(args) -> dict:
    import torch

    from stm_dist.data.manifest import read_manifest
    from stm_dist.engine.distributed import init
    from stm_dist.engine.tasks.detection import DetectionTask

    mode = args.worker
    rank, world, device = init(use_deepspeed=mode != "torch")
    cfg = _config(args, mode)
    cfg.model.num_classes = int(read_manifest(args.data, "train")["num_classes"])
    cfg.train.global_batch = args.micro_batch * world
    task = DetectionTask(cfg)
    n = args.warmup + args.steps
    train, val, categories = _batches(task, rank, world, n)
    torch.manual_seed(0)  # identical initial weights on every rank and in every mode
    model = task.build_model()
    if mode == "torch":
        from stm_dist.engine.precision import Precision

        prec = Precision(args.precision)
        model = model.to(device)
        opt = torch.optim.AdamW(task.param_groups(model), lr=1e-4, eps=1e-8, fused=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)

        def step(images, targets):
            for g in opt.param_groups:
                g["lr"] = 1e-4
            with prec.autocast(device.type):
                losses = ddp(images.to(device, prec.input_dtype), targets)
            loss = sum(v.float() for v in losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()
    else:
        from stm_dist.engine import ds_setup
        from stm_dist.engine.step import StepRunner, prepare_model

        built = ds_setup.build(cfg, world, "cpu" if device.type == "cpu" else "cuda")
        model = prepare_model(model, world, channels_last=False)
        engine, opt = ds_setup.initialize(built, model, task.param_groups(model), cfg, task.fetch_units)
        runner = StepRunner(engine, opt, built, cfg.optim.clip_grad, device, task=task)

        def step(images, targets):
            for g in opt.param_groups:  # the trainer's Schedules.apply
                g["lr"] = 1e-4
            return runner.train_step([(images, targets)])

    for images, targets in train[:args.warmup]:
        step(images, targets)
    torch.distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for images, targets in train[args.warmup:]:
        last = step(images, targets)
    float(last)
    cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    torch.distributed.barrier()
    dt = time.perf_counter() - t0
    torch.distributed.all_reduce(cpu)
    r = {"mode": mode, "steps_per_s": args.steps / dt, "img_per_s": args.steps * args.micro_batch * world / dt,
         "cpu_s_per_step": float(cpu) / world / args.steps, "world_size": world, "precision": args.precision,
         "loss": float(last)}
    if mode != "torch":
        r.update(_inference(task, engine, built.zero_stage, val, categories, device, cfg))
    return r


def _inference(task, engine, zero_stage, val, categories, device, cfg) -> dict:
    """Eval-mode images/s of an fp32 copy of the trained weights, as evaluation runs it."""
    import torch

    from stm_dist.detection.coco_eval import to_coco_results
    from stm_dist.engine.run_eval import eval_copy

    model = eval_copy(cfg, engine.module, zero_stage, device, task=task).eval()
    out = {}
    for what, convert in (("infer_img_per_s", False), ("eval_img_per_s", True)):
        torch.distributed.barrier()
        t0, n = time.perf_counter(), 0
        with torch.no_grad():
            for images, targets in val:
                outputs = model(images.to(device), targets)
                if convert:
                    to_coco_results([{k: v.cpu() for k, v in o.items()} for o in outputs], targets, categories)
                n += len(targets)
        count = torch.tensor([float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(count)
        torch.distributed.barrier()
        out[what] = float(count) / (time.perf_counter() - t0)
    return out


def _demo_data(root: str, images: int, args) -> str:
    from data_tools.demo_coco import write_demo_coco
    from data_tools.writer import create_shards

    write_demo_coco(os.path.join(root, "coco"), train_images=images, val_images=args.eval_images, seed=0,
                    canvas_sizes=(args.short_side, args.max_size), digit_sizes=(32, min(96, args.short_side)))
    shards = os.path.join(root, "shards")
    for split in ("train", "val"):
        create_shards(os.path.join(root, "coco"), split, shards, samples_per_shard=1000, progress=False)
    return shards


def _launch(args, mode: str) -> dict:
    def forward(result):
        return ["--model", args.model, "--head", args.head, "--short-side", str(args.short_side), "--max-size",
                str(args.max_size), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup",
                str(args.warmup), "--precision", args.precision, "--data", args.data, "--worker", mode,
                "--result", result]

    return launch("stm_dist.bench.detection", args.procs, forward, f"stm-bench detection: {mode}")


def _median(rs: list, key: str) -> float:
    vals = sorted(r[key] for r in rs)
    return vals[len(vals) // 2]


def run(args):
    if args.worker:
        finish_worker(lambda: _worker(args), args.result)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"stm-bench detection: unknown mode(s) {bad}; choose from {MODES}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            # enough images for every rank's steps after the aspect groups drop their remainders
            args.data = _demo_data(tmp, 2 * (args.warmup + args.steps) * args.micro_batch * args.procs + 8, args)
        print(f"Mask R-CNN ({args.head} head) on {args.model}, short side {args.short_side} / long <= {args.max_size}, "
              f"{args.micro_batch} images x {args.procs} processes, {args.steps} timed steps after {args.warmup} "
              f"warm-up, {args.precision}; data {args.data}", flush=True)
        runs = {m: [] for m in modes}
        for rep in range(args.repeat):
            # each round starts one mode later: a load that rises or falls over the run (a shared
            # box) then favours no mode
            for m in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                r = _launch(args, m)
                r["load_avg_1min"] = os.getloadavg()[0]
                runs[m].append(r)
                infer = (f"  inference {r['infer_img_per_s']:6.2f} img/s (with COCO conversion "
                         f"{r['eval_img_per_s']:6.2f})" if "infer_img_per_s" in r else "")
                print(f"  [{rep + 1}/{args.repeat}] {m:6s} {r['img_per_s']:7.2f} img/s  {r['cpu_s_per_step']:6.3f} "
                      f"CPU s/step  load {r['load_avg_1min']:.1f}{infer}", flush=True)
    results = []
    for m in modes:
        med = dict(min(runs[m], key=lambda r: abs(r["img_per_s"] - _median(runs[m], "img_per_s"))),
                   all_img_per_s=[r["img_per_s"] for r in runs[m]], cpu_s_per_step=_median(runs[m], "cpu_s_per_step"),
                   all_cpu_s_per_step=[r["cpu_s_per_step"] for r in runs[m]])
        results.append(med)
    base = next((r for r in results if r["mode"] == "torch"), None)
    for r in results:
        if base and r is not base:
            r["slower_pct"] = 100.0 * (base["img_per_s"] / r["img_per_s"] - 1.0)
            r["cpu_overhead_pct"] = 100.0 * (r["cpu_s_per_step"] / base["cpu_s_per_step"] - 1.0)
            verdict = "within" if r["slower_pct"] <= 10.0 else "OVER"
            print(f"  {r['mode']}: {r['img_per_s'] / base['img_per_s']:.3f}x the plain torch loop's img/s "
                  f"({r['slower_pct']:+.1f}% time per step, {verdict} the 10% target; {r['cpu_overhead_pct']:+.1f}% "
                  f"CPU time per step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="stm-bench detection", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
