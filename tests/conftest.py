import os
import shutil
import tempfile

import pytest
import torch

# Keep the two CI cores from oversubscribing when tests spawn worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A private inductor cache per test session: the shared /tmp/torchinductor_<user> keeps whatever an
# interrupted compile left behind (a truncated .so made a later run fail with "file too short").
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="stm-test-inductor-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
