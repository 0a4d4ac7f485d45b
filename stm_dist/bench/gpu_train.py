"""One-GPU training img/s and peak memory: a plain PyTorch AMP loop against our engine (compile off/on).

For each model (default: every mixer's tiny model at 224², bf16, batch 128, ZeRO 1), in one
process, on synthetic batches made on the device once before timing:
  plain           the timm-style baseline: autocast forward, soft-target CE, backward, clip 5.0,
                  torch.optim.AdamW(fused=True), one optimizer step per batch;
  engine          stm_dist.engine.step.build_engine(..., compile=False): DeepSpeed, fp32 master
                  weights, autocast forward, the same loss, clip and AdamW settings;
  engine_compile  the same with compile=True.
Cases of one model are timed in interleaved rounds (plain, engine, ... then again), so drift of
the machine hits every mode alike; a mode's img/s is the median over its rounds. Peak memory is
torch.cuda.max_memory_allocated over a case's warm-up steps minus what was allocated before the
case was built (so the batches and other cases' weights are not counted).

Order = priority under --budget-s: the models in --compile-models get all three modes first (the
compile >= 1.2x eager check), then the other models plain+engine (the engine >= 0.95x plain check
for every mixer), then their compile cases, each started only while its predicted time still
fits. Results are rewritten to --json / --md after every group, so a run killed at its time limit
keeps what it finished.
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

MODES = ("plain", "engine", "engine_compile")
TINY = ("unified_convnext_tiny", "unified_swin_tiny", "unified_halo_tiny", "unified_pvt_tiny",
        "unified_dcn_v3_tiny")
ENGINE_MIN_RATIO, COMPILE_MIN_RATIO = 0.95, 1.2  # issue 10, "Must show"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--models", default=",".join(TINY), help="comma-separated registered model names")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--compile-models", default="unified_convnext_tiny,unified_swin_tiny",
                   help="models whose three modes run first, interleaved (the compile-ratio check)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per case first (compilation happens here)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU dry runs)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no group whose predicted time exceeds what is left of this (0: no limit)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every group)")
    p.add_argument("--md", default=None, help="write the markdown table here (rewritten after every group)")
    return p


def _fail(msg: str):
    raise SystemExit(f"stm-bench gpu_train: {msg}")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def soft_target_ce(logits, target):
    """timm's SoftTargetCrossEntropy in fp32, as stm_dist.engine.trainer computes it."""
    import torch

    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class PlainLoop:
    """The baseline a timm user would write: no DeepSpeed, fused torch AdamW, autocast forward."""

    def __init__(self, model, args, device):
        import torch

        from stm_dist.models import param_groups

        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Same decay/no-decay split and hyper-parameters as build_engine is given below.
        self.opt = torch.optim.AdamW(param_groups(self.model, weight_decay=0.05), lr=1e-3, fused=True)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.device_type = device.type
        # fp16 needs loss scaling (the original used timm's NativeScaler = torch GradScaler).
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None

    def train_step(self, micro_batches):
        import torch

        (x, t), = micro_batches
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(x)
        loss = soft_target_ce(logits, t)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 5.0, foreach=True)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, 5.0, foreach=True)
            self.scaler.step(self.opt)
            self.scaler.update()
        return loss.detach()


def _build(mode, model_name, args, device):
    import torch

    from stm_dist.models import create_model

    torch.manual_seed(0)  # every mode of a model starts from the same weights
    model = create_model(model_name, num_classes=args.num_classes, img_size=args.img_size)
    if mode == "plain":
        return PlainLoop(model, args, device)
    from stm_dist.engine.step import build_engine

    return build_engine(model, precision=args.precision, zero_stage=args.zero_stage,
                        global_batch=args.batch, micro_batch=args.batch, compile=mode == "engine_compile",
                        channels_last=args.channels_last, lr=1e-3, weight_decay=0.05, clip_grad=5.0)


