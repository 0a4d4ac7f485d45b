"""Autograd and fake (meta) kernels for torch.ops.stm_dist.ms_deform_attn{,_backward}.

The device kernels are C++ (csrc/); what torch.compile / torch.export need beyond them lives
here: output shapes without computing anything (fake kernels) and the backward formula
(autograd), so that traced graphs keep the op as one node with no graph break. Imported once,
by `stm_dist.ops.extension_available()`, right after the library loads.
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
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        torch._check(
            t.dtype == value.dtype,
            lambda: f"ms_deform_attn: {name} has dtype {t.dtype} but value has dtype {value.dtype}",
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
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


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
