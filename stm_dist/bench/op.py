"""`stm-bench op`: time the compiled ms_deform_attn against the pure-PyTorch reference.

Shapes are the four stages of unified_dcn_v3_tiny at 224x224 (spec §2.5): stage i has
dim 64*2^i, 4*2^i heads of 16 channels, a 56/2^i map zero-padded by one pixel on each side as
the value map, one query per unpadded pixel, one level and 9 points. Prints forward and
forward+backward milliseconds per call (median; kernel and reference timed in turn, so that a
busy CPU loads both alike) and the speed-up of the kernel over the reference.
"""
import argparse
import statistics
import time

import torch

from stm_dist import ops

TINY_STAGES = [  # (dim, heads, map size)
    (64, 4, 56),
    (128, 8, 28),
    (256, 16, 14),
    (512, 32, 7),
]
HEAD_DIM = 16
POINTS = 9


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes (default: float32 on cpu; float32,float16,bfloat16 on cuda)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case (default: 5 cpu, 20 per batch x 5 batches cuda)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--stages", default="0,1,2,3", help="which tiny stages to run (default: all four)")
    return parser


def stage_inputs(stage, batch, device, dtype, seed=0):
    """Inputs of one DCNv3 sampling call at a tiny stage; locations spread around each query like
    a 3x3 kernel plus learned offsets, a few of them falling outside the padded map."""
    _, heads, size = TINY_STAGES[stage]
    gen = torch.Generator().manual_seed(seed + stage)
    hp = wp = size + 2
    value = torch.randn(batch, hp * wp, heads, HEAD_DIM, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size) + 1.5, torch.arange(size) + 1.5, indexing="ij")
    ref = torch.stack([xs / wp, ys / hp], -1).reshape(1, size * size, 1, 1, 1, 2)
    ky, kx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
    grid = torch.stack([kx / wp, ky / hp], -1).reshape(1, 1, 1, 1, POINTS, 2)
    offsets = torch.randn(batch, size * size, heads, 1, POINTS, 2, generator=gen) * 1.5 / hp
    loc = ref + grid + offsets
    attn = torch.randn(batch, size * size, heads, 1, POINTS, generator=gen).softmax(-1)
    shapes = torch.tensor([[hp, wp]], dtype=torch.long)
    start = torch.zeros(1, dtype=torch.long)
    move = dict(device=device, dtype=dtype)
    return value.to(**move), shapes, start, loc.to(**move), attn.to(**move)


def _time(fns, iters, warmup, device):
    """Median milliseconds per call of each of `fns`, timed round-robin (one call of each in
    turn) so that the kernel and the reference see the same load on a busy shared CPU."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    if device == "cuda":  # kernels are short: time batches of calls with events
        for _ in range(5):
            for fn, out in zip(fns, times):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / iters)
        return [statistics.median(t) for t in times]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def _calls(impl, inputs):
    """(forward only, forward + backward) closures of one implementation on one stage's inputs."""
    value, shapes, start, loc, attn = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    with torch.no_grad():
        grad_out = torch.ones_like(impl(value, shapes, start, loc, attn))

    def fwd():
        with torch.no_grad():
            impl(value, shapes, start, loc, attn)

    def fwd_bwd():
        v, l, a = leaves
        for t in leaves:
            t.grad = None
        impl(v, shapes, start, l, a).backward(grad_out)

    return fwd, fwd_bwd


def bench_case(kernel, reference, inputs, iters, warmup, device):
    """Milliseconds (kernel fwd, reference fwd, kernel f+b, reference f+b)."""
    kf, kfb = _calls(kernel, inputs)
    rf, rfb = _calls(reference, inputs)
    fwd = _time([kf, rf], iters, warmup, device)
    fwd_bwd = _time([kfb, rfb], iters, warmup, device)
    return fwd[0], fwd[1], fwd_bwd[0], fwd_bwd[1]


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("stm-bench op: --device cuda but no CUDA device is visible")
    if not ops.kernel_available("ms_deform_attn", device.upper()):
        raise SystemExit(f"stm-bench op: stm_dist._C has no {device.upper()} kernel for ms_deform_attn "
                         "(rebuild with `pip install --no-build-isolation --no-deps -e .`)")
    names = args.dtypes or ("float32" if device == "cpu" else "float32,float16,bfloat16")
    dtypes = []
    for name in names.split(","):
        dt = getattr(torch, name.strip(), None)
        if not isinstance(dt, torch.dtype):
            raise SystemExit(f"stm-bench op: --dtypes entry {name!r} is not a torch dtype")
        dtypes.append(dt)
    stages = [int(s) for s in args.stages.split(",")]
    for s in stages:
        if not 0 <= s < len(TINY_STAGES):
            raise SystemExit(f"stm-bench op: --stages entry {s} is not a stage of unified_dcn_v3_tiny (0-3)")
    iters = args.iters or (5 if device == "cpu" else 20)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ms_deform_attn, unified_dcn_v3_tiny stage shapes, batch {args.batch}, {where}, torch {torch.__version__}")
    head = f"{'stage':>5} {'dtype':>9} {'heads':>5} {'value map':>9} | {'fwd kernel':>10} {'fwd ref':>9} {'x':>6} | " \
           f"{'f+b kernel':>10} {'f+b ref':>9} {'x':>6}   (ms)"
    print(head)
    print("-" * len(head))
    kernel = torch.ops.stm_dist.ms_deform_attn
    for dt in dtypes:
        for s in stages:
            inputs = stage_inputs(s, args.batch, device, dt)
            kf, rf, kfb, rfb = bench_case(kernel, ops.ms_deform_attn_reference, inputs, iters, args.warmup, device)
            _, heads, size = TINY_STAGES[s]
            print(f"{s + 1:>5} {str(dt).replace('torch.', ''):>9} {heads:>5} {f'{size + 2}x{size + 2}':>9} | "
                  f"{kf:>10.3f} {rf:>9.3f} {rf / kf:>5.1f}x | {kfb:>10.3f} {rfb:>9.3f} {rfb / kfb:>5.1f}x")


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="stm-bench op", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
