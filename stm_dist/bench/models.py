"""Forward+backward throughput and peak memory of the unified models, eager and compiled.

Each (model, mode) case runs in a fresh process so that peak memory and compile caches of one
case never leak into the next. On CPU the peak is the measuring process's high-water RSS
(parameters, activations, compiler and runtime included); on CUDA it is
`torch.cuda.max_memory_allocated`. Writes `<out-dir>/models.csv` and `<out-dir>/models.png`.

With `--original CHECKOUT` (a checkout of OpenGVLab/STM-Evaluation; env STM_ORIGINAL) each model
is also timed against the original code in the same process: both models get the same weights,
their eager forward+backward steps are interleaved round by round and the medians compared
(`<out-dir>/compare.csv`). Without a usable checkout the bench says so and times ours only.
"""
import argparse
import csv
import fnmatch
import multiprocessing as mp
import os
import resource
import time

MODES = ("eager", "compiled")
FIELDS = ("model", "mode", "device", "threads", "batch", "img_size", "params_m", "img_per_s",
          "step_ms", "first_step_s", "peak_mem_mib", "error")
COMPARE_FIELDS = ("model", "device", "threads", "batch", "img_size", "rounds", "iters", "ours_ms",
                  "original_ms", "speedup", "max_abs_diff", "note", "error")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--models", default="unified_*_micro",
                   help="comma-separated names or shell patterns (default: the five micro models)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224, help="a multiple of 32")
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", default="bench_out/models", help="where models.csv / models.png go")
    p.add_argument("--original", default=os.environ.get("STM_ORIGINAL"),
                   help="checkout of OpenGVLab/STM-Evaluation to time against (env STM_ORIGINAL)")
    p.add_argument("--original-timm", default=os.environ.get("STM_ORIGINAL_TIMM"),
                   help="folder holding timm 0.6.x for the original's imports, e.g. from "
                        "`pip install --no-deps --target DIR timm==0.6.7` (env STM_ORIGINAL_TIMM)")
    p.add_argument("--rounds", type=int, default=5,
                   help="with --original: interleaved rounds of --iters steps per model (medians)")
    return p


def _expand(patterns: str) -> list:
    from stm_dist.models import list_models

    names, known = [], list_models()
    for pat in filter(None, (s.strip() for s in patterns.split(","))):
        hits = [n for n in known if fnmatch.fnmatch(n, pat)] if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise SystemExit(f"stm-bench models: --models pattern {pat!r} matches no registered model")
        names += [n for n in hits if n not in names]
    return names


