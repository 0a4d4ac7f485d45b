"""Run under the real `deepspeed` launcher by test_zero3_fetch.py: the same seed and batches
through ZeRO 2, ZeRO 3 with flat block fetching (the shipped zero3_fp32.json), ZeRO 3 with
block fetching of separate tensors, with DeepSpeed's per-sub-module fetching and with the whole
parameters of a step bounded; rank 0 writes losses and partitioning facts as JSON."""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from stm_dist.engine.distributed import finish, init
from stm_dist.engine.step import build_engine
from stm_dist.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = os.path.join(REPO, "ds_configs", "variants")
RUNS = {"z2": (2, None), "z3_flat": (3, None),
        "z3_block": (3, os.path.join(VARIANTS, "zero3_fp32_block.json")),
        "z3_module": (3, os.path.join(VARIANTS, "zero3_fp32_per_module.json")),
        "z3_bounded": (3, os.path.join(VARIANTS, "zero3_fp32_bounded.json"))}


def track_whole_fraction(module, params, peak: list):
    """The largest share of parameter elements whole (gathered or being gathered) seen at any
    module's forward, after DeepSpeed's own pre-forward hook has fetched what it needs."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    total = sum(p.ds_numel for p in params)

    def hook(mod, args):
        whole = sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        peak[0] = max(peak[0], whole / total)

    for m in module.modules():
        m.register_forward_pre_hook(hook)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    rank, world, _ = init(use_deepspeed=True)
    g = torch.Generator().manual_seed(7 + rank)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), F.one_hot(torch.randint(0, 10, (8,), generator=g), 10).float())
               for _ in range(args.steps)]
    out = {}
    for name, (stage, ds_config) in RUNS.items():
        torch.manual_seed(0)
        model = create_model("unified_convnext_micro", num_classes=10, img_size=32, drop_path_rate=0.0)
        runner = build_engine(model, precision="fp32", zero_stage=stage, global_batch=8 * world, micro_batch=8,
                              channels_last=False, lr=2e-3, ds_config=ds_config)
        peak = [0.0]
        if stage == 3:
            track_whole_fraction(runner.engine.module, list(runner.engine.module.parameters()), peak)
        losses = []
        for b in batches:
            loss = runner.train_step([b])
            torch.distributed.all_reduce(loss)
            losses.append(float(loss) / world)
        r = {"losses": losses}
        if stage == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            params = list(runner.engine.module.parameters())
            r["n_params"] = len(params)
            # Between steps a partitioned parameter holds no data; a persistent one stays whole.
            r["n_whole_between_steps"] = sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params)
            r["n_persistent"] = sum(bool(p.ds_persist) for p in params)
            r["peak_whole_fraction"] = peak[0]
            r["n_leaf_blocks"] = sum(bool(getattr(m, "_z3_leaf", False)) for m in runner.engine.module.modules())
            # What evaluation and stm-export read: the gathered weights in the model's own keys.
            from stm_dist.engine.ema import gathered
            from stm_dist.engine.flat_params import unflatten

            with gathered(runner.engine.module, 3):
                sd = unflatten(runner.engine.module, {k: v.detach().clone() for k, v in
                                                      runner.engine.module.state_dict().items()})
            r["state_keys"] = sorted(sd)
            r["state_sum"] = float(sum(v.double().sum() for v in sd.values() if v.is_floating_point()))
        out[name] = r
        del runner
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    finish(0)


if __name__ == "__main__":
    main()
