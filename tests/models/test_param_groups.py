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
