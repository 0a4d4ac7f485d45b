"""The unified meta-architecture every spatial token mixer (STM) plugs into.

Stem (two stride-2 convs) -> 4 stages of mixer blocks separated by stride-2 conv downsamples,
each stage followed by a LayerNorm2d that sits on the main path -> 1x1 conv head (+BN+GELU) ->
global average pool -> linear classifier. Only the block class differs between mixers, so the
comparison is fair; the mixers never copy this file, they hand it a block class.

Attribute names are the original's state-dict prefixes (`downsample_layers`, `stages`,
`stage_norms`, `stage_end_norm`, `conv_head`, `avg_head`, `head`): released checkpoints load
strictly.
"""
import logging
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .layers import LayerNorm2d, to_2tuple

__all__ = ["MetaArch", "Stem", "DownsampleLayer", "FeatureInfo"]

_logger = logging.getLogger(__name__)


class Stem(nn.Module):
    """Two 3x3 stride-2 convs (stride 4 overall) with LayerNorm2d, GELU between them."""

    def __init__(self, in_channels: int, out_channels: int, act_layer=nn.GELU):
        super().__init__()
        mid = int(out_channels * 0.5)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=True),
            LayerNorm2d(mid),
            act_layer(),
            nn.Conv2d(mid, out_channels, 3, stride=2, padding=1, bias=True),
            LayerNorm2d(out_channels),
        )

    def forward(self, x):
        return self.stem(x)


class DownsampleLayer(nn.Module):
    """3x3 stride-2 conv (no bias) + LayerNorm2d between stages."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.reduction = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )

    def forward(self, x):
        return self.reduction(x)


class FeatureInfo(list):
    """timm-style list of dicts (num_chs, reduction, module) with channels()/reduction() helpers."""

    def channels(self) -> list:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list:
        return [f["reduction"] for f in self]


# timm's pooling types (SelectAdaptivePool2d); '' = no pooling (the classifier then needs
# num_classes=0: forward_head returns the conv head's map).
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


def _global_pool(pool_type: str, num_classes: int, where: str):
    """(pooling module, width multiplier) for timm's `global_pool`; None means 'avg'."""
    pool_type = "avg" if pool_type is None else pool_type
    if pool_type not in POOL_TYPES:
        raise ValueError(f"{where}: global_pool {pool_type!r} not supported: one of "
                         f"{', '.join(repr(p) for p in POOL_TYPES)} ('' = no pooling, with num_classes=0)")
    if pool_type == "" and num_classes > 0:
        raise ValueError(f"{where}: global_pool='' (no pooling) needs num_classes=0 (the classifier takes a "
                         f"pooled vector), got num_classes={num_classes}")
    if pool_type == "avg":  # the original's module (what every recipe and fixture ran)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Identity(), nn.Flatten(1)), 1
    if pool_type == "":
        return nn.Identity(), 1
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
    return pool, pool.feat_mult()


def _init_weights(m: nn.Module) -> None:
    # Applied to the whole network after construction, deliberately overriding block-level
    # inits (spec §1.3): this is what the original trained from.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def no_weight_decay_names(module: nn.Module) -> set:
    """Names the original's optimizer factory exempts from weight decay (spec §1.4)."""
    skip = {"absolute_pos_embed"}
    skip.update(n for n, _ in module.named_parameters() if "relative_position_bias_table" in n)
    return skip


def run_stage(block_type, blocks, x, extra=None, grad_checkpointing: bool = False):
    """One stage's blocks, between the block type's optional pre/post_stage_transform. A block is
    called as block(x), or block(x, extra) with the stage's extra input as its own argument, never
    packed with x in a tuple: a module's full backward hook (how ZeRO 3 releases a fetch unit's
    parameters) only sees top-level tensor arguments, and would fire before the block's weight
    gradients exist."""
    if hasattr(block_type, "pre_stage_transform"):
        x = block_type.pre_stage_transform(x)
    for blk in blocks:
        args = (x,) if extra is None else (x, extra)
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, *args, use_reentrant=False)
        else:
            x = blk(*args)
    if hasattr(block_type, "post_stage_transform"):
        x = block_type.post_stage_transform(x)
    return x


