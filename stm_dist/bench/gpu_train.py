"""One-GPU training img/s and peak memory: a plain PyTorch AMP loop against our engine (compile off/on).

For each model (default: every mixer's tiny model at 224², bf16, batch 128, ZeRO 1), in one
process, on synthetic batches made on the device once before timing:
  plain           the timm-style baseline: autocast forward, soft-target CE, backward, clip 5.0,
                  torch.optim.AdamW(fused=True), one optimizer step per batch;
  engine          stm_dist.engine.step.build_engine(..., compile=False): DeepSpeed, fp32 master
                  weights, autocast forward, the same loss, clip and AdamW settings;
  engine_compile  the same with compile=True.
The modes of one group are timed in interleaved rounds (plain, engine, ... then again), so drift
of the machine hits every mode alike; a mode's img/s is the median over its rounds. Peak memory is
torch.cuda.max_memory_allocated over a case's warm-up steps minus what was allocated before the
case was built (so the batches and other cases' weights are not counted).

Order = priority under --budget-s: first the eager modes (plain + engine) of every model, in the
order of --models (DCNv3, the one model that runs the compiled CUDA op, first), then
engine_compile of the --compile-models, then of the others; a group is started only while its
predicted time still fits. --json / --md are rewritten whenever a number is measured (each case's
warm-up, each round), so a run killed at any moment keeps everything measured until then;
--append adds to a file of an earlier run with the same settings (a later compile-only run).
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback

from ._gpu_train_table import cell, load_for_append, markdown, write

MODES = ("plain", "engine", "engine_compile")
TINY = ("unified_dcn_v3_tiny", "unified_convnext_tiny", "unified_swin_tiny", "unified_pvt_tiny",
        "unified_halo_tiny")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--models", default=",".join(TINY), help="comma-separated registered model names, in the order run")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--compile-models", default="unified_convnext_tiny,unified_swin_tiny",
                   help="models whose engine_compile runs before the others' (the compile-ratio check)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per case first (compilation happens here)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--ds-config", default=None,
                   help="a DeepSpeed JSON for the engine modes instead of the shipped ds_configs/zero{stage}_"
                        "{precision}.json (its stage and precision then apply to them)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU dry runs)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no group whose predicted time exceeds what is left of this (0: no limit)")
    p.add_argument("--json", default=None, help="write the results here (rewritten whenever a number is measured)")
    p.add_argument("--md", default=None, help="write the markdown table here (rewritten with the JSON)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --json (an earlier run with the same settings) and add to them")
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
                        channels_last=args.channels_last, lr=1e-3, weight_decay=0.05, clip_grad=5.0,
                        ds_config=args.ds_config)


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
            "error": error, "skipped": skipped,
            "state": "failed" if error else ("skipped" if skipped else "measuring")}


def _error(row, e):
    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    row["state"] = "failed"
    traceback.print_exc()


def _timings(row, ts, args):
    """img/s and step time from the rounds so far (called after every round)."""
    row["img_per_s_rounds"] = [round(args.steps * args.batch / t, 1) for t in ts]
    row["img_per_s"] = round(statistics.median(row["img_per_s_rounds"]), 1)
    row["step_ms"] = round(1000 * statistics.median(ts) / args.steps, 2)
    # Wall time this case cost (build, warm-up, its rounds): what the budget planner learns from.
    row["case_s"] = round((row["build_s"] or 0) + (row["warmup_s"] or 0) + sum(ts), 2)


def run_group(model_name, modes, args, device, rows, save) -> list:
    """Build each mode's runner (warm-up and peak memory one at a time), then interleaved timing.
    The group's rows go into `rows` at once; `save()` is called whenever one of them changes."""
    import torch

    cuda = device.type == "cuda"
    batches = _batches(args, device)
    group, runners = [_row(model_name, mode, args) for mode in modes], {}
    rows += group
    save()
    for row in group:
        try:
            _free(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if cuda else 0
            t0 = time.perf_counter()
            runner = _build(row["mode"], model_name, args, device)
            row["build_s"] = round(time.perf_counter() - t0, 2)
            if row["mode"] != "plain":  # what the engine runs at (a --ds-config may set them)
                row["zero_stage"], row["precision"] = runner.zero_stage, runner.precision.name
            row["first_step_s"], _ = _run_steps(runner, batches, 1, device)
            rest, _ = _run_steps(runner, batches, max(args.warmup - 1, 0), device)
            row["warmup_s"] = row["first_step_s"] + rest
            row["case_s"] = round(row["build_s"] + row["warmup_s"], 2)
            if cuda:
                row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
            runners[row["mode"]] = runner
        except Exception as e:  # one failing mode (OOM, compile error) must not lose the others
            _error(row, e)
        save()
    times = {m: [] for m in runners}
    for _ in range(args.rounds):
        for mode, runner in list(runners.items()):
            row = next(r for r in group if r["mode"] == mode)
            try:
                dt, loss = _run_steps(runner, batches, args.steps, device)
                times[mode].append(dt)
                row["loss"] = float(loss)  # one host read per round, outside the timed window
                _timings(row, times[mode], args)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"non-finite loss {row['loss']}")
            except Exception as e:
                _error(row, e)
                runners.pop(mode)
            save()
    for row in group:
        if row["state"] == "measuring":
            row["state"] = "done"
    runners.clear()
    del batches
    _free(device)
    save()
    return group


