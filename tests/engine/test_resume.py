"""Fault tolerance under the real `deepspeed` launcher with 2 CPU processes (gloo), every
stochastic part of the recipe on (RandAugment, mixup/cutmix, random erasing, smoothing, EMA):
a SIGKILL mid-epoch, right after a checkpoint or during an epoch-end evaluation, then a restart,
gives the uninterrupted run's losses bit for bit; an evaluation the kill cut short is re-run
once; a truncated newest checkpoint is skipped; a ZeRO-3 export equals the live weights."""
import os
import subprocess
import sys

import pytest
import torch

from engine_launch import env, records, run_train, train_records
from resume_runs import complete, run_and_kill_when, write_short_epoch_shards

pytestmark = pytest.mark.slow

# 96 training samples, global batch 16: 6 steps per epoch, 2 epochs, a checkpoint every 2 steps
# and at each epoch end, an evaluation at each epoch end (step 6 and 12).
STEPS = 12
AUGMENT = ["data.randaug=true", "augment.mixup=0.8", "augment.cutmix=1.0", "augment.reprob=0.25",
           "checkpoint.every_steps=2", "checkpoint.every_epochs=1", "train.eval_every_epochs=1"]
# Each ZeRO stage is killed at one of the three points (one reference run per stage).
KILL_POINT = {1: "mid_epoch", 2: "after_checkpoint", 3: "during_eval"}
_refs = {}


def extra(stage):
    out = [f"deepspeed.config=ds_configs/zero{stage}_fp32.json"] + AUGMENT
    return out + (["run.dump_live_weights=true"] if stage == 3 else [])


def reference(stage, shards, tmp_root):
    """The uninterrupted run of a stage, made once per session."""
    if stage not in _refs:
        run = os.path.join(tmp_root, f"ref_zero{stage}")
        run_train(2, run, shards, extra(stage))
        _refs[stage] = run
    return _refs[stage]


def losses(run):
    """step -> loss of the last time that step ran (a resumed run re-runs steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in train_records(run)}


def evals(run):
    return [r for r in records(run) if r["kind"] == "eval"]


def last_eval(run):
    return evals(run)[-1]


def log_text(run):
    with open(os.path.join(run, "train.log")) as f:
        return f.read()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def short_shards(tmp_path_factory):
    return write_short_epoch_shards(str(tmp_path_factory.mktemp("digits96")))


def _kill(stage, run, shards):
    """Run until the stage's kill point, SIGKILL everything; returns the step resumed from."""
    point = KILL_POINT[stage]
    if point == "mid_epoch":  # step 5 is logged: the step-4 checkpoint is done, step 6 is not
        seen = run_and_kill_when(2, run, shards, lambda d: any(r["step"] >= 5 for r in train_records(d)), extra(stage))
        assert max(r["step"] for r in seen if r["kind"] == "train") < 6, "not killed mid-epoch"
        # Truncate the step-4 checkpoint too: the restart must skip it and fall back to step 2.
        victim = os.path.join(run, "checkpoints", "step000000004", "mp_rank_00_model_states.pt")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        return 2
    if point == "after_checkpoint":  # the moment step 8's marker is written, before step 9 is logged
        seen = run_and_kill_when(2, run, shards, lambda d: complete(d, 8), extra(stage))
        assert max(r["step"] for r in seen if r["kind"] == "train") == 8
        return 8
    # during_eval: the epoch-end checkpoint (step 6) is written before the evaluation of epoch 0
    seen = run_and_kill_when(2, run, shards, lambda d: complete(d, 6), extra(stage))
    assert not [r for r in seen if r["kind"] == "eval"], "the evaluation finished before the kill"
    return 6


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigkill_then_restart_is_bit_identical(stage, short_shards, root):
    ref = reference(stage, short_shards, root)
    ref_losses = losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals(ref)] == [6, 12]

    run = os.path.join(root, f"killed_zero{stage}")
    resumed_from = _kill(stage, run, short_shards)
    run_train(2, run, short_shards, extra(stage))
    text = log_text(run)
    assert "resumed from" in text
    assert f"step{resumed_from:09d}" in text.split("resumed from")[-1].splitlines()[0]
    if KILL_POINT[stage] == "mid_epoch":
        assert "skipping checkpoint" in text and "step000000004: file mp_rank_00_model_states.pt has" in text
    if KILL_POINT[stage] == "during_eval":
        assert "evaluation pending for epoch 0 (step 6)" in text
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        assert resumed[step] == ref_losses[step], f"ZeRO {stage}: step {step} loss differs after resume"
    # Each evaluation shows once, and equals the reference's (weights and EMA restored exactly).
    got = evals(run)
    assert [r["step"] for r in got] == [6, 12], [r["step"] for r in got]
    for e_run, e_ref in zip(got, evals(ref)):
        for k in ("loss", "top1", "loss_ema", "top1_ema"):
            assert e_run[k] == e_ref[k], (e_run["step"], k)


