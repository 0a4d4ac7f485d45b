"""Weight-decay groups as the original decides them (spec §6.4), and the corrected switch."""
import torch

from stm_dist.models import create_model, decay_split, param_groups


def _split(name, corrected=False):
    with torch.device("meta"):
        model = create_model(name)
    decay, no_decay = decay_split(model, corrected=corrected)
    return model, set(decay), set(no_decay)


def test_original_rule_convnext_halo_swin():
    m, decay, no = _split("unified_convnext_micro")
    assert {"stages.0.0.gamma_1", "stages.0.0.gamma_2", "head.weight", "conv_head.0.weight",
            "stages.0.0.dwconv.weight"} <= decay
    assert {"stages.0.0.dwconv.bias", "stages.0.0.pw_norm.weight", "conv_head.1.weight",
            "stage_norms.0.weight", "head.bias"} <= no
    assert decay | no == {n for n, _ in m.named_parameters()} and not decay & no

    _, decay, no = _split("unified_halo_micro")
    assert {"stages.1.0.gamma_1", "stages.1.0.attn.pos_embed.height_rel",
            "stages.1.0.attn.pos_embed.width_rel", "stages.1.0.attn.kv.weight"} <= decay

    m, decay, no = _split("unified_swin_micro")
    tables = {n for n, _ in m.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= no and tables <= m.no_weight_decay()
    assert {"stages.0.0.gamma_1", "stages.0.0.gamma_2"} <= no
    assert "stages.0.0.attn.qkv.weight" in decay


def test_corrected_rule():
    for name in ("unified_convnext_micro", "unified_halo_micro", "unified_swin_micro"):
        m, decay, no = _split(name, corrected=True)
        for n in decay:
            leaf = n.rsplit(".", 1)[-1]
            assert not leaf.startswith("gamma") and "rel" not in leaf and "pos_embed" not in leaf, n
        assert all(n.endswith(".weight") for n in decay)


def test_groups_feed_an_optimizer():
    model = create_model("unified_convnext_micro")
    model.stages[0][0].dwconv.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, weight_decay=0.05)
    assert [g["group_name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()


# ---------------------------------------------------------------- layer-wise lr decay
import math  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
from timm.models._manipulate import group_parameters  # noqa: E402

from stm_dist.models.param_groups import layer_ids, layer_scales  # noqa: E402


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "resnet18"])
def test_layer_ids_number_like_timm(name):
    # timm's own numbering is the contract: prefix ordinals, regex groups, suffixes,
    # MATCH_PREV_GROUP merges, unmatched parameters last.
    with torch.device("meta"):
        model = timm.create_model(name)
    assert layer_ids(model) == group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def test_layer_ids_of_a_unified_model():
    with torch.device("meta"):
        model = create_model("unified_convnext_micro", num_classes=5)
    ids = layer_ids(model)
    n = max(ids.values()) + 1
    assert n == 1 + sum(model.depths) + 1  # stem, one layer per block, head
    assert ids["downsample_layers.0.stem.0.weight"] == 0
    assert ids["stages.0.0.dwconv.weight"] == 1 and ids["stages.3.2.dwconv.weight"] == n - 2
    assert ids["head.weight"] == ids["conv_head.0.weight"] == n - 1
    # A downsample joins the first block after it, a stage norm the last block before it.
    assert ids["downsample_layers.1.reduction.0.weight"] == ids["stages.1.0.dwconv.weight"]
    assert ids["stage_norms.0.weight"] == ids["stages.0.2.dwconv.weight"]


def test_layer_decay_groups_scale_and_keep_the_decay_rule():
    model = create_model("unified_swin_micro", num_classes=5)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    ids = layer_ids(model)
    n = max(ids.values()) + 1
    decay, no_decay = decay_split(model)
    name_of = {id(p): k for k, p in model.named_parameters()}
    seen = []
    for g in groups:
        names = [name_of[id(p)] for p in g["params"]]
        seen += names
        assert {ids[k] for k in names} == {g["layer_id"]}
        assert math.isclose(g["lr_scale"], 0.75 ** (n - 1 - g["layer_id"]), rel_tol=1e-12)
        assert set(names) <= set(decay if g["weight_decay"] > 0 else no_decay)
        assert g["weight_decay"] in (0.0, 0.05)
    assert sorted(seen) == sorted(decay + no_decay)
    assert groups[0]["lr_scale"] == 0.75 ** (n - 1) and groups[-1]["lr_scale"] == 1.0
    assert layer_scales(3, 0.5) == [0.25, 0.5, 1.0]
    # Off: exactly the original's two groups.
    assert [g["group_name"] for g in param_groups(model, 0.05)] == ["decay", "no_decay"]
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        param_groups(model, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="no group_matcher"):
        layer_ids(torch.nn.Linear(2, 2))
