"""Run under the real `deepspeed` launcher (or as one plain process) by test_precision.py.

One process group, many engines: each check builds a fresh engine with the trainer's own
code path (stm_dist.engine.step.build_engine) on the real digits images, so the 2-process
launch is paid once. Rank 0 writes what it measured to the JSON file named by --out.
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from stm_dist.engine.distributed import finish, init
from stm_dist.engine.ema import ShardedEMA
from stm_dist.engine.step import build_engine
from stm_dist.models import create_model

MODEL = "unified_convnext_micro"


def digits(n: int, size: int = 32):
    """The real scikit-learn digits, upsampled: (images, one-hot targets) in a fixed order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.25
    y = F.one_hot(torch.tensor(d.target[:n]), 10).float()
    return x, y


def fresh_model():
    torch.manual_seed(0)
    return create_model(MODEL, num_classes=10, img_size=32, drop_path_rate=0.0)


def my_half(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def train(precision, stage, steps, batch, rank, world, ema=None, on_step=None):
    x, y = digits(steps * batch)
    runner = build_engine(fresh_model(), precision=precision, zero_stage=stage, global_batch=batch,
                          micro_batch=batch // world, channels_last=False, lr=2e-3)
    e = ShardedEMA(runner.engine.module, ema, stage, rank, world) if ema else None
    losses = []
    if on_step is not None:
        on_step(runner, e, start=True)
    for s in range(steps):
        xb = my_half(x[s * batch:(s + 1) * batch], rank, world)
        yb = my_half(y[s * batch:(s + 1) * batch], rank, world)
        loss = runner.train_step([(xb, yb)])
        torch.distributed.all_reduce(loss)
        losses.append(float(loss) / world)
        if e is not None:
            e.update()
        if on_step is not None:
            on_step(runner, e)
    return runner, e, losses


def branches_visible(runner) -> float:
    """Max |logits - logits with every layer-scale branch zeroed| in the training precision."""
    import deepspeed

    eng = runner.engine
    eng.eval()
    x, _ = digits(8)
    with torch.no_grad(), runner.precision.autocast("cpu"):
        full = eng(x.to(runner.precision.input_dtype)).float()
    # At ZeRO 3 the gammas live inside their blocks' flat tensors (engine/flat_params.py):
    # find them by the model's own names in the gathered weights and zero them in place.
    from stm_dist.engine.flat_params import unflatten

    params = list(eng.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if runner.zero_stage == 3 else contextlib.nullcontext()
    with ctx, torch.no_grad():
        named = unflatten(eng.module, {n: p.data for n, p in eng.module.named_parameters()})
        gammas = [t for n, t in named.items() if "gamma" in n]
        assert gammas, "no layer-scale gammas found"
        for g in gammas:
            g.zero_()
    with torch.no_grad(), runner.precision.autocast("cpu"):
        bare = eng(x.to(runner.precision.input_dtype)).float()
    return float((full - bare).abs().max())


def param_dtypes(runner):
    out = set()
    for p in runner.engine.module.parameters():
        out.add(str((p.ds_tensor if hasattr(p, "ds_tensor") else p).dtype))
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--checks", default="modes,track,ema")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    rank, world, _ = init()
    checks = args.checks.split(",")
    res = {"world": world, "seconds": {}}
    t0 = time.perf_counter()

    def timed(name):  # what each check cost, for whoever next trims the suite
        nonlocal t0
        res["seconds"][name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    if "modes" in checks:
        for stage in (1, 2, 3):
            for prec in ("bf16", "fp16"):
                runner, _, losses = train(prec, stage, 2, 16, rank, world)
                res[f"z{stage}_{prec}"] = {"dtypes": param_dtypes(runner), "losses": losses,
                                           "visible": branches_visible(runner)}
        runner, _, _ = train("pure_bf16", 1, 1, 16, rank, world)
        res["z1_pure_bf16"] = {"dtypes": param_dtypes(runner), "visible": branches_visible(runner)}
        timed("modes")

    if "track" in checks:
        for prec in ("fp32", "bf16"):
            res[f"track_{prec}"] = train(prec, 1, 30, 16, rank, world)[2]
        timed("track")

    if "ema" in checks:
        from deepspeed.utils import safe_get_full_fp32_param

        ref, errs = {}, []
        decay = 0.9

        def compare(runner, e, start=False):
            # The reference: fp32 EMA of DeepSpeed's own fp32 master copy, kept whole.
            for n, p in runner.engine.module.named_parameters():
                m = safe_get_full_fp32_param(p).detach().clone()
                ref[n] = m if start else ref[n] * decay + m * (1 - decay)
            if start:
                return
            full = e.full_state()
            errs.append(max(float(((full[n] - r).abs() / r.abs().clamp_min(1e-3)).max()) for n, r in ref.items()))

        runner, e, _ = train("bf16", 2, 6, 16, rank, world, ema=decay, on_step=compare)
        single = ShardedEMA(runner.engine.module, decay, 2, 0, 1)
        res["ema"] = {"max_rel_err_per_step": errs, "bytes": e.local_bytes(), "bytes_one_rank": single.local_bytes()}
        torch.save(e.state_dict(), args.out + f".ema{rank}.pt")
        if rank == 0:
            torch.save(ref, args.out + ".ema_ref.pt")
        timed("ema")

    if "syncbn" in checks:
        # One step: the statistics then depend only on the initial weights and the global batch
        # (later steps add Adam's amplification of rounding differences in near-zero gradients).
        runner, _, losses = train("fp32", 1, 1, 16, rank, world)
        bn = [m for m in runner.engine.module.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        stats = torch.stack([bn.running_mean, bn.running_var])
        gathered = [torch.empty_like(stats) for _ in range(world)]
        torch.distributed.all_gather(gathered, stats)
        res["syncbn"] = {"running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist(),
                         "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered), "losses": losses}
        timed("syncbn")

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(res, f)
    finish(0)


if __name__ == "__main__":
    main()
