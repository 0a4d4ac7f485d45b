"""A real one-node slurm: an array sweep of two tiny runs through slurm/sweep.sbatch, a
preempted run (USR1 -> checkpoint -> requeue -> resume) through slurm/train.sbatch that must
end exactly where the uninterrupted sweep run of the same recipe ended, and stm-report over the
sweep's run directories, and a TERM to the whole job (a preemption's first signal) that still
ends with a complete checkpoint, a requeue and a resume."""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest

from harness import REPO, launch_env, read_metrics, tiny_overrides, tool
from services import ServiceError, Slurm, listeners_of, wait_for

pytestmark = pytest.mark.slow
STEPS = 10
MODELS = ["unified_convnext_micro", "unified_pvt_micro"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = Slurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _job_env(slurm: Slurm) -> dict:
    return launch_env(SLURM_CONF=slurm.conf, STM_MASTER_ADDR="127.0.0.1", STM_PROCS_PER_NODE="1")


def _wait_jobs_done(slurm: Slurm, job_id: str, n_tasks: int, timeout: float) -> list[dict]:
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

    def finished():
        states = slurm.job_state(job_id)
        return len(states) == n_tasks and all(s["JobState"] in done for s in states)

    try:
        wait_for(finished, timeout, f"job {job_id} to finish", poll=2)
    except ServiceError as e:
        raise AssertionError(f"{e}\n{slurm.job_state(job_id)}") from None
    return slurm.job_state(job_id)


def _slurm_output(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _submit_train_and_wait_two_steps(slurm: Slurm, workdir, run_dir: str, args: list, env: dict) -> tuple[str, str]:
    """sbatch slurm/train.sbatch with `args`, then wait until the run has logged two steps (the
    moment a signal would find a running rank); (job id, its output file). A job that ends
    before that fails the test with its output."""
    job = slurm.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={workdir}/%x-%j.out",
                     f"--chdir={workdir}", os.path.join(REPO, "slurm", "train.sbatch"), *args],
                    env=env).stdout.strip()
    out_file = f"{workdir}/stm-train-{job}.out"

    def reached_step_2():
        state = slurm.job_state(job)[0]["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} ended ({state}) before it could be signalled:\n"
                                 + (_slurm_output(out_file) if os.path.exists(out_file) else ""))
        return os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(read_metrics(run_dir)[0]) >= 2

    wait_for(reached_step_2, 300, f"job {job} to run two steps", poll=0.5)
    return job, out_file


@pytest.fixture(scope="module")
def sweep_runs(slurm, digits_shards, tmp_path_factory):
    """Submit the 2-run array sweep and wait for it: {model: run_dir}, plus the sweep file."""
    work = tmp_path_factory.mktemp("sweep")
    sweep = work / "tiny.yaml"
    overrides = "\n".join(f"  - {o}" for o in tiny_overrides(digits_shards, STEPS))
    sweep.write_text(f"name: tiny\nconfigs: {REPO}/configs\nmodels: [{', '.join(MODELS)}]\n"
                     f"overrides:\n{overrides}\n")
    runs_root = work / "runs"
    env = _job_env(slurm)
    env["STM_RUNS_ROOT"] = str(runs_root)
    # The slurm daemons may only listen on loopback.
    for name, pid in slurm.daemon_pids().items():
        for addr in listeners_of(pid):
            assert addr.startswith("127.0.0.1:"), f"{name} listens on {addr}"
    job = slurm.run(["sbatch", "--parsable", f"--array=0-{len(MODELS) - 1}", "--cpus-per-task=1",
                     f"--output={work}/%x-%A_%a.out", f"--chdir={work}",
                     os.path.join(REPO, "slurm", "sweep.sbatch"), str(sweep)], env=env).stdout.strip()
    states = _wait_jobs_done(slurm, job, len(MODELS), timeout=600)
    outputs = {i: _slurm_output(f"{work}/stm-sweep-{job}_{i}.out") for i in range(len(MODELS))}
    for s in states:
        i = int(s["ArrayTaskId"])
        assert s["JobState"] == "COMPLETED" and s["ExitCode"] == "0:0", f"task {i}: {s}\n{outputs[i][-4000:]}"
        # A run that finishes is never requeued.
        assert s["Restarts"] == "0", s
        assert "requeueing" not in outputs[i]
    return {"sweep": str(sweep), "root": str(runs_root), "work": str(work),
            "dirs": {m: str(runs_root / "tiny" / m) for m in MODELS}}


