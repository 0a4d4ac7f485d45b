"""U-InternImage: DCNv3 blocks for the unified backbone (spec §2.5, §3, §5).

The mixer is a 3x3 deformable convolution with softmax-normalised per-group modulation, written
as the original `MSDeformAttnGrid_softmax`: a depth-wise conv branch predicts offsets and
weights, values are projected and zero-padded, and the sampling itself goes through the one
operator entry point `stm_dist.ops.ms_deform_attn` (compiled kernel or PyTorch reference).

Parameter names follow the original checkpoints (`gamma1`, `attn.dw_conv.0`,
`attn.dw_conv.1.norm`, `attn.sampling_offsets`, ...).
"""
import math
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from stm_dist.ops import ms_deform_attn

from .layers import Mlp, drop_path_or_identity, layer_scale
from .registry import paper_release, register_mixer

__all__ = ["DeformInputs", "DeformableGridAttention", "DCNv3Block", "MODELS"]


class DeformInputs(NamedTuple):
    """Per-stage sampling geometry, computed once per forward and shared by the stage's blocks."""

    reference_points: torch.Tensor  # (1, H*W, 1, 2) float32, (x, y) normalised to the padded map
    spatial_shapes: torch.Tensor  # (1, 2) int64 on the CPU: padded (H, W)
    level_start_index: torch.Tensor  # (1,) int64 on the CPU
    size: Tuple[int, int]  # unpadded (H, W) of the stage's feature map


