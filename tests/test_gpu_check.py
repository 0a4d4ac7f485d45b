"""The prepared GPU check (tools/gpu_check.sh, its report, stm-bench gpu_train, make gpu-bundle) on the CPU.

A GPU session gets one try of ~8 minutes, so what can break without a GPU is proven here: the
script parses, the bundle target asks for the pinned versions, the dry run's benchmark phases go
through the same phase runner, benchmark and report code as the GPU run (the eager pair, the ZeRO 3
step with the shipped config, the compile phase's append and budget skip), and a run killed at
any phase boundary leaves a report in $OUT that names the phases done and those not reached.
No network: `make -n` only prints the download commands.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
PLAN = ["env", "build_C", "bundle", "tests_gpu", "tests_ops", "bench", "zero3", "bench_compile", "compile_zero3"]
# What the script waits for before starting each phase (tests_ops runs beside tests_gpu).
WAITS_FOR = {"env": [], "build_C": ["env"], "bundle": ["env"], "tests_gpu": ["build_C"], "tests_ops": ["build_C"],
             "bench": ["bundle", "tests_gpu", "tests_ops"], "zero3": ["bench"], "bench_compile": ["zero3"],
             "compile_zero3": ["bench_compile"]}
# The device tool brings back at most 8 plain files, named in letters, digits, '.', '_' and '-'.
RETURNABLE = re.compile(r"^[A-Za-z0-9._-]+$")


def _pin(path, name):
    text = open(os.path.join(ROOT, path)).read()
    m = re.search(rf"(?im)^{re.escape(name)}==(\S+)$", text)
    assert m, f"{path} has no {name}== pin"
    return m.group(1)


def _before(name):
    """Every phase that must have ended before `name` starts."""
    out = set()
    for p in WAITS_FOR[name]:
        out |= {p} | _before(p)
    return out


def _env(tmp_path, **extra):
    return dict(os.environ, GPU_CHECK_PY=VENV_PY if os.path.exists(VENV_PY) else sys.executable,
                GPU_CHECK_WORK=str(tmp_path / "work"), **extra)


def _returnable(out):
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and RETURNABLE.match(f.name) for f in files), files


def test_gpu_check_script_parses():
    p = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_gpu_check_rejects_unknown_argument(tmp_path):
    p = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown argument '--bogus'" in p.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_gpu_bundle_target_downloads_the_pinned_versions():
    # -B: print the recipe even when the bundle is already there; -n: run nothing.
    p = subprocess.run(["make", "-n", "-B", "gpu-bundle"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    ds = _pin("requirements/deepspeed.txt", "deepspeed")
    assert re.search(rf"--no-binary :all: .*deepspeed=={re.escape(ds)}\b", out), out
    binary = out[out.index("--only-binary=:all:"):]
    assert "--python-version 3.12" in binary and "manylinux2014_x86_64" in binary
    for name in ("hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions"):
        assert f"{name}=={_pin('requirements/lock.txt', name)}" in binary, (name, binary)
    assert "52428800" in out  # the 50 MiB check is part of the recipe


def test_gpu_check_dry_run_benchmark_phases(tmp_path):
    """The three benchmark phases of the dry run (the others need nvcc, or only collect tests
    here: the whole dry run is `bash tools/gpu_check.sh --dry-run`)."""
    out = tmp_path / "out"
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=_env(tmp_path, GPU_CHECK_PHASES="bench,zero3,bench_compile"), timeout=300)
    assert (out / "gpu_check.json").exists(), p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    status = {ph["phase"]: ph["status"] for ph in doc["phases"]}
    assert list(status) == PLAN and doc["dry_run"] is True and doc["final"] is True
    assert status["bench"] == status["zero3"] == status["bench_compile"] == "ok", (status, log[-3000:])
    assert all(status[name] == "not selected" for name in PLAN if name not in ("bench", "zero3", "bench_compile"))
    assert p.returncode == 0 and doc["failed"] == [], p.stdout[-2000:]
    # The eager pair measured, then the compile phase appended its case, skipped for its budget.
    rows = {r["mode"]: r for r in doc["bench"]["rows"]}
    assert list(rows) == ["plain", "engine", "engine_compile"], log[-3000:]
    for mode in ("plain", "engine"):
        r = rows[mode]
        assert r["state"] == "done" and r["error"] is None and r["img_per_s"] > 0, (mode, r)
        assert r["model"] == "unified_convnext_micro" and r["batch"] == 4 and r["img_size"] == 32
    assert rows["engine_compile"]["state"] == "skipped" and rows["engine_compile"]["skipped"].startswith("budget:")
    assert doc["bench"]["ratios"][0]["engine_vs_plain"] > 0
    # The ZeRO 3 step with the shipped config, in its own file.
    (z,) = doc["zero3"]["rows"]
    assert doc["zero3"]["meta"]["ds_config"] == "ds_configs/zero3_bf16.json"
    assert (z["model"], z["mode"], z["zero_stage"], z["precision"], z["state"]) == (
        "unified_dcn_v3_micro", "engine", 3, "bf16", "done"), z
    assert z["img_per_s"] > 0 and z["loss"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| unified_convnext_micro | engine | 1 |" in md and "| unified_dcn_v3_micro | engine | 3 |" in md
    assert "DALI's `mixed` (GPU) decode is not tested here" in md
    assert "[zero3] == limit" in log and "[bench] [gpu_train] unified_convnext_micro" in log
    _returnable(out)


@pytest.mark.parametrize("boundary", [f"{name}:end" for name in PLAN] + ["bench:start"])
def test_gpu_check_killed_at_a_phase_boundary_leaves_a_partial_report(tmp_path, boundary):
    """GPU_CHECK_KILL_AT kills the whole run (every process, at once, as the device tool's limit
    does). No phase is selected, so each boundary costs only the runner and its report; at
    bench:start the bench is selected and killed as it starts."""
    name, when = boundary.split(":")
    out = tmp_path / "out"
    env = _env(tmp_path, GPU_CHECK_PHASES="bench" if when == "start" else "none", GPU_CHECK_KILL_AT=boundary)
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120, start_new_session=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    doc = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    status = {ph["phase"]: ph["status"] for ph in doc["phases"]}
    assert list(status) == PLAN and doc["final"] is False
    assert "if this is the last version that came back, the run was killed here" in md
    if when == "start":
        assert status[name].startswith("running since"), status
    else:
        assert status[name] == "not selected", status
    for other in PLAN:
        row = f"| {other} | {status[other]} |"
        assert row in md, (row, md)
        if other in _before(name):
            assert status[other] == "not selected", (other, status)
        elif name in _before(other):
            assert status[other] == "not reached", (other, status)
    assert f"[{name}] GPU_CHECK_KILL_AT={boundary}: killing the run" in (out / "gpu_check.log").read_text()
    _returnable(out)


def _report(tmp_path, events, log, final=True):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (tmp_path / "events.tsv").write_text("".join("\t".join(map(str, e)) + "\n" for e in events))
    (out / "gpu_check.log").write_text(log)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check_report.py"), "--events",
                        str(tmp_path / "events.tsv"), "--out", str(out), "--plan", ",".join(PLAN), "--t0", "0",
                        "--total", "470"] + (["--final"] if final else []), capture_output=True, text=True)
    doc = json.loads((out / "gpu_check.json").read_text())
    return p, {ph["phase"]: ph for ph in doc["phases"]}


def test_gpu_check_report_passes_soft_phases_cut_short_and_fails_the_rest(tmp_path):
    # name, event, at, exit, seconds, soft, note (as tools/gpu_check.sh writes them)
    events = [("env", "start", 0, 0, 0, 0, ""), ("env", "end", 5, 0, 5, 0, ""),
              ("tests_ops", "start", 5, 0, 0, 1, ""), ("tests_ops", "end", 40, 130, 35, 1, "stopped"),
              ("tests_gpu", "start", 5, 0, 0, 0, ""), ("tests_gpu", "end", 30, 1, 25, 0, ""),
              ("bench_compile", "start", 300, 0, 0, 1, ""), ("bench_compile", "end", 460, 124, 160, 1, ""),
              ("compile_zero3", "skip", 460, 0, 0, 1, "0s left of the 470s budget, it needs ~150s"),
              ("build_C", "start", 5, 0, 0, 0, "")]
    log = ("[tests_ops] ....... [ 40%]\n[tests_ops] !!! KeyboardInterrupt !!!\n"
           "[tests_gpu] ..F.. [100%]\n[tests_gpu] 1 failed, 4 passed in 20.01s\n")
    p, ph = _report(tmp_path, events, log)
    assert p.returncode == 1, p.stderr
    assert ph["env"]["status"] == "ok" and not ph["env"]["failed"]
    assert ph["tests_ops"]["status"].startswith("cut short: stopped") and not ph["tests_ops"]["failed"]
    assert ph["tests_ops"]["summary"] == "7 passed before it stopped"
    assert ph["tests_gpu"]["status"] == "FAILED (exit 1)" and ph["tests_gpu"]["summary"] == "1 failed, 4 passed in 20.01s"
    assert ph["bench_compile"]["status"] == "cut short: its time ran out" and not ph["bench_compile"]["failed"]
    assert ph["compile_zero3"]["status"].startswith("skipped: 0s left")
    assert ph["build_C"]["status"].startswith("running since +5 s") and ph["bench"]["status"] == "not reached"
    # A hard phase at its limit fails; a soft one whose tests failed before the cut fails too.
    p, ph = _report(tmp_path / "b", [("bundle", "end", 250, 124, 240, 0, ""), ("tests_ops", "end", 99, 124, 90, 1, "")],
                    "[tests_ops] ..E. [ 10%]\n")
    assert p.returncode == 1 and ph["bundle"]["status"].startswith("TIMED OUT") and ph["tests_ops"]["failed"]
    p, ph = _report(tmp_path / "c", [("env", "end", 5, 0, 5, 0, "")], "")
    assert p.returncode == 0 and ph["env"]["status"] == "ok"
