"""engine/flat_params.py without DeepSpeed: a flattened model computes what the original does,
its gradients are the original's, and its state dicts unflatten to the model's own keys."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from stm_dist.engine import ds_setup, flat_params, run_checkpoints
from stm_dist.models import create_model
from stm_dist.models.param_groups import param_groups

MIXERS = ("convnext", "swin", "pvt", "halo", "dcn_v3")


def _pair(name: str):
    torch.manual_seed(0)
    a = create_model(f"unified_{name}_micro", num_classes=10, img_size=32, drop_path_rate=0.0)
    b = copy.deepcopy(a)
    groups = param_groups(b, weight_decay=0.05)
    flat_groups = flat_params.flatten(b, ds_setup.fetch_units(b), groups)
    return a, b, groups, flat_groups


@pytest.mark.parametrize("name", MIXERS)
def test_flat_model_computes_and_differentiates_like_the_original(name):
    a, b, groups, flat_groups = _pair(name)
    n_before = sum(len(g["params"]) for g in groups)
    n_after = sum(len(g["params"]) for g in flat_groups)
    assert n_after < n_before / 2, (n_before, n_after)  # what DeepSpeed's per-tensor work runs for
    # Same settings per group, the same number of values in each.
    for g, f in zip(groups, flat_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in f.items() if k != "params"}
        assert sum(p.numel() for p in g["params"]) == sum(p.numel() for p in f["params"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a.train(), b.train()
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    layout = flat_params.layout_of(b)
    grads = layout.unflatten({n: p.grad for n, p in b.named_parameters()})
    for n, p in a.named_parameters():
        assert torch.equal(grads[n], p.grad), n
    # The state dict, in the model's own keys, loads into a fresh model and equals the original.
    sd = flat_params.unflatten(b, b.state_dict())
    assert sd.keys() == a.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(sd[k], v), k
    # Outside the forward no original attribute holds a view (nothing keeps a gathered copy).
    for unit in ds_setup.fetch_units(b):
        for mod in unit.modules():
            for attr in ("weight", "bias"):
                t = mod.__dict__.get(attr)
                assert t is None or t.numel() == 0, (mod, attr)
    repr(b)  # module reprs read attributes such as `norm.bias`
    assert flat_params.Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


def test_channels_last_weights_stay_channels_last_and_the_layout_is_checked():
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(unit)
    model = nn.Sequential(unit)
    groups = [{"params": [unit[0].weight], "weight_decay": 0.05},
              {"params": [unit[0].bias, unit[1].weight, unit[1].bias], "weight_decay": 0.0}]
    # No units (the model under gradient checkpointing): nothing changes, no layout is recorded.
    assert flat_params.flatten(model, [], groups) is groups and flat_params.layout_of(model) is None
    flat_params.flatten(model, [unit], groups)
    seen = []
    unit[0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), ref(x))
    assert seen == [True] and not unit[0].weight.numel()
    sd = flat_params.unflatten(model, model.state_dict())
    torch.testing.assert_close(sd["0.0.weight"], ref[0].weight)
    bad = {"0.flat_params_0": torch.zeros(3)}
    with pytest.raises(flat_params.FlatLayoutError, match=r"0\.flat_params_0: 3 values, its layout holds 108"):
        flat_params.layout_of(model).unflatten(bad)


def test_a_checkpoint_of_another_fetch_unit_is_refused_by_name():
    _, b, _, _ = _pair("convnext")
    live = flat_params.layout_of(b)
    assert run_checkpoints._layout_mismatch(live.to_json(), live) is None
    assert run_checkpoints._layout_mismatch(None, None) is None
    msg = run_checkpoints._layout_mismatch(None, live)
    assert "saved with zero3_fetch_unit 'block' or 'module', this run uses 'flat'" in msg
    msg = run_checkpoints._layout_mismatch(live.to_json(), None)
    assert "saved with zero3_fetch_unit 'flat', this run uses 'block' or 'module'" in msg
    other = dict(live.to_json())
    other.pop(next(iter(other)))
    assert "group the model's parameters differently" in run_checkpoints._layout_mismatch(other, live)
