"""`stm-bench train`: optimizer steps/s of our engine (stm_dist.engine.step, DeepSpeed ZeRO 0-3)
against a plain torch DDP loop on the same model and the same batches, N processes each, real
launcher.

Both loops do the same work per step: set the LR, forward under the same autocast, soft-target
CE, backward, clip to 5.0, fused AdamW step, SyncBatchNorm in both. Batches are made once
before timing (random tensors, or real ones from --data shards), so the number is the
engine's cost, not the input pipeline's.

A mode may name its own DeepSpeed JSON, `zero3:ds_configs/variants/zero3_fp32_per_module.json`,
to time two settings of one stage side by side. Besides wall-clock steps/s the bench reports
CPU seconds per step (process time, mean over ranks): on a box shared with other jobs the wall
clock counts the time a rank waits to be scheduled, the CPU time mostly does not.
"""
import argparse
import json
import os
import time

from stm_dist.bench.worker_launch import finish_worker, launch

MODES = ("torch", "zero0", "zero1", "zero2", "zero3")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="unified_convnext_micro")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=32, help="per process")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="the same autocast precision for the plain loop and the engine")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {MODES}; a ZeRO mode may name its DeepSpeed JSON: zero3:PATH")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the modes round-robin this many times and report each mode's median (noisy machines)")
    p.add_argument("--data", default=None, help="shard dir: time on real training batches instead of random ones")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", default=None,
                   help="cProfile rank 0's timed steps into PATH.<mode>.prof (one mode's overhead, by function)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ds-config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _batches(args, rank, world, n):
    import torch

    if args.data:
        from stm_dist.data import build_train_loader

        loader = build_train_loader(args.data, args.micro_batch, rank=rank, world_size=world,
                                    img_size=args.img_size, num_threads=1, randaug=False)
        out = []
        while len(out) < n:
            for x, y in loader:
                out.append((x, y % args.num_classes))
                if len(out) == n:
                    break
        return out
    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(args.micro_batch, 3, args.img_size, args.img_size, generator=g),
             torch.randint(0, args.num_classes, (args.micro_batch,), generator=g)) for _ in range(n)]


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from stm_dist.engine.distributed import init
    from stm_dist.engine.precision import Precision
    from stm_dist.engine.step import build_engine, prepare_model, soft_target_cross_entropy
    from stm_dist.models import create_model
    from stm_dist.models.param_groups import param_groups

    mode = args.worker.split(":", 1)[0]
    rank, world, device = init(use_deepspeed=mode != "torch")
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    n = args.warmup + args.steps
    batches = [(x, F.one_hot(y, args.num_classes).float()) for x, y in _batches(args, rank, world, n)]
    prec = Precision(args.precision)

    if mode == "torch":
        # The timm-style baseline: DDP, autocast forward, fused AdamW, clipping; the same
        # SyncBatchNorm as the engine so both do the same collectives per micro-step.
        model = prepare_model(model, world, channels_last=False).to(device)
        groups = param_groups(model, weight_decay=0.05)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(groups, lr=1e-3, eps=1e-8, fused=True)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(i, x, t):
            for g in opt.param_groups:
                g["lr"] = 1e-3
            with prec.autocast(device.type):
                logits = ddp(x.to(device))
            loss = soft_target_cross_entropy(logits, t.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=True)
            opt.step()
            return loss.detach()
    else:
        runner = build_engine(model, precision=args.precision, zero_stage=int(mode[-1]),
                              global_batch=args.micro_batch * world, micro_batch=args.micro_batch,
                              channels_last=False, lr=1e-3, ds_config=args.ds_config)

        def step(i, x, t):
            return runner.train_step([(x, t)])

    for i in range(args.warmup):
        step(i, *batches[i])
    torch.distributed.barrier()
    prof = None
    if args.profile and rank == 0:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.warmup, n):
        last = step(i, *batches[i])
    float(last)  # the steps are asynchronous on a GPU: wait for the last one
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    torch.distributed.barrier()
    dt = time.perf_counter() - t0
    torch.distributed.all_reduce(cpu)
    return {"mode": args.worker, "steps_per_s": args.steps / dt, "img_per_s": args.steps * args.micro_batch * world / dt,
            "cpu_s_per_step": float(cpu) / world / args.steps, "world_size": world, "precision": args.precision}


