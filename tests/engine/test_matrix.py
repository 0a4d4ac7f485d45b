"""Every mixer (the five and examples/pool_mixer.py) trains under every shipped ZeRO stage x
{fp32, bf16} DeepSpeed config, two processes through the real launcher, as stm-train runs it;
and resumes bit for bit from a checkpoint at ZeRO 3.

One launch runs all 48 runs in turn (cases_worker.py): a launch costs ~20 s of start-up, a run a
few seconds. Each case is its own test below, so a failure names mixer x stage x precision and
shows the case's traceback.
"""
import math
import os

import pytest
from engine_launch import REPO, case_ok, run_cases, train_records

pytestmark = pytest.mark.slow

MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3", "pool")
STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
RESUME_STAGE, STEPS, RESUME_AT = 3, 3, 2
BASE = ["model.num_classes=10", "model.img_size=32", "data.num_threads=1", "data.randaug=false",
        "train.global_batch=16", "train.micro_batch=8", "train.log_every=1", "train.ema_decay=0.9",
        "train.eval_every_epochs=0", "schedule.epochs=2", "schedule.warmup_epochs=1", "optim.lr=2e-3",
        "checkpoint.every_steps=0", "checkpoint.keep_last=1"]


def name(mixer, stage, precision):
    return f"{mixer}/zero{stage}/{precision}"


def overrides(mixer, stage, precision, shards, run_dir, steps):
    o = [f"model.name=unified_{mixer}_micro", f"deepspeed.config={REPO}/ds_configs/zero{stage}_{precision}.json",
         f"data.train_shards={shards}", f"run.out_dir={run_dir}", f"schedule.max_steps={steps}", *BASE]
    if mixer == "pool":
        o.append(f"model.mixer_module={REPO}/examples/pool_mixer.py")
    return o


@pytest.fixture(scope="module")
def matrix(digits_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("matrix"))
    cases, dirs = [], {}
    for precision in PRECISIONS:
        for stage in STAGES:
            for mixer in MIXERS:
                case = name(mixer, stage, precision)
                dirs[case] = os.path.join(out, case.replace("/", "_"))
                cases.append({"name": case, "overrides": overrides(mixer, stage, precision, digits_shards,
                                                                   dirs[case], STEPS)})
                if stage == RESUME_STAGE and precision == "fp32":
                    # Stopped after step 2 (its checkpoint), then restarted in the same run dir.
                    again = dirs[case + "/resumed"] = dirs[case] + "_resumed"
                    for steps, part in ((RESUME_AT, "/first"), (STEPS, "/resumed")):
                        cases.append({"name": case + part, "overrides": overrides(
                            mixer, stage, precision, digits_shards, again, steps)})
    launch = run_cases(2, cases, out)
    launch["dirs"] = dirs
    return launch


def losses(matrix, case, first=None):
    case_ok(matrix, case if first is None else first)
    recs = {}
    for r in train_records(matrix["dirs"][case]):
        recs[r["step"]] = r["loss"]  # a restart's records come later: the last one wins
    return [recs[s] for s in sorted(recs)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_trains(matrix, mixer, stage, precision):
    got = losses(matrix, name(mixer, stage, precision))
    assert len(got) == STEPS and all(math.isfinite(x) for x in got), (mixer, stage, precision, got)


@pytest.mark.parametrize("mixer", MIXERS)
def test_fp32_losses_equal_across_stages(matrix, mixer):
    """Same data, same initial weights, same AdamW: ZeRO's partitioning must not change the
    numbers (ZeRO 0 steps torch's fused AdamW, 1-3 DeepSpeed's; steps 2-3 include updates)."""
    ref = losses(matrix, name(mixer, 0, "fp32"))
    for stage in STAGES[1:]:
        got = losses(matrix, name(mixer, stage, "fp32"))
        diff = max(abs(a - b) for a, b in zip(ref, got))
        assert diff <= 1e-5, f"{mixer}: ZeRO {stage} fp32 losses {got} vs ZeRO 0 {ref} (max |diff| {diff:.2e})"


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_close_to_fp32(matrix, mixer):
    """bf16 autocast with fp32 master weights follows the fp32 run closely (a wrong cast, e.g.
    bf16 master weights or a bf16 softmax in the mixer, shows as a gap)."""
    for stage in STAGES:
        fp32 = losses(matrix, name(mixer, stage, "fp32"))
        bf16 = losses(matrix, name(mixer, stage, "bf16"))
        diff = max(abs(a - b) for a, b in zip(fp32, bf16))
        assert diff <= 0.05, f"{mixer}: ZeRO {stage} bf16 {bf16} vs fp32 {fp32}"


@pytest.mark.parametrize("mixer", MIXERS)
def test_resume_from_checkpoint_is_bit_identical(matrix, mixer):
    """A run stopped after step 2 and restarted in its run directory repeats the uninterrupted
    run's losses exactly (weights, optimizer, the flat ZeRO 3 layout, data position, random
    streams); kill -9 itself is tested on ConvNeXt in test_resume.py."""
    case = name(mixer, RESUME_STAGE, "fp32")
    ref = losses(matrix, case)
    case_ok(matrix, case + "/first")
    got = losses(matrix, case + "/resumed")
    assert got == ref, f"{mixer}: resumed {got} vs uninterrupted {ref}"


def test_training_never_imports_inductor(matrix):
    """DeepSpeed's ZeRO stages import its Muon optimizer, whose torch.compile decorators load
    torch._inductor: seconds of every rank's start-up. ds_setup.skip_muon_import keeps it out;
    after 60 runs under every stage and precision, inductor's compiler was never loaded."""
    recs = [r for r in matrix["cases"].values() if "inductor_compile_fx_loaded" in r]
    assert recs and not any(r["inductor_compile_fx_loaded"] for r in recs), \
        [r["case"] for r in recs if r["inductor_compile_fx_loaded"]][:5]
