"""Single-device training step time of the unified models, to size a sweep before submitting it.

    python slurm/measure_step_time.py --models 'unified_*_tiny' --batch 128 --out step_times.jsonl

One full optimizer step per iteration (forward, loss, backward, AdamW), bf16 autocast on CUDA
(fp32 on CPU), random inputs at 224 px, no data loading: the compute-only ceiling of one
device. docs/scaling.md turns these numbers into multi-node predictions.
"""
import argparse
import fnmatch
import json
import time

import torch


def measure(name: str, batch: int, img: int, iters: int, warmup: int, device: str) -> dict:
    from stm_dist.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, img_size=img).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=device == "cuda")
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    dt = (time.perf_counter() - t) / iters
    rec = {"model": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "batch": batch, "img_size": img, "step_s": dt, "img_s": batch / dt,
           "params": sum(p.numel() for p in model.parameters())}
    if device == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="unified_*_micro", help="comma-separated names or patterns")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append one JSON line per model here")
    args = p.parse_args()
    from stm_dist.models import list_models

    known = list_models()
    names = [n for pat in args.models.split(",") for n in known if fnmatch.fnmatch(n, pat.strip())]
    if not names:
        raise SystemExit(f"no model matches {args.models!r}; known: {', '.join(known)}")
    for name in names:
        try:
            rec = measure(name, args.batch, args.img_size, args.iters, args.warmup, args.device)
        except torch.OutOfMemoryError as e:
            rec = {"model": name, "batch": args.batch, "error": f"out of memory: {e}"[:200]}
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
