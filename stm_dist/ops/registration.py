"""Autograd, fake (meta) and autocast kernels for torch.ops.stm_dist.ms_deform_attn{,_backward}.

The device kernels are C++ (csrc/); what torch.compile / torch.export need beyond them lives
here: output shapes without computing anything (fake kernels) and the backward formula
(autograd), so that traced graphs keep the op as one node with no graph break; and the autocast
rule (value in the autocast dtype, locations and weights in float32). Imported once, by
`stm_dist.ops.extension_available()`, right after the library loads.
"""
import torch

_OP = "stm_dist::ms_deform_attn"
_BWD = "stm_dist::ms_deform_attn_backward"


def _check_shapes(value, sampling_locations, attention_weights):
    # The C++ kernels check everything; the fake kernel repeats the checks that decide shapes, so
    # that a traced graph fails at trace time with the same message instead of producing garbage.
    torch._check(value.dim() == 4, lambda: f"ms_deform_attn: value must be 4-D (N, S, M, D), got {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6,
        lambda: f"ms_deform_attn: sampling_locations must be 6-D (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}",
    )
    torch._check(
        attention_weights.dim() == 5,
        lambda: f"ms_deform_attn: attention_weights must be 5-D (N, Lq, M, L, P), got {tuple(attention_weights.shape)}",
    )
    half_value = value.dtype in (torch.float16, torch.bfloat16)
    torch._check(
        sampling_locations.dtype == value.dtype or (half_value and sampling_locations.dtype == torch.float32),
        lambda: f"ms_deform_attn: sampling_locations has dtype {sampling_locations.dtype} but value has dtype "
                f"{value.dtype} (locations and weights take value's dtype, or float32 next to a float16/bfloat16 value)",
    )
    torch._check(
        attention_weights.dtype == sampling_locations.dtype,
        lambda: f"ms_deform_attn: attention_weights has dtype {attention_weights.dtype} but sampling_locations has "
                f"dtype {sampling_locations.dtype}",
    )
    N, _, M, _ = value.shape
    torch._check(sampling_locations.shape[0] == N and sampling_locations.shape[2] == M,
                 lambda: "ms_deform_attn: sampling_locations (N, Lq, M, ...) does not match value (N, S, M, D)")


@torch.library.register_fake(_OP)
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_shapes(value, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


@torch.library.register_fake(_BWD)
def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights):
    _check_shapes(value, sampling_locations, attention_weights)
    # new_empty, not empty_like: the kernels return contiguous gradients whatever the inputs'
    # strides, and a fake that kept the strides would let a traced graph assume a wrong layout.
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.stm_dist.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_loc if needs[3] else None,
        grad_attn if needs[4] else None,
    )


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def _autocast_cast(t, dtype):
    # Autocast's own rule: only floating tensors other than float64 are cast.
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


def _register_autocast(device_type):
    """Under autocast the value map (the bulk of the op's memory traffic) runs in the autocast
    dtype; sampling locations and attention weights stay float32. In bf16 (8 significant bits) a
    location near 1.0 is rounded by up to 2^-9 of the map, 0.1 pixel on a 58-pixel map and a
    whole pixel from 512 pixels on; float32 keeps it exact to the kernels' float arithmetic. The
    weights are a sliver of the op's bytes and the kernels take them together with the locations.

    torch.library.register_autocast would cast every floating input to one dtype, so this is the
    same registration (a kernel on the Autocast<device> key, plus the Python-dispatcher
    py_impl that tracing uses) with the per-argument rule above.
    """
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    op = torch.ops.stm_dist.ms_deform_attn.default

    def autocast_impl(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(_autocast_cast(value, dtype), spatial_shapes, level_start_index,
                      _autocast_cast(sampling_locations, torch.float32),
                      _autocast_cast(attention_weights, torch.float32))

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(autocast_impl)
    _LIB.impl("ms_deform_attn", lambda _keyset, *args: autocast_impl(*args), key.name, with_keyset=True)


_LIB = torch.library.Library("stm_dist", "IMPL")  # kept alive for the process: owns the registrations
for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
