"""U-Swin: (shifted) window self-attention as the spatial token mixer (spec §2.3).

Beyond the original: any input size works. The feature map is zero-padded (bottom/right) to a
multiple of the window, padded keys are masked out, and the shift mask is built for each
resolution and kept in a small LRU shared by all blocks. At the construction resolution the persistent `attn_mask` buffer is used
as is (it stays in the state dict for key parity), so 224x224 outputs are the original's.

`detection=True` is the original's detection block instead (detection/mmdet_custom/.../swin.py):
every odd block shifts by window // 2 at any map size (no clamp to one window), the map is
padded to a multiple of the window with the padded tokens attended like real ones (only the
shift regions are masked, the mask built per input size), and there is no `attn_mask` buffer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .layers import LayerNorm2d, MaskCache, Mlp, drop_path_or_identity, layer_scale, sdpa_pays
from .registry import paper_release, register_mixer

__all__ = ["SwinBlock", "WindowAttention", "window_partition", "window_reverse", "shift_window_mask",
           "MODELS"]

_MASK_VALUE = -100.0  # the original's additive mask value
# Shift/padding masks of resolutions other than the construction one, shared by all blocks.
_MASKS = MaskCache(maxsize=16)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws*ws, C); windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shift_window_mask(H: int, W: int, Hp: int, Wp: int, ws: int, shift: int, device=None,
                      mask_padding: bool = True):
    """Additive (nW, ws*ws, ws*ws) mask for a map padded from (H, W) to (Hp, Wp), or None.

    Tokens may only attend tokens of the same label: the 3x3 shift regions of Swin (built in the
    rolled frame, as the original), and padding gets labels of its own so that no real token
    attends a padded one (`mask_padding=False`: padded tokens are ordinary tokens, as in the
    original detection backbone).
    """
    if shift == 0 and ((H, W) == (Hp, Wp) or not mask_padding):
        return None
    label = torch.zeros(Hp, Wp, device=device)
    if shift > 0:
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        cnt = 0
        for hs in cuts:
            for wsl in cuts:
                label[hs, wsl] = cnt
                cnt += 1
    pad = torch.zeros(Hp, Wp, device=device)
    if not mask_padding:
        H, W = Hp, Wp
    pad[H:, :] = 1.0
    pad[:, W:] = 1.0
    if shift > 0:
        pad = torch.roll(pad, (-shift, -shift), (0, 1))
    label = label + 16.0 * pad
    win = window_partition(label.view(1, Hp, Wp, 1), ws).squeeze(-1)  # (nW, N)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, _MASK_VALUE), torch.zeros_like(diff))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias.

    `fused_attn=True` runs F.scaled_dot_product_attention with the bias (plus the shift/padding
    mask) as its additive attn_mask, except where that is slower (layers.sdpa_pays); False
    keeps the explicit matmul-softmax-matmul in the original's order. Same function; rounding
    differs within the parity tolerances.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 fused_attn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.fused_attn = fused_attn
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
        index = rel[0] * (2 * window_size - 1) + rel[1]
        self.register_buffer("relative_position_index", index, persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _bias(self, N: int) -> torch.Tensor:
        """(h, N, N) relative position bias."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias(N).to(q.dtype)
        if sdpa_pays(self.fused_attn, q, self.relative_position_bias_table.requires_grad):
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=self.scale)
            else:
                # Windows of one image are consecutive in B_: a free view to (B, nW, h, N, d) lets
                # one (nW, h, N, N) mask broadcast over the batch instead of being copied B times.
                nW = mask.shape[0]
                attn_mask = bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)
                q, k, v = (t.view(B_ // nW, nW, h, N, C // h) for t in (q, k, v))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
                out = out.view(B_, h, N, C // h)
            return self.proj(out.transpose(1, 2).reshape(B_, N, C))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, h, N, N) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
            attn = attn.view(B_, h, N, N)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SwinBlock(nn.Module):
    # What stm_dist.detection.create_backbone adds to block_kwargs: the original's detection block.
    detection_kwargs = dict(detection=True)

    def __init__(self, dim, drop_path=0.0, stage=0, depth=0, total_depth=0, input_resolution=(56, 56),
                 layer_scale_init_value=1e-6, num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4,
                 fused_attn=True, detection=False):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.detection = detection
        shift = 0 if depth % 2 == 0 else window_size // 2
        if min(self.input_resolution) <= window_size and not detection:
            # As the original: a stage no larger than one window neither shifts nor pads.
            shift, window_size = 0, min(self.input_resolution)
        self.window_size, self.shift_size = window_size, shift

        self.gamma_1 = layer_scale((dim,), layer_scale_init_value)
        self.gamma_2 = layer_scale((dim,), layer_scale_init_value)
        H, W = self.input_resolution
        if shift > 0 and not detection:
            Hp, Wp = -(-H // window_size) * window_size, -(-W // window_size) * window_size
            self.register_buffer("attn_mask", shift_window_mask(H, W, Hp, Wp, window_size, shift),
                                 persistent=True)
        else:
            self.attn_mask = None
        self.norm1 = LayerNorm2d(dim)
        self.attn = WindowAttention(dim, num_heads[stage], window_size, fused_attn=fused_attn)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

    def _mask(self, H, W, Hp, Wp, shift, device, dtype):
        if (H, W) == self.input_resolution and self.attn_mask is not None and shift == self.shift_size:
            return self.attn_mask
        ws, mask_padding = self.window_size, not self.detection
        if shift == 0 and ((H, W) == (Hp, Wp) or not mask_padding):
            return None

        def build():
            return shift_window_mask(H, W, Hp, Wp, ws, shift, device, mask_padding).to(dtype)

        return _MASKS.get((H, W, Hp, Wp, ws, shift, mask_padding, str(device), dtype), build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW -> NCHW
        B, C, H, W = x.shape
        ws, s = self.window_size, self.shift_size
        if min(H, W) <= ws and not self.detection:
            # The original's rule, applied to the actual size: a map that fits one window gains
            # nothing from shifting, and the cyclic-shift mask would cut neighbours apart.
            s = 0
        y = self.norm1(x).permute(0, 2, 3, 1)
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        if (Hp, Wp) != (H, W):
            y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
        if s > 0:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = self.attn(window_partition(y, ws), self._mask(H, W, Hp, Wp, s, x.device, x.dtype))
        y = window_reverse(y, ws, Hp, Wp)
        if s > 0:
            y = torch.roll(y, (s, s), (1, 2))
        y = y[:, :H, :W, :]
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y.permute(0, 3, 1, 2))

        y = self.mlp(self.norm2(x).permute(0, 2, 3, 1))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


def _cfg(size, depths, dims, heads, dpr):
    return dict(depths=depths, dims=dims, drop_path_rate=dpr, url=paper_release("swin", size),
                block_kwargs=dict(num_heads=heads, window_size=7))


MODELS = register_mixer("swin", SwinBlock, {
    "micro": _cfg("micro", (2, 2, 9, 2), (32, 64, 128, 256), (1, 2, 4, 8), 0.0),
    "tiny": _cfg("tiny", (2, 2, 6, 2), (96, 192, 384, 768), (3, 6, 12, 24), 0.2),
    "small": _cfg("small", (2, 2, 18, 2), (96, 192, 384, 768), (3, 6, 12, 24), 0.3),
    "base": _cfg("base", (2, 2, 18, 2), (128, 256, 512, 1024), (4, 8, 16, 32), 0.5),
})
