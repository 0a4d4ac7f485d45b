"""The models inside timm and timm's model interface on MetaArch.

Building is cheap (meta device for the counts); forwards use the five micro models only (at 224
and 256 for the stage shapes, smaller elsewhere) to keep this file fast on CPU.
"""
import argparse
import os
import re

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet
from timm.optim import param_groups_layer_decay

from parity import SPEC_DIR, fill_state_dict
from stm_dist.models import create_model

SIZES = ("micro", "tiny", "small", "base")
PAPER_MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3")
RELEASE_NAME = {"halo": "halonet", "dcn_v3": "internimage"}
MICROS = [f"unified_{m}_micro" for m in PAPER_MIXERS]


def _spec_counts() -> dict:
    """{model: (params, F, stage channels)} from the spec's §4 table."""
    rows = {}
    text = open(os.path.join(SPEC_DIR, "original_models.md")).read()
    for m in re.finditer(r"^\| (unified_\w+) \| ([\d,]+) \| [\d.]+ \| [\d.]+ \| (\d+) \| ([^|]+)\|", text, re.M):
        chans = [int(c.split("×")[0]) for c in m.group(4).split(",")]
        rows[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3)), chans)
    return rows


SPEC = _spec_counts()


def test_spec_table_read():
    assert len(SPEC) == 25 and all(f"unified_{m}_{s}" in SPEC for m in PAPER_MIXERS for s in SIZES)


@pytest.mark.parametrize("name", [f"unified_{m}_{s}" for m in PAPER_MIXERS for s in SIZES])
def test_timm_builds_the_paper_models_with_spec_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, features, chans = SPEC[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.head_hidden_size == features and model.feature_info.channels() == chans
    assert model.num_features == chans[-1]  # timm: the width of forward_features
    mixer, size = name[len("unified_"):].rsplit("_", 1)
    cfg = model.pretrained_cfg
    assert cfg["url"] == ("https://github.com/OpenGVLab/STM-Evaluation/releases/download/cls-ckpt/"
                          f"unified_{RELEASE_NAME.get(mixer, mixer)}_{size}.pth")
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"], cfg["num_classes"]) == \
        ((3, 224, 224), 0.875, "bicubic", 1000)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.default_cfg is model.pretrained_cfg


def test_aliases_and_extras_in_timm():
    names = set(timm.list_models("unified_*"))
    for size in SIZES:
        assert {f"unified_halonet_{size}", f"unified_internimage_{size}", f"unified_pvt_v2_{size}"} <= names
    with torch.device("meta"):
        alias = timm.create_model("unified_internimage_tiny")
    assert sum(p.numel() for p in alias.parameters()) == SPEC["unified_dcn_v3_tiny"][0]
    assert alias.pretrained_cfg["url"].endswith("/unified_internimage_tiny.pth")
    assert not timm.models.get_pretrained_cfg("unified_pvt_v2_tiny").has_weights  # never released


def _pair(name, img):
    """A full model and timm's features_only wrapper of it holding the same weights."""
    torch.manual_seed(0)
    full = timm.create_model(name, img_size=img).eval()
    feat = timm.create_model(name, img_size=img, features_only=True).eval()
    assert isinstance(feat, FeatureGetterNet)
    missing = feat.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing.missing_keys
    return full, feat


@pytest.mark.parametrize("img", [224, 256])
@pytest.mark.parametrize("name", MICROS)
def test_features_only_and_forward_intermediates_give_the_stage_shapes(name, img):
    full, feat = _pair(name, img)
    chans = SPEC[name][2]
    shapes = [(1, c, img // 4 // 2**i, img // 4 // 2**i) for i, c in enumerate(chans)]
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        feats = feat(x)
        final, inter = full.forward_intermediates(x)
        last2 = full.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == shapes and feat.feature_info.channels() == chans
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(t.shape) for t in inter] == shapes
    for a, b in zip(feats, inter):
        assert torch.equal(a, b)
    assert torch.equal(last2[0], inter[2]) and torch.equal(last2[1], inter[3])
    assert torch.equal(final, inter[3])  # stage_end_norm is the identity in the unified models


def test_stop_early_pruning_and_out_indices():
    torch.manual_seed(0)
    model = create_model("unified_swin_micro").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_stages(x)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, ref[:2]))
        feat = timm.create_model("unified_swin_micro", features_only=True, out_indices=(1, 2))
        feat.model.load_state_dict(model.state_dict(), strict=False)
        outs = feat.eval()(x)
    assert feat.feature_info.channels() == [64, 128]
    assert len(feat.model.stages) == 3 and isinstance(feat.model.head, torch.nn.Identity)  # stage 3, head pruned
    assert not any(k.startswith(("stages.3", "conv_head", "head.")) for k in feat.state_dict())
    assert torch.equal(outs[0], ref[1]) and torch.equal(outs[1], ref[2])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", MICROS)
def test_forward_head_of_forward_features_is_forward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        pooled = model.forward_head(f, pre_logits=True)
        assert torch.equal(model.forward_head(f), model(x))
        assert torch.equal(model.head(pooled), model(x))
    assert tuple(f.shape) == (2, model.num_features, 2, 2) and tuple(pooled.shape) == (2, model.head_hidden_size)
    assert model.get_classifier().in_features == model.head_hidden_size != model.num_features


def test_reset_classifier():
    torch.manual_seed(0)
    model = create_model("unified_convnext_micro").eval()
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5 and model(x).shape == (1, 5)
    assert torch.all(model.head.bias == 0) and 0.005 < model.head.weight.std().item() < 0.04  # trunc_normal(.02)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (1, model.head_hidden_size, 2, 2)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(3, global_pool="")


