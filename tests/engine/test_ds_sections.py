"""A user's `scheduler` or `data_types` section in the DeepSpeed JSON: refused by name (key,
value, what is allowed and why) or merged where it agrees with the precision design; never
silently overridden. Refused before any process group starts, in well under a second."""
import json
import os
import subprocess
import sys
import time

import pytest

from engine_launch import demo_config_with_ds

from stm_dist.engine import ds_setup
from stm_dist.engine.config import REPO_ROOT, ConfigError

DEMO = os.path.join(REPO_ROOT, "configs", "demo_digits.yaml")


@pytest.mark.parametrize("base, sections, named", [
    ("zero1_fp32.json", {"scheduler": {"type": "WarmupCosineLR", "params": {}}},
     "remove 'scheduler' (type 'WarmupCosineLR'): stm-train sets the learning rate"),
    ("zero1_bf16.json", {"data_types": {"grad_accum_dtype": "bf16"}},
     "'data_types.grad_accum_dtype' is 'bf16'; with mixed_precision.dtype 'bf16' it may only be 'fp32'"),
    ("zero2_fp16.json", {"data_types": {"buffer_dtype": "fp16"}},
     "'data_types.buffer_dtype' is 'fp16'; with mixed_precision.dtype 'fp16' it may only be 'fp32'"),
    ("zero1_pure_bf16.json", {"data_types": {"buffer_dtype": "fp32"}},
     "'data_types.buffer_dtype' is 'fp32'; with mixed_precision.dtype 'pure_bf16' it may only be 'bf16'"),
    ("zero1_pure_bf16.json", {"data_types": {"grad_accum_dtype": "fp16"}},
     "may only be 'bf16' or 'fp32'"),
    ("zero3_fp32.json", {"data_types": {"param_dtype": "bf16"}},
     "'data_types.param_dtype' is 'bf16'; with mixed_precision.dtype 'fp32' it may only be 'fp32'"),
    ("zero1_fp32.json", {"data_types": {"grad_acum_dtype": "fp32"}},
     "unknown key 'data_types.grad_acum_dtype' (allowed: buffer_dtype, grad_accum_dtype, param_dtype"),
])
def test_fighting_sections_are_refused_by_name(tmp_path, base, sections, named):
    cfg = demo_config_with_ds(tmp_path, base, **sections)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        ds_setup.check(cfg)
    assert time.perf_counter() - t0 < 1.0
    assert named in str(e.value) and cfg.deepspeed.config in str(e.value)
    with pytest.raises(ConfigError, match="data_types|scheduler"):  # build() refuses the same
        ds_setup.build(cfg, 1, "cpu")


@pytest.mark.parametrize("base, types, mode", [
    ("zero1_fp32.json", {"grad_accum_dtype": "fp32", "buffer_dtype": "fp32"}, "fp32"),
    ("zero2_bf16.json", {"grad_accum_dtype": "fp32", "keep_in_fp32_modules": []}, "bf16"),
    ("zero1_pure_bf16.json", {"grad_accum_dtype": "fp32"}, "pure_bf16"),
])
def test_agreeing_data_types_reach_deepspeed(tmp_path, base, types, mode):
    cfg = demo_config_with_ds(tmp_path, base, data_types=types)
    ds_setup.check(cfg)
    built = ds_setup.build(cfg, 1, "cpu")
    assert built.precision.name == mode
    for k, v in types.items():
        assert built.ds["data_types"][k] == v, k
    if mode == "pure_bf16":  # ours, beside the user's: DeepSpeed casts parameters, not BatchNorm buffers
        assert built.ds["data_types"]["buffer_dtype"] == "bf16"


def test_cli_refuses_a_scheduler_before_starting(tmp_path):
    cfg_path = str(tmp_path / "ds.json")
    with open(os.path.join(REPO_ROOT, "ds_configs", "zero1_fp32.json")) as f:
        ds = json.load(f)
    ds["scheduler"] = {"type": "WarmupLR"}
    with open(cfg_path, "w") as f:
        json.dump(ds, f)
    run_dir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    p = subprocess.run([sys.executable, "-m", "stm_dist.cli.train", "--config", DEMO,
                        f"deepspeed.config={cfg_path}", f"run.out_dir={run_dir}"],
                       env=dict(env, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config error: 'deepspeed.config'" in p.stderr and "remove 'scheduler' (type 'WarmupLR')" in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(run_dir)  # nothing started: no run directory, no process group
