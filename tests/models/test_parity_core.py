"""Numerical parity with the original models (fixtures from the original code, same weights).

micro models run in the default suite; tiny/small/base are marked slow (float64 on 2 cores).
"""
import pytest
import torch

from parity import TOL, has_fixture, load_fixture, max_deviation, run_fixtures

MIXERS = ("halo", "swin", "convnext")


def _params():
    for stm in MIXERS:
        for size in ("micro", "tiny", "small", "base"):
            marks = [] if size == "micro" else [pytest.mark.slow]
            yield pytest.param(f"unified_{stm}_{size}", marks=marks, id=f"{stm}_{size}")


@pytest.mark.parametrize("name", list(_params()))
def test_fixture_parity(name):
    assert has_fixture(name), f"fixture missing for {name}"
    for dtype, got in run_fixtures(name, (torch.float64, torch.float32)):
        ref = load_fixture(name, dtype)
        dev = max_deviation(got, ref)
        tol = TOL[dtype]
        assert dev["logits"] <= tol["logits"], (name, dtype, dev)
        assert dev["stage"] <= tol["stage"], (name, dtype, dev)
        # Stage statistics over the whole maps, not only the slices.
        rel = 1e-9 if dtype == torch.float64 else 1e-4
        for g, r in zip(got["stage_mean"] + got["stage_std"], ref["stage_mean"] + ref["stage_std"]):
            assert abs(g - r) <= rel * max(1.0, abs(r)), (name, dtype, g, r)
