"""stm-report with analyses: the mixers side by side, and the paper's ImageNet-1k numbers only
next to runs evaluated on ImageNet-1k."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from conftest import MODEL, SECOND, read_json

from stm_dist.cli.report import main


def _run_dir(root, name, model, val_shards, top1):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"model: {{name: {model}, num_classes: 10, img_size: 32}}\n"
                                   f"data: {{val_shards: {val_shards}}}\n")
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 10, "loss": 0.5, "img_s": 100.0}) + "\n"
                                     + json.dumps({"kind": "eval", "step": 10, "top1": top1, "top5": 99.0}) + "\n")
    return d


def _imagenet_manifest(path):
    """The val manifest of an ImageNet-1k shard set (1000 classes, 50,000 images), shards omitted."""
    path.mkdir(parents=True)
    (path / "val.json").write_text(json.dumps({"format": "stm-shards/1", "num_samples": 50000, "num_classes": 1000,
                                               "shards": [], "source": {"root": "/data/imagenet"}}))
    return path


@pytest.fixture(scope="module")
def report(outputs, digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _run_dir(root, "digits_convnext", MODEL, digits_shards, 96.7)
    _run_dir(root, "in1k_convnext", MODEL, _imagenet_manifest(root / "in1k_shards"), 74.0)
    out = root / "report"
    # stm-report's main() in this process: it returns its exit status (no os._exit), and a
    # second interpreter would cost ~1 s of imports on the 2-core CI box
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(root), "--analyses", outputs["root"], "-o", str(out), "--no-complexity"])
    assert code == 0, err.getvalue()
    return out


def test_paper_numbers_only_beside_imagenet_runs(report):
    runs = {r["name"]: r for r in read_json(report / "report.json")["runs"]}
    digits, in1k = runs["digits_convnext"], runs["in1k_convnext"]
    assert digits["imagenet1k"] is False and digits["paper_top1"] is None
    assert digits["dataset"].startswith("10 classes, 300 val images")
    assert in1k["imagenet1k"] is True and in1k["dataset"] == "ImageNet-1k" and in1k["paper_top1"] == 75.1
    md = (report / "report.md").read_text()
    grid = md.split("(the paper's layout)")[1].split("## All runs")[0]
    micro = next(line for line in grid.splitlines() if line.startswith("| Micro"))
    assert "74.00 / 75.1" in micro and "96.70" not in grid  # the digits run is not in the paper's table
    assert "not compared with the paper: 10 classes, 300 val images" in grid
    all_runs = md.split("## All runs")[1]
    assert "| ImageNet-1k |" in all_runs and "| 10 classes, 300 val images" in all_runs


def test_analyses_side_by_side(report, outputs):
    from PIL import Image

    data = read_json(report / "report.json")["analyses"]
    # one group each (same data, size, images, attack): the paper's mixer order, Swin before ConvNeXt
    assert [len(data["erf"]), len(data["robustness"]), len(data["invariance"]["translation"])] == [1, 1, 1]
    assert [r["model"] for r in data["erf"][0]["results"]] == [SECOND, MODEL]
    assert [r["model"] for r in data["robustness"][0]["results"]] == [SECOND, MODEL]
    assert [r["model"] for r in data["invariance"]["translation"][0]["results"]] == [SECOND, MODEL]
    ours = read_json(os.path.join(outputs["one"], "erf.json"))
    kept = data["erf"][0]["results"][1]
    assert kept["area_ratio"] == ours["area_ratio"] and kept["replknet_area_ratio"] == ours["replknet_area_ratio"]
    # the provenance the report says it keeps: data, checkpoint, seed, attack settings
    for kind in ("erf", "robustness"):
        for r in data[kind][0]["results"]:
            mine = read_json(os.path.join(outputs["root"], r["dir"], f"{kind}.json"))
            assert r["provenance"] == mine["provenance"] and r["provenance"]["seed"] == 0
    assert data["robustness"][0]["results"][1]["provenance"]["attack"]["pgd_steps"] == 2
    settings = data["erf"][0]["settings"]
    assert settings["img_size"] == 32 and settings["num_images"] == 11
    assert settings["data"] == ours["provenance"]["data"]["manifest_sha256"]
    md = (report / "report.md").read_text()
    assert "## Analyses of the mixers" in md and "| U-Swin micro |" in md and "| U-ConvNeXt micro |" in md
    for name in ("invariance_translation_compare.png", "erf_compare.png", "robustness_compare.png"):
        pixels = np.asarray(Image.open(report / name).convert("RGB")).reshape(-1, 3)
        colours = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # faster than rows
        assert len(np.unique(colours)) > 10, f"{name} looks blank"
        assert f"]({name})" in md


def test_report_labels_the_headline_numbers(report):
    """Robustness: the per-eps accuracy is the headline, the accumulated one is named; ERF:
    RepLKNet's statistic beside ours; invariance: the offset axis and fp32."""
    from PIL import Image

    md = (report / "report.md").read_text()
    rob = md.split("### Adversarial robustness")[1].split("###")[0]
    assert "each budget alone" in rob and "accumulated" in rob and "budget <= eps" in rob
    erf = md.split("### Effective receptive field")[1].split("###")[0]
    assert "RepLKNet" in erf and "|gradient|" in erf
    inv = md.split("### Invariance: translation")[1].split("###")[0]
    assert "crop-window offset" in inv and "fp32" in inv and "AMP" in inv
    text = Image.open(report / "robustness_compare.png").text["Description"]
    assert "each budget alone" in text and "accumulated" in text
    assert "crop-window offset" in Image.open(report / "invariance_translation_compare.png").text["Description"]


