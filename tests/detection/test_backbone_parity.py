"""Float64 parity of the 20 detection backbones with the original's (shared/spec/
original_det_fixtures: outputs of the original mmdet backbones on fixed weights, 1x3x224x320).

Each model is built once, float64, filled by the fixtures' weight rule from its own state-dict
keys (which must be the original's), and run once; ~50 s for all 20 on a quiet 2-core box.
"""
import os

import pytest
import torch

from parity import SPEC_DIR, fill_state_dict
from stm_dist.detection import create_backbone
from stm_dist.detection.backbone import backbone_config

FIXTURES = os.path.join(SPEC_DIR, "original_det_fixtures", "fixtures.pt")
NAMES = [f"unified_{m}_{s}" for m in ("halo", "pvt", "swin", "convnext", "dcn_v3")
         for s in ("micro", "tiny", "small", "base")]
# README "Suggested tolerance"; DCNv3's float32 reference points (see the classification note)
TOL = {"dcn_v3": 1e-6}


@pytest.fixture(scope="module")
def fixtures():
    assert os.path.exists(FIXTURES), f"detection fixtures missing: {FIXTURES}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: spinning OpenMP threads cost more than they give
    yield torch.load(FIXTURES, weights_only=False)["models"]
    torch.set_num_threads(threads)


def test_fixture_file_covers_the_20(fixtures):
    assert sorted(fixtures) == sorted(NAMES)


def _same_config(ours: dict, theirs: dict, name: str):
    """The original config's model.backbone arguments are what create_backbone uses."""
    for key in ("depths", "dims", "out_indices"):
        assert list(ours[key]) == list(theirs[key]), (name, key, ours[key], theirs[key])
    assert ours["drop_path_rate"] == theirs["drop_path_rate"], name
    for kind in ("block_kwargs", "forward_kwargs"):
        for k, v in theirs.get(kind, {}).items():
            got = ours[kind][k]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == v, (name, kind, k, got, v)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_parity(fixtures, name):
    ref = fixtures[name]
    _same_config(backbone_config(name), ref["kwargs"], name)
    torch.manual_seed(0)
    model = create_backbone(name).eval().double()
    sd = model.state_dict()

    # Keys and shapes: exactly the original's (its timm kept Swin's relative_position_index
    # as a state-dict buffer; the fixtures list only the entries the weight rule fills).
    ours = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("relative_position_index")}
    assert ours == {k: tuple(s) for k, s in ref["weight_keys"]}, name
    assert [k for k in sd if k.startswith("out_norm_")] == [f"out_norm_{i}.{p}" for i in range(4)
                                                           for p in ("weight", "bias")]
    assert model.out_channels == [s[1] for s in ref["shapes"]]

    model.load_state_dict(fill_state_dict(sd, torch.float64), strict=True)
    x = torch.randn(*ref["input_shape"], generator=torch.Generator().manual_seed(ref["input_seed"]),
                    dtype=torch.float64)
    assert x.sum().item() == pytest.approx(ref["input_sum"], abs=1e-9)
    with torch.no_grad():
        outs = model(x)
    tol = TOL.get(name[len("unified_"):].rsplit("_", 1)[0], 1e-9)
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in ref["shapes"]]
    for i, out in enumerate(outs):
        assert out.dtype == torch.float64
        dev = max((out[:, :16, :3, :3] - ref["slices"][i]).abs().max().item(),
                  (out[:, :8, -2:, -2:] - ref["corner"][i]).abs().max().item())
        assert dev <= tol, (name, i, dev)
        # Statistics over the whole map, not only the slices.
        assert abs(out.mean().item() - ref["mean"][i]) <= tol, (name, i)
        assert abs(out.std().item() - ref["std"][i]) <= tol, (name, i)
