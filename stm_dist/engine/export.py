"""Turn a run's checkpoint (any ZeRO stage) into one plain fp32 state dict.

The result has the model's own state-dict keys (the original release's key layout), so
`create_model(name)` + `load_pretrained(model, path)` reads it like a released checkpoint.
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .checkpoint import locate  # noqa: F401  (stm-eval and stm-analyze find checkpoints here too)


def consolidate(ckpt_dir: str, tag: str, marker: dict, ema: bool = False) -> dict:
    tag_dir = os.path.join(ckpt_dir, tag)
    if ema:
        from .ema import assemble

        states = [c.get("ema") for c in ckpt.load_all_clients(tag_dir, int(marker.get("world_size", 1)))]
        if any(s is None for s in states):
            raise KeyError(f"{tag_dir}: this run kept no EMA weights (train.ema was false)")
        # Each rank saved the slices of the average it owns; put them back together.
        return {k: v.float() if v.is_floating_point() else v for k, v in assemble(states).items()}
    stage = int(marker.get("zero_stage", 0))
    if stage == 0:
        path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
        # The module DeepSpeed holds is the fp32 master (bf16/fp16 train under autocast);
        # only the explicit pure_bf16 mode stores 16-bit weights here.
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag)
    # Buffers come back in the training dtype; parameters are the fp32 master copy.
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def export(run_path: str, out_path: str, ema: bool = False, warn=print) -> dict:
    ckpt_dir, tag, marker = locate(run_path, warn=warn)
    sd = consolidate(ckpt_dir, tag, marker, ema=ema)
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    info = {"model": marker.get("model"), "step": marker.get("step"), "source": os.path.join(ckpt_dir, tag),
            "ema": ema}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info
