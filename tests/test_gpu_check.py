"""The prepared GPU check (tools/gpu_check.sh, stm-bench gpu_train, make gpu-bundle) on the CPU.

A GPU session gets one try of ~8 minutes, so the parts that can break without a GPU are proven
here: the shell script parses, the bundle target asks for the pinned versions, and the dry run
goes through the same phase runner, benchmark and report code as the GPU run and writes a table
and JSON with a measured row per mode. No network: `make -n` only prints the download commands.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def _pin(path, name):
    text = open(os.path.join(ROOT, path)).read()
    m = re.search(rf"(?im)^{re.escape(name)}==(\S+)$", text)
    assert m, f"{path} has no {name}== pin"
    return m.group(1)


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


def test_gpu_check_dry_run_writes_a_row_per_mode(tmp_path):
    """The dry run's phase runner, benchmark and report (the bench phase only: the others need
    nvcc or take minutes here; the full dry run is `bash tools/gpu_check.sh --dry-run`)."""
    py = os.path.join(ROOT, ".venv", "bin", "python")
    env = dict(os.environ, GPU_CHECK_PHASES="bench", GPU_CHECK_PY=py if os.path.exists(py) else sys.executable,
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_TOTAL_S="300")
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    out = tmp_path / "out"
    assert (out / "gpu_check.md").exists(), p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] is True
    status = {ph["phase"]: ph["status"] for ph in doc["phases"]}
    assert status["env"] == status["build_C"] == "not selected" and len(status) == 6, status
    rows = {r["mode"]: r for r in doc["bench"]["rows"]}
    bench_log = (out / "bench.log").read_text()[-3000:]
    assert set(rows) == {"plain", "engine"}, bench_log
    for mode, r in rows.items():
        assert r["error"] is None and r["img_per_s"] and r["img_per_s"] > 0, (mode, r, bench_log)
        assert r["model"] == "unified_convnext_micro" and r["batch"] == 4 and r["img_size"] == 32
    assert doc["bench"]["ratios"][0]["engine_vs_plain"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| unified_convnext_micro | plain |" in md and "| unified_convnext_micro | engine |" in md
    assert status["bench"] == "ok" and p.returncode == 0, (status, p.stdout[-2000:])
    # Only what the device tool can bring back: at most 8 plain files in $OUT.
    assert len(list(out.iterdir())) <= 8 and all(f.is_file() for f in out.iterdir())
