"""The extension guard: a stm_dist._C whose build record does not match the running torch is
refused with both versions and the rebuild command, before it is loaded.

The forged cases run in a child process on a copy of the package (Python files copied, the built
library linked) that sits first on PYTHONPATH, so the checkout's own record is never touched.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stm_dist
from stm_dist.ops import build_guard

LIBRARY = build_guard.library_path()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="stm_dist._C is not built")
REBUILD_CMD = "pip install --no-build-isolation --no-deps -e ."


def _package_copy(root, record):
    pkg = root / "stm_dist"
    (pkg / "ops").mkdir(parents=True)
    src = os.path.dirname(stm_dist.__file__)
    shutil.copy(os.path.join(src, "__init__.py"), pkg)
    for name in os.listdir(os.path.join(src, "ops")):
        if name.endswith(".py"):
            shutil.copy(os.path.join(src, "ops", name), pkg / "ops")
    os.symlink(LIBRARY, pkg / os.path.basename(LIBRARY))
    if record is not None:
        (pkg / build_guard.RECORD).write_text(json.dumps(record))
    return pkg


def _import_in_child(root):
    code = ("import stm_dist, stm_dist.ops as ops\n"
            f"assert stm_dist.__file__.startswith({str(root)!r}), stm_dist.__file__\n"
            "print('loaded', ops.extension_available())\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    # cwd too: `python -c` puts it first on sys.path, and the checkout's stm_dist must not win.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=120)


def test_checkout_record_matches_running_torch():
    with open(os.path.join(os.path.dirname(LIBRARY), build_guard.RECORD)) as f:
        assert json.load(f) == build_guard.running_build()
    build_guard.check(LIBRARY)


def test_record_for_another_torch_refuses_to_load(tmp_path):
    forged = dict(build_guard.running_build(), torch="2.11.0+cu130")
    if forged["torch"] == torch.__version__:
        forged["torch"] = "2.0.0"
    _package_copy(tmp_path, forged)
    proc = _import_in_child(tmp_path)
    assert proc.returncode != 0 and "loaded" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stm_dist.ops.build_guard.ExtensionBuildMismatch: "), proc.stderr
    assert f"built for torch {forged['torch']} " in last and f"runs torch {torch.__version__} " in last, last
    assert REBUILD_CMD in last and "make test" in last, last


def test_missing_record_refuses_to_load(tmp_path):
    _package_copy(tmp_path, None)
    proc = _import_in_child(tmp_path)
    assert proc.returncode != 0 and "loaded" not in proc.stdout
    assert "has no build record" in proc.stderr and REBUILD_CMD in proc.stderr, proc.stderr


@pytest.mark.parametrize("key,other", [("cxx11_abi", None), ("cuda", "11.8")])
def test_abi_or_cuda_difference_is_named(tmp_path, key, other):
    pkg = _package_copy(tmp_path, None)
    forged = build_guard.running_build()
    forged[key] = (not forged[key]) if key == "cxx11_abi" else (other if forged[key] != other else "12.1")
    (pkg / build_guard.RECORD).write_text(json.dumps(forged))
    with pytest.raises(build_guard.ExtensionBuildMismatch, match=f"\\({key} differs\\)"):
        build_guard.check(str(pkg / os.path.basename(LIBRARY)))