def _meta(args, device):
    import torch

    meta = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "deepspeed": None, "c_cuda_kernel": None, "ds_config": args.ds_config}
    try:  # the installed version, without importing DeepSpeed (seconds) before it is needed
        from importlib.metadata import version

        meta["deepspeed"] = version("deepspeed")
    except Exception:
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
    eager = [x for x in modes if x != "engine_compile"]
    groups = [(m, eager) for m in models] if eager else []
    if "engine_compile" in modes:
        first = [m for m in models if m in compile_models]
        groups += [(m, ["engine_compile"]) for m in first + [m for m in models if m not in first]]
    return groups


def _predict(modes, seen):
    """Seconds a group should take: the slowest such case seen so far, with a margin; a guess
    before any was seen (compile of a tiny model is ~1 min cold on the GPU machine's 16 cores)."""
    return sum(1.3 * max(seen[m]) if seen.get(m) else (90.0 if m == "engine_compile" else 25.0) for m in modes)


def _init_engine():
    """The process group the engine needs (a world of one; nccl on the GPU, gloo on CPU). None, or
    why the engine cannot run (no DeepSpeed: the bundle install failed): the baseline still runs."""
    try:
        from stm_dist.engine.distributed import init

        init()
        return None
    except Exception as e:
        traceback.print_exc()
        return f"engine unavailable: {type(e).__name__}: {e}".splitlines()[0][:300]


def run(args) -> int:
    t_start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        _fail(f"--modes: unknown mode(s) {bad or modes}; choose from {', '.join(MODES)}")
    for key in ("batch", "img_size", "steps", "rounds"):
        if getattr(args, key) < 1:
            _fail(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.ds_config and not os.path.isfile(args.ds_config):
        _fail(f"--ds-config: no such file {args.ds_config}")
    if args.append and not args.json:
        _fail("--append needs --json (the file to add to)")
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
    meta = _meta(args, device)
    rows = load_for_append(args.json, meta) if args.append else []
    new = len(rows)  # the exit status speaks for this run's rows only

    def save():
        write(args.json, args.md, meta, rows)

    seen, engine = {}, {}
    for model_name, group in _plan(models, modes, {m.strip() for m in args.compile_models.split(",")}):
        left = args.budget_s - (time.perf_counter() - t_start) if args.budget_s else math.inf
        need = _predict(group, seen)
        if need > left:
            rows += [_row(model_name, m, args, skipped=f"budget: {max(left, 0):.0f} s left, ~{need:.0f} s needed")
                     for m in group]
            print(f"[gpu_train] skip {model_name} {group}: ~{need:.0f} s needed, {max(left, 0):.0f} s left", flush=True)
            save()
            continue
        if "error" not in engine and any(m != "plain" for m in group):
            engine["error"] = _init_engine()  # first use only: a run whose engine cases all skip never pays
        run_now = [m for m in group if m == "plain"] if engine.get("error") else group
        rows += [_row(model_name, m, args, error=engine.get("error")) for m in group if m not in run_now]
        if run_now:
            for r in run_group(model_name, run_now, args, device, rows, save):
                seen.setdefault(r["mode"], []).append(r["case_s"] or 0)
                print(f"[gpu_train] {r['model']:24s} {r['mode']:15s} img/s {cell(r['img_per_s']):>9s}  "
                      f"peak MiB {cell(r['peak_mib']):>8s}  first step {r['first_step_s'] or 0:.1f} s  "
                      f"{r['error'] or ''}", flush=True)
        save()
    print(markdown(meta, rows), flush=True)
    return 1 if any(r.get("error") for r in rows[new:]) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stm_dist.bench.gpu_train", description=__doc__.splitlines()[0])
    return run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