def _measure(case: dict) -> dict:
    """One case, run inside its own process."""
    import torch
    import torch.nn.functional as F

    from stm_dist.models import create_model

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    dev = torch.device(case["device"])
    torch.manual_seed(0)
    model = create_model(case["model"]).to(dev).train()
    row = dict(case, threads=torch.get_num_threads(),
               params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3))
    x = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=dev)
    y = torch.randint(0, 1000, (case["batch"],), device=dev)
    fn = torch.compile(model) if case["mode"] == "compiled" else model

    def step():
        F.cross_entropy(fn(x), y).backward()
        for p in model.parameters():
            p.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    row["first_step_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(case["warmup"] - 1):
        step()
    t0 = time.perf_counter()
    for _ in range(case["iters"]):
        step()
    dt = (time.perf_counter() - t0) / case["iters"]
    row["step_ms"] = round(1e3 * dt, 2)
    row["img_per_s"] = round(case["batch"] / dt, 2)
    if dev.type == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # ru_maxrss is in KiB on Linux
        row["peak_mem_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _timed_rounds(steps: dict, rounds: int, iters: int) -> dict:
    """Median seconds per step of each callable, rounds interleaved (order flipped every round)
    so that load drifting on a shared machine hits every contender alike."""
    import statistics

    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[k]()
            times[k].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def _compare(case: dict) -> dict:
    """Ours vs the original, same weights, same process (eager)."""
    import torch
    import torch.nn.functional as F

    from stm_dist.bench.original import OriginalUnavailable, load_factory
    from stm_dist.models import create_model

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    dev = torch.device(case["device"])
    torch.manual_seed(0)
    models = {"ours": create_model(case["model"]).to(dev)}
    row = dict(case, threads=torch.get_num_threads())
    try:
        orig = load_factory(case["original"], case["model"], case["original_timm"])()
        orig.load_state_dict(models["ours"].state_dict(), strict=True)
        models["original"] = orig.to(dev)
    except OriginalUnavailable as e:
        row["note"] = f"original not compared: {e}"
    x = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=dev)
    y = torch.randint(0, 1000, (case["batch"],), device=dev)
    if "original" in models:  # same function? (eval mode: no drop-path, BN running stats)
        with torch.no_grad():
            outs = [m.eval()(x) for m in models.values()]
        row["max_abs_diff"] = f"{(outs[0] - outs[1]).abs().max().item():.2e}"

    def make_step(model):
        def step():
            F.cross_entropy(model(x), y).backward()
            for p in model.parameters():
                p.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return step

    steps = {k: make_step(m.train()) for k, m in models.items()}
    for _ in range(case["warmup"]):
        for step in steps.values():
            step()
    med = _timed_rounds(steps, case["rounds"], case["iters"])
    row["ours_ms"] = round(1e3 * med["ours"], 2)
    if "original" in med:
        row["original_ms"] = round(1e3 * med["original"], 2)
        row["speedup"] = round(med["original"] / med["ours"], 3)
    return row


def _child(case, queue):
    try:
        queue.put(_compare(case) if case.get("compare") else _measure(case))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other cases still run
        queue.put(dict(case, error=f"{type(e).__name__}: {e}".replace("\n", " ")[:300]))


def _run_isolated(case: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(case, queue))
    proc.start()
    try:
        row = queue.get()
    finally:
        proc.join()
    if proc.exitcode not in (0, None) and not row.get("error"):
        row["error"] = f"measuring process exited with {proc.exitcode}"
    return row


def _write_csv(rows: list, path: str, fields=FIELDS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(models) * 2), 4.5))
    width = 0.8 / max(1, len(modes))
    for ax, key, label in ((axes[0], "img_per_s", "forward+backward img/s"),
                           (axes[1], "peak_mem_mib", "peak memory (MiB)")):
        for k, mode in enumerate(modes):
            vals = [next((r.get(key) or 0 for r in rows if r["model"] == m and r["mode"] == mode), 0)
                    for m in models]
            ax.bar([i + k * width for i in range(len(models))], vals, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(models))])
        ax.set_xticklabels([m.replace("unified_", "") for m in models], rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"{r0['device']} x{r0.get('threads', '?')} threads, batch {r0['batch']}, "
                 f"{r0['img_size']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    if args.img_size % 32:
        raise SystemExit(f"stm-bench models: --img-size must be a multiple of 32, got {args.img_size}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"stm-bench models: unknown --modes {bad}; choose from {MODES}")
    os.makedirs(args.out_dir, exist_ok=True)
    names = _expand(args.models)
    from stm_dist.bench.original import check_checkout

    why = check_checkout(args.original)
    if why is None:
        return _run_compare(args, names)
    print(f"stm-bench models: original code not available ({why}); timing ours only. "
          "See docs/perf.md for how to compare against the original.", flush=True)
    rows = []
    csv_path = os.path.join(args.out_dir, "models.csv")
    for name in names:
        for mode in modes:
            case = dict(model=name, mode=mode, device=args.device, threads=args.threads,
                        batch=args.batch, img_size=args.img_size, iters=args.iters,
                        warmup=max(1, args.warmup))
            row = _run_isolated(case)
            rows.append(row)
            print(f"{name:28s} {mode:9s} " + (f"ERROR {row['error']}" if row.get("error") else
                  f"{row['img_per_s']:9.2f} img/s  {row['step_ms']:9.1f} ms/step  "
                  f"peak {row['peak_mem_mib']:8.1f} MiB  first step {row['first_step_s']:.1f} s"),
                  flush=True)
            _write_csv(rows, csv_path)  # after every case: an interrupted run keeps what it measured
    png_path = os.path.join(args.out_dir, "models.png")
    write_plot(rows, png_path)
    print(f"wrote {csv_path} and {png_path}")
    return 1 if any(r.get("error") for r in rows) else 0


def _run_compare(args, names: list) -> int:
    rows = []
    csv_path = os.path.join(args.out_dir, "compare.csv")
    print(f"stm-bench models: ours vs the original at {args.original} (eager forward+backward, "
          f"batch {args.batch}, {args.img_size} px, median of {args.rounds} interleaved rounds "
          f"x {args.iters} steps; speedup = original / ours)", flush=True)
    for name in names:
        case = dict(model=name, device=args.device, threads=args.threads, batch=args.batch,
                    img_size=args.img_size, iters=args.iters, warmup=max(1, args.warmup),
                    rounds=max(1, args.rounds), original=os.path.abspath(args.original),
                    original_timm=args.original_timm and os.path.abspath(args.original_timm),
                    compare=True)
        row = _run_isolated(case)
        rows.append(row)
        if row.get("error"):
            line = f"ERROR {row['error']}"
        elif row.get("original_ms"):
            line = (f"ours {row['ours_ms']:9.1f} ms  original {row['original_ms']:9.1f} ms  "
                    f"{row['speedup']:.3f}x  max|diff| {row['max_abs_diff']}")
        else:
            line = f"ours {row['ours_ms']:9.1f} ms  ({row['note']})"
        print(f"{name:28s} {line}", flush=True)
        _write_csv(rows, csv_path, COMPARE_FIELDS)
    print(f"wrote {csv_path}")
    return 1 if any(r.get("error") for r in rows) else 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="stm-bench models", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))
