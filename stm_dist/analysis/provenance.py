"""Where an analysis result comes from, recorded in every JSON stm-analyze writes ("provenance"),
so that stm-report can keep it and tell comparable results from the rest:

    data        shard folder, split, sha256 of the split's manifest (names every shard and
                its size: the same hash is the same images), sample and class counts
    checkpoint  path as given (absolute; "random" for a seeded init), sha256 of the file (None
                for a run directory or checkpoint folder, whose files are many), sha256 of the
                weights actually evaluated (every tensor of the fp32 state dict, by name)
    seed, img_size, crop_pct, limit, ema, label_map, num_classes, split, precision
    per analysis: type and levels (invariance), images and the input resize (erf), attack
                settings (robustness: eps list, PGD steps, step size, random start)
"""
from __future__ import annotations

import hashlib
import os

from data_tools.tar_index import sha256_path


def weights_sha256(model) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and bytes of each tensor."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # raw bytes, any dtype (bf16 has no numpy type)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_provenance(shard_dir: str, split: str, manifest: dict) -> dict:
    return {"shards": os.path.abspath(shard_dir), "split": split,
            "manifest_sha256": sha256_path(os.path.join(shard_dir, f"{split}.json")),
            "num_samples": int(manifest["num_samples"]), "num_classes": int(manifest["num_classes"])}


def checkpoint_provenance(checkpoint: str, model) -> dict:
    is_file = checkpoint != "random" and os.path.isfile(checkpoint)
    return {"path": checkpoint if checkpoint == "random" else os.path.abspath(checkpoint),
            "sha256": sha256_path(checkpoint) if is_file else None,
            "weights_sha256": weights_sha256(model)}


def provenance(args, manifest: dict, model, **settings) -> dict:
    """The provenance block of one stm-analyze result; `settings`: the analysis' own."""
    return {"data": data_provenance(args.data, args.split, manifest),
            "checkpoint": checkpoint_provenance(args.checkpoint, model),
            "ema": bool(args.ema), "label_map": args.label_map, "num_classes": int(args.num_classes or
                                                                                  manifest["num_classes"]),
            "seed": args.seed, "img_size": args.img_size, "crop_pct": args.crop_pct, "limit": args.limit,
            "precision": "fp32", **settings}
