import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=REPO)


def test_import_is_light():
    """`import stm_dist` must not pull in DeepSpeed, DALI or torch, and must be fast."""
    code = (
        "import sys, time; t = time.perf_counter(); import stm_dist; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('deepspeed', 'nvidia.dali', 'torch') if m in sys.modules]; "
        "print(dt); print(','.join(heavy))"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    dt, heavy = res.stdout.splitlines()[0], res.stdout.splitlines()[1:]
    assert float(dt) < 3.0
    assert heavy in ([], [""]), f"import stm_dist loaded {heavy}"


def test_models_do_not_import_engine_or_deepspeed():
    res = _python("import sys, stm_dist.models; print([m for m in sys.modules if m.startswith(('deepspeed', 'nvidia.dali', 'stm_dist.engine'))])")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_stm_env_reports_and_exits_zero():
    exe = os.path.join(os.path.dirname(sys.executable), "stm-env")
    t = time.perf_counter()
    res = subprocess.run([exe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for key in ("torch", "CUDA available", "extension loaded", "ms_deform_attn CPU kernel",
                "ms_deform_attn CUDA kernel", "deepspeed", "apex", "nvidia.dali"):
        assert key in out, f"stm-env report lacks {key!r}:\n{out}"
    assert "extension loaded" in out and "True" in out.split("extension loaded")[1].splitlines()[0]
    assert time.perf_counter() - t < 120


def test_extension_build_matches_toolchain():
    """setup.py builds the CUDA kernels whenever torch is a CUDA build and nvcc exists."""
    import shutil

    import torch

    import stm_dist.ops as ops

    assert ops.extension_available()
    expect_cuda = torch.version.cuda is not None and shutil.which("nvcc", path=os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin") is not None
    if os.environ.get("STM_DIST_CUDA", "auto") in ("0", "off"):
        expect_cuda = False
    assert bool(torch.ops.stm_dist.built_with_cuda()) == expect_cuda
