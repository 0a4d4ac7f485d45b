"""U-PVT: spatial-reduction attention blocks for the unified backbone (spec §2.2, §3).

`PvtBlock` is the PVT-v1 block the paper's `unified_pvt_*` models use; `PvtV2Block` (depth-wise
conv inside the MLP, no positional embedding) backs the extra `unified_pvt_v2_*` models.

Parameter names follow the original checkpoints exactly (`pos_embed`, `gamma_1`, `attn.q`,
`attn.kv`, `attn.sr`, `attn.norm`, `mlp.fc1`, ...) so released weights load without renaming.
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from .layers import Mlp, NHWCStage, drop_path_or_identity, layer_scale
from .registry import paper_release, register_mixer

__all__ = ["SpatialReductionAttention", "PvtBlock", "PvtV2Block", "MODELS"]


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a `sr_ratio`-strided conv of the tokens.

    `fused_attn=True` runs F.scaled_dot_product_attention (no mask); False writes the attention
    out (matmul, softmax, matmul) in the original's operation order. Same function; rounding
    differs within the parity tolerances.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, sr_ratio=1, fused_attn=True):
        super().__init__()
        self.fused_attn = fused_attn
        if dim % num_heads != 0:
            raise ValueError(f"SpatialReductionAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            # A strided conv floors at sizes that are not multiples of sr_ratio, which is what we
            # want: any feature size works, the key set just shrinks accordingly.
            kv_src = self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1)
            kv_src = self.norm(kv_src)
        else:
            kv_src = x
        kv = self.kv(kv_src).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class PvtBlock(NHWCStage, nn.Module):
    """PVT-v1 block, (B, H, W, C) in and out (see NHWCStage).

    The first block of every stage owns a learned positional embedding that is added to the
    residual stream (classification variant of the original). It is stored at the construction
    resolution and resized bilinearly (align_corners=True, as the original's checkpoint loader
    does) when the feature map has another size, so any input that is a multiple of 32 runs;
    at the construction size no resize happens and the numbers are the original's.

    `detection=True` is the original's detection block: the residual stream skips the positional
    embedding (the identity is taken before it is added; only the attention input carries it).
    """

    # What stm_dist.detection.create_backbone adds to block_kwargs: the original's detection block.
    detection_kwargs = dict(detection=True)

    def __init__(self, dim, drop_path, stage, depth, total_depth, input_resolution, layer_scale_init_value,
                 num_heads, mlp_ratios, sr_ratios, qkv_bias=True, fused_attn=True, detection=False):
        super().__init__()
        self.detection = detection
        if depth == 0:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *input_resolution))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        self.gamma_1 = layer_scale(dim, layer_scale_init_value)
        self.gamma_2 = layer_scale(dim, layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads[stage], qkv_bias, sr_ratios[stage], fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratios[stage]))
        self.drop_path = drop_path_or_identity(drop_path)

    def _pos_embed_at(self, H: int, W: int):
        pos = self.pos_embed
        if tuple(pos.shape[-2:]) != (H, W):
            pos = F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=True)
        return pos.permute(0, 2, 3, 1)  # (1, H, W, C) view: the add keeps x's layout

    def forward(self, x):
        B, H, W, C = x.shape
        if self.pos_embed is None:
            x = x.view(B, H * W, C)
            y = self.attn(self.norm1(x), H, W)
        elif self.detection:
            y = self.attn(self.norm1((x + self._pos_embed_at(H, W)).view(B, H * W, C)), H, W)
            x = x.view(B, H * W, C)
        else:
            x = (x + self._pos_embed_at(H, W)).view(B, H * W, C)
            y = self.attn(self.norm1(x), H, W)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        return x.view(B, H, W, C)


class TokenDepthwiseConv(nn.Module):
    """3x3 depth-wise conv applied to (B, N, C) tokens through their HxW view."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)  # key `dwconv.dwconv` as in the original

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class DepthwiseConvMlp(nn.Module):
    """PVT-v2 feed-forward: fc1 -> depth-wise conv -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = TokenDepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H: int, W: int):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class PvtV2Block(NHWCStage, nn.Module):
    """PVT-v2 block, (B, H, W, C) in and out: SRA + depth-wise-conv MLP, no positional embedding."""

    def __init__(self, dim, drop_path, stage, depth, total_depth, input_resolution, layer_scale_init_value,
                 num_heads, mlp_ratios, sr_ratios, qkv_bias=True, fused_attn=True):
        super().__init__()
        self.gamma_1 = layer_scale(dim, layer_scale_init_value)
        self.gamma_2 = layer_scale(dim, layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads[stage], qkv_bias, sr_ratios[stage], fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DepthwiseConvMlp(dim, int(dim * mlp_ratios[stage]))
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x.view(B, H * W, C)
        # v2 scales after drop-path (the v1 block scales before); same value, kept for parity.
        y = self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + (y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.drop_path(self.mlp(self.norm2(x), H, W))
        x = x + (y if self.gamma_2 is None else self.gamma_2 * y)
        return x.view(B, H, W, C)


def _pvt(depths, mlp_ratios, drop_path_rate, dims=(64, 128, 320, 512), url=""):
    return dict(
        depths=depths,
        dims=dims,
        block_kwargs=dict(num_heads=(1, 2, 5, 8), mlp_ratios=mlp_ratios, sr_ratios=(8, 4, 2, 1), qkv_bias=True),
        drop_path_rate=drop_path_rate,
        url=url,
    )


_MICRO_DIMS = (32, 64, 160, 256)

# Only the paper's PVT (v1 attention) was released; PVTv2 blocks are an extra.
MODELS = {
    **register_mixer("pvt", PvtBlock, {
        "micro": _pvt((2, 2, 3, 2), (8, 8, 4, 4), 0.0, _MICRO_DIMS, paper_release("pvt", "micro")),
        "tiny": _pvt((3, 4, 9, 3), (8, 8, 4, 4), 0.1, url=paper_release("pvt", "tiny")),
        "small": _pvt((3, 4, 21, 3), (8, 8, 4, 4), 0.3, url=paper_release("pvt", "small")),
        "base": _pvt((3, 8, 45, 3), (4, 4, 4, 4), 0.5, url=paper_release("pvt", "base")),
    }),
    **register_mixer("pvt_v2", PvtV2Block, {
        "micro": _pvt((2, 2, 3, 2), (8, 8, 4, 4), 0.0, _MICRO_DIMS),
        "tiny": _pvt((3, 3, 9, 3), (8, 8, 4, 4), 0.1),
        "small": _pvt((3, 3, 21, 3), (8, 8, 4, 4), 0.3),
        "base": _pvt((3, 6, 45, 3), (4, 4, 4, 4), 0.5),
    }),
}
