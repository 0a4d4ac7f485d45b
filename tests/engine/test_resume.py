"""Fault tolerance under the real `deepspeed` launcher with 2 CPU processes (gloo), every
stochastic part of the recipe on (RandAugment, mixup/cutmix, random erasing, smoothing, EMA):
under each of ZeRO 1, 2 and 3, one run SIGKILLed during an epoch-end evaluation, right after a
checkpoint and mid-epoch, restarted after each kill, gives the uninterrupted run's losses and
evaluations bit for bit; the evaluation the kill cut short is re-run once; a truncated or
bit-flipped newest checkpoint is skipped, naming the file; a checkpoint that fails to load falls
back on every rank; a ZeRO-3 export equals the live weights."""
import os
import re
import subprocess
import sys
from typing import Callable, NamedTuple

import pytest
import torch

from engine_launch import BASE, case_ok, env, records, run_cases, run_train, train_records
from resume_runs import complete, damage, run_and_kill_when, write_short_epoch_shards
from side_by_side import finish, start

pytestmark = pytest.mark.slow

# 96 training samples, global batch 16: 6 steps per epoch, 2 epochs, a checkpoint every 2 steps
# and at each epoch end, an evaluation at each epoch end (step 6 and 12).
STEPS = 12
AUGMENT = ["data.randaug=true", "augment.mixup=0.8", "augment.cutmix=1.0", "augment.reprob=0.25",
           "checkpoint.every_steps=2", "checkpoint.every_epochs=1", "train.eval_every_epochs=1"]
_refs = {}


def last_step(run):
    return max((r["step"] for r in train_records(run)), default=0)


class Kill(NamedTuple):
    """One kill of a stage's chain: the launch runs `until` the condition holds on the run dir,
    is SIGKILLed, `check` confirms where it died (from the records at the kill), and the next
    launch must resume from step `resume_at`."""
    point: str
    until: Callable[[str], bool]
    check: Callable[[list], bool]
    resume_at: int


def _train_steps(recs):
    return [r["step"] for r in recs if r["kind"] == "train"]


def _evals_at_kill(recs):
    return [r["step"] for r in recs if r["kind"] == "eval"]


# The order a run meets the three points; each restart continues the chain (4 launches a stage).
CHAIN = [
    # The epoch-end checkpoint (step 6) is written before the epoch-0 evaluation: killed in between.
    Kill("during the epoch-0 evaluation", lambda d: complete(d, 6),
         lambda recs: max(_train_steps(recs)) == 6 and not _evals_at_kill(recs), resume_at=6),
    # The moment step 8's COMPLETE marker exists, before step 9 is logged.
    Kill("right after the step-8 checkpoint", lambda d: complete(d, 8),
         lambda recs: max(_train_steps(recs)) == 8, resume_at=8),
    # Step 11 is logged: the step-10 checkpoint is done, step 12 (the epoch end) is not.
    Kill("mid-epoch, at step 11", lambda d: last_step(d) >= 11,
         lambda recs: max(_train_steps(recs)) == 11 and _evals_at_kill(recs) == [6], resume_at=10),
]
# Before the last restart the newest checkpoint (step 10) is damaged in some stages: the restart
# must skip it, naming the file, and resume step 8 instead.
DAMAGE = {1: ("truncate", "mp_rank_00_model_states.pt", "has {} bytes"),
          2: ("flip", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "does not match its checksum"),
          3: None}


def extra(stage):
    out = [f"deepspeed.config=ds_configs/zero{stage}_fp32.json"] + AUGMENT
    return out + (["run.dump_live_weights=true"] if stage == 3 else [])


def reference(stage, shards, tmp_root):
    """The uninterrupted run of a stage. The three stages' runs are made together, once, in one
    launch (cases_worker.py: the launch's start-up is paid once)."""
    if not _refs:
        runs = {s: os.path.join(tmp_root, f"ref_zero{s}") for s in (1, 2, 3)}
        launch = run_cases(2, [{"name": f"reference ZeRO {s}", "overrides": [
            f"run.out_dir={runs[s]}", f"data.train_shards={shards}", f"data.val_shards={shards}", *BASE, *extra(s)]}
            for s in runs], os.path.join(tmp_root, "references"))
        _refs.update({s: (runs[s], launch) for s in runs})
    run, launch = _refs[stage]
    case_ok(launch, f"reference ZeRO {stage}")
    return run


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


