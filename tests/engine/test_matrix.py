"""Every mixer (the five and examples/pool_mixer.py) trains under every shipped ZeRO stage x
{fp32, bf16} DeepSpeed config, two processes through the real launcher, with the trainer users
run; and resumes bit for bit from a checkpoint at ZeRO 3.

One launch runs all 48 cases in turn (matrix_worker.py): a launch costs ~20 s of start-up, a case
a few seconds. Each case is its own test below, so a failure names mixer x stage x precision and
shows the case's traceback.
"""
import json
import math
import os
import subprocess

import pytest
from engine_launch import BIN, REPO, env, free_port

MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3", "pool")
STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
RESUME_STAGE = 3


@pytest.fixture(scope="module")
def matrix(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    result = out / "result.jsonl"
    cmd = [os.path.join(BIN, "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "engine", "matrix_worker.py"), "--shards", digits_shards,
           "--out-dir", str(out), "--result", str(result), "--stages", ",".join(map(str, STAGES)),
           "--precisions", ",".join(PRECISIONS), "--mixers", ",".join(MIXERS),
           "--resume-stage", str(RESUME_STAGE)]
    try:
        p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=1500)
        tail = (p.stdout + p.stderr)[-3000:]
        code = p.returncode
    except subprocess.TimeoutExpired as e:
        tail, code = f"timed out after {e.timeout} s", None
    cases, started = {}, []
    if result.exists():
        for line in result.read_text().splitlines():
            rec = json.loads(line)
            if "started" in rec:
                started.append(rec["started"])
            else:
                cases[rec["case"]] = rec
    return {"cases": cases, "started": started, "code": code, "tail": tail}


def _case(matrix, mixer, stage, precision):
    name = f"{mixer}/zero{stage}/{precision}"
    rec = matrix["cases"].get(name)
    if rec is None:
        where = ("the launch died or hung inside this case" if matrix["started"][-1:] == [name]
                 else "the launch never reached this case")
        pytest.fail(f"{name}: no result ({where}); launch exit {matrix['code']}:\n{matrix['tail']}")
    if "error" in rec:
        pytest.fail(f"{name} failed: {rec['error']}\n{rec['traceback']}")
    return rec


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_trains(matrix, mixer, stage, precision):
    losses = _case(matrix, mixer, stage, precision)["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), (mixer, stage, precision, losses)


@pytest.mark.parametrize("mixer", MIXERS)
def test_fp32_losses_equal_across_stages(matrix, mixer):
    """Same data, same initial weights, same AdamW: ZeRO's partitioning must not change the
    numbers (ZeRO 0 steps torch's fused AdamW, 1-3 DeepSpeed's; steps 2-3 include updates)."""
    ref = _case(matrix, mixer, 0, "fp32")["losses"]
    for stage in STAGES[1:]:
        got = _case(matrix, mixer, stage, "fp32")["losses"]
        diff = max(abs(a - b) for a, b in zip(ref, got))
        assert diff <= 1e-5, f"{mixer}: ZeRO {stage} fp32 losses {got} vs ZeRO 0 {ref} (max |diff| {diff:.2e})"


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_close_to_fp32(matrix, mixer):
    """bf16 autocast with fp32 master weights follows the fp32 run closely (a wrong cast, e.g.
    bf16 master weights or a bf16 softmax in the mixer, shows as a gap)."""
    for stage in STAGES:
        fp32 = _case(matrix, mixer, stage, "fp32")["losses"]
        bf16 = _case(matrix, mixer, stage, "bf16")["losses"]
        diff = max(abs(a - b) for a, b in zip(fp32, bf16))
        assert diff <= 0.05, f"{mixer}: ZeRO {stage} bf16 {bf16} vs fp32 {fp32}"


@pytest.mark.parametrize("mixer", MIXERS)
def test_resume_from_checkpoint_is_bit_identical(matrix, mixer):
    """A run stopped after step 2 and restarted in its run directory by a new trainer repeats the
    uninterrupted run's losses exactly (weights, optimizer, flat ZeRO 3 layout, data position,
    random streams); kill -9 itself is tested on ConvNeXt in test_resume.py."""
    rec = _case(matrix, mixer, RESUME_STAGE, "fp32")
    assert rec["resumed_first"] == rec["losses"][:2], (mixer, rec)
    assert rec["resumed"] == rec["losses"], f"{mixer}: resumed {rec['resumed']} vs uninterrupted {rec['losses']}"
