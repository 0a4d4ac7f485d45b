"""The original's detection backbones: `create_backbone(name, **overrides)`.

They are not the classification models minus the head (detection/mmdet_custom/models/backbones
of the original, and ../shared/spec/original_det_fixtures/README.md):
* no stage norms on the main path; each returned stage map goes through a fresh LayerNorm2d
  `out_norm_{i}` (eps 1e-6, weight 1 / bias 0) and only that copy is normalised;
* no conv head, pooling or classifier;
* a mixer may build a different block for detection: the block class's `detection_kwargs`
  (Swin: shift in every stage, pad with the padding attended and the mask built per input; PVT:
  residual identity taken before the position embedding; Halo: block padding attended);
* drop path 0.1 (micro), 0.2 (tiny, small), 0.3 (base), as the detection configs.
Everything else is the registered classification config (depths, dims, block and forward
arguments), so a mixer registered with `register_mixer` gets a detection backbone the same way.

State-dict keys are the original detection backbone's: `downsample_layers.*`, `stages.i.j.*`,
`out_norm_{i}.*`. Swin's `relative_position_index` buffers stay in the state dict as in the
original's timm of the time (the released classification checkpoints hold them too).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from stm_dist.models.layers import LayerNorm2d, to_2tuple
from stm_dist.models.meta_arch import DownsampleLayer, Stem, _init_weights, no_weight_decay_names, run_stage
from stm_dist.models.registry import list_models, mixer_of, model_config, resolve_name

__all__ = ["DetectionBackbone", "create_backbone", "list_backbones", "backbone_config",
           "DETECTION_DROP_PATH"]

# model.backbone.drop_path_rate of the original's configs/unified_models/*/mask_rcnn_*.py
DETECTION_DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3}

# Classification-only MetaArch arguments with no meaning here.
_CLS_ONLY = ("num_classes", "extra_transform", "extra_transform_ratio", "norm_every_stage",
             "features_only", "url", "drop_rate", "global_pool")
_ARGS = ("depths", "dims", "drop_path_rate", "layer_scale_init_value", "block_kwargs",
         "forward_kwargs", "img_size", "in_channels", "out_indices", "grad_checkpointing")


class DetectionBackbone(nn.Module):
    """Stem + 4 stages of mixer blocks (the MetaArch block contract and stage hooks), returning
    the `out_norm_i` maps of `out_indices` (strides 4, 8, 16, 32). `img_size` only sets the
    construction grid a block may size itself by (PVT's position embedding, 56x56 at 224)."""

    def __init__(self, block_type, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, block_kwargs: Optional[dict] = None,
                 forward_kwargs: Optional[dict] = None, img_size=224, in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), grad_checkpointing: bool = False,
                 name: str = ""):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"{name or 'backbone'}: depths and dims need 4 entries, got {depths}, {dims}")
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"{name or 'backbone'}: out_indices must be within 0..3, got {tuple(out_indices)}")
        self.name = name
        self.block_type = block_type
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.out_indices = tuple(sorted(set(out_indices)))
        self.out_channels: List[int] = [self.dims[i] for i in self.out_indices]
        self.strides: List[int] = [4 * 2 ** i for i in self.out_indices]
        self.forward_kwargs = dict(forward_kwargs or {})
        self.grad_checkpointing = grad_checkpointing
        self.in_channels = in_channels

        self.downsample_layers = nn.ModuleList([Stem(in_channels, dims[0])])
        for i in range(1, 4):
            self.downsample_layers.append(DownsampleLayer(dims[i - 1], dims[i]))
        # float32 linspace then .item(), as the original: the rates are bit-identical.
        dp_rates = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        h, w = to_2tuple(img_size)
        grid = (h // 4, w // 4)
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            res = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            self.stages.append(nn.ModuleList([
                block_type(dim=dims[i], drop_path=dp_rates[cur + j], stage=i, depth=j, total_depth=cur + j,
                           input_resolution=res, layer_scale_init_value=layer_scale_init_value,
                           **(block_kwargs or {}))
                for j in range(depths[i])]))
            cur += depths[i]
        # Registered after the stages: the original's state-dict order.
        for i in self.out_indices:
            self.add_module(f"out_norm_{i}", LayerNorm2d(dims[i]))
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        """The original's exemptions (its detection optimizer also exempts every norm)."""
        return no_weight_decay_names(self)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.name or 'backbone'}: expected an image batch (B, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"{self.name or 'backbone'}: input sides must be multiples of 32 (pad the batch, "
                             f"as the detection pipeline's size_divisor=32 does), got {tuple(x.shape[-2:])}")
        bt = self.block_type
        extra = bt.extra_inputs(x, **self.forward_kwargs) if hasattr(bt, "extra_inputs") else None
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self.downsample_layers[i](x)
            x = run_stage(bt, self.stages[i], x, None if extra is None else extra[i], self.grad_checkpointing)
            if i in self.out_indices:
                outs.append(getattr(self, f"out_norm_{i}")(x))
        return outs


def list_backbones(pattern: str = "*") -> list:
    """Every registered model name (each has a detection backbone)."""
    return list_models(pattern)


def backbone_config(name: str, **overrides) -> dict:
    """The DetectionBackbone arguments of `name` (block_type included): the registered
    classification config, the detection drop-path rate of its size, the block's
    `detection_kwargs`, then `overrides` (block_kwargs / forward_kwargs entries are merged)."""
    canonical = resolve_name(name)
    cfg = model_config(canonical)
    block = cfg.pop("block")
    for k in _CLS_ONLY:
        cfg.pop(k, None)
    size = mixer_of(canonical)[1]
    if size in DETECTION_DROP_PATH:
        cfg["drop_path_rate"] = DETECTION_DROP_PATH[size]
    cfg["block_kwargs"] = {**cfg.get("block_kwargs", {}), **getattr(block, "detection_kwargs", {})}
    cfg["forward_kwargs"] = dict(cfg.get("forward_kwargs") or {})
    cfg["out_indices"] = (0, 1, 2, 3)  # the original's configs: all four levels for the FPN
    unknown = sorted(set(overrides) - set(_ARGS))
    if unknown:
        raise TypeError(f"create_backbone({name!r}): unknown argument(s) {unknown}; accepted: {sorted(_ARGS)}")
    for key, value in overrides.items():
        if key in ("block_kwargs", "forward_kwargs") and value is not None:
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    unused = sorted(set(cfg) - set(_ARGS))
    if unused:  # a MetaArch argument added later that this backbone does not know
        raise TypeError(f"create_backbone({name!r}): registered argument(s) {unused} have no meaning "
                        "for a detection backbone")
    cfg["block_type"] = block
    cfg["name"] = canonical
    return cfg


def create_backbone(name: str, **overrides) -> DetectionBackbone:
    """The original's detection backbone of a registered model (the 20 paper models and any
    mixer registered with `register_mixer`); `overrides` replace its arguments (drop_path_rate,
    layer_scale_init_value, out_indices, grad_checkpointing, block_kwargs={...}, ...)."""
    return DetectionBackbone(**backbone_config(name, **overrides))
