"""stm-export's two formats: .safetensors holds exactly the tensors of the .pth export (same keys,
dtypes and bits), both carry the model name and pretrained_cfg, and both load through our
load_pretrained and timm's reader into the same model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine_launch import BASE, REPO, env
from side_by_side import finish, start

MODEL = "unified_convnext_micro"


def _start_export(run, out, *extra):
    return start([sys.executable, "-m", "stm_dist.cli.export", run, "-o", out, *extra], env=env())


def _export(run, out, *extra):
    return finish(_start_export(run, out, *extra))


@pytest.fixture(scope="module")
def run_dir(digits_shards, tmp_path_factory):
    """A ZeRO 1 run of 3 steps with EMA (one process, the real stm-train)."""
    run = str(tmp_path_factory.mktemp("export") / "run")
    cmd = [sys.executable, "-m", "stm_dist.cli.train", "--config", os.path.join(REPO, "configs", "demo_digits.yaml"),
           f"run.out_dir={run}", f"data.train_shards={digits_shards}", f"data.val_shards={digits_shards}", *BASE,
           "schedule.max_steps=3", "checkpoint.every_steps=0", "checkpoint.every_epochs=0"]
    p = subprocess.run(cmd, env=env(single_process=True), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    files, started = {}, {}
    for ema in (False, True):
        for suffix in ("pth", "safetensors"):
            path = str(out / f"{'ema' if ema else 'w'}.{suffix}")
            # All four at once: each export is mostly its imports, on one core.
            started[ema, suffix] = _start_export(run_dir, path, *(["--ema"] if ema else []))
            files[ema, suffix] = path
    for (ema, suffix), proc in started.items():
        p = finish(proc)
        assert p.returncode == 0, p.stderr
        assert f"wrote {files[ema, suffix]} ({suffix};" in p.stdout, p.stdout
    return files


def test_safetensors_is_bit_identical_to_pth(exports):
    from safetensors.torch import load_file

    for ema in (False, True):
        pth = torch.load(exports[ema, "pth"], map_location="cpu", weights_only=True)
        assert set(pth) == {"state_dict", "model", "pretrained_cfg", "source", "step", "ema"}
        ref, st = pth["state_dict"], load_file(exports[ema, "safetensors"])
        assert list(st) and set(st) == set(ref)
        for k, v in ref.items():
            assert st[k].dtype == v.dtype and st[k].shape == v.shape, k
            assert torch.equal(st[k], v), k
            if v.is_floating_point():
                assert v.dtype == torch.float32, k
    # The EMA is another set of weights, not a copy of the trained one.
    w = load_file(exports[False, "safetensors"])
    e = load_file(exports[True, "safetensors"])
    assert any(not torch.equal(w[k], e[k]) for k in w if w[k].is_floating_point())


def test_both_files_say_what_they_hold(exports, run_dir):
    from stm_dist.engine.export import read_info

    for (ema, suffix), path in exports.items():
        info = read_info(path)
        assert info["model"] == MODEL and info["ema"] is ema and info["step"] == 3, (path, info)
        assert info["source"].startswith(os.path.join(run_dir, "checkpoints", "step")), info
        cfg = info["pretrained_cfg"]
        # The run's class count, input size and crop, not the 1000-class 224-px defaults.
        assert cfg["num_classes"] == 10 and list(cfg["input_size"]) == [3, 32, 32], cfg
        assert cfg["crop_pct"] == 0.875 and len(cfg["mean"]) == 3 and "url" not in cfg, cfg
        assert cfg["interpolation"] == "bicubic" and list(cfg.get("pool_size", [1, 1])) == [1, 1], cfg
        with open(path + ".json") as f:
            assert json.load(f) == dict(info, format=suffix)
    from safetensors import safe_open

    with safe_open(exports[True, "safetensors"], framework="pt") as f:
        meta = f.metadata()
    # String metadata under the documented keys; the config is JSON text.
    assert meta["stm_dist.model"] == MODEL and meta["stm_dist.ema"] == "true"
    assert json.loads(meta["stm_dist.pretrained_cfg"])["num_classes"] == 10


def test_our_loader_and_timms_read_both_formats(exports):
    from timm.models import load_state_dict as timm_load_state_dict

    from stm_dist.models import create_model
    from stm_dist.models.pretrained import load_pretrained

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = {}
    for key, path in exports.items():
        m = create_model(MODEL, num_classes=10, img_size=32).eval()
        load_pretrained(m, path, use_ema=key[0])  # strict: every key matched
        with torch.no_grad():
            logits[key] = m(x)
        sd = timm_load_state_dict(path, use_ema=False)
        m2 = create_model(MODEL, num_classes=10, img_size=32).eval()
        m2.load_state_dict(sd)
        assert set(sd) == set(torch.load(exports[key[0], "pth"], weights_only=True)["state_dict"]), path
        with torch.no_grad():
            assert torch.equal(m2(x), logits[key]), path
    for ema in (False, True):
        assert torch.equal(logits[ema, "pth"], logits[ema, "safetensors"])


def test_format_and_suffix_must_agree(run_dir, tmp_path):
    out, other = str(tmp_path / "w.pth"), str(tmp_path / "w.bin")
    bin_export = _start_export(run_dir, other, "--format", "pth")  # alongside the refused one
    p = _export(run_dir, out, "--format", "safetensors")
    assert p.returncode == 1 and not os.path.exists(out)
    assert "stm-export: --format safetensors but the output is named" in p.stderr and "w.safetensors" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # An explicit pth format with another suffix is still a .pth container.
    p = finish(bin_export)
    assert p.returncode == 0, p.stderr
    assert set(torch.load(other, weights_only=True)) >= {"state_dict", "model", "pretrained_cfg"}


def test_timm_create_model_loads_the_export(exports):
    """timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...)) reads either
    export and gives our model's logits, bit for bit."""
    import timm

    from stm_dist.models import create_model
    from stm_dist.models.pretrained import load_pretrained

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for (ema, suffix), path in exports.items():
        ours = create_model(MODEL, num_classes=10, img_size=32).eval()
        load_pretrained(ours, path, use_ema=ema)
        theirs = timm.create_model(MODEL, pretrained=True, num_classes=10, img_size=32,
                                   pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
        with torch.no_grad():
            assert torch.equal(theirs(x), ours(x)), path
