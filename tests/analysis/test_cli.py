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
    out = {k: v for k, v in r.items() if k not in ("seconds", "seconds_per_image", "world_size")}
    # `all --limit 13 --images 11` records its --limit; the plain erf command had none (11 images either way)
    out["provenance"] = {k: v for k, v in r["provenance"].items() if k != "limit"}
    return out


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
    assert all(set(lv) == {"level", "content_shift_px", "acc1", "acc5", "consistency", "loss"} for lv in inv["levels"])
    erf = read_json(os.path.join(outputs["one"], "erf.json"))
    assert erf["num_images"] == 11 and list(erf["area_ratio"]) == ["0.2", "0.3", "0.5", "0.99"]
    ratios = list(erf["area_ratio"].values())
    assert all(0 < a <= b <= 1 for a, b in zip(ratios, ratios[1:]))
    # RepLKNet's own statistic beside ours, named as such, with what each one is
    assert list(erf["replknet_area_ratio"]) == ["0.2", "0.3", "0.5", "0.99"]
    assert erf["replknet_area_ratio"] != erf["area_ratio"]
    theirs = erf["definitions"]["replknet_area_ratio"]
    assert "RepLKNet" in theirs and "log10" in theirs
    assert "|gradient|" in erf["definitions"]["area_ratio"]
    rob = read_json(os.path.join(outputs["one"], "robustness.json"))
    assert [(a["attack"], round(a["eps"] * 255, 6)) for a in rob["attacks"]] == \
        [(k, e) for k in ("fgsm", "pgd") for e in (0, 1, 2, 4)]
    assert all(set(a) == {"attack", "eps", "acc1", "acc1_accumulated"} for a in rob["attacks"])
    for name in ("invariance_translation.png", "erf.png", "robustness.png"):
        pixels = np.asarray(Image.open(os.path.join(outputs["one"], name)).convert("RGB")).reshape(-1, 3)
        colours = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # faster than rows
        assert len(np.unique(colours)) > 10, f"{name} looks blank"


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


def _sha256(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_every_output_records_its_provenance(outputs, fitted, digits_shards):
    """Data (shard folder + manifest hash), checkpoint (path + file hash + hash of the weights
    evaluated), seed, image size, limit and the analysis' own settings, in every JSON."""
    data = {"shards": os.path.abspath(digits_shards), "split": "val",
            "manifest_sha256": _sha256(os.path.join(digits_shards, "val.json")), "num_samples": 300, "num_classes": 10}
    weights = set()
    for name, limit in (("invariance_translation", 13), ("erf", None), ("robustness", 7)):
        p = read_json(os.path.join(outputs["one"], f"{name}.json"))["provenance"]
        assert p["data"] == data, name
        ck = p["checkpoint"]
        assert ck["path"] == os.path.abspath(fitted[1]) and ck["sha256"] == _sha256(fitted[1]), name
        weights.add(ck["weights_sha256"])
        assert p["seed"] == 0 and p["img_size"] == 32 and p["limit"] == limit and p["precision"] == "fp32", name
    assert len(weights) == 1 and len(next(iter(weights))) == 64
    assert read_json(os.path.join(outputs["one"], "erf.json"))["provenance"]["images"] == 11
    rob = read_json(os.path.join(outputs["one"], "robustness.json"))["provenance"]
    assert rob["attack"] == {"eps": [0, 1 / 255, 2 / 255, 4 / 255], "pgd_steps": 2, "pgd_step_size": "eps/4",
                             "pgd_random_start": True, "norm": "l_inf", "space": "pixels in [0, 1]"}
    inv = read_json(os.path.join(outputs["one"], "invariance_translation.json"))["provenance"]
    assert inv["type"] == "translation" and inv["crop_pct"] == 0.875
    # a random init is identified by its seed and the hash of its weights
    second = read_json(os.path.join(os.path.dirname(outputs["one"]), "unified_swin_micro", "erf.json"))["provenance"]
    assert second["checkpoint"]["path"] == "random" and second["checkpoint"]["sha256"] is None
    assert second["checkpoint"]["weights_sha256"] not in weights
