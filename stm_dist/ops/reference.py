"""Pure-PyTorch multi-scale deformable sampling (spec §5), the reference for the compiled kernels.

Equivalent to the original CUDA op: bilinear sampling with zeros outside each level map,
`F.grid_sample(align_corners=False)` on the grid `2 * loc - 1`.
"""
import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N,S,M,D), spatial_shapes (L,2) [H,W], sampling_locations (N,Lq,M,L,P,2) in [0,1] (x,y),
    attention_weights (N,Lq,M,L,P) -> (N, Lq, M*D) in value's dtype. With float32 locations next to
    a bf16/fp16 value (what the kernels accept) it computes in float32."""
    out_dtype = value.dtype
    compute = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, sampling_locations, attention_weights = (t.to(compute) for t in (value, sampling_locations,
                                                                           attention_weights))
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(out_dtype)
