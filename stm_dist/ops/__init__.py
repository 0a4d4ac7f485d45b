"""Python face of the compiled operators in csrc/ (torch.ops.stm_dist.*).

`ms_deform_attn` is the one entry point the DCNv3 mixer calls: the compiled kernel when the
extension is built for the tensor's device, otherwise the pure-PyTorch reference. Both are
differentiable in value, sampling_locations and attention_weights.
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
    from . import registration  # noqa: F401  (fake + autograd kernels of the compiled op)

    return True


def kernel_available(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.stm_dist.<op> has a kernel for a dispatch key such as "CPU" or "CUDA"."""
    if not extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_dist::{op}", dispatch_key)


@torch.compiler.assume_constant_result
def _use_compiled(is_cuda: bool) -> bool:
    # A constant for torch.compile: the dispatcher query is not traceable, and its answer cannot
    # change once the library has loaded.
    return kernel_available("ms_deform_attn", "CUDA" if is_cuda else "CPU")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable sampling (spec §5): value (N,S,M,D), spatial_shapes (L,2) int64 (H,W),
    level_start_index (L,), sampling_locations (N,Lq,M,L,P,2) normalised (x,y), attention_weights
    (N,Lq,M,L,P) -> (N,Lq,M*D).

    sampling_locations and attention_weights are cast to value's dtype (under autocast a softmax
    hands back float32 while value is bfloat16). On CUDA keep spatial_shapes / level_start_index
    on the CPU: the kernel reads them on the host, and a GPU copy would cost a device sync.
    """
    if sampling_locations.dtype != value.dtype:
        sampling_locations = sampling_locations.to(value.dtype)
    if attention_weights.dtype != value.dtype:
        attention_weights = attention_weights.to(value.dtype)
    if _use_compiled(value.is_cuda):
        return torch.ops.stm_dist.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
