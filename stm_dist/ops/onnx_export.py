"""ONNX translation of torch.ops.stm_dist.ms_deform_attn for the dynamo exporter.

`torch.onnx.export(model, args, dynamo=True, custom_translation_table=translation_table())`
turns the compiled op (one node in the exported program) into standard ONNX: the same
decomposition as the pure-PyTorch reference (stm_dist/ops/reference.py), one GridSample
(bilinear, zeros outside, align_corners=False on the grid 2 * loc - 1) per level, the
per-point weights multiplied in and summed. A model exported without the compiled op (the
reference path) needs no table. onnxscript is imported only here, and only by export code.
"""
import torch

__all__ = ["ms_deform_attn_onnx", "translation_table", "OPSET"]

OPSET = 20  # GridSample's 'linear' mode (opset 20); torch's exporter defaults to 20 as well


def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N,S,M,D), spatial_shapes (L,2) [H,W], level_start_index (L,), sampling_locations
    (N,Lq,M,L,P,2) in [0,1] (x,y), attention_weights (N,Lq,M,L,P) -> (N, Lq, M*D) in value's type.
    Built with ONNX Script ops while the exporter traces it; M, D, L and P must be static (they
    are: the head count, channels per head, levels and points come from the model's config)."""
    from onnxscript import opset20 as op

    _, _, M, D = value.shape
    L, P = sampling_locations.shape[3], sampling_locations.shape[4]
    if not all(isinstance(d, int) for d in (M, D, L, P)):
        raise ValueError(f"ms_deform_attn ONNX translation: heads, channels, levels and points must be static, "
                         f"got M={M}, D={D}, L={L}, P={P}")

    def ints(*v):
        return op.Constant(value_ints=list(v))

    # The reference computes in the locations' precision (float32 beside a 16-bit value).
    value_c = op.CastLike(value, sampling_locations)
    weights = op.CastLike(attention_weights, sampling_locations)
    grids = op.Sub(op.Mul(sampling_locations, op.CastLike(op.Constant(value_float=2.0), sampling_locations)),
                   op.CastLike(op.Constant(value_float=1.0), sampling_locations))
    sampled = []
    for lvl in range(L):
        hw = op.Gather(spatial_shapes, op.Constant(value_int=lvl), axis=0)  # (2,) [H, W]
        start = op.Reshape(op.Gather(level_start_index, op.Constant(value_int=lvl), axis=0), ints(1))
        size = op.Reshape(op.ReduceProd(hw, keepdims=0), ints(1))
        # (N, H*W, M, D) -> (N, M, D, H*W) -> (N*M, D, H, W)
        v = op.Slice(value_c, start, op.Add(start, size), ints(1))
        v = op.Reshape(op.Transpose(v, perm=[0, 2, 3, 1]), op.Concat(ints(-1, D), hw, axis=0))
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        g = op.Transpose(op.Gather(grids, op.Constant(value_int=lvl), axis=3), perm=[0, 2, 1, 3, 4])
        g = op.Reshape(g, op.Concat(ints(-1), op.Shape(g, start=2), axis=0))
        s = op.GridSample(v, g, mode="linear", padding_mode="zeros", align_corners=0)  # (N*M, D, Lq, P)
        sampled.append(op.Unsqueeze(s, ints(3)))
    stacked = sampled[0] if L == 1 else op.Concat(*sampled, axis=3)  # (N*M, D, Lq, L, P)
    stacked = op.Reshape(stacked, op.Concat(op.Shape(stacked, end=3), ints(-1), axis=0))  # (N*M, D, Lq, L*P)
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    w = op.Transpose(weights, perm=[0, 2, 1, 3, 4])
    w = op.Reshape(w, op.Concat(ints(-1, 1), op.Shape(w, start=2, end=3), ints(L * P), axis=0))
    out = op.ReduceSum(op.Mul(stacked, w), ints(-1), keepdims=0)  # (N*M, D, Lq)
    out = op.Reshape(out, op.Concat(op.Shape(value, end=1), ints(M * D, -1), axis=0))  # (N, M*D, Lq)
    return op.CastLike(op.Transpose(out, perm=[0, 2, 1]), value)


def translation_table() -> dict:
    """{the compiled op: its ONNX translation} for torch.onnx.export(custom_translation_table=...);
    empty when stm_dist._C is not loaded (models then run, and export, the reference)."""
    from . import extension_available

    try:
        loaded = extension_available()
    except Exception:  # noqa: BLE001 - a mismatched build is not loaded: the reference runs
        loaded = False
    if not loaded:
        return {}
    return {torch.ops.stm_dist.ms_deform_attn.default: ms_deform_attn_onnx}