def _batches(args, device, n=2):
    """Two distinct device-resident batches, alternated, so no step reuses its predecessor's input."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(1234)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    out = []
    for _ in range(n):
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
        t = torch.softmax(torch.randn(args.batch, args.num_classes, generator=g), dim=-1)
        out.append((x.to(device).contiguous(memory_format=fmt), t.to(device)))
    return out


def _run_steps(runner, batches, n, device):
    _sync(device)
    t0 = time.perf_counter()
    loss = None
    for i in range(n):
        loss = runner.train_step([batches[i % len(batches)]])
    _sync(device)
    return time.perf_counter() - t0, loss


def _free(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(model_name, mode, args, error=None, skipped=None) -> dict:
    return {"model": model_name, "mode": mode, "batch": args.batch, "img_size": args.img_size,
            "precision": args.precision, "zero_stage": None if mode == "plain" else args.zero_stage,
            "img_per_s": None, "img_per_s_rounds": [], "step_ms": None, "peak_mib": None,
            "first_step_s": None, "warmup_s": None, "build_s": None, "case_s": None, "loss": None,
            "error": error, "skipped": skipped}


def run_group(model_name, modes, args, device) -> list:
    """Build each mode's runner (warm-up and peak memory one at a time), then interleaved timing."""
    import torch

    cuda = device.type == "cuda"
    batches = _batches(args, device)
    rows, runners = [], {}
    for mode in modes:
        row = _row(model_name, mode, args)
        rows.append(row)
        try:
            _free(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if cuda else 0
            t0 = time.perf_counter()
            runner = _build(mode, model_name, args, device)
            row["build_s"] = round(time.perf_counter() - t0, 2)
            row["first_step_s"], _ = _run_steps(runner, batches, 1, device)
            rest, _ = _run_steps(runner, batches, max(args.warmup - 1, 0), device)
            row["warmup_s"] = row["first_step_s"] + rest
            if cuda:
                row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
            runners[mode] = runner
        except Exception as e:  # one failing mode (OOM, compile error) must not lose the others
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
    times = {m: [] for m in runners}
    for _ in range(args.rounds):
        for mode, runner in list(runners.items()):
            row = next(r for r in rows if r["mode"] == mode)
            try:
                dt, loss = _run_steps(runner, batches, args.steps, device)
                times[mode].append(dt)
                row["loss"] = float(loss)  # one host read per round, outside the timed window
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                traceback.print_exc()
                runners.pop(mode)
    for row in rows:
        ts = times.get(row["mode"])
        if ts and row["error"] is None:
            row["img_per_s_rounds"] = [round(args.steps * args.batch / t, 1) for t in ts]
            row["img_per_s"] = round(statistics.median(row["img_per_s_rounds"]), 1)
            row["step_ms"] = round(1000 * statistics.median(ts) / args.steps, 2)
            if row["loss"] is not None and not math.isfinite(row["loss"]):
                row["error"] = f"non-finite loss {row['loss']}"
        # Wall time this case cost (build, warm-up, its rounds): what the budget planner learns from.
        row["case_s"] = round((row["build_s"] or 0) + (row["warmup_s"] or 0) + sum(ts or []), 2)
    runners.clear()
    del batches
    _free(device)
    return rows


def ratios(rows) -> list:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ips = {r["mode"]: r["img_per_s"] for r in rows if r["model"] == model and r["img_per_s"]}
        e_p = round(ips["engine"] / ips["plain"], 3) if "engine" in ips and "plain" in ips else None
        c_e = round(ips["engine_compile"] / ips["engine"], 3) if "engine_compile" in ips and "engine" in ips else None
        out.append({"model": model, "engine_vs_plain": e_p, "engine_ok": None if e_p is None else e_p >= ENGINE_MIN_RATIO,
                    "compile_vs_eager": c_e, "compile_ok": None if c_e is None else c_e >= COMPILE_MIN_RATIO})
    return out


def _cell(v):
    return "—" if v is None else str(v)


def markdown(meta, rows) -> str:
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}, CUDA {meta['cuda']}, DeepSpeed "
             f"{meta['deepspeed']}; stm_dist._C CUDA kernel: {meta['c_cuda_kernel']}; {meta['precision']}, "
             f"batch {meta['batch']}, {meta['img_size']}², ZeRO {meta['zero_stage']}, channels_last "
             f"{meta['channels_last']}; {meta['rounds']} rounds x {meta['steps']} steps after {meta['warmup']} warm-up.",
             "", "| model | mode | img/s | per round | step ms | peak MiB | first step s | loss | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or r.get("skipped") or ""
        loss = None if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(f"| {r['model']} | {r['mode']} | {_cell(r['img_per_s'])} | "
                     f"{' / '.join(map(str, r['img_per_s_rounds'])) or '—'} | {_cell(r['step_ms'])} | "
                     f"{_cell(r['peak_mib'])} | {_cell(None if r['first_step_s'] is None else round(r['first_step_s'], 2))} | "
                     f"{_cell(loss)} | {note.replace('|', '/')} |")
    lines += ["", f"| model | engine / plain (need ≥ {ENGINE_MIN_RATIO}) | compile / eager (need ≥ {COMPILE_MIN_RATIO} for ConvNeXt, Swin) |",
              "|---|---|---|"]
    for q in ratios(rows):
        ok = {True: " ok", False: " BELOW", None: ""}
        lines.append(f"| {q['model']} | {_cell(q['engine_vs_plain'])}{ok[q['engine_ok']]} | "
                     f"{_cell(q['compile_vs_eager'])}{ok[q['compile_ok']]} |")
    return "\n".join(lines) + "\n"


