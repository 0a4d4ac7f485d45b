"""The shipped Mask R-CNN recipes (configs/detection/mask_rcnn_*.yaml): one per paper model plus the
3x multi-scale recipes of the tiny models, each loading and validating by name, with the paper's
numbers (issue 21; the original's detection/configs/unified_models/*). Nothing is built: the model
names are checked against the detection backbone registry only."""
import os

import pytest

from stm_dist.engine.config import load, resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3")
SIZES = ("micro", "tiny", "small", "base")
DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3}  # the original's model.backbone.drop_path_rate
RECIPES = [(m, s, "1x") for m in MIXERS for s in SIZES] + [(m, "tiny", "3x") for m in MIXERS]


def test_every_paper_model_has_a_recipe_and_nothing_else_is_shipped():
    shipped = sorted(f for f in os.listdir(os.path.join(REPO, "configs", "detection")) if f.startswith("mask_rcnn_"))
    assert shipped == sorted(f"mask_rcnn_unified_{m}_{s}_{k}.yaml" for m, s, k in RECIPES)


@pytest.mark.parametrize("mixer,size,kind", RECIPES, ids=[f"{m}_{s}_{k}" for m, s, k in RECIPES])
def test_recipe_has_the_papers_numbers(mixer, size, kind):
    from stm_dist.detection.backbone import list_backbones

    name = f"mask_rcnn_unified_{mixer}_{size}_{kind}"
    path = resolve_config(name)  # by name, as `stm-train --config NAME` finds it
    assert path == os.path.join(REPO, "configs", "detection", name + ".yaml")
    cfg = load(name)
    m, det, o, s, t = cfg.model, cfg.detection, cfg.optim, cfg.schedule, cfg.train
    assert m.task == "detection" and m.name == f"unified_{mixer}_{size}" and m.name in list_backbones()
    assert m.num_classes == 80 and m.pretrained is None
    assert m.drop_path_rate == DROP_PATH[size]
    # AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 (constant), no clipping, no EMA
    assert (o.lr, o.betas, o.weight_decay, o.weight_decay_end, o.clip_grad) == (1e-4, [0.9, 0.999], 0.05, None, 0.0)
    assert o.layer_decay is None and t.ema is False
    # mmdet's step policy: warm-up from 0.001 x lr, x0.1 at the milestones
    assert s.kind == "step" and s.gamma == 0.1 and s.warmup_epochs >= 1
    assert o.warmup_init_lr == pytest.approx(0.001 * o.lr, rel=1e-12)
    # 16 images per global batch, 2 per process; validation every epoch with a small batch
    assert (t.global_batch, t.micro_batch) == (16, 2)
    assert t.eval_every_epochs == 1 and cfg.data.eval_batch <= 4
    assert (det.max_size, det.flip_prob, det.size_divisor, det.head, det.mmdet_compat) == (1333, 0.5, 32, "full", False)
    if kind == "1x":
        assert (s.epochs, s.milestones, s.warmup_steps) == (12, [8.0, 11.0], 1000)
        assert det.short_sides == [800.0]
    else:  # InternImage's mask_rcnn_*_3x: 480..800 step 32, 36 epochs, steps 27 / 33, warm-up 500
        assert (s.epochs, s.milestones, s.warmup_steps) == (36, [27.0, 33.0], 500)
        assert det.short_sides == [float(v) for v in range(480, 801, 32)]
    ds = os.path.basename(cfg.deepspeed.config)
    assert ds.endswith("_bf16.json") and os.path.isfile(cfg.deepspeed.config), cfg.deepspeed.config


def test_release_spellings_name_the_recipes():
    # The paper's release files say halonet / internimage where our registry says halo / dcn_v3.
    det = os.path.join(REPO, "configs", "detection")
    assert resolve_config("mask_rcnn_unified_halonet_tiny_1x") == os.path.join(det, "mask_rcnn_unified_halo_tiny_1x.yaml")
    assert resolve_config("mask_rcnn_unified_internimage_base_1x") == os.path.join(
        det, "mask_rcnn_unified_dcn_v3_base_1x.yaml")
    from stm_dist.engine.config import ConfigError

    with pytest.raises(ConfigError, match="close recipe names: mask_rcnn_unified_swin_tiny_"):
        resolve_config("mask_rcnn_unified_swin_tiny_2x")