def _copy_analyses(outputs, dest, edit):
    """The erf and robustness results of `outputs`, copied, with edit(model, name, result) applied."""
    import shutil

    for model in (MODEL, SECOND):
        (dest / model).mkdir(parents=True)
        shutil.copy(os.path.join(outputs["root"], model, "erf_map.npy"), dest / model)
        for name in ("erf", "robustness"):
            path = dest / model / f"{name}.json"
            shutil.copy(os.path.join(outputs["root"], model, f"{name}.json"), path)
            r = read_json(path)
            edit(model, name, r)
            path.write_text(json.dumps(r))


def test_results_that_are_not_comparable_are_reported_apart(outputs, tmp_path, capsys):
    """Different image sizes (ERF) or PGD steps (robustness) are never in one table or figure:
    separate groups, each naming its settings, and a note naming the setting and the files.
    A different --eps list alone is comparable: the headline is per eps."""
    def edit(model, name, r):
        if model == SECOND and name == "erf":
            r["provenance"]["img_size"] = r["img_size"] = 64
        if model == SECOND and name == "robustness":
            r["provenance"]["attack"]["pgd_steps"] = 5
        if model == MODEL and name == "robustness":
            r["provenance"]["attack"]["eps"] = [0, 4 / 255]
            for a in r["attacks"]:  # as written before the per-eps headline: acc1 was the accumulated one
                a["acc1_single"], a["acc1"] = a.pop("acc1"), a.pop("acc1_accumulated")

    _copy_analyses(outputs, tmp_path / "analyses", edit)
    (tmp_path / "runs").mkdir()
    assert main([str(tmp_path / "runs"), "--analyses", str(tmp_path / "analyses"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    note = next(line for line in err.splitlines() if "erf" in line and "not comparable" in line)
    assert "img_size" in note and f"{SECOND}/erf.json" in note and f"{MODEL}/erf.json" in note
    assert any("robustness" in line and "pgd_steps" in line for line in err.splitlines())
    data = read_json(tmp_path / "out" / "report.json")["analyses"]
    assert sorted(g["settings"]["img_size"] for g in data["erf"]) == [32, 64]
    assert [[r["model"] for r in g["results"]] for g in data["erf"]] in ([[MODEL], [SECOND]], [[SECOND], [MODEL]])
    assert sorted(g["settings"]["pgd_steps"] for g in data["robustness"]) == [2, 5]
    ours = read_json(os.path.join(outputs["one"], "robustness.json"))["attacks"]
    read = next(r for g in data["robustness"] for r in g["results"] if r["model"] == MODEL)["attacks"]
    assert read == ours  # the old file's numbers under today's names
    assert all(os.path.isfile(tmp_path / "out" / f) for f in ("erf_compare.png", "erf_compare_2.png"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("### Effective receptive field") == 2 and "img_size 64" in md and "img_size 32" in md