def _pad_width(deform_points, deform_padding):
    return int(math.sqrt(deform_points) // 2) if deform_padding else 0


def _stage_size(img_size, stage):
    # The stem and every downsample are 3x3/stride-2/pad-1 convs: each halves with ceil. The
    # original floored here, which only agrees for inputs that are multiples of 32.
    return -(-img_size // 2 ** (stage + 2))


def _reference_points(padded_h, padded_w, pad, device):
    # float32 on purpose, whatever the model dtype: the original builds them this way and the
    # float64 parity fixtures carry its rounding (fixtures README, "DCNv3 caveat").
    ys = torch.linspace(pad + 0.5, padded_h - pad - 0.5, padded_h - 2 * pad, dtype=torch.float32, device=device)
    xs = torch.linspace(pad + 0.5, padded_w - pad - 0.5, padded_w - 2 * pad, dtype=torch.float32, device=device)
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    ref = torch.stack((ref_x.reshape(-1)[None] / padded_w, ref_y.reshape(-1)[None] / padded_h), -1)
    return ref[:, :, None]


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over C of an NCHW map; kept as a wrapper for the `dw_conv.1.norm` key."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DeformableGridAttention(nn.Module):
    """DCNv3 core (original `MSDeformAttnGrid_softmax`, one level) on NHWC input.

    For output pixel (i, j) and group g it returns
    `sum_p softmax(a)[p] * bilinear(value_g, i + gy_p + dy, j + gx_p + dx)` over a k x k grid,
    with values zero outside the image, followed by `output_proj`.
    """

    def __init__(self, dim, num_groups, deform_points=9, dw_kernel_size=3, deform_ratio=1.0,
                 dilation_rates=(1,), deform_padding=True, offsets_scaler=1.0):
        super().__init__()
        if dim % num_groups != 0:
            raise ValueError(f"DeformableGridAttention: dim {dim} is not divisible by num_groups {num_groups}")
        if num_groups % len(dilation_rates) != 0:
            raise ValueError(f"DeformableGridAttention: num_groups {num_groups} is not a multiple of "
                             f"len(dilation_rates) {len(dilation_rates)}")
        kernel = int(math.sqrt(deform_points))
        if kernel * kernel != deform_points:
            raise ValueError(f"DeformableGridAttention: deform_points {deform_points} is not a square")
        self.num_groups = num_groups
        self.num_points = deform_points
        self.value_dim = int(dim * deform_ratio)
        self.pad = _pad_width(deform_points, deform_padding)
        self.offsets_scaler = offsets_scaler

        self.dw_conv = nn.Sequential(
            nn.Conv2d(dim, dim, dw_kernel_size, 1, (dw_kernel_size - 1) // 2, groups=dim),
            ChannelsLastLayerNorm(dim),
            nn.GELU(),
        )
        self.sampling_offsets = nn.Linear(dim, num_groups * deform_points * 2)
        self.attention_weights = nn.Linear(dim, num_groups * deform_points)
        self.value_proj = nn.Linear(dim, self.value_dim)
        self.output_proj = nn.Linear(self.value_dim, dim)
        self.kernel = kernel
        self.dilation_rates = tuple(dilation_rates)

    def _grid(self, dtype, device):
        """Fixed sampling grid (1, 1, G, 1, P, 2) as (x, y), x varying slowest over the k x k
        points as in the original; group g uses dilation_rates[g % len(dilation_rates)].

        Built on the device each call instead of kept as a buffer: no host-to-device copy (that
        would sync the stream in every block), and nothing left uninitialised when a model is
        built on the meta device and materialised later.
        """
        k, G, rates = self.kernel, self.num_groups, self.dilation_rates
        unit = torch.arange(k, dtype=dtype, device=device) + (-k // 2 + 1)
        unit = torch.stack((unit.repeat_interleave(k), unit.repeat(k)), -1)  # (P, 2)
        if len(set(rates)) == 1:
            grid = (unit * rates[0]).expand(G, -1, -1)
        else:
            grid = torch.stack([unit * rates[g % len(rates)] for g in range(G)])
        return grid.reshape(1, 1, G, 1, k * k, 2)

    def forward(self, x, deform: DeformInputs):
        N, H, W, C = x.shape
        G, P, pad = self.num_groups, self.num_points, self.pad
        query = self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        value = self.value_proj(x)
        if pad:
            # Zero border added after the projection (so it stays zero, bias included). Not F.pad:
            # in this graph torch.compile's backward of the pad (torch 2.14, aot_eager) handed a
            # non-contiguous gradient to a `view` and failed at run time.
            padded = value.new_zeros(N, H + 2 * pad, W + 2 * pad, self.value_dim)
            padded[:, pad:pad + H, pad:pad + W] = value
            value = padded
        value = value.reshape(N, (H + 2 * pad) * (W + 2 * pad), G, self.value_dim // G)

        offsets = self.sampling_offsets(query).reshape(N, H * W, G, 1, P, 2)
        weights = F.softmax(self.attention_weights(query).reshape(N, H * W, G, P), -1).reshape(N, H * W, G, 1, P)

        # Locations in at least float32 whatever the model or autocast dtype: bf16/fp16
        # coordinates would be off by a good fraction of a pixel.
        geo_dtype = torch.promote_types(value.dtype, torch.float32)
        step = (self._grid(geo_dtype, x.device) + offsets.to(geo_dtype)) * self.offsets_scaler
        # Normalised to the padded map by dividing (not multiplying by a reciprocal): the
        # original's rounding, which the float64 fixtures carry.
        step = torch.stack((step[..., 0] / (W + 2 * pad), step[..., 1] / (H + 2 * pad)), -1)
        locations = deform.reference_points[:, :, None, :, None, :] + step
        # The value map goes in its own dtype; under autocast the op's autocast rule runs it in
        # the autocast dtype with float32 locations and weights (stm_dist/ops/registration.py).
        out = ms_deform_attn(value, deform.spatial_shapes, deform.level_start_index, locations.contiguous(), weights)
        out = self.output_proj(out)
        return out.reshape(N, H, W, C)


class DCNv3Block(nn.Module):
    """Pre-norm DCNv3 block: `block(x NCHW, DeformInputs) -> x NCHW`; runs NHWC inside."""

    def __init__(self, dim, drop_path, stage, depth, total_depth, input_resolution, layer_scale_init_value,
                 num_heads, deform_points=9, kernel_size=3, deform_padding=True, deform_ratio=1.0,
                 dilation_rates=(1,), offsets_scaler=1.0, mlp_ratio=4.0):
        super().__init__()
        self.gamma1 = layer_scale(dim, layer_scale_init_value)
        self.gamma2 = layer_scale(dim, layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DeformableGridAttention(dim, num_heads[stage], deform_points, kernel_size, deform_ratio,
                                            dilation_rates, deform_padding, offsets_scaler)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

    @staticmethod
    def extra_inputs(img, depths=4, deform_points=9, deform_padding=True):
        """Sampling geometry of every stage for a raw image batch (B, 3, h, w)."""
        if img.dim() != 4:
            raise ValueError(f"DCNv3Block.extra_inputs: expected an image batch (B, C, H, W), got shape "
                             f"{tuple(img.shape)}")
        h, w = img.shape[-2:]
        pad = _pad_width(deform_points, deform_padding)
        stages = []
        for i in range(depths):
            hs, ws = _stage_size(h, i), _stage_size(w, i)
            stages.append(DeformInputs(
                reference_points=_reference_points(hs + 2 * pad, ws + 2 * pad, pad, img.device),
                # Shapes stay on the CPU even for CUDA images: the kernels read them on the host.
                spatial_shapes=torch.tensor([[hs + 2 * pad, ws + 2 * pad]], dtype=torch.long),
                level_start_index=torch.zeros(1, dtype=torch.long),
                size=(hs, ws),
            ))
        return stages

    def forward(self, x, deform: DeformInputs):
        if tuple(x.shape[-2:]) != tuple(deform.size):
            raise ValueError(f"DCNv3Block: feature map {tuple(x.shape[-2:])} does not match the sampling "
                             f"geometry {tuple(deform.size)} built by extra_inputs")
        x = x.permute(0, 2, 3, 1)
        y = self.attn(self.norm1(x), deform)
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)
        return x.permute(0, 3, 1, 2)


def _dcn(width, depths, drop_path_rate, release=None):
    heads = tuple(width // 16 * 2 ** i for i in range(4))  # 16 channels per group everywhere
    return dict(
        depths=depths,
        dims=tuple(width * 2 ** i for i in range(4)),
        block_kwargs=dict(num_heads=heads, deform_points=9, kernel_size=3, deform_padding=True),
        forward_kwargs=dict(deform_points=9, deform_padding=True),
        drop_path_rate=drop_path_rate,
        url=paper_release("internimage", release) if release else "",
    )


# "internimage": the name of the released checkpoint files (large was not released).
MODELS = register_mixer("dcn_v3", DCNv3Block, {
    "micro": _dcn(32, (2, 2, 9, 2), 0.0, "micro"),
    "tiny": _dcn(64, (4, 4, 18, 4), 0.1, "tiny"),
    "small": _dcn(80, (4, 4, 21, 4), 0.3, "small"),
    "base": _dcn(112, (4, 4, 21, 4), 0.5, "base"),
    "large": _dcn(160, (5, 5, 22, 5), 0.5),
}, aliases=("internimage",))