def test_group_matcher_numbers_layers_for_layer_decay():
    model = create_model("unified_convnext_micro")  # depths 3, 3, 8, 3
    decay = 0.5
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=decay)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]} if "param_names" in groups[0] else None
    if scale is None:  # timm returns parameters only: map them back by identity
        ids = {id(p): n for n, p in model.named_parameters()}
        scale = {ids[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    layers = 1 + 17 + 1  # stem, one per block, head
    top = layers - 1
    assert scale["downsample_layers.0.stem.0.weight"] == decay ** top
    assert scale["stages.0.0.dwconv.weight"] == decay ** (top - 1)
    assert scale["downsample_layers.1.reduction.0.weight"] == scale["stages.1.0.dwconv.weight"] == decay ** (top - 4)
    assert scale["stage_norms.0.weight"] == scale["stages.0.2.dwconv.weight"]
    assert scale["stages.3.2.pwconv2.weight"] == decay ** 1
    assert scale["head.weight"] == scale["conv_head.0.weight"] == 1.0
    coarse = model.group_matcher(coarse=True)
    from timm.models._manipulate import group_parameters

    ids = group_parameters(model, coarse, reverse=True)
    assert max(ids.values()) == 5  # stem, 4 stages, head
    assert ids["downsample_layers.2.reduction.0.weight"] == ids["stages.2.7.dwconv.weight"] == ids["stage_norms.2.weight"]


def test_pretrained_through_timm_offline(tmp_path):
    """Release-style container (module. prefixes, a pickled Namespace) and a bare state dict,
    through pretrained_cfg_overlay: same logits; another class count gets a new head."""
    src = create_model("unified_halo_micro").eval()
    src.load_state_dict(fill_state_dict(src.state_dict(), torch.float32), strict=True)
    release = tmp_path / "unified_halonet_micro.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 299,
                "args": argparse.Namespace(model="unified_halonet_micro")}, release)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = src(x)
        for overlay in (dict(file=str(release)), dict(state_dict=src.state_dict())):
            m = timm.create_model("unified_halonet_micro", pretrained=True, pretrained_cfg_overlay=overlay).eval()
            assert torch.equal(m(x), ref), overlay.keys()
        ten = timm.create_model("unified_halo_micro", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(release))).eval()
        assert ten(x).shape == (1, 10)
        assert torch.equal(ten.forward_head(ten.forward_features(x), pre_logits=True),
                           src.forward_head(src.forward_features(x), pre_logits=True))


def test_unknown_timm_argument_is_named():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['bogus'\]"):
        timm.create_model("unified_swin_micro", bogus=1)


def test_timm_train_py_creates_the_models():
    """timm's train.py passes these (its defaults, None values dropped by timm.create_model)."""
    for name in ("unified_swin_micro", "unified_dcn_v3_micro"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, in_chans=3, drop_rate=0.0, scriptable=False,
                                      checkpoint_path="", global_pool=None, drop_path_rate=None)
        assert model.num_classes == 1000


def test_drop_rate_is_dropout_before_the_classifier():
    torch.manual_seed(0)
    model = timm.create_model("unified_convnext_micro", drop_rate=0.5, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    model.train()
    pooled = model.forward_head(feats, pre_logits=True)
    zeros = (pooled == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # half the pooled features dropped (GELU output is rarely exactly 0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_head(feats), model.head(model.forward_head(feats, pre_logits=True)))
    with pytest.raises(ValueError, match="drop_rate"):
        timm.create_model("unified_convnext_micro", drop_rate=1.5)


@pytest.mark.parametrize("pool,mult", [("avg", 1), ("max", 1), ("avgmax", 1), ("catavgmax", 2)])
def test_global_pool_types(pool, mult):
    torch.manual_seed(0)
    model = timm.create_model("unified_convnext_micro", global_pool=pool, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.conv_head(model.forward_features(x))
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        want = {"avg": f.mean((2, 3)), "max": f.amax((2, 3)), "avgmax": 0.5 * (f.mean((2, 3)) + f.amax((2, 3))),
                "catavgmax": torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)}[pool]
        torch.testing.assert_close(pooled, want)
        assert model(x).shape == (2, 3)
    assert model.get_classifier().in_features == mult * model.head_hidden_size
    model.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), f.mean((2, 3)))
    assert model(x).shape == (2, 5)


def test_global_pool_none_and_unknown():
    x = torch.randn(1, 3, 64, 64)
    unpooled = timm.create_model("unified_convnext_micro", global_pool="", num_classes=0).eval()
    with torch.no_grad():
        assert unpooled(x).shape == (1, unpooled.head_hidden_size, 2, 2)
    with pytest.raises(ValueError, match=r"global_pool=''.*num_classes=0"):
        timm.create_model("unified_convnext_micro", global_pool="")
    with pytest.raises(ValueError, match=r"global_pool 'median'.*'avg'"):
        timm.create_model("unified_convnext_micro", global_pool="median")


def test_output_stride():
    with torch.device("meta"):
        assert timm.create_model("unified_pvt_micro", output_stride=32).feature_info.reduction()[-1] == 32
    with pytest.raises(ValueError, match=r"unified_pvt_micro: output_stride=16 .*32"):
        timm.create_model("unified_pvt_micro", output_stride=16)


def test_readme_and_timm_docstring_say_the_models_register_on_import():
    from stm_dist.models import timm_models

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = open(os.path.join(repo, "README.md")).read()
    top = readme[:readme.index("Precision:")]  # the part that shows the models
    assert re.search(r"register with timm[^.]*`import stm_dist\.models`", top), "README"
    assert re.search(r"register with timm[^.]*`import stm_dist\.models`", timm_models.__doc__ or "")
    entry = timm.models.model_entrypoint("unified_swin_micro")
    assert "import stm_dist.models" in entry.__doc__