def test_array_sweep_one_run_dir_per_task(sweep_runs):
    for model, run_dir in sweep_runs["dirs"].items():
        with open(os.path.join(run_dir, "config.yaml")) as f:
            assert f"name: {model}" in f.read()
        losses, evals = read_metrics(run_dir)
        assert sorted(losses) == list(range(1, STEPS + 1)), run_dir
        assert all(np.isfinite(v) for v in losses.values())
        assert STEPS in evals, f"{run_dir}: no final evaluation"
        assert os.path.isfile(os.path.join(run_dir, "checkpoints", f"step{STEPS:09d}", "COMPLETE"))


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, sweep_runs, tmp_path):
    # The same recipe as sweep run 0 (same config, overrides, world size), its own run dir.
    env = _job_env(slurm)
    env["STM_RUNS_ROOT"] = sweep_runs["root"]
    task = slurm.run([tool("stm-sweep"), "task", sweep_runs["sweep"], "0"], env=env).stdout.split("\n")
    run_dir = str(tmp_path / "preempted")
    args = [a for a in task if a] + [f"run.out_dir={run_dir}"]
    job, out_file = _submit_train_and_wait_two_steps(slurm, tmp_path, run_dir, args, env)
    # What slurm does 120 s before the time limit (#SBATCH --signal=B:USR1@120).
    slurm.run(["scancel", "--signal=USR1", "--batch", job])

    state = _wait_jobs_done(slurm, job, 1, timeout=600)[0]
    out = _slurm_output(out_file)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{out[-4000:]}"
    assert state["Restarts"] == "1", f"expected exactly one requeue: {state}\n{out[-4000:]}"
    assert "USR1 received" in out and "requeueing job" in out, out[-4000:]

    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()
    stopped = re.search(r"stopping after step (\d+): SIGUSR1 received", log)
    assert stopped, log[-3000:]
    k = int(stopped.group(1))
    assert 2 <= k < STEPS
    assert f"resumed from {run_dir}/checkpoints/step{k:09d}" in log, log[-3000:]
    assert log.rstrip().splitlines()[-1].split("] ", 1)[1].startswith("finished:"), log[-1000:]
    with open(os.path.join(run_dir, "checkpoints", f"step{k:09d}", "COMPLETE")) as f:
        assert json.load(f)["step"] == k

    # Resumed exactly: every step, before and after the interruption, has the loss of the
    # uninterrupted run, bit for bit, and so do the final evaluation numbers.
    losses, evals = read_metrics(run_dir)
    ref_losses, ref_evals = read_metrics(sweep_runs["dirs"][MODELS[0]])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses
    assert evals[STEPS]["top1"] == ref_evals[STEPS]["top1"]
    assert evals[STEPS]["top1_ema"] == ref_evals[STEPS]["top1_ema"]


def test_term_to_the_whole_job_ends_with_a_complete_checkpoint(slurm, digits_shards, tmp_path):
    """What a preemption does first: TERM to every process of the job (batch script, launchers,
    ranks). The ranks still agree on a step and save it completely before anything is killed;
    the ranks' status 75 reaches the script, which requeues, and the requeued job resumes there
    and finishes."""
    run_dir = str(tmp_path / "termed")
    steps = 30
    args = ["--config", os.path.join(REPO, "configs", "demo_digits.yaml"), *tiny_overrides(digits_shards, steps),
            f"run.out_dir={run_dir}"]
    job, out_file = _submit_train_and_wait_two_steps(slurm, tmp_path, run_dir, args, _job_env(slurm))
    slurm.run(["scancel", "--signal=TERM", "--full", job])

    state = _wait_jobs_done(slurm, job, 1, timeout=600)[0]
    out = _slurm_output(out_file)
    assert "TERM received" in out and "requeueing job" in out, out[-4000:]
    assert state["Restarts"] == "1" and state["JobState"] == "COMPLETED", f"{state}\n{out[-4000:]}"
    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()
    stopped = re.search(r"stopping after step (\d+): SIG(TERM|USR1) received", log)
    assert stopped, log[-3000:]
    k = int(stopped.group(1))
    assert 2 <= k < steps
    with open(os.path.join(run_dir, "checkpoints", f"step{k:09d}", "COMPLETE")) as f:
        marker = json.load(f)
    assert marker["step"] == k and set(marker["sha256"]) == set(marker["files"])
    assert f"resumed from {run_dir}/checkpoints/step{k:09d}" in log, log[-3000:]
    assert sorted(read_metrics(run_dir)[0]) == list(range(1, steps + 1))


