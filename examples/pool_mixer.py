"""A sixth spatial token mixer in one file: PoolFormer's average pooling (Yu et al., "MetaFormer
Is Actually What You Need for Vision", 2022) in the unified meta-architecture.

Load it with the recipe key `model.mixer_module: examples/pool_mixer.py` (stm-train, sweeps),
STM_MIXER_MODULES=examples/pool_mixer.py (any stm-* command, e.g. stm-analyze), or
`stm_dist.models.load_mixer_module("examples/pool_mixer.py")`; then `unified_pool_micro` and
`unified_pool_tiny` exist in our registry and in timm. Block contract: docs/mixers.md.
"""
import torch
import torch.nn as nn
from timm.layers import DropPath

from stm_dist.models import register_mixer


class PoolBlock(nn.Module):
    """x + drop_path(ls1 * (avgpool(norm(x)) - norm(x))), then x + drop_path(ls2 * mlp(norm(x))).
    NCHW in, NCHW out; the pooling has no parameters, the MLP is two 1x1 convs."""

    def __init__(self, dim, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=None,
                 layer_scale_init_value=1e-6, pool_size=3, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)  # PoolFormer's norm: over C, H and W of each image
        # count_include_pad=False: border tokens average only real neighbours.
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, mlp_ratio * dim, 1), nn.GELU(), nn.Conv2d(mlp_ratio * dim, dim, 1))
        use_ls = layer_scale_init_value is not None and layer_scale_init_value > 0
        self.ls1 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1)) if use_ls else None
        self.ls2 = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1)) if use_ls else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.pool(y) - y  # the mixer: neighbours' mean minus the token itself
        x = x + self.drop_path(y if self.ls1 is None else self.ls1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.ls2 is None else self.ls2 * y)


MODELS = register_mixer("pool", PoolBlock, sizes={
    # micro: the other mixers' micro widths; tiny: PoolFormer-S24's stages.
    "micro": dict(depths=(2, 2, 6, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
    "tiny": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), drop_path_rate=0.1),
})
