"""The ERF against the analytic receptive field of a known conv stack."""
import numpy as np
import pytest
import torch

from stm_dist.analysis.erf import ERF_IMG_SIZE, area_ratio, batch_map, replknet_area_ratio


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
    erf = batch_map(conv_stack(n, k), images)["abs"]
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
    erf = batch_map(last_stage(model), torch.randn(2, 3, 128, 128))["abs"]
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


def test_batch_map_keeps_abs_for_ours_and_relu_for_replknet():
    """RepLKNet sums ReLU(gradient); ours sums |gradient|: a negative path counts only in ours."""
    feature_fn = lambda x: x[:, :1] - 2 * x[:, 1:2]  # noqa: E731  a 1-channel NCHW map
    images = torch.zeros(3, 3, 9, 9, dtype=torch.float64)
    images[:, 0] = 1.0                                 # relu(centre) = centre > 0
    maps = batch_map(feature_fn, images)
    expected_abs, expected_relu = np.zeros((9, 9)), np.zeros((9, 9))
    expected_abs[4, 4], expected_relu[4, 4] = 3 * 3.0, 3 * 1.0  # 3 images x (|+1| + |-2|) vs relu: +1 only
    np.testing.assert_array_equal(maps["abs"], expected_abs)
    np.testing.assert_array_equal(maps["relu"], expected_relu)


def _ring(m, c, r, value):
    m[c - r:c + r + 1, c - r:c + r + 1][[0, -1], :] = value
    m[c - r:c + r + 1, c - r:c + r + 1][:, [0, -1]] = value


def test_replknet_statistic_is_its_definition():
    """RepLKNet's analyze_erf: log10(x + 1), divided by its max; squares of side 2i + 1 centred on
    pixel (H // 2, W // 2), i = 1 .. H // 2 - 1; the first whose share is strictly greater (`>`)
    than t. Ours, on the same map, counts raw contributions from a single pixel up (`>=`)."""
    m = np.zeros((21, 21))
    m[10, 10] = 99.0                 # log10(100) = 2 -> 1 after the max-normalisation
    _ring(m, 10, 1, 9.0)             # 8 pixels: log10(10) = 1 -> 0.5 each; the 3 x 3 holds 5
    ring2 = np.zeros((21, 21))
    _ring(ring2, 10, 2, 1.0)
    ys, xs = np.nonzero(ring2)
    m[ys[:10], xs[:10]] = 9.0        # 10 of the 5 x 5 ring: 5 more, total 10 -> the 3 x 3 holds exactly 50%
    side, ratio = replknet_area_ratio(m, 0.5)
    assert (side, ratio) == (5, pytest.approx(25 / 441))  # 0.5 is not > 0.5: the next square
    assert replknet_area_ratio(m, 0.3) == (3, pytest.approx(9 / 441))
    assert replknet_area_ratio(m, 0.2) == (3, pytest.approx(9 / 441))  # never a single pixel
    assert area_ratio(m, 0.2) == pytest.approx(1 / 441)  # ours: 99 / 261 of the raw mass in one pixel
    # the log matters: the raw 3 x 3 holds 171 / 261 = 66% > 50%, so on the raw map it would be 3
    assert area_ratio(m, 0.5) == pytest.approx(9 / 441)
    # never the whole image: mass in a corner is outside every square RepLKNet tries
    m[0, 0] = 1e6
    assert replknet_area_ratio(m, 0.99) is None
    # centred on the image, not on the mass: a field off-centre needs a bigger square
    off = np.zeros((21, 21))
    off[5:8, 5:8] = 9.0
    assert replknet_area_ratio(off, 0.5) == (11, pytest.approx(121 / 441))
    assert area_ratio(off, 0.5) == pytest.approx(9 / 441)


def test_default_erf_size_does_not_saturate_and_help_says_why():
    """At 224 px the last stage is 7 x 7 and the fields fill the image: the default is RepLKNet's
    1024 px, for stm-analyze erf and for the erf of stm-analyze all."""
    from stm_dist.cli.analyze import build_parser, expand

    base = ["--model", "m", "--checkpoint", "random", "--data", "d", "--out", "o"]
    erf = expand(build_parser().parse_args(["erf", *base]))
    assert [a.img_size for a in erf] == [ERF_IMG_SIZE] and ERF_IMG_SIZE == 1024
    every = expand(build_parser().parse_args(["all", *base]))
    assert [(a.analysis, a.img_size) for a in every] == [("invariance", 224), ("erf", 1024), ("robustness", 224)]
    assert expand(build_parser().parse_args(["erf", *base, "--img-size", "64"]))[0].img_size == 64
    helptext = build_parser()._subparsers._group_actions[0].choices["erf"].format_help()
    assert "1024" in helptext and "RepLKNet" in helptext and "7 x 7" in helptext