# Parameters of the two micro models from spec §4 (1000 classes); our runs have a 10-class
# head, so the head's 1000*F + 1000 becomes 10*F + 10 (closed form of spec §4.1, F = 384).
SPEC_PARAMS_1000 = {"unified_convnext_micro": 4_439_624, "unified_pvt_micro": 4_454_056}
SPEC_PAPER_TOP1 = {"unified_convnext_micro": 75.1, "unified_pvt_micro": 72.8}  # spec §8


def _md_table(text: str, heading: str) -> list[dict]:
    rows = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break  # the first table after the heading only
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = []
    for line in rows[2:]:
        out.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return out


def test_report_table_and_plots(sweep_runs, tmp_path):
    import subprocess

    from PIL import Image

    out_dir = tmp_path / "report"
    proc = subprocess.run([tool("stm-report"), os.path.join(sweep_runs["root"], "tiny"), "-o", str(out_dir)],
                          capture_output=True, text=True, env=launch_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (out_dir / "report.md").read_text()

    runs = {r["model"]: r for r in _md_table(text, "## All runs")}
    assert set(runs) == set(MODELS)
    for model, row in runs.items():
        losses, evals = read_metrics(sweep_runs["dirs"][model])
        last = evals[max(evals)]
        assert row["status"] == "finished" and int(row["steps"]) == STEPS
        assert float(row["final loss"]) == pytest.approx(losses[STEPS], abs=5e-5)
        assert float(row["top-1"]) == pytest.approx(last["top1"], abs=0.005)
        assert float(row["top-5"]) == pytest.approx(last["top5"], abs=0.005)
        assert float(row["top-1 EMA"]) == pytest.approx(last["top1_ema"], abs=0.005)
        assert float(row["best top-1"]) == pytest.approx(max(e["top1"] for e in evals.values()), abs=0.005)
        expected_params = SPEC_PARAMS_1000[model] - (1000 * 384 + 1000) + (10 * 384 + 10)
        assert float(row["params (M)"]) == pytest.approx(expected_params / 1e6, abs=5e-4)
        assert 0.5 < float(row["GFLOPs"]) < 2.0  # micro models: ~1.2-1.3 GFLOPs at 224 (spec §4)
        assert float(row["img/s"]) > 0
        assert int(row["procs"]) == 1
        # digits runs: labelled with their data and never put beside the paper's ImageNet-1k number
        assert row["paper top-1"] == "–" and row["data"].startswith("10 classes, 300 val images")

    # The paper's layout: sizes x mixers, our number / the published one.
    grid = {r["size"]: r for r in _md_table(text, "(the paper's layout)")}
    assert list(grid) == ["Micro (~4.5M)", "Tiny (~30M)", "Small (~50M)", "Base (~100M)"]
    # digits runs stay out of the paper's table: its cells hold the published number only
    assert grid["Micro (~4.5M)"]["U-ConvNeXt"] == f"– / {SPEC_PAPER_TOP1['unified_convnext_micro']}"
    assert grid["Micro (~4.5M)"]["U-PVT"] == f"– / {SPEC_PAPER_TOP1['unified_pvt_micro']}"
    assert f"{len(MODELS)} run(s) on other data, not compared with the paper" in text
    assert grid["Tiny (~30M)"]["U-Swin"] == "– / 82.3"  # no run: published value only

    data = json.loads((out_dir / "report.json").read_text())
    assert {r["model"] for r in data["runs"]} == set(MODELS)

    for name in ("top1_vs_gflops.png", "top1_vs_params.png", "img_s_per_mixer.png"):
        img = Image.open(out_dir / name)
        assert img.size == (700, 450), name
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        non_white = (pixels < 250).any(axis=1).mean()
        colours = len(np.unique(pixels, axis=0))
        assert non_white > 0.02 and colours > 10, f"{name} looks blank ({non_white:.3f} ink, {colours} colours)"
        assert f"]({name})" in text
