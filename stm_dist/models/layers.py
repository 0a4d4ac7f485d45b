"""Small pieces shared by the meta-architecture and several mixers.

Module attribute names (`fc1`, `fc2`, `weight`, `bias`) are part of the checkpoint format: they
match the original state-dict keys, so they must not be renamed.
"""
import threading
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

__all__ = ["LayerNorm2d", "Mlp", "drop_path_or_identity", "to_2tuple", "MaskCache", "set_fused_attn",
           "sdpa_pays"]

# On CPU, SDPA with an attention mask that needs a gradient (Swin's learned bias, Halo's
# query-related logits) has no fused kernel: it runs torch's math reference, which measured
# slower than our explicit path (micro blocks, forward+backward, 2 threads: SDPA took 0.9-1.6x
# the explicit time, median 1.4x, for Swin and Halo stages 1-3).
# Without a mask gradient (inference, PVT) the CPU flash kernel is used, and on CUDA the
# memory-efficient kernel takes the mask gradient. Tests set this to compare both paths.
SDPA_ON_CPU_WITH_MASK_GRAD = False


def to_2tuple(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (eps 1e-6 as in the original).

    Done by permuting to NHWC and back, exactly like the original, so float rounding matches.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last dim (keys `fc1`, `fc2` as timm's Mlp)."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path_or_identity(p: float) -> nn.Module:
    """One DropPath per block (shared by both residual branches, independent draws)."""
    return DropPath(p) if p > 0.0 else nn.Identity()


def layer_scale(shape, init_value: float):
    """A learnable layer-scale gamma, or None when layer scale is switched off (init <= 0)."""
    if init_value is None or init_value <= 0:
        return None
    return nn.Parameter(init_value * torch.ones(shape))


class MaskCache:
    """A bounded LRU of constant tensors (attention masks) keyed by resolution, device and dtype.

    One instance per mixer module is shared by every block of every model in the process, so a
    mask is built once per resolution rather than once per block, and feeding many different
    input sizes evicts old masks instead of growing memory without bound. Under torch.compile the
    mask is built inside the graph (a constant Dynamo folds), so the cache never has to be traced.
    """

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._store = OrderedDict()
        self._lock = threading.Lock()  # data-loader threads or several models may share it

    def get(self, key, build):
        if torch.compiler.is_compiling():
            return build()
        with self._lock:
            hit = self._store.get(key)
            if hit is not None:
                self._store.move_to_end(key)
                return hit
        value = build()
        with self._lock:
            self._store[key] = value
            self._store.move_to_end(key)
            while len(self._store) > self.maxsize:
                self._store.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


def sdpa_pays(fused_attn: bool, q: torch.Tensor, mask_needs_grad: bool) -> bool:
    """Whether a module with `fused_attn` set should call F.scaled_dot_product_attention now."""
    if not fused_attn:
        return False
    if q.device.type == "cpu" and mask_needs_grad and torch.is_grad_enabled():
        return SDPA_ON_CPU_WITH_MASK_GRAD
    return True


def set_fused_attn(model: nn.Module, enabled: bool = True) -> int:
    """Switch every attention module of `model` between F.scaled_dot_product_attention (True)
    and the explicit matmul-softmax-matmul path (False); returns how many modules were switched.

    Both paths compute the same function (the explicit one in the original's operation order);
    the explicit path stays available for debugging and for bit-level comparisons.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "fused_attn"), bool):
            m.fused_attn = bool(enabled)
            n += 1
    return n


class NHWCStage:
    """Mixin for blocks that work on (B, H, W, C) maps (PVT, Halo): the stage hooks switch the
    layout once per stage, so a block reads its tokens as a free (B, H*W, C) view instead of
    copying NCHW <-> tokens twice per block (the original's `.contiguous()` pair). Same values,
    same rounding."""

    @staticmethod
    def pre_stage_transform(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def post_stage_transform(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous()
