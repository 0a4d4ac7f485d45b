"""Python face of the compiled operators in csrc/ (torch.ops.stm_dist.*).

`ms_deform_attn` is the one entry point the DCNv3 mixer calls: the compiled kernel when the
extension is built for the tensor's device, otherwise the pure-PyTorch reference.
"""
import functools

import torch

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "extension_available", "kernel_available"]


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when stm_dist._C loaded (it registers its operators as a side effect)."""
    try:
        from stm_dist import _C  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_available(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.stm_dist.<op> has a kernel for a dispatch key such as "CPU" or "CUDA"."""
    if not extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_dist::{op}", dispatch_key)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable sampling; shapes as in ms_deform_attn_reference."""
    key = "CUDA" if value.is_cuda else "CPU"
    if kernel_available("ms_deform_attn", key):
        return torch.ops.stm_dist.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
