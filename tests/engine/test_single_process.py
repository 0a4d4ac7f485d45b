"""stm-train as one plain process (no launcher): a non-finite loss stops the run with a checkpoint
and names the step; a config error names the key and exits 2."""
import os
import subprocess
import sys

import pytest
import torch

from engine_launch import BASE, REPO, env

from stm_dist.engine import checkpoint as ckpt


def _train(run_dir, shards, extra):
    e = env(single_process=True)
    cmd = [sys.executable, "-m", "stm_dist.cli.train", "--config", os.path.join(REPO, "configs", "demo_digits.yaml"),
           f"run.out_dir={run_dir}", f"data.train_shards={shards}", f"data.val_shards={shards}", *BASE, *extra]
    return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_non_finite_loss_stops_with_checkpoint_and_step(digits_shards, tmp_path):
    run = str(tmp_path / "nan")
    # An absurd learning rate overflows the weights on the first update; the next loss is NaN/inf.
    p = _train(run, digits_shards, ["optim.lr=1e30", "optim.warmup_init_lr=1e30", "schedule.max_steps=6",
                                    "checkpoint.every_steps=0", "optim.clip_grad=0"])
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(run, "train.log")) as f:
        text = f.read()
    assert "non-finite loss" in text and "at step " in text, text[-2000:]
    found = ckpt.latest_complete(os.path.join(run, "checkpoints"))
    assert found is not None
    bad_step = int(text.split("non-finite loss")[1].split("at step ")[1].split()[0])
    # Losses are read every log_every (here 1) steps: the run stops right after the bad step,
    # whose non-finite update the optimizer skipped, and saves that state.
    assert found[1]["step"] == bad_step
    state = torch.load(os.path.join(run, "checkpoints", found[0], "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)["module"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())


def test_config_error_names_the_key(tmp_path):
    p = _train(str(tmp_path / "bad"), str(tmp_path), ["train.ema_decai=0.5"])
    assert p.returncode == 2
    assert "unknown key 'train.ema_decai' (did you mean 'train.ema_decay'?)" in p.stderr
    assert "Traceback" not in p.stderr
