"""The scaling model of docs/scaling.md: communication volume per ZeRO stage, predicted step
time and efficiency on 1-8 nodes of 8 GPUs, GPU-hours of the 20-run sweep.

    python slurm/scaling_model.py step_times.jsonl     # from measure_step_time.py, one GPU

Everything this prints except the measured single-GPU throughput is a prediction; the
assumptions are the constants below (and are restated in docs/scaling.md).
"""
import argparse
import json

from stm_dist.report.paper import MIXERS, SIZES

IMAGENET_TRAIN = 1_281_167
EPOCHS = 300
GPUS_PER_NODE = 8
GRAD_BYTES = 2          # bf16 gradients and parameters on the wire
BUS_GBPS_INTRA = 350.0  # NCCL bus bandwidth inside one 8-GPU NVLink node, GB/s (assumed)
BUS_GBPS_INTER = 40.0   # per GPU across nodes: 400 Gb/s NIC per GPU at ~80 % (assumed)
# The recipe fixes the global batch (spec §6): transformer.sh 1024, cnn.sh (ConvNeXt) 4096.
GLOBAL_BATCH = {m: (4096 if m == "convnext" else 1024) for m in MIXERS}
# Bytes sent+received per GPU per optimizer step, in units of (N-1)/N * params * GRAD_BYTES.
ZERO_FACTOR = {0: 2, 1: 2, 2: 2, 3: 3}


def comm_gb(params: int, stage: int, n: int) -> float:
    return ZERO_FACTOR[stage] * params * GRAD_BYTES * (n - 1) / n / 1e9 if n > 1 else 0.0


def step_time(rec: dict, mixer: str, n: int, stage: int) -> tuple[float, float]:
    """(compute s, communication s) of one optimizer step on n GPUs, no overlap assumed."""
    per_image = rec["step_s"] / rec["batch"]          # measured at batch 128 on one GPU
    compute = per_image * GLOBAL_BATCH[mixer] / n       # fixed global batch: work splits n ways
    bw = BUS_GBPS_INTRA if n <= GPUS_PER_NODE else BUS_GBPS_INTER
    return compute, comm_gb(rec["params"], stage, n) / bw


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step_times", help="JSON lines from slurm/measure_step_time.py (one GPU)")
    p.add_argument("--stage", type=int, default=1, help="ZeRO stage for the efficiency table")
    args = p.parse_args()
    recs = {}
    with open(args.step_times) as f:
        for line in f:
            r = json.loads(line)
            if "step_s" in r:
                recs[r["model"]] = r
    nodes = [1, 2, 4, 8]
    print("| model | params (M) | ZeRO 0/1/2 GB/step | ZeRO 3 GB/step | 1 GPU img/s (measured) | "
          + " | ".join(f"eff. {k}x8" for k in nodes) + " | GPU-h 300 ep (8 GPUs) | GPU-h (64 GPUs) |")
    print("|---|---|---|---|---|" + "---|" * len(nodes) + "---|---|")
    total8 = total64 = 0.0
    for size in SIZES:
        for mixer in MIXERS:
            name = f"unified_{mixer}_{size}"
            r = recs.get(name)
            if r is None:
                print(f"| {name} | – | – | – | not measured |" + " – |" * (len(nodes) + 2))
                continue
            t1 = r["step_s"] / r["batch"] * GLOBAL_BATCH[mixer]
            effs, hours = [], {}
            for k in nodes:
                n = k * GPUS_PER_NODE
                c, m = step_time(r, mixer, n, args.stage)
                effs.append(t1 / n / (c + m))
                steps = EPOCHS * IMAGENET_TRAIN / GLOBAL_BATCH[mixer]
                hours[n] = steps * (c + m) * n / 3600
            total8 += hours[8]
            total64 += hours[64]
            print(f"| {name} | {r['params'] / 1e6:.1f} | {comm_gb(r['params'], 1, 8):.3f} | "
                  f"{comm_gb(r['params'], 3, 8):.3f} | {r['img_s']:.0f} | "
                  + " | ".join(f"{e:.2f}" for e in effs) + f" | {hours[8]:.0f} | {hours[64]:.0f} |")
    print(f"\ntotal GPU-hours, 20 runs: {total8:.0f} on 1 node x 8 GPUs each, {total64:.0f} on 8 nodes x 8 GPUs each")


if __name__ == "__main__":
    main()
