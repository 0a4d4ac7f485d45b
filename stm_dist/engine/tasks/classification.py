"""Image classification: the unified models (or any registered mixer) on labelled shards,
soft-target cross-entropy after mixup/cutmix, top-1/top-5 with every image counted once."""
from __future__ import annotations

import torch

from ..config import ConfigError


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationTask:
    name = "classification"
    metric = "top1"

    def __init__(self, cfg):
        self.cfg = cfg
        self._batch_aug = None

    # ------------------------------------------------------------------ model
    def build_model(self, for_eval: bool = False):
        from stm_dist.models import create_model

        m = self.cfg.model
        kw = {"num_classes": m.num_classes, "img_size": m.img_size, "layer_scale_init_value": m.layer_scale_init_value}
        if m.drop_path_rate is not None and not for_eval:
            kw["drop_path_rate"] = m.drop_path_rate
        return create_model(m.name, **kw)

    def load_initial_weights(self, model, log=print):
        """model.pretrained into a freshly built model; a classifier of another class count is
        replaced (fine-tuning). Errors name the key and the file."""
        from stm_dist.models.pretrained import CheckpointError, load_pretrained

        m = self.cfg.model
        try:
            report = load_pretrained(model, m.pretrained, use_ema=m.pretrained_ema, new_head=True)
        except CheckpointError as e:
            raise ConfigError(f"'model.pretrained': {e}") from None
        log(f"model.pretrained: {report.source}{' (EMA weights)' if report.ema else ''}"
            + (f", resized to the model: {', '.join(report.resized)}" if report.resized else ""))
        if report.new_head:
            log(report.head_line())
        return report

    def param_groups(self, model, log=print) -> list:
        from stm_dist.models.param_groups import param_groups

        o = self.cfg.optim
        try:
            groups = param_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
        except ValueError as e:
            raise ConfigError(f"'optim.layer_decay': {e}") from None
        if o.layer_decay is not None:
            n = max(g["layer_id"] for g in groups) + 1
            log(f"optim.layer_decay {o.layer_decay}: {n} layers, lr scale {o.layer_decay ** (n - 1):.3g} (layer 0) "
                f".. 1 (layer {n - 1}), {len(groups)} parameter groups")
        return groups

    def fetch_units(self, model) -> list:
        from ..ds_setup import fetch_units

        return fetch_units(model)

    # ------------------------------------------------------------------ data
    def train_loader(self, rank: int, world: int, accum: int, device: str):
        from stm_dist.data import build_train_loader

        t, d = self.cfg.train, self.cfg.data
        return build_train_loader(d.train_shards, t.micro_batch, rank=rank, world_size=world, accum=accum,
                                  seed=t.seed, img_size=self.cfg.model.img_size, device=device,
                                  num_threads=d.num_threads, randaug=d.randaug, backend=d.backend,
                                  dont_use_mmap=d.dont_use_mmap,
                                  source_workers=d.source_workers if d.backend == "dali" else 0, split=d.train_split)

    def prepare(self, micro_batch):
        """(images, labels) -> (images, soft targets): mixup/cutmix, label smoothing, erasing."""
        if self._batch_aug is None:
            from stm_dist.data import BatchAugment

            a = self.cfg.augment
            self._batch_aug = BatchAugment(mixup=a.mixup, cutmix=a.cutmix, switch_prob=a.switch_prob,
                                           smoothing=a.smoothing, reprob=a.reprob,
                                           num_classes=self.cfg.model.num_classes)
        images, labels = micro_batch
        return self._batch_aug(images, labels)

    def forward_loss(self, engine, images, targets, device, precision, channels_last: bool = False):
        images = images.to(device, precision.input_dtype, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device.type):
            logits = engine(images)
        return soft_target_cross_entropy(logits, targets)

    # ------------------------------------------------------------------ evaluation
    def val_loader(self, rank: int, world: int, on_cuda: bool):
        from stm_dist.data import build_val_loader

        c = self.cfg
        return build_val_loader(c.data.val_shards, c.data.eval_batch, rank=rank, world_size=world,
                                img_size=c.model.img_size, crop_pct=c.data.crop_pct,
                                device="cuda" if on_cuda else "cpu", num_threads=c.data.num_threads,
                                backend=c.data.backend, dont_use_mmap=c.data.dont_use_mmap, split=c.data.val_split)

    def evaluate(self, model, loader, device, out_dir=None, step: int = 0, suffix: str = "") -> dict:
        from stm_dist.data import read_manifest

        from ..evaluate import evaluate

        expected = int(read_manifest(self.cfg.data.val_shards, self.cfg.data.val_split)["num_samples"])
        r = evaluate(model, loader, device, expected_samples=expected)
        return {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"]}
