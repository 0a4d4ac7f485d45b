"""Shared helpers for fixture parity with the original models (used by every mixer's tests).

`fill_state_dict` is the fixture README's weight rule: every floating-point entry is drawn from a
generator seeded by the CRC32 of its (original) key name, so a model with the original key names
gets exactly the weights the fixtures were produced with.
"""
import os
import zlib

import pytest
import torch

from stm_dist.models import create_model

# The spec lives in shared/ beside the checkout (as in CI's clean clone); STM_SPEC_DIR overrides.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC_DIR = os.environ.get("STM_SPEC_DIR", os.path.join(os.path.dirname(_REPO), "shared", "spec"))
FIXTURE_DIR = os.path.join(SPEC_DIR, "original_fixtures")
KEYS_DIR = os.path.join(SPEC_DIR, "original_state_dict_keys")

# README "Suggested tolerances".
TOL = {torch.float64: dict(logits=1e-9, stage=1e-9), torch.float32: dict(logits=1e-6, stage=1e-5)}


def _kept(k: str, v: torch.Tensor) -> bool:
    """Entries the rule leaves as the model made them (integer tables, computed masks)."""
    return (not v.is_floating_point()) or k.endswith("relative_position_index") or k.endswith("attn_mask")


def _draw(k: str, v: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(k.encode("utf-8")))
    r = torch.randn(v.shape, generator=g, dtype=torch.float64)
    if k.endswith("running_var"):
        return 1.0 + 0.1 * r.abs()
    if v.dim() >= 2:
        return 0.02 * r
    if k.endswith(".weight"):
        return 1.0 + 0.1 * r
    return 0.1 * r


def fill_state_dict(sd: dict, dtype: torch.dtype, drawn: dict = None) -> dict:
    """`drawn`: a dict that keeps the float64 draws (the rule draws in float64 and rounds to
    `dtype`), so a second fill of the same keys in another dtype is those draws rounded, bit for
    bit a fresh fill, without drawing again (~4 s for a base model)."""
    out = {}
    for k, v in sd.items():
        if _kept(k, v):
            out[k] = v
            continue
        if drawn is None:
            t = _draw(k, v)
        else:
            t = drawn.get(k)
            if t is None:
                t = drawn[k] = _draw(k, v)
        out[k] = t.to(dtype)
    return out


def fixture_input(dtype: torch.dtype) -> torch.Tensor:
    """The fixtures' input: float64 runs used the un-rounded float64 tensor."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x if dtype == torch.float64 else x.float()


def has_fixture(name: str) -> bool:
    return os.path.exists(os.path.join(FIXTURE_DIR, f"{name}.pt"))


def load_fixture(name: str, dtype: torch.dtype) -> dict:
    key = "float64" if dtype == torch.float64 else "float32"
    return torch.load(os.path.join(FIXTURE_DIR, f"{name}.pt"), weights_only=False)[key]


def filled_model(name: str, dtype: torch.dtype, device="cpu", **overrides):
    """Model `name` in eval mode, in `dtype`, with the fixture weights loaded strictly."""
    model = create_model(name, num_classes=1000, layer_scale_init_value=1e-6, **overrides)
    model = model.to(device=device, dtype=dtype).eval()
    model.load_state_dict(fill_state_dict(model.state_dict(), dtype), strict=True)
    return model


@torch.no_grad()
def run_fixture(name: str, dtype: torch.dtype, x: torch.Tensor = None, device="cpu", **overrides) -> dict:
    """Logits and fixture-style stage statistics/slices of the filled model on the fixture input."""
    return _outputs(filled_model(name, dtype, device, **overrides), dtype, x, device)


@torch.no_grad()
def run_fixtures(name: str, dtypes=(torch.float64, torch.float32)):
    """(dtype, run_fixture(name, dtype)) for each dtype, from one constructed model and one draw
    of the weights. Exactly what separate run_fixture calls give: filled_model converts the
    float32-built model to the run's dtype anyway (the entries the rule keeps survive a
    float32 -> float64 -> float32 round trip unchanged), and the weights are reloaded per dtype."""
    model = create_model(name, num_classes=1000, layer_scale_init_value=1e-6).eval()
    drawn = {}
    for dtype in dtypes:
        model = model.to(dtype=dtype)
        model.load_state_dict(fill_state_dict(model.state_dict(), dtype, drawn), strict=True)
        yield dtype, _outputs(model, dtype)


def _outputs(model, dtype, x=None, device="cpu") -> dict:
    x = (fixture_input(dtype) if x is None else x).to(device)
    stages = model.forward_stages(x)
    feats = model.conv_head(model.stage_end_norm(stages[-1]))
    logits = model.head(model.avg_head(feats))
    return dict(
        logits=logits.cpu(),
        stage_mean=[s.mean().item() for s in stages],
        stage_std=[s.std().item() for s in stages],
        stage_slice=[s[0, :8, :2, :2].cpu() for s in stages],
    )


def max_deviation(got: dict, ref: dict) -> dict:
    """Max |got - ref| for logits and over the four stage slices."""
    ref_logits = torch.as_tensor(ref["logits"]).to(got["logits"].dtype)
    stage = max((g - torch.as_tensor(r).to(g.dtype)).abs().max().item()
                for g, r in zip(got["stage_slice"], ref["stage_slice"]))
    return dict(logits=(got["logits"] - ref_logits).abs().max().item(), stage=stage)


def original_keys(name: str):
    """[(key, shape tuple)] from original_state_dict_keys/<name>.txt, or None if absent."""
    path = os.path.join(KEYS_DIR, f"{name}.txt")
    if not os.path.exists(path):
        return None
    rows = []
    for line in open(path).read().splitlines():
        key, shape = line.split("\t")[:2]
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def meta_model(name: str, **overrides):
    """A model on the meta device: shapes and counts without paying for initialisation."""
    with torch.device("meta"):
        return create_model(name, **overrides)


def fast_model(name: str, **overrides):
    """Built on the meta device and filled by the fixture rule: skips the slow trunc_normal init."""
    model = meta_model(name, **overrides).to_empty(device="cpu")
    computed = [k for k in model.state_dict() if k.endswith(("relative_position_index", "attn_mask"))]
    if computed:  # to_empty leaves them uninitialised and the fixture rule does not fill them
        raise ValueError(f"fast_model({name!r}): buffers computed at construction ({computed[0]}, ...); "
                         "use create_model or filled_model")
    model.load_state_dict(fill_state_dict(model.state_dict(), torch.float32), strict=True)
    return model.eval()


def check_fixture(name: str, dtype: torch.dtype) -> None:
    """Logits and stage slices within the README tolerances, stage mean/std close as well."""
    got, ref = run_fixture(name, dtype), load_fixture(name, dtype)
    dev, tol = max_deviation(got, ref), TOL[dtype]
    assert dev["logits"] <= tol["logits"], dev
    assert dev["stage"] <= tol["stage"], dev
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    for key in ("stage_mean", "stage_std"):
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=rel), key


def check_counts(name: str, params: int, features: int, entries: int = None) -> None:
    """Spec §4: exact parameter count, pooled feature width and state-dict entry count."""
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.head_hidden_size == features
    if entries is not None:
        assert len(model.state_dict()) == entries
