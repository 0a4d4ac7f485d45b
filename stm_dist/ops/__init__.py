"""Python face of the compiled operators in csrc/ (torch.ops.stm_dist.*).

`ms_deform_attn` is the one entry point the DCNv3 mixer calls: the compiled kernel when the
extension is built for the tensor's device, otherwise the pure-PyTorch reference (with a warning:
it is 5-10x slower). Both are differentiable in value, sampling_locations and attention_weights.

A stm_dist._C built for another torch is never loaded: see build_guard.py.
"""
import functools
import warnings

import torch

from . import build_guard
from .build_guard import ExtensionBuildMismatch
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "extension_available", "kernel_available",
           "ExtensionBuildMismatch"]


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when stm_dist._C loaded (it registers its operators as a side effect); False when it is
    not built. Raises ExtensionBuildMismatch when it is built for another torch (or fails to load)."""
    if not build_guard.load():
        return False
    from . import registration  # noqa: F401  (fake, autograd and autocast kernels of the compiled op)

    return True


def kernel_available(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.stm_dist.<op> has a kernel for a dispatch key such as "CPU" or "CUDA"."""
    if not extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_dist::{op}", dispatch_key)


_WARNED = set()


@torch.compiler.assume_constant_result
def _use_compiled(is_cuda: bool) -> bool:
    # A constant for torch.compile: the dispatcher query is not traceable, and its answer cannot
    # change once the library has loaded.
    key = "CUDA" if is_cuda else "CPU"
    found = kernel_available("ms_deform_attn", key)
    if not found and key not in _WARNED:
        _WARNED.add(key)
        why = "has no CUDA kernels" if extension_available() else "is not built"
        warnings.warn(f"stm_dist._C {why}: ms_deform_attn on {key} runs the pure-PyTorch reference, 5-10x "
                      f"slower; {build_guard.REBUILD}", RuntimeWarning, stacklevel=3)
    return found


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable sampling (spec §5): value (N,S,M,D), spatial_shapes (L,2) int64 (H,W),
    level_start_index (L,), sampling_locations (N,Lq,M,L,P,2) normalised (x,y), attention_weights
    (N,Lq,M,L,P) -> (N,Lq,M*D) in value's dtype.

    Locations and weights are cast to value's dtype, except next to a bfloat16/float16 value,
    where they are float32 (a bf16 coordinate is off by up to 2^-9 of the map). Under autocast
    the op's autocast kernel casts value to the autocast dtype (stm_dist/ops/registration.py).
    On CUDA keep spatial_shapes / level_start_index on the CPU: the kernel reads them on the
    host, and a GPU copy would cost a device sync.
    """
    geo = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    if sampling_locations.dtype != geo:
        sampling_locations = sampling_locations.to(geo)
    if attention_weights.dtype != geo:
        attention_weights = attention_weights.to(geo)
    if _use_compiled(value.is_cuda):
        return torch.ops.stm_dist.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