def _meta(args, device):
    import torch

    meta = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "deepspeed": None, "c_cuda_kernel": None}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    try:
        from stm_dist.ops import kernel_available

        # Recorded with every number: the DCNv3 model falls back to the 5-10x slower reference
        # when _C lacks the CUDA kernel (or was built for another torch).
        meta["c_cuda_kernel"] = kernel_available("ms_deform_attn", "CUDA")
    except Exception as e:
        meta["c_cuda_kernel"] = f"error: {e}"
    meta.update({k: getattr(args, k) for k in ("batch", "img_size", "precision", "zero_stage", "channels_last",
                                                "steps", "rounds", "warmup", "num_classes")})
    return meta


def _plan(models, modes, compile_models):
    """Groups in priority order (see the module docstring)."""
    first = [m for m in models if m in compile_models]
    rest = [m for m in models if m not in compile_models]
    eager = [x for x in modes if x != "engine_compile"]
    groups = [(m, list(modes)) for m in first] + [(m, eager) for m in rest if eager]
    if "engine_compile" in modes:
        groups += [(m, ["engine_compile"]) for m in rest]
    return groups


def _predict(modes, seen):
    """Seconds a group should take: the slowest such case seen so far, with a margin; a guess
    before any was seen (compile of a tiny model is ~1 min cold on the GPU machine's 16 cores)."""
    per = [1.3 * max(seen[m]) if seen.get(m) else (90.0 if m == "engine_compile" else 25.0) for m in modes]
    return sum(per)


def _write(args, meta, rows):
    doc = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
    for path, text in ((args.json, json.dumps(doc, indent=1)), (args.md, markdown(meta, rows))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)  # a kill mid-write never leaves half a file


def run(args) -> int:
    t_start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        _fail(f"--modes: unknown mode(s) {bad or modes}; choose from {', '.join(MODES)}")
    for key in ("batch", "img_size", "steps", "rounds"):
        if getattr(args, key) < 1:
            _fail(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    import torch

    from stm_dist.models import list_models

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if unknown or not models:
        _fail(f"--models: unknown model(s) {unknown or models} (see stm_dist.models.list_models())")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # What the original's training sets, for every mode alike.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    engine_error = None
    if any(m != "plain" for m in modes):
        try:
            from stm_dist.engine.distributed import init

            init()  # a world of one; DeepSpeed's process group (nccl on the GPU, gloo on CPU)
        except Exception as e:  # no DeepSpeed (the bundle install failed): still measure the baseline
            engine_error = f"engine unavailable: {type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
    meta = _meta(args, device)
    rows, seen = [], {}
    compile_models = {m.strip() for m in args.compile_models.split(",")}
    queue = _plan(models, modes, compile_models)
    while queue:
        model_name, group = queue.pop(0)
        left = args.budget_s - (time.perf_counter() - t_start) if args.budget_s else math.inf
        need = _predict(group, seen)
        if need > left and "engine_compile" in group and len(group) > 1:
            # The eager pair matters for every mixer: run it now, the compile case at the end.
            queue.insert(0, (model_name, [m for m in group if m != "engine_compile"]))
            later = [i for i, (_, g) in enumerate(queue) if g == ["engine_compile"]]
            queue.insert(later[0] if later else len(queue), (model_name, ["engine_compile"]))
            continue
        run_now = [m for m in group if m == "plain"] if engine_error else group
        if run_now and need > left:
            rows += [_row(model_name, m, args, skipped=f"budget: {left:.0f} s left, ~{need:.0f} s needed")
                     for m in run_now]
            print(f"[gpu_train] skip {model_name} {run_now}: ~{need:.0f} s needed, {left:.0f} s left", flush=True)
        elif run_now:
            got = run_group(model_name, run_now, args, device)
            for r in got:
                seen.setdefault(r["mode"], []).append(r["case_s"])
                print(f"[gpu_train] {r['model']:24s} {r['mode']:15s} img/s {_cell(r['img_per_s']):>9s}  "
                      f"peak MiB {_cell(r['peak_mib']):>8s}  first step {r['first_step_s'] or 0:.1f} s  "
                      f"{r['error'] or ''}", flush=True)
            rows += got
        rows += [_row(model_name, m, args, error=engine_error) for m in group if m not in run_now]
        _write(args, meta, rows)
    print(markdown(meta, rows), flush=True)
    return 1 if any(r.get("error") for r in rows) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stm_dist.bench.gpu_train", description=__doc__.splitlines()[0])
    return run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
