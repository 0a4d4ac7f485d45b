import os

# Keep the two CI cores from oversubscribing when tests spawn worker processes; set before torch
# is imported, or this process itself keeps its default thread pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
# A private inductor cache per test session: the shared /tmp/torchinductor_<user> keeps whatever an
# interrupted compile left behind (a truncated .so made a later run fail with "file too short").
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="stm-test-inductor-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE)


def pytest_collection_finish(session):
    """Start building the wheel test_package.py installs, if a collected test needs it: it
    compiles at the lowest priority while the tests before it run (tests/wheel_build.py)."""
    if session.config.option.collectonly or not any("wheel" in getattr(i, "fixturenames", ()) for i in session.items):
        return
    from wheel_build import WHEEL_BUILD, Build

    alone = all(item.path.name == "test_package.py" for item in session.items)  # nothing runs beside it
    setattr(session.config, WHEEL_BUILD, Build(tempfile.mkdtemp(prefix="stm-test-wheel-"), jobs=2 if alone else 1))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
    from wheel_build import WHEEL_BUILD

    build = getattr(session.config, WHEEL_BUILD, None)
    if build is not None:
        build.stop()
        shutil.rmtree(build.out, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