def test_zero3_export_equals_live_weights_and_eval_matches(short_shards, root, tmp_path):
    ref = reference(3, short_shards, root)
    out = str(tmp_path / "model.pth")
    p = subprocess.run([sys.executable, "-m", "stm_dist.cli.export", ref, "-o", out], env=env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    exported = torch.load(out, map_location="cpu")["state_dict"]  # stm-export's .pth container
    live = torch.load(os.path.join(ref, "live_weights.pt"), map_location="cpu")
    assert set(exported) == set(live)
    for k, v in live.items():
        assert exported[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        assert torch.equal(exported[k], v), k

    from stm_dist.models import create_model
    from stm_dist.models.pretrained import load_pretrained

    m = create_model("unified_convnext_micro", num_classes=10, img_size=32)
    load_pretrained(m, out)  # the original key layout: loads strictly

    # stm-eval of the export on 2 processes equals the in-training evaluation.
    res = str(tmp_path / "eval.json")
    from engine_launch import BIN, free_port

    p = subprocess.run([os.path.join(BIN, "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
                        "--module", "stm_dist.cli.eval", "--model", "unified_convnext_micro", "--checkpoint", out,
                        "--data", short_shards, "--img-size", "32", "--batch", "64", "--num-threads", "1",
                        "--json", res], env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    r = json.load(open(res))
    e = last_eval(ref)
    assert r["samples"] == 300 and r["world_size"] == 2
    assert r["top1"] == e["top1"] and r["top5"] == e["top5"]
    assert abs(r["loss"] - e["loss"]) < 1e-6

    # Another model's checkpoint: one line naming what it holds, no traceback.
    p = subprocess.run([sys.executable, "-m", "stm_dist.cli.eval", "--model", "unified_swin_micro", "--checkpoint",
                        ref, "--data", short_shards, "--img-size", "32"], env=env(single_process=True),
                       capture_output=True, text=True)
    assert p.returncode == 1 and "holds weights of unified_convnext_micro, not unified_swin_micro" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    # stm-export --ema puts the ranks' EMA slices back together; it is the EMA the run evaluated.
    ema_out = str(tmp_path / "ema.pth")
    p = subprocess.run([sys.executable, "-m", "stm_dist.cli.export", ref, "--ema", "-o", ema_out], env=env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = create_model("unified_convnext_micro", num_classes=10, img_size=32)
    load_pretrained(m, ema_out)
    assert all(v.dtype == torch.float32 for v in torch.load(ema_out)["state_dict"].values() if v.is_floating_point())


def _drop_hash(tag_dir, rel, new_size=None):
    """Forget a file's recorded sha256 (as for a checkpoint written before hashes were kept)."""
    import json

    path = os.path.join(tag_dir, "COMPLETE")
    with open(path) as f:
        marker = json.load(f)
    marker["sha256"].pop(rel)
    if new_size is not None:
        marker["files"][rel] = new_size
    with open(path, "w") as f:
        json.dump(marker, f)


def test_checkpoints_that_fail_to_load_fall_back_on_every_rank(short_shards, root):
    """Step 12: one optimizer file unpicklable (found by one rank only); step 10: model states that
    DeepSpeed's own loader rejects (a renamed key). Neither has a recorded hash. Both ranks give
    up both together and resume step 8, with the reference's losses."""
    import shutil

    ref = reference(1, short_shards, root)
    run = os.path.join(root, "fallback")
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "metrics.jsonl"))
    ck = os.path.join(run, "checkpoints")
    assert sorted(t for t in os.listdir(ck) if t.startswith("step")) == ["step000000008", "step000000010",
                                                                          "step000000012"]

    rel = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(os.path.join(ck, "step000000012", rel), "r+b") as f:
        f.write(b"\x00not a checkpoint" * 4)
    _drop_hash(os.path.join(ck, "step000000012"), rel)

    states = os.path.join(ck, "step000000010", "mp_rank_00_model_states.pt")
    sd = torch.load(states, map_location="cpu", weights_only=False)
    key = next(iter(sd["module"]))
    sd["module"][key + "_renamed"] = sd["module"].pop(key)
    torch.save(sd, states)
    _drop_hash(os.path.join(ck, "step000000010"), "mp_rank_00_model_states.pt", os.path.getsize(states))

    run_train(2, run, short_shards, extra(1))
    text = log_text(run)
    assert text.count(f"cannot load checkpoint {ck}/step000000012: file {rel} cannot be read") == 1, text
    assert text.count(f"cannot load checkpoint {ck}/step000000010: DeepSpeed's load_checkpoint failed") == 1, text
    assert f"resumed from {ck}/step000000008 at epoch 1, step 8" in text
    ref_l, got = losses(ref), losses(run)
    assert sorted(got) == [9, 10, 11, 12]
    for step in got:
        assert got[step] == ref_l[step], step
