"""Instance segmentation: torchvision's Mask R-CNN on a unified detection backbone
(stm_dist.detection), COCO shards through the same epoch plan, COCO box/mask AP.

The recipe is the paper's Mask R-CNN 1x (configs/detection/): AdamW with no weight decay on
norms and position tables (mmdet's paramwise rule), a step schedule, 2 images per GPU. The
engine treats a batch as opaque: (images, per-image target dicts) in, the sum of the detector's
losses out.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import ConfigError

# mmdet's paramwise_cfg of the original detection configs: decay multiplier 0 for these names.
NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


def detection_param_groups(model, weight_decay: float) -> list:
    """[decayed, not decayed]: a parameter is not decayed when its name contains one of
    NO_DECAY_KEYS (mmdet's custom_keys match substrings); biases and layer-scale gammas are
    decayed, as they were in the paper's detection runs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, group_name="decay"),
              dict(params=no_decay, weight_decay=0.0, group_name="no_decay")]
    return [g for g in groups if g["params"]]


def _to_device(targets: list, device) -> list:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def _gather(obj):
    """Every rank's `obj` in rank order (a list of one without a process group)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class DetectionTask:
    name = "detection"
    metric = "bbox_AP"

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------------ model
    def build_model(self, for_eval: bool = False):
        from stm_dist.detection.detector import build_detector

        m, det = self.cfg.model, self.cfg.detection
        kw = {}
        if m.drop_path_rate is not None and not for_eval:
            kw["drop_path_rate"] = m.drop_path_rate
        try:
            return build_detector(m.name, m.num_classes, head=det.head, mmdet_compat=det.mmdet_compat, **kw)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"'model.name' {m.name!r} (model.task=detection): {e}") from None

    def load_initial_weights(self, model, log=print):
        """model.pretrained: a classification checkpoint (ours, timm's, the paper's release, a run
        directory) into the backbone, by the original's rules (docs/detection.md)."""
        from stm_dist.detection.backbone_weights import load_backbone_weights

        m = self.cfg.model
        try:
            return load_backbone_weights(model.backbone, m.pretrained, log=log, use_ema=m.pretrained_ema)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ConfigError(f"'model.pretrained': {e}") from None

    def param_groups(self, model, log=print) -> list:
        if self.cfg.optim.layer_decay is not None:
            raise ConfigError("'optim.layer_decay' is not supported with model.task=detection")
        return detection_param_groups(model, self.cfg.optim.weight_decay)

    def fetch_units(self, model) -> list:
        # The backbone's blocks and downsamples as for classification; FPN and heads per module.
        from ..ds_setup import fetch_units

        return fetch_units(model.backbone)

    # ------------------------------------------------------------------ data
    def _scales(self):
        det = self.cfg.detection
        return [(det.max_size, int(s)) for s in det.short_sides]

    def train_loader(self, rank: int, world: int, accum: int, device: str):
        from stm_dist.detection.loaders import build_det_train_loader

        t, d, det = self.cfg.train, self.cfg.data, self.cfg.detection
        return build_det_train_loader(d.train_shards, t.micro_batch, rank=rank, world_size=world, accum=accum,
                                      seed=t.seed, scales=self._scales(), flip_prob=det.flip_prob,
                                      size_divisor=det.size_divisor, device=device, num_threads=d.num_threads,
                                      dont_use_mmap=d.dont_use_mmap, backend=d.backend, split=d.train_split)

    def prepare(self, micro_batch):
        return micro_batch  # (images, targets): the pipeline did the resizing, flipping and padding

    def forward_loss(self, engine, images, targets, device, precision, channels_last: bool = False):
        images = images.to(device, precision.input_dtype, non_blocking=True)
        targets = _to_device(targets, device)
        with precision.autocast(device.type):
            losses = engine(images, targets)
        return sum(v.float() for v in losses.values())

    # ------------------------------------------------------------------ evaluation
    def val_loader(self, rank: int, world: int, on_cuda: bool, split: str | None = None):
        from stm_dist.detection.loaders import build_det_val_loader

        c, det = self.cfg, self.cfg.detection
        return build_det_val_loader(c.data.val_shards, c.data.eval_batch, rank=rank, world_size=world,
                                    scale=max(self._scales(), key=lambda s: s[1]), size_divisor=det.size_divisor,
                                    device="cuda" if on_cuda else "cpu", num_threads=c.data.num_threads,
                                    dont_use_mmap=c.data.dont_use_mmap, with_masks=False, backend=c.data.backend,
                                    split=split or c.data.val_split)

    def annotations(self, loader) -> str:
        """The COCO ground-truth file of the loader's split (written beside the shards)."""
        return os.path.join(self.cfg.data.val_shards, loader.manifest["annotations"])

    @staticmethod
    def results_files(out_dir: str, stem: str) -> dict:
        """{"bbox": path, "segm": path}: where evaluate() writes the COCO results JSON."""
        return {kind: os.path.join(out_dir, f"{stem}_{kind}.json") for kind in ("bbox", "segm")}

    @torch.no_grad()
    def predict(self, model, loader, device) -> tuple[list, list, int]:
        """This rank's COCO results (bbox, segm) and image count over its slice of the split."""
        from stm_dist.detection.coco_eval import to_coco_results

        was_training = model.training
        model.eval()
        bbox, segm, n = [], [], 0
        for images, targets in loader:
            outputs = model(images.to(device, torch.float32, non_blocking=True), targets)
            outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
            b, s = to_coco_results(outputs, targets, loader.categories)
            bbox += b
            segm += s
            n += len(targets)
        model.train(was_training)
        return bbox, segm, n

    def evaluate(self, model, loader, device, out_dir=None, step: int = 0, suffix: str = "",
                 stem: str | None = None) -> dict:
        """COCO box and mask AP of `model` over the whole split: each rank predicts its slice,
        rank 0 scores all results with pycocotools (and writes them as COCO results JSON to
        `out_dir`: results_files(out_dir, stem), stem step<step><suffix> unless given), every
        rank returns the same numbers."""
        bbox, segm, n = self.predict(model, loader, device)
        parts = _gather((bbox, segm, n))
        results = None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            results = self._score(loader, parts, out_dir, stem or f"step{step}{suffix}")
        # Every rank gets rank 0's outcome, its error included: a rank raising alone would leave
        # the others waiting in the next collective.
        results = _gather(results)[0]
        if isinstance(results, str):
            raise RuntimeError(results)
        return results

    def _score(self, loader, parts, out_dir, stem):
        """Rank 0: COCO AP of all ranks' results (and the results JSON files); an error as text."""
        from stm_dist.detection.coco_eval import coco_evaluate

        bbox = [r for p in parts for r in p[0]]
        segm = [r for p in parts for r in p[1]]
        seen, expected = sum(p[2] for p in parts), int(loader.manifest["num_samples"])
        if seen != expected:
            return f"evaluation saw {seen} images over all ranks, the split has {expected}"
        try:
            metrics = coco_evaluate(self.annotations(loader), bbox, segm, log=lambda *a: None)
        except (OSError, ValueError, KeyError) as e:
            return f"COCO evaluation against {self.annotations(loader)}: {e}"
        results = {"bbox_AP": metrics["bbox_AP"], "segm_AP": metrics["segm_AP"]}
        for kind in ("bbox", "segm"):
            for stat in ("AP50", "AP75"):
                if stat in metrics.get(kind, {}):
                    results[f"{kind}_{stat}"] = metrics[kind][stat]
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            paths = self.results_files(out_dir, stem)
            for kind, res in (("bbox", bbox), ("segm", segm)):
                path = paths[kind]
                with open(path + ".tmp", "w") as f:
                    json.dump(res, f)
                os.replace(path + ".tmp", path)
        return results
