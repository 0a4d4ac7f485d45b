"""Mixed precision the recipe's way, through the real `deepspeed` launcher with 2 CPU processes:
fp32 master weights under bf16/fp16 autocast at ZeRO 1-3 with the residual branches visible,
bf16 tracking fp32, a sharded EMA equal to an fp32 EMA of DeepSpeed's own master copy, and
synchronised BatchNorm statistics independent of how the global batch is split."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine_launch import BIN, env, free_port

from stm_dist.engine.ema import assemble

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "precision_worker.py")


def _launch(procs: int, out: str, checks: str) -> dict:
    e = env(single_process=procs == 1)
    if procs == 1:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(procs), "--master_port", str(free_port()),
               WORKER]
    p = subprocess.run(cmd + ["--out", out, "--checks", checks], env=e, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("precision") / "two.json")
    return out, _launch(2, out, "modes,track,ema,syncbn")


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_16bit_configs_keep_fp32_parameters_and_visible_branches(two, stage, prec):
    r = two[1][f"z{stage}_{prec}"]
    assert r["dtypes"] == ["torch.float32"]
    # Zeroing every layer-scale gamma (1e-6 at init) changes the logits: the branches count.
    assert r["visible"] > 0
    assert all(np.isfinite(r["losses"]))


def test_pure_bf16_is_the_explicit_all_bf16_mode(two):
    assert two[1]["z1_pure_bf16"]["dtypes"] == ["torch.bfloat16"]


def test_bf16_tracks_fp32_of_the_same_seed(two):
    fp32, bf16 = np.array(two[1]["track_fp32"]), np.array(two[1]["track_bf16"])
    assert len(fp32) == 30 and fp32[-5:].mean() < 0.6 * fp32[0]  # it learns
    rel = np.abs(bf16 - fp32) / np.abs(fp32)
    assert rel.mean() <= 0.03, rel


def test_bf16_zero2_ema_equals_fp32_ema_of_the_master_weights(two):
    out, r = two
    e = r["ema"]
    assert len(e["max_rel_err_per_step"]) == 6
    assert max(e["max_rel_err_per_step"]) <= 1e-6, e["max_rel_err_per_step"]
    # The slices each rank saved, put back together offline (as stm-export --ema does).
    full = assemble([torch.load(f"{out}.ema{r_}.pt", weights_only=False) for r_ in range(2)])
    ref = torch.load(out + ".ema_ref.pt", weights_only=False)
    for k, v in ref.items():
        assert full[k].dtype == torch.float32
        torch.testing.assert_close(full[k], v, rtol=1e-6, atol=1e-9)
    # Each of 2 ranks holds about half of what one rank holding everything would.
    assert 0.45 <= e["bytes"] / e["bytes_one_rank"] <= 0.55, e


def test_sync_batchnorm_statistics_do_not_depend_on_the_split(two, tmp_path):
    r2 = two[1]["syncbn"]
    assert r2["ranks_equal"]
    r1 = _launch(1, str(tmp_path / "one.json"), "syncbn")["syncbn"]
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(r2[key], r1[key], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r2["losses"], r1["losses"], rtol=1e-5)