class MetaArch(nn.Module):
    """Unified backbone + classifier.

    Block contract: `block_type(dim, drop_path, stage, depth, total_depth, input_resolution,
    layer_scale_init_value, **block_kwargs)`. Optional hooks on the block class:
    `extra_inputs(img, **forward_kwargs)` -> one extra input per stage, passed to every block of
    stage i as a second argument, `block(x, extra[i])` (blocks still return only x: module hooks,
    DeepSpeed's ZeRO 3 ones included, see the map as a top-level tensor input);
    `pre_stage_transform(x)` / `post_stage_transform(x)` around each stage (layout changes).
    """

    def __init__(
        self,
        block_type,
        img_size=224,
        in_channels: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        block_kwargs: Optional[dict] = None,
        forward_kwargs: Optional[dict] = None,
        extra_transform: bool = True,
        extra_transform_ratio: float = 1.5,
        norm_every_stage: bool = True,
        grad_checkpointing: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_rate: float = 0.0,
        global_pool: Optional[str] = "avg",
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 entries, got depths={depths} dims={dims}")
        bad = [i for i in out_indices if i not in range(4)]
        if bad:
            raise ValueError(f"out_indices must be within 0..3, got {tuple(out_indices)}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate (dropout before the classifier) must be in [0, 1), got {drop_rate}")
        self.block_type = block_type
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_channels
        self.forward_kwargs = dict(forward_kwargs or {})
        self.grad_checkpointing = grad_checkpointing
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        block_kwargs = dict(block_kwargs or {})

        self.downsample_layers = nn.ModuleList([Stem(in_channels, dims[0])])
        for i in range(1, 4):
            self.downsample_layers.append(DownsampleLayer(dims[i - 1], dims[i]))

        # float32 linspace then .item(), as the original: the rates are bit-identical.
        dp_rates = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        grid = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            res = (grid[0] // 2**i, grid[1] // 2**i)
            self.stages.append(nn.ModuleList([
                block_type(dim=dims[i], drop_path=dp_rates[cur + j], stage=i, depth=j,
                           total_depth=cur + j, input_resolution=res,
                           layer_scale_init_value=layer_scale_init_value, **block_kwargs)
                for j in range(depths[i])
            ]))
            cur += depths[i]

        norm = LayerNorm2d if norm_every_stage else (lambda d: nn.Identity())
        self.stage_norms = nn.ModuleList([norm(d) for d in dims])
        self.stage_end_norm = nn.Identity() if norm_every_stage else LayerNorm2d(dims[-1])

        # timm's convention: num_features is the width of forward_features (the last stage),
        # head_hidden_size that of the pre-logits vector (after the 1x1 conv head).
        self.num_features = dims[-1]
        self.head_hidden_size = int(dims[-1] * extra_transform_ratio) if extra_transform else dims[-1]
        self.drop_rate = drop_rate
        if features_only:
            # A feature extractor has no classifier: unused parameters would upset DDP/ZeRO.
            self.conv_head = self.avg_head = self.head = None
            self.head_drop = nn.Identity()
        else:
            if extra_transform:
                self.conv_head = nn.Sequential(
                    nn.Conv2d(dims[-1], self.head_hidden_size, 1, bias=False),
                    nn.BatchNorm2d(self.head_hidden_size),
                    nn.GELU(),
                )
            else:
                self.conv_head = nn.Identity()
            self.avg_head, mult = _global_pool(global_pool, num_classes, "MetaArch")
            self.global_pool = "avg" if global_pool is None else global_pool
            # No module at 0 (the recipes' value): the graphs stay what they were.
            self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
            self.head = nn.Linear(mult * self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stage_norms.{i}") for i in range(4)]
        self.feature_info = FeatureInfo([info[i] for i in self.out_indices] if features_only else info)
        self.apply(_init_weights)

    # -- timm's model interface --------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return no_weight_decay_names(self)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise lr decay): the stem is layer 0; each block is
        its own layer (coarse: each stage); a downsample shares the layer of the first block
        after it and a stage norm that of the last block before it, as in timm's ConvNeXt;
        conv head and classifier match nothing, so timm numbers them last."""
        after_prev = (99999,)  # timm's MATCH_PREV_GROUP: merged into the preceding layer
        if coarse:
            blocks = [(r"^(?:downsample_layers|stages|stage_norms)\.(\d+)", None),
                      (r"^stage_end_norm\.", after_prev)]
        else:
            blocks = [(r"^downsample_layers\.(\d+)\.", (0,)),
                      (r"^stages\.(\d+)\.(\d+)\.", None),
                      (r"^stage_norms\.(\d+)\.", after_prev),
                      (r"^stage_end_norm\.", after_prev)]
        return dict(stem=r"^downsample_layers\.0\.", blocks=blocks)

    def load_pretrained(self, checkpoint, **kwargs):
        """timm's `custom_load` hook (`timm.create_model(name, pretrained=True)`): our loader's
        conventions (stm_dist.models.pretrained); a head of another class count is replaced,
        with a warning naming both counts (timm logs the same when it adapts a classifier)."""
        from .pretrained import load_pretrained

        kwargs.setdefault("new_head", True)
        report = load_pretrained(self, checkpoint, **kwargs)
        if report.new_head:
            old, new = report.head_classes
            name = (getattr(self, "pretrained_cfg", None) or {}).get("architecture") or type(self).__name__
            _logger.warning(f"{name}: the {old}-class classifier of {report.source} is not used: the model has "
                            f"num_classes={new}, its head is newly initialised (pass num_classes={old} to keep "
                            "the file's)")
        return report

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for `num_classes` (0: none, forward_head returns the pooled vector);
        `global_pool`: one of POOL_TYPES ('' removes the pooling, with num_classes=0), None keeps
        the current one."""
        if self.features_only:
            raise RuntimeError("reset_classifier: this model was built with features_only=True (no head)")
        pool = self.global_pool if global_pool is None else global_pool
        avg_head, mult = _global_pool(pool, num_classes, "reset_classifier")
        if global_pool is not None:
            self.avg_head, self.global_pool = avg_head, pool
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = nn.Linear(mult * self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)
        self.head.to(device=ref.device, dtype=ref.dtype)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm 1.0's feature getter. Intermediates are the stage maps after their stage norms
        (on the main path, strides 4/8/16/32); `indices`: last n stages (int), those listed, or
        all (None). `norm` adds `stage_end_norm` to the last stage's map. Returns the list, or
        (final map as forward_features gives it, list)."""
        if output_fmt != "NCHW":
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        n = len(self.stages)
        take, max_index = feature_take_indices(n, indices)
        last = max_index if stop_early else n - 1
        bt = self.block_type
        extra = bt.extra_inputs(x, **self.forward_kwargs) if hasattr(bt, "extra_inputs") else None
        outs = []
        for i in range(last + 1):
            x = self.downsample_layers[i](x)
            x = run_stage(bt, self.stages[i], x, None if extra is None else extra[i], self.grad_checkpointing)
            x = self.stage_norms[i](x)
            if i in take:
                outs.append(self.stage_end_norm(x) if norm and i == n - 1 else x)
        if intermediates_only:
            return outs
        if last == n - 1:
            x = self.stage_end_norm(x)
        return x, outs

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last index kept (and the head); returns the absolute indices."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        keep = max_index + 1
        self.stages = self.stages[:keep]
        self.downsample_layers = self.downsample_layers[:keep]
        self.stage_norms = self.stage_norms[:keep]
        self.feature_info = FeatureInfo(self.feature_info[:keep])
        if prune_norm or prune_end:
            self.stage_end_norm = nn.Identity()  # sized for the last stage only
        if (prune_head or prune_end) and not self.features_only:
            self.conv_head = nn.Identity()
            self.num_features = self.head_hidden_size = self.dims[max_index]
            self.reset_classifier(0, "")
        return take

    def forward_stages(self, x: torch.Tensor) -> list:
        """All stage maps (NCHW, strides 4/8/16/32), each after its stage norm."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, dims[-1], H/32, W/32) after `stage_end_norm`: what the conv
        head consumes (timm's convention). The original's pooled "forward_features" vector is
        `forward_head(forward_features(x), pre_logits=True)`."""
        x, _ = self.forward_intermediates(x, indices=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Conv head, global pooling, dropout (drop_rate), then the classifier (`pre_logits`: the
        pooled vector after the dropout, as timm's heads give it)."""
        if self.features_only:
            raise RuntimeError("forward_head needs the conv head; this model was built with features_only=True")
        x = self.head_drop(self.avg_head(self.conv_head(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            feats = self.forward_stages(x)
            return [feats[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))
