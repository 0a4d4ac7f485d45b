"""stm-analyze as a user runs it: bad input in one line, the outputs, and 2 processes (torchrun,
gloo) giving exactly the 1-process numbers with every image counted once."""
import os

import numpy as np
import pytest
from conftest import MODEL, read_json, run_analyze


def test_help_explains_the_three_analyses():
    proc = run_analyze("--help")
    assert proc.returncode == 0
    for word in ("invariance", "erf", "robustness", "all", "--checkpoint", "torchrun"):
        assert word in proc.stdout
    proc = run_analyze("robustness", "--help")
    assert proc.returncode == 0 and "--eps" in proc.stdout and "1/255" in proc.stdout
    proc = run_analyze("all", "--help")
    assert proc.returncode == 0 and all(w in proc.stdout for w in ("--types", "--images", "--eps", "--erf-img-size"))


@pytest.mark.parametrize("args,message", [
    (["robustness", "--eps", "0", "abc"], "--eps: 'abc' is not a number"),
    (["robustness", "--eps=-1/255"], "--eps: '-1/255' is outside [0, 1]"),
    (["erf", "--checkpoint", "/no/such.pth"], "checkpoint not found: /no/such.pth"),
    (["erf", "--data", "/no/shards"], "/no/shards/val.json: no manifest"),
    (["erf", "--model", "unified_nope_micro"], "unknown model 'unified_nope_micro'"),
])
def test_bad_input_is_one_clear_line(args, message, digits_shards, tmp_path):
    base = {"--model": MODEL, "--checkpoint": "random", "--data": digits_shards, "--out": str(tmp_path)}
    for flag in [a for a in args if a in base]:
        del base[flag]
    proc = run_analyze(*args, *[x for kv in base.items() for x in kv], "--img-size", 32)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stm-analyze: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _strip(r):
    return {k: v for k, v in r.items() if k not in ("seconds", "seconds_per_image", "world_size")}


@pytest.mark.parametrize("name", ["invariance_translation", "erf", "robustness"])
def test_two_processes_equal_one_process_exactly(outputs, name):
    r1, r2 = (read_json(os.path.join(outputs[k], f"{name}.json")) for k in ("one", "two"))
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert r1["num_images"] == {"invariance_translation": 13, "erf": 11, "robustness": 7}[name]
    assert _strip(r1) == _strip(r2)  # exact: floats compared bit for bit
    if name == "erf":
        m1, m2 = (np.load(os.path.join(outputs[k], "erf_map.npy")) for k in ("one", "two"))
        assert np.array_equal(m1, m2) and m1.shape == (32, 32) and m1.sum() > 0


def test_outputs_follow_the_documented_schema(outputs):
    from PIL import Image

    inv = read_json(os.path.join(outputs["one"], "invariance_translation.json"))
    assert inv["model"] == MODEL and inv["type"] == "translation" and set(inv["standard"]) >= {"acc1", "acc5"}
    assert [lv["level"] for lv in inv["levels"]] == list(range(0, 65, 4))
    assert all(set(lv) == {"level", "acc1", "acc5", "consistency", "loss"} for lv in inv["levels"])
    erf = read_json(os.path.join(outputs["one"], "erf.json"))
    assert erf["num_images"] == 11 and list(erf["area_ratio"]) == ["0.2", "0.3", "0.5", "0.99"]
    ratios = list(erf["area_ratio"].values())
    assert all(0 < a <= b <= 1 for a, b in zip(ratios, ratios[1:]))
    rob = read_json(os.path.join(outputs["one"], "robustness.json"))
    assert [(a["attack"], round(a["eps"] * 255, 6)) for a in rob["attacks"]] == \
        [(k, e) for k in ("fgsm", "pgd") for e in (0, 1, 2, 4)]
    for name in ("invariance_translation.png", "erf.png", "robustness.png"):
        pixels = np.asarray(Image.open(os.path.join(outputs["one"], name)).convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10, f"{name} looks blank"


def test_an_export_of_another_model_is_named(fitted, digits_shards, tmp_path):
    """The checkpoint goes through stm-eval's resolution: an stm-export sidecar naming another
    model is refused in one line."""
    import shutil

    ckpt = tmp_path / "model.pth"
    shutil.copy(fitted[1], ckpt)
    (tmp_path / "model.pth.json").write_text('{"model": "unified_swin_micro"}')
    proc = run_analyze("erf", "--model", MODEL, "--checkpoint", ckpt, "--data", digits_shards, "--out", tmp_path,
                       "--img-size", 32, "--images", 2)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds weights of unified_swin_micro, not unified_convnext_micro" in lines[0]