def log_size(run):
    path = os.path.join(run, "train.log")
    return os.path.getsize(path) if os.path.exists(path) else 0


def log_since(run, offset):
    """What the log gained after `offset` bytes: one start's lines (the log is appended to)."""
    with open(os.path.join(run, "train.log"), "rb") as f:
        f.seek(offset)
        return f.read().decode()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def short_shards(tmp_path_factory):
    return write_short_epoch_shards(str(tmp_path_factory.mktemp("digits96")))


def _resumed_step(segment: str) -> int:
    found = re.findall(r"resumed from \S+/step(\d{9}) at epoch", segment)
    assert len(found) == 1, f"expected one 'resumed from' in this start's log:\n{segment[-3000:]}"
    return int(found[0])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigkill_at_each_point_then_restart_is_bit_identical(stage, short_shards, root):
    """One chain per stage: killed during an evaluation, right after a checkpoint and mid-epoch,
    each time restarted; every step's loss and both evaluations equal the uninterrupted run's."""
    ref = reference(stage, short_shards, root)
    ref_losses = losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals(ref)] == [6, 12]

    run = os.path.join(root, f"chain_zero{stage}")
    segments = []  # the train.log each start wrote: the first start, then one per restart
    for kill in CHAIN:
        offset = log_size(run)
        seen = run_and_kill_when(2, run, short_shards, kill.until, extra(stage))
        assert kill.check(seen), f"ZeRO {stage}: not killed {kill.point}: steps {_train_steps(seen)}, " \
                                 f"evaluations {_evals_at_kill(seen)}"
        segments.append(log_since(run, offset))
    damage_spec = DAMAGE[stage]
    if damage_spec:
        how, rel, message = damage_spec
        victim = os.path.join(run, "checkpoints", "step000000010", rel)
        written = os.path.getsize(victim)
        damage(victim, how)
        message = message.format(os.path.getsize(victim))
    offset = log_size(run)
    run_train(2, run, short_shards, extra(stage))
    segments.append(log_since(run, offset))

    assert "resumed from" not in segments[0]
    expected = [k.resume_at for k in CHAIN]
    if damage_spec:
        expected[-1] = 8
        assert f"skipping checkpoint {run}/checkpoints/step000000010: file {rel} {message}" in segments[-1], \
            segments[-1][-3000:]
        if how == "truncate":
            assert f"{written} were written" in segments[-1]
    assert [_resumed_step(s) for s in segments[1:]] == expected, f"ZeRO {stage}"
    # The evaluation the first kill cut short is re-run by the next start, and by no other.
    pending = [i for i, s in enumerate(segments) if "evaluation pending for epoch 0 (step 6)" in s]
    assert pending == [1], pending

    # Every time a step ran, in any start, it gave the uninterrupted run's loss bit for bit.
    ran = train_records(run)
    assert sorted({r["step"] for r in ran}) == list(range(1, STEPS + 1))
    for r in ran:
        assert r["loss"] == ref_losses[r["step"]], f"ZeRO {stage}: step {r['step']} loss differs after a restart"
    # Each evaluation shows once, and equals the reference's (weights and EMA restored exactly).
    got = evals(run)
    assert [r["step"] for r in got] == [6, 12], [r["step"] for r in got]
    for e_run, e_ref in zip(got, evals(ref)):
        for k in ("loss", "top1", "loss_ema", "top1_ema"):
            assert e_run[k] == e_ref[k], (stage, e_run["step"], k)


def test_zero3_export_equals_live_weights_and_eval_matches(short_shards, root, tmp_path):
    ref = reference(3, short_shards, root)
    out, ema_out = str(tmp_path / "model.pth"), str(tmp_path / "ema.pth")
    # Two of the one-process commands run while the rest runs (each is mostly imports, on one core).
    ema_export = start([sys.executable, "-m", "stm_dist.cli.export", ref, "--ema", "-o", ema_out], env=env())
    wrong_model = start([sys.executable, "-m", "stm_dist.cli.eval", "--model", "unified_swin_micro", "--checkpoint",
                         ref, "--data", short_shards, "--img-size", "32"], env=env(single_process=True))
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
    p = finish(wrong_model)
    assert p.returncode == 1 and "holds weights of unified_convnext_micro, not unified_swin_micro" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    # stm-export --ema puts the ranks' EMA slices back together; it is the EMA the run evaluated.
    p = finish(ema_export)
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
