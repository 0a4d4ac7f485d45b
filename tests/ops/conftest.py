import pytest
import torch


def build_inputs(batch, levels, heads, head_dim, queries, points, dtype=torch.float64, device="cpu",
                 outside=0.2, seed=0):
    """Random ms_deform_attn inputs. `levels` is a list of (H, W). Locations span
    [-outside, 1 + outside], so some samples fall partly or wholly outside the map."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(levels)
    value = torch.randn(batch, S, heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, L, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * (1 + 2 * outside) - outside
    attn = torch.rand(batch, queries, heads, L, points, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    cast = dict(dtype=dtype, device=device)
    return value.to(**cast), shapes.to(device), start.to(device), loc.to(**cast), attn.to(**cast)


# (batch, levels, heads, head_dim, queries, points): 1 and 3 levels, 2-8 heads, 4-25 points,
# head dims 16-64, batch 1 and 3; kept small so opcheck/gradcheck stay quick on two cores.
SHAPES = [
    pytest.param((1, [(6, 5)], 2, 16, 7, 9), id="b1-l1-m2-d16-p9"),
    pytest.param((3, [(5, 4), (3, 3), (2, 1)], 4, 16, 5, 4), id="b3-l3-m4-d16-p4"),
    pytest.param((1, [(4, 4), (2, 3), (1, 1)], 8, 32, 3, 25), id="b1-l3-m8-d32-p25"),
    pytest.param((3, [(3, 4)], 2, 64, 4, 5), id="b3-l1-m2-d64-p5"),
]


@pytest.fixture
def make_inputs():
    return build_inputs
