"""stm-report on detection runs (model.task detection): the paper's COCO table beside runs of the
1x recipe on COCO val2017 only, every detection run in its own table, the AP curves; classification
runs keep their own part. Run directories are written as stm-train writes them (config.yaml,
metrics.jsonl, the val manifest), no training."""
import json

import pytest

from stm_dist.cli.report import main


def _manifest(path, classes, images, root):
    path.mkdir(parents=True)
    (path / "val.json").write_text(json.dumps({"format": "stm-shards/1", "task": "detection", "num_samples": images,
                                               "num_classes": classes, "shards": [], "source": {"root": root}}))
    return path


def _run(root, name, model, shards, aps, epochs=12, short_sides=(800,), task="detection"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({
        "model": {"name": model, "task": task, "num_classes": 80},
        "data": {"val_shards": str(shards)}, "schedule": {"epochs": epochs},
        "detection": {"short_sides": list(short_sides)}}))
    recs = [{"kind": "train", "step": 10 * (i + 1), "loss": 1.0 / (i + 1), "img_s": 20.0} for i in range(len(aps))]
    recs += [{"kind": "eval", "step": 10 * (i + 1), "epoch": i, "bbox_AP": b, "segm_AP": m} for i, (b, m) in enumerate(aps)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_runs")
    coco = _manifest(root / "coco_shards", 80, 5000, "/data/coco")
    demo = _manifest(root / "demo_shards", 10, 100, "/runs/demo_detection/coco")
    _run(root, "swin_t_1x", "unified_swin_tiny", coco, [(30.0, 28.0), (45.0, 41.0), (44.0, 41.5)])
    _run(root, "swin_t_3x", "unified_swin_tiny", coco, [(47.9, 43.1)], epochs=36, short_sides=range(480, 801, 32))
    _run(root, "demo", "unified_convnext_micro", demo, [(55.0, 50.0)])
    # a classification run beside them keeps the classification part (its test is tests/analysis)
    cls = root / "cls"
    cls.mkdir()
    (cls / "config.yaml").write_text(json.dumps({"model": {"name": "unified_convnext_micro", "num_classes": 10}}))
    (cls / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "top1": 91.25, "top5": 99.0}) + "\n")
    out = root / "report"
    assert main([str(root), "-o", str(out), "--no-complexity"]) == 0
    return out


def test_paper_coco_numbers_only_beside_1x_coco_runs(report):
    runs = {r["name"]: r for r in json.loads((report / "report.json").read_text())["runs"]}
    one, three, demo = runs["swin_t_1x"], runs["swin_t_3x"], runs["demo"]
    assert (one["task"], one["schedule"], one["coco"], one["dataset"]) == ("detection", "1x", True, "COCO val2017")
    assert (one["paper_box_AP"], one["paper_mask_AP"]) == (44.3, 40.5)
    assert (one["bbox_AP"], one["best_bbox_AP"], one["best_segm_AP"]) == (44.0, 45.0, 41.5)
    assert [p["bbox_AP"] for p in one["ap_curve"]] == [30.0, 45.0, 44.0]
    assert three["schedule"] == "3x ms" and three["coco"] and three["paper_box_AP"] is None
    assert demo["coco"] is False and demo["paper_box_AP"] is None
    assert demo["dataset"].startswith("10 categories, 100 val images")
    assert runs["cls"]["task"] == "classification" and runs["cls"]["top1"] == 91.25

    md = (report / "report.md").read_text()
    grid = md.split("(Mask R-CNN 1x, the paper's layout)")[1].split("## Detection runs")[0]
    tiny = next(line for line in grid.splitlines() if line.startswith("| Tiny"))
    # U-Swin's cell: our best 1x box/mask beside the paper's; the 3x and demo runs stay out
    assert "| 45.0/41.5 / 44.3/40.5 |" in tiny and "47.9" not in grid and "55.0" not in grid
    micro = next(line for line in grid.splitlines() if line.startswith("| Micro"))
    assert "– / 39.2/36.4" in micro  # no run of ours: the paper's number alone
    assert "not compared with the paper" in grid and "COCO val2017 (3x ms)" in grid and "10 categories" in grid
    table = md.split("## Detection runs")[1]
    assert all(f"| {name} |" in table for name in ("swin_t_1x", "swin_t_3x", "demo"))
    assert "| 44.3 / 40.5 |" in table
    # the classification part holds the classification run only
    all_runs = md.split("## All runs")[1].split("## Plots")[0]
    assert "| cls |" in all_runs and "swin_t_1x" not in all_runs
    assert "![coco_ap_curves](coco_ap_curves.png)" in md


def test_ap_curves_are_drawn(report):
    import numpy as np
    from PIL import Image

    img = Image.open(report / "coco_ap_curves.png")
    assert img.size == (1000, 400)
    # not a blank canvas: the curves put colour on it
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50


def test_detection_only_report_has_no_classification_part(report, tmp_path):
    from stm_dist.report import collect_runs, write_report

    runs = [r for r in collect_runs(str(report.parent), count_complexity=False) if r.task == "detection"]
    paths = write_report(runs, str(tmp_path))
    md = open(paths["markdown"]).read()
    assert "## Top-1 by size and mixer" not in md and "## Detection runs" in md
    assert [p.split("/")[-1] for p in paths["plots"]] == ["coco_ap_curves.png"]
