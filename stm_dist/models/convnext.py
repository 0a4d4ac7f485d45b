"""U-ConvNeXt: depth-wise 7x7 convolution as the spatial token mixer (spec §2.4).

The unified variant wraps the depth-wise conv in two 1x1 projections (like the attention
mixers' input/output projections) and, as in the original, has no activation in that branch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import LayerNorm2d, drop_path_or_identity, layer_scale
from .registry import paper_release, register_mixer

__all__ = ["ConvNeXtBlock", "MODELS"]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=None,
                 layer_scale_init_value=1e-6, kernel_size=7, mlp_ratio=4):
        super().__init__()
        # Registration order = original state-dict order (gammas first).
        self.gamma_1 = layer_scale((1, dim, 1, 1), layer_scale_init_value)
        self.gamma_2 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.dw_norm = LayerNorm2d(dim)
        self.dw_input_proj = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.dw_out_proj = nn.Conv2d(dim, dim, 1)
        self.pw_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW -> NCHW
        y = self.dw_out_proj(self.dwconv(self.dw_input_proj(self.dw_norm(x))))
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)

        x = x.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.pw_norm(x))))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        x = x + self.drop_path(y)
        return x.permute(0, 3, 1, 2)


def _cfg(size, depths, dims, dpr):
    return dict(depths=depths, dims=dims, drop_path_rate=dpr, url=paper_release("convnext", size))


MODELS = register_mixer("convnext", ConvNeXtBlock, {
    "micro": _cfg("micro", (3, 3, 8, 3), (32, 64, 128, 256), 0.0),
    "tiny": _cfg("tiny", (2, 2, 9, 2), (96, 192, 384, 768), 0.1),
    "small": _cfg("small", (2, 2, 24, 2), (96, 192, 384, 768), 0.4),
    "base": _cfg("base", (2, 2, 24, 2), (128, 256, 512, 1024), 0.5),
})
