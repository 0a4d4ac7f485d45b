"""stm-report with analyses: the mixers side by side, and the paper's ImageNet-1k numbers only
next to runs evaluated on ImageNet-1k."""
import json
import os

import numpy as np
import pytest
from conftest import MODEL, SECOND, launch, read_json


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
    proc = launch(["-m", "stm_dist.cli.report", str(root), "--analyses", outputs["root"], "-o", str(out),
                   "--no-complexity"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
    # the paper's mixer order: Swin before ConvNeXt
    assert [r["model"] for r in data["erf"]] == [SECOND, MODEL]
    assert [r["model"] for r in data["robustness"]] == [SECOND, MODEL]
    assert [r["model"] for r in data["invariance"]["translation"]] == [SECOND, MODEL]
    ours = read_json(os.path.join(outputs["one"], "erf.json"))
    assert data["erf"][1]["area_ratio"] == ours["area_ratio"]
    md = (report / "report.md").read_text()
    assert "## Analyses of the mixers" in md and "| U-Swin micro |" in md and "| U-ConvNeXt micro |" in md
    for name in ("invariance_translation_compare.png", "erf_compare.png", "robustness_compare.png"):
        pixels = np.asarray(Image.open(report / name).convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10, f"{name} looks blank"
        assert f"]({name})" in md
