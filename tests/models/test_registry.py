"""Registry, model interface and parameter-count checks (cheap: meta device where possible)."""
import subprocess
import sys

import pytest
import torch

from parity import original_keys
from stm_dist.models import create_model, list_models, resolve_name

# Spec §4: parameter counts and state-dict entry counts of the original models.
PARAMS = {
    "unified_halo_micro": 4_389_672, "unified_halo_tiny": 31_523_176,
    "unified_halo_small": 52_831_336, "unified_halo_base": 93_327_336,
    "unified_swin_micro": 4_381_042, "unified_swin_tiny": 31_540_546,
    "unified_swin_small": 52_867_666, "unified_swin_base": 93_388_576,
    "unified_convnext_micro": 4_439_624, "unified_convnext_tiny": 31_912_360,
    "unified_convnext_small": 54_393_640, "unified_convnext_base": 95_865_576,
}
ENTRIES = {"halo": (273, 225, 417, 417), "swin": (279, 230, 428, 428), "convnext": (305, 273, 513, 513)}
FEATURES = {"micro": 384, "tiny": 1152, "small": 1152, "base": 1536}
SIZES = ("micro", "tiny", "small", "base")


def test_all_paper_models_and_extras_registered():
    names = set(list_models())
    for stm in ("halo", "pvt", "swin", "convnext", "dcn_v3"):
        for size in SIZES:
            assert f"unified_{stm}_{size}" in names
    for extra in ("unified_dcn_v3_large", *(f"unified_pvt_v2_{s}" for s in SIZES)):
        assert extra in names
    assert list_models("unified_swin_*") == sorted(f"unified_swin_{s}" for s in SIZES)


def test_aliases_and_unknown_name():
    assert resolve_name("unified_halonet_tiny") == "unified_halo_tiny"
    assert resolve_name("unified_internimage_base") == "unified_dcn_v3_base"
    with pytest.raises(KeyError, match="did you mean unified_swin_tiny"):
        create_model("unified_swim_tiny")
    with pytest.raises(TypeError, match="unknown argument.*bogus"):
        create_model("unified_swin_micro", bogus=1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_state_dict_layout(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    stm, size = name.split("_")[1], name.split("_")[2]
    sd = model.state_dict()
    assert len(sd) == ENTRIES[stm][SIZES.index(size)]
    assert model.head_hidden_size == FEATURES[size]
    ref = original_keys(name)
    if ref is not None:  # full listings exist for micro and tiny
        assert list(sd) == [k for k, _ in ref]
        assert [tuple(sd[k].shape) for k, _ in ref] == [s for _, s in ref]


def test_models_import_is_light():
    code = ("import sys, stm_dist.models as m; m.create_model('unified_convnext_micro');"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('deepspeed', 'nvidia') "
            "or k.startswith('stm_dist.engine') or k.startswith('stm_dist.data')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_drop_path_schedule_and_layer_scale():
    model = create_model("unified_swin_small")
    blocks = [b for stage in model.stages for b in stage]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    expected = [v.item() for v in torch.linspace(0, 0.3, len(blocks))]
    assert rates == expected and rates[-1] == pytest.approx(0.3)
    assert torch.all(blocks[0].gamma_1 == 1e-6)
    no_ls = create_model("unified_convnext_micro", layer_scale_init_value=0)
    assert no_ls.stages[0][0].gamma_1 is None
    x = torch.randn(1, 3, 64, 64)
    assert torch.isfinite(no_ls(x)).all()


@pytest.mark.parametrize("name", ["unified_convnext_micro", "unified_swin_micro", "unified_halo_micro"])
def test_init_rule(name):
    """Spec §1.3: every Conv2d/Linear ~ trunc_normal(0.02) with zero bias; norms at 1/0."""
    torch.manual_seed(0)
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(w.std().item() - 0.02) < 1e-3 and w.abs().max() <= 2.0
    assert all(m.bias is None or torch.all(m.bias == 0) for m in convs)
    bn = model.conv_head[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_var == 1)
