"""Bad arguments to torch.ops.stm_dist.ms_deform_attn give errors that name the argument.

The calls run in one child process (input_check_cases.py): a build that crashes on an argument
error fails the case it crashed in, not the test session.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import stm_dist.ops as ops

from .conftest import build_inputs
from .input_check_cases import NAMES

pytestmark = pytest.mark.skipif(not ops.kernel_available("ms_deform_attn", "CPU"),
                                reason="stm_dist._C has no CPU kernel (extension not built)")

SCRIPT = os.path.join(os.path.dirname(__file__), "input_check_cases.py")


@pytest.fixture(scope="module")
def child_results():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {r["case"]: r for r in lines if "case" in r}
    started = [r["start"] for r in lines if "start" in r]
    crashed = started[-1] if started and started[-1] not in results else None
    return dict(results=results, crashed=crashed, rc=proc.returncode, stderr=proc.stderr[-2000:])


@pytest.mark.parametrize("name", NAMES)
def test_bad_argument_is_named(child_results, name):
    r = child_results
    if name not in r["results"]:
        where = f"the child process died in case {r['crashed']!r}" if r["crashed"] else "the case never ran"
        pytest.fail(f"{name}: {where} (exit status {r['rc']}):\n{r['stderr']}")
    result = r["results"][name]
    assert result["ok"], f"{name}: {'raised ' + repr(result['message']) if result['raised'] else 'did not raise'}"


def test_child_exits_cleanly(child_results):
    assert child_results["rc"] == 0 and child_results["crashed"] is None, child_results["stderr"]


def test_fake_kernel_reports_bad_rank_at_trace_time():
    value, shapes, start, loc, attn = build_inputs(2, [(4, 5), (2, 2)], 2, 8, 3, 4, dtype=torch.float32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    bad_loc = loc[..., 0]
    with FakeTensorMode() as mode, pytest.raises(Exception, match="sampling_locations must be 6-D"):
        v, s, i, l, a = [mode.from_tensor(t) for t in (value, shapes, start, bad_loc, attn)]
        torch.ops.stm_dist.ms_deform_attn(v, s, i, l, a)
