"""The ERF against the analytic receptive field of a known conv stack."""
import numpy as np
import pytest
import torch

from stm_dist.analysis.erf import area_ratio, batch_map


def conv_stack(n: int, k: int) -> torch.nn.Sequential:
    """n stride-1 k x k convs with all-ones kernels: the only path from input to output."""
    layers = [torch.nn.Conv2d(3, 1, k, padding=k // 2, bias=False)]
    layers += [torch.nn.Conv2d(1, 1, k, padding=k // 2, bias=False) for _ in range(n - 1)]
    for m in layers:
        torch.nn.init.ones_(m.weight)
    return torch.nn.Sequential(*layers).double()


@pytest.mark.parametrize("n,k", [(3, 3), (2, 5), (4, 3)])
def test_conv_stack_erf_is_the_analytic_receptive_field(n, k):
    H = W = 33
    images = torch.rand(4, 3, H, W, dtype=torch.float64)  # positive: relu(centre) is the identity
    erf = batch_map(conv_stack(n, k), images)
    # d centre / d input pixel = number of paths = (n-fold convolution of a k-box)(dy) x (same)(dx)
    profile = np.ones(1)
    for _ in range(n):
        profile = np.convolve(profile, np.ones(k))
    rf = n * (k - 1) + 1
    assert len(profile) == rf
    expected = np.zeros((H, W))
    c, r = H // 2, rf // 2
    expected[c - r:c + r + 1, c - r:c + r + 1] = 4 * 3 * np.outer(profile, profile)  # 4 images x 3 channels
    np.testing.assert_allclose(erf, expected, rtol=1e-12, atol=0)
    assert (erf > 0).sum() == rf * rf
    # the whole contribution lies inside the rf x rf square, and no smaller one
    assert area_ratio(erf, 1.0) == pytest.approx(rf * rf / (H * W))
    assert area_ratio(erf, 0.99) <= rf * rf / (H * W)


def test_fresh_unified_model_sees_what_its_downsampling_convs_see():
    """Freshly initialised, every block's branch is scaled by layer scale 1e-6, so the network is
    its stem + 3 downsamples: five 3x3 stride-2 convs, receptive field 1 + 2 (1+2+4+8+16) = 63 px,
    centred for the central pixel (2, 2) of the 4x4 map at 128 px on input pixel 64."""
    from stm_dist.analysis.erf import last_stage
    from stm_dist.models import create_model

    torch.manual_seed(0)
    model = create_model("unified_convnext_micro", num_classes=10, img_size=128).eval()
    erf = batch_map(last_stage(model), torch.randn(2, 3, 128, 128))
    inside = erf[64 - 31:64 + 32, 64 - 31:64 + 32].sum() / erf.sum()
    assert inside > 0.999
    assert 0.5 * 63 ** 2 / 128 ** 2 < area_ratio(erf, 0.99) <= 63 ** 2 / 128 ** 2


def test_area_ratio_finds_the_smallest_centred_square():
    m = np.zeros((21, 21))
    m[10, 10] = 0.5          # the centre alone: 50%
    m[9:12, 9:12] += 0.25 / 8
    m[10, 10] -= 0.25 / 8    # the 3x3 ring: 25% more
    m[0, 0] = m[0, 20] = m[20, 0] = m[20, 20] = 0.25 / 4  # the corners: the rest, centre of mass kept
    assert area_ratio(m, 0.2) == pytest.approx(1 / 441) and area_ratio(m, 0.5) == pytest.approx(1 / 441)
    assert area_ratio(m, 0.6) == pytest.approx(9 / 441) and area_ratio(m, 0.75) == pytest.approx(9 / 441)
    assert area_ratio(m, 0.99) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="all zeros"):
        area_ratio(np.zeros((5, 5)), 0.5)