def _launch(args, mode: str) -> dict:
    def forward(result):
        fwd = ["--model", args.model, "--img-size", str(args.img_size), "--num-classes", str(args.num_classes),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--precision", args.precision, "--worker", mode, "--result", result]
        if ":" in mode:
            fwd += ["--ds-config", mode.split(":", 1)[1]]
        if args.profile:
            tag = mode.replace(":", "_").replace("/", "_").replace(".json", "")
            fwd += ["--profile", os.path.abspath(f"{args.profile}.{tag}.prof")]
        if args.data:
            fwd += ["--data", args.data]
        return fwd

    return launch("stm_dist.bench.train", args.procs, forward, f"stm-bench train: {mode}")


def run(args):
    if args.worker:
        finish_worker(lambda: _worker(args), args.result)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m.split(":", 1)[0] not in MODES]
    if bad:
        raise SystemExit(f"stm-bench train: unknown mode(s) {bad}; choose from {MODES} (a ZeRO mode may add :PATH)")
    for m in modes:
        if ":" in m:
            stage, path = m.split(":", 1)
            _check_mode_config(stage, path, args.precision)
    print(f"{args.model} @ {args.img_size}px, micro-batch {args.micro_batch} x {args.procs} processes, "
          f"{args.steps} timed steps after {args.warmup} warm-up ({args.precision} for DeepSpeed)")
    runs = {m: [] for m in modes}
    for rep in range(args.repeat):
        for m in modes:
            r = _launch(args, m)
            runs[m].append(r)
            r["load_avg_1min"] = os.getloadavg()[0]  # how shared the box was (noisy machines)
            print(f"  [{rep + 1}/{args.repeat}] {m:6s} {r['steps_per_s']:7.3f} steps/s  {r['img_per_s']:8.1f} img/s"
                  f"  {r['cpu_s_per_step']:6.3f} CPU s/step  load {r['load_avg_1min']:.1f}", flush=True)
    results = []
    for m in modes:
        ordered = sorted(runs[m], key=lambda r: r["steps_per_s"])
        cpus = sorted(r["cpu_s_per_step"] for r in runs[m])
        med = dict(ordered[len(ordered) // 2], all_steps_per_s=[r["steps_per_s"] for r in runs[m]],
                   cpu_s_per_step=cpus[len(cpus) // 2], all_cpu_s_per_step=[r["cpu_s_per_step"] for r in runs[m]])
        results.append(med)
        if args.repeat > 1:
            print(f"  median {m:6s} {med['steps_per_s']:7.3f} steps/s  {med['cpu_s_per_step']:6.3f} CPU s/step")
    base = next((r for r in results if r["mode"] == "torch"), None)
    if base:
        for r in results:
            if r["mode"] != "torch":
                r["overhead_pct"] = 100.0 * (base["steps_per_s"] / r["steps_per_s"] - 1.0)
                r["cpu_overhead_pct"] = 100.0 * (r["cpu_s_per_step"] / base["cpu_s_per_step"] - 1.0)
                print(f"  {r['mode']}: {r['overhead_pct']:+.1f}% time per step, {r['cpu_overhead_pct']:+.1f}% CPU time "
                      f"per step vs the plain torch loop")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _check_mode_config(stage: str, path: str, precision: str):
    """A mode's own JSON must exist and be of the mode's stage and --precision: one line naming
    both, not a traceback from inside the launched ranks."""
    from stm_dist.engine import ds_setup
    from stm_dist.engine.config import ConfigError

    if stage == "torch":
        raise SystemExit(f"stm-bench train: mode 'torch:{path}': the plain torch loop takes no DeepSpeed JSON")
    try:
        raw = ds_setup.load_json(path)
    except ConfigError as e:
        raise SystemExit(f"stm-bench train: mode '{stage}:{path}': {e}") from None
    found, prec = ds_setup.zero_stage(raw), ds_setup.precision_name(raw)
    if prec != precision:
        raise SystemExit(f"stm-bench train: mode '{stage}:{path}': the file's mixed_precision.dtype is {prec!r} but "
                         f"--precision is {precision!r}; pass --precision {prec} or a {precision} file")
    if found != int(stage[-1]):
        raise SystemExit(f"stm-bench train: mode '{stage}:{path}': the file is ZeRO stage {found}; "
                         f"write it as zero{found}:{path}")


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="stm-bench train", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
