"""load_backbone_weights: the original's rules (skip conv_head/head/attn_mask, drop stage_norms,
out_norm_* new) on the paper's release format, our exports and run directories, detector files,
and named errors for weights of another model."""
import argparse
import ast
import json
import os

import pytest
import torch

from parity import SPEC_DIR, fill_state_dict
from stm_dist.detection import create_backbone, load_backbone_weights
from stm_dist.detection.backbone_weights import CheckpointError
from stm_dist.engine.export import write
from stm_dist.models import create_model

DET_FIXTURES = os.path.join(SPEC_DIR, "original_det_fixtures", "fixtures.pt")


@pytest.fixture(scope="module")
def det_keys():
    return {n: [k for k, _ in r["weight_keys"]]
            for n, r in torch.load(DET_FIXTURES, weights_only=False)["models"].items()}


def _release_file(path, name):
    """A released unified_*.pth: the original classification model's keys, shapes and dtypes
    (shared/spec/original_state_dict_keys), state dict under 'model' beside the training state."""
    rows = [line.split("\t") for line in open(os.path.join(SPEC_DIR, "original_state_dict_keys", f"{name}.txt"))
            .read().splitlines()]
    sd = {k: torch.zeros(ast.literal_eval(shape), dtype=getattr(torch, dtype)) for k, shape, dtype, _ in rows}
    sd = fill_state_dict(sd, torch.float32)
    for k, v in sd.items():  # the integer buffers as the model computes them, not zeros
        if not v.is_floating_point():
            sd[k] = v + 1
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model=name)}, path)
    return sd


@pytest.mark.parametrize("name", ["unified_swin_micro", "unified_pvt_micro", "unified_halo_micro",
                                  "unified_dcn_v3_micro"])
def test_release_file_loads_with_the_originals_skipped_and_missing_keys(tmp_path, det_keys, name):
    path = str(tmp_path / f"{name}.pth")
    cls_sd = _release_file(path, name)
    # The original's init_weights, on the key lists alone.
    kept = {k for k in cls_sd if not (k.startswith(("conv_head", "head")) or "attn_mask" in k)}
    det = set(det_keys[name]) | {k for k in cls_sd if k.endswith("relative_position_index")}
    want_skipped = [k for k in cls_sd if k not in kept]
    want_unexpected = [k for k in cls_sd if k in kept and k not in det]
    want_missing = sorted(det - kept)
    assert want_unexpected and all(k.startswith("stage_norms.") for k in want_unexpected)
    assert want_missing == sorted(f"out_norm_{i}.{p}" for i in range(4) for p in ("weight", "bias"))

    backbone = create_backbone(name)
    lines = []
    report = load_backbone_weights(backbone, path, log=lines.append)
    assert report.skipped == want_skipped
    assert report.unexpected == want_unexpected
    assert sorted(report.missing) == want_missing
    assert not report.resized
    assert any("attn_mask" in k for k in report.skipped) == (name == "unified_swin_micro")
    own = backbone.state_dict()
    assert sorted(report.loaded) == sorted(k for k in det & kept if not k.endswith("relative_position_index"))
    for k in report.loaded:
        assert torch.equal(own[k], cls_sd[k]), k
    for k in want_missing:  # fresh LayerNorms
        assert torch.equal(own[k], torch.ones_like(own[k]) if k.endswith("weight") else torch.zeros_like(own[k]))
    # the backbone's own computed index, not the file's
    for k in own:
        if k.endswith("relative_position_index"):
            assert not torch.equal(own[k], cls_sd[k])
    assert lines[0].startswith(f"backbone weights from {path}: {len(report.loaded)} tensors loaded")
    assert any("missing, new" in ln and "out_norm_0.weight" in ln for ln in lines)
    assert any("unexpected, dropped" in ln and "stage_norms.0.weight" in ln for ln in lines)


@pytest.fixture(scope="module")
def trained():
    """Our classification model with distinct weights (what stm-export / best.pth hold)."""
    m = create_model("unified_swin_micro")
    m.load_state_dict(fill_state_dict(m.state_dict(), torch.float32))
    return m.state_dict()


def _check_loaded(backbone, sd):
    own = backbone.state_dict()
    for k, v in own.items():
        if k.startswith(("downsample_layers", "stages")) and not k.endswith("relative_position_index"):
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_our_export_formats(tmp_path, trained, fmt):
    path = str(tmp_path / f"w.{fmt}")
    write(trained, path, {"model": "unified_swin_micro", "source": "test", "step": 1, "ema": False}, fmt)
    backbone = create_backbone("unified_swin_micro")
    report = load_backbone_weights(backbone, path, log=None)
    assert sorted(report.missing) == sorted(f"out_norm_{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert {k.split(".")[0] for k in report.skipped} == {"conv_head", "head", "stages"}  # attn_mask too
    _check_loaded(backbone, trained)


def test_run_directory_best_and_ema(tmp_path, trained):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="stm-export"):
        load_backbone_weights(create_backbone("unified_swin_micro"), str(run), log=None)
    # As stm-train's BestCheckpoints writes them: a bare state dict, its description beside it.
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}
    for name, sd in (("best", trained), ("best_ema", ema)):
        torch.save(sd, run / f"{name}.pth")
        (run / f"{name}.pth.json").write_text(json.dumps({"kind": name, "model": "unified_swin_micro",
                                                          "ema": name == "best_ema", "step": 1}))
    backbone = create_backbone("unified_swin_micro")
    assert load_backbone_weights(backbone, str(run), log=None).source == str(run / "best.pth")
    _check_loaded(backbone, trained)
    report = load_backbone_weights(backbone, str(run), log=None, use_ema=True)
    assert report.source == str(run / "best_ema.pth") and report.ema
    _check_loaded(backbone, ema)


def test_detector_checkpoint_backbone_part(trained):
    backbone = create_backbone("unified_swin_micro")
    det = {f"backbone.{k}": v for k, v in create_backbone("unified_swin_micro").state_dict().items()}
    det["backbone.stages.0.0.norm1.weight"] = det["backbone.stages.0.0.norm1.weight"] + 3
    det["neck.fpn_convs.0.conv.weight"] = torch.zeros(1)
    report = load_backbone_weights(backbone, {"state_dict": det}, log=None)
    assert not report.missing and not report.unexpected and not report.skipped
    assert torch.equal(backbone.state_dict()["stages.0.0.norm1.weight"], det["backbone.stages.0.0.norm1.weight"])


def test_weights_of_another_model_are_named(tmp_path, trained):
    with pytest.raises(CheckpointError, match=r"not in the file: .*stages\.0\.0\.pos_embed"):
        load_backbone_weights(create_backbone("unified_pvt_micro"), trained, log=None)
    small = {k: v for k, v in trained.items() if not k.startswith("stages.2.8")}  # 9 blocks -> 8
    backbone = create_backbone("unified_swin_micro")
    with pytest.raises(CheckpointError, match=r"stages\.2\.8\.norm1\.weight"):
        load_backbone_weights(backbone, small, log=None)
    report = load_backbone_weights(backbone, small, log=None, strict=False)
    assert "stages.2.8.norm1.weight" in report.missing
    tiny = create_backbone("unified_swin_tiny")  # 6 blocks in stage 3, wider
    with pytest.raises(CheckpointError, match=r"not in it: stages\.2\.6\.gamma_1"):
        load_backbone_weights(tiny, trained, log=None)
    with pytest.raises(CheckpointError, match=r"unified_swin_tiny: downsample_layers\.0\.stem\.0\.weight: shape"):
        load_backbone_weights(tiny, trained, log=None, strict=False)
