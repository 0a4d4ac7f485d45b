"""The experiment schema: every shipped config loads; bad keys, types and files are named."""
import glob
import json
import os

import pytest

from stm_dist.engine import ds_setup
from stm_dist.engine.config import REPO_ROOT, ConfigError, check_paths, load

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.yaml")))
SWIN = os.path.join(REPO_ROOT, "configs", "unified_swin_tiny.yaml")


def test_all_twenty_model_configs_follow_the_recipe():
    load(os.path.join(REPO_ROOT, "configs", "demo_digits.yaml"))  # the demo's config is valid too
    names = [os.path.basename(p)[:-5] for p in CONFIGS if os.path.basename(p).startswith("unified_")]
    assert len(names) == 20
    from stm_dist.models import list_models

    registered = set(list_models("unified_*"))
    for p in CONFIGS:
        if not os.path.basename(p).startswith("unified_"):
            continue  # demo_digits.yaml: the small demo, not the recipe
        cfg = load(p)
        assert cfg.model.name == os.path.basename(p)[:-5] and cfg.model.name in registered, p
        cnn = "convnext" in cfg.model.name
        assert (cfg.train.global_batch, cfg.optim.lr) == ((4096, 4e-3) if cnn else (1024, 1e-3)), p
        assert (cfg.optim.warmup_init_lr, cfg.optim.min_lr) == ((0.0, 1e-6) if cnn else (1e-6, 1e-5)), p
        assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (300, 20)
        assert (cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.train.ema_decay) == (0.05, 5.0, 0.9999)
        assert (cfg.augment.mixup, cfg.augment.cutmix, cfg.augment.smoothing, cfg.augment.reprob) == (0.8, 1.0, 0.1, 0.25)


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1e-3", "'optim.lrr' (did you mean 'optim.lr'?)"),
    ("trian.seed=1", "'trian' (did you mean 'train'?)"),
    ("optim.lr=fast", "'optim.lr': expected float, got str"),
    ("train.micro_batch=1.5", "'train.micro_batch': expected int, got float"),
    ("train.ema=3", "'train.ema': expected bool, got int"),
    ("data.backend=opencv", "'data.backend' must be one of"),
    ("train.micro_batch=100", "'train.global_batch' (1024) must be a multiple of train.micro_batch (100)"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load(SWIN, [override])
    assert named in str(e.value)


def test_bad_yaml_file_names_file_and_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  name: unified_swin_tiny\n  drop_path: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load(str(p))
    assert str(p) in str(e.value) and "'model.drop_path'" in str(e.value) and "model.drop_path_rate" in str(e.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load(str(tmp_path / "missing.yaml"))


def test_missing_files_are_named(tmp_path):
    cfg = load(SWIN, [f"data.train_shards={tmp_path}", f"data.val_shards={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"'data.val_shards': no such file or directory"):
        check_paths(cfg)
    cfg = load(SWIN, [f"data.train_shards={tmp_path}", f"data.val_shards={tmp_path}",
                      "deepspeed.config=ds_configs/zero9_fp32.json"])
    with pytest.raises(ConfigError, match=r"'deepspeed.config': no such file or directory: ds_configs/zero9"):
        check_paths(cfg)


def test_deepspeed_config_is_filled_from_the_experiment():
    cfg = load(SWIN, ["train.micro_batch=64", "deepspeed.config=ds_configs/zero3_bf16.json"])
    check_paths(cfg, need_train=False, need_val=False)
    built = ds_setup.build(cfg, world_size=4, accelerator="cpu")
    ds = built.ds
    assert built.precision.name == "bf16" and built.zero_stage == 3 and not built.own_optimizer
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 5.0
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["lr"] == 1e-3
    # bf16 = fp32 master weights under autocast: DeepSpeed itself runs in fp32 mode.
    assert ds["zero_optimization"]["stage"] == 3 and "bf16" not in ds and "data_types" not in ds
    assert "mixed_precision" not in ds
    assert not any(k.startswith("_") for k in ds)
    with pytest.raises(ConfigError, match="train.global_batch"):
        ds_setup.build(cfg, world_size=3, accelerator="cpu")


def test_every_ds_config_is_valid_json_for_its_stage_and_precision():
    files = sorted(glob.glob(os.path.join(REPO_ROOT, "ds_configs", "zero*_*.json")))
    assert len(files) == 13
    for f in files:
        stage, prec = os.path.basename(f)[4:-5].split("_", 1)
        raw = json.load(open(f))
        assert raw["zero_optimization"]["stage"] == int(stage)
        assert ds_setup.precision_name(raw) == prec


@pytest.mark.parametrize("section, named", [
    ({"dtype": "bf32"}, r"'mixed_precision.dtype' is 'bf32'; choose one of"),
    ({"dtype": "fp16"}, r"'mixed_precision.dtype' fp16 needs 'mixed_precision.loss_scale'"),
    ({"dtype": "bf16", "loss_scale": {}}, r"'mixed_precision.loss_scale' only applies to dtype fp16"),
    ({"dtype": "fp16", "loss_scale": {"init": 2}}, r"unknown key\(s\) \['init'\] in 'mixed_precision.loss_scale'"),
    ({"dtype": "fp16", "loss_scale": {"backoff_factor": 2}}, r"'mixed_precision.loss_scale' .* out of range"),
])
def test_bad_precision_is_a_config_error_naming_the_key(tmp_path, section, named):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "mixed_precision": section}))
    cfg = load(SWIN, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=named):
        ds_setup.build(cfg, world_size=1, accelerator="cpu")


def test_deepspeeds_own_16bit_sections_are_refused_and_pure_bf16_needs_its_name(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    cfg = load(SWIN, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=r"section 'bf16' is managed by stm-train.*pure_bf16"):
        ds_setup.build(cfg, world_size=1, accelerator="cpu")
    cfg = load(SWIN, ["deepspeed.config=ds_configs/zero1_pure_bf16.json"])
    check_paths(cfg, need_train=False, need_val=False)
    with pytest.warns(UserWarning, match="residual branch rounds away"):
        built = ds_setup.build(cfg, world_size=1, accelerator="cpu")
    assert built.ds["bf16"] == {"enabled": True} and built.ds["data_types"]["buffer_dtype"] == "bf16"


def test_zero0_uses_our_fused_adamw_and_clipping():
    cfg = load(SWIN, ["deepspeed.config=ds_configs/zero0_fp16.json"])
    check_paths(cfg, need_train=False, need_val=False)
    built = ds_setup.build(cfg, world_size=1, accelerator="cpu")
    assert built.own_optimizer and "optimizer" not in built.ds and built.ds["gradient_clipping"] == 0.0
    assert built.precision.loss_scale["init_scale"] == 65536.0


@pytest.mark.parametrize("override, named", [
    ("augment.reprob=1.5", "'augment.reprob' is a probability: must be in [0, 1], got 1.5"),
    ("augment.switch_prob=-0.1", "'augment.switch_prob' is a probability"),
    ("augment.smoothing=1.0", "'augment.smoothing' must be in [0, 1)"),
    ("augment.mixup=-1", "'augment.mixup' (a Beta alpha; 0 = off) must be >= 0"),
    ("train.micro_batch=0", "'train.micro_batch' must be > 0, got 0"),
    ("train.global_batch=-8", "'train.global_batch' must be > 0"),
    ("train.eval_every_epochs=-1", "'train.eval_every_epochs' must be >= 0 (0: never evaluate), got -1"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas' must both be in [0, 1)"),
    ("optim.weight_decay=-0.05", "'optim.weight_decay' must be >= 0"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("optim.eps=0", "'optim.eps' must be > 0"),
    ("model.num_classes=0", "'model.num_classes' must be >= 1, got 0"),
    ("model.drop_path_rate=1.0", "'model.drop_path_rate' must be in [0, 1)"),
    ("data.crop_pct=0", "'data.crop_pct' must be in (0, 1]"),
    ("data.num_threads=0", "'data.num_threads' must be >= 1"),
    ("schedule.warmup_epochs=400", "'schedule.warmup_epochs' (400) must not exceed schedule.epochs (300)"),
    ("checkpoint.keep_last=0", "'checkpoint.keep_last' must be >= 1"),
    ("model.task=segmentation", "'model.task' must be one of ['classification', 'detection']"),
    ("detection.short_sides=[800, 16]", "'detection.short_sides' must list sizes >= 32"),
    ("detection.max_size=600", "'detection.max_size' (600) must be >= the largest short side (800)"),
    ("detection.flip_prob=2", "'detection.flip_prob' must be in [0, 1], got 2.0"),
    ("schedule.milestones=[11, 8]", "'schedule.milestones' must be increasing epochs > 0"),
    ("schedule.gamma=0", "'schedule.gamma' must be in (0, 1]"),
])
def test_out_of_range_values_are_named(override, named):
    with pytest.raises(ConfigError) as e:
        load(SWIN, [override])
    assert named in str(e.value), str(e.value)


def test_warmup_steps_without_warmup_epochs_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"'schedule.warmup_steps' \(50\) only takes effect with"):
        load(SWIN, ["schedule.warmup_epochs=0", "schedule.warmup_steps=50"])
    assert load(SWIN, ["schedule.warmup_steps=50"]).schedule.warmup_steps == 50


def test_unknown_model_name_names_close_matches():
    from stm_dist.engine.config import check_model_name

    with pytest.raises(ConfigError, match=r"'model.name': unknown model 'unified_swim_tiny'; did you mean "
                                          r"unified_swin_tiny"):
        check_model_name(load(SWIN, ["model.name=unified_swim_tiny"]))
    check_model_name(load(SWIN, ["model.name=unified_halonet_tiny"]))  # the original's alias


def test_recipe_covers_what_is_trained_and_not_how_it_runs(tmp_path):
    from stm_dist.engine.recipe import differences, recipe, recipe_hash

    base = load(SWIN)
    same = load(SWIN, ["train.micro_batch=64", "data.num_threads=7", "train.log_every=3", "run.out_dir=/x",
                       "checkpoint.every_steps=5", "data.train_shards=/a", "schedule.max_steps=9"])
    assert recipe_hash(recipe(base)) == recipe_hash(recipe(same)) and not differences(recipe(base), recipe(same))
    lr = load(SWIN, ["optim.lr=2e-3"])
    assert differences(recipe(base), recipe(lr)) == ["optim.lr: 0.001 -> 0.002"]
    ds = json.load(open(os.path.join(REPO_ROOT, base.deepspeed.config)))
    ds["mixed_precision"] = {"dtype": "fp32"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    other = load(SWIN, [f"deepspeed.config={tmp_path / 'ds.json'}"])
    check_paths(base, need_train=False, need_val=False)
    assert differences(recipe(base), recipe(other)) == [
        'deepspeed.json.mixed_precision: {"dtype": "bf16"} -> {"dtype": "fp32"}']


def test_a_setting_added_since_the_checkpoint_is_no_change_at_its_default():
    """A checkpoint saved before a key existed resumes when the key holds its default, and is
    refused when the user set it to something else."""
    from stm_dist.engine.recipe import differences, recipe

    now = recipe(load(SWIN))
    saved = {k: v for k, v in now.items() if k != "optim.layer_decay"}
    assert now["optim.layer_decay"] is None and differences(saved, now) == []
    decayed = recipe(load(SWIN, ["optim.layer_decay=0.75"]))
    assert differences(saved, decayed) == ["optim.layer_decay: (absent) -> 0.75"]
