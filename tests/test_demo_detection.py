"""`make demo-detection`'s driver (stm_dist.cli.demo_detection) end to end at toy size: demo-coco
-> shards -> 2 DeepSpeed processes fine-tuning Mask R-CNN from a classification checkpoint ->
runs/.../eval.json. Asserts the backbone really loaded the classification weights (the log line)
and eval.json's contract (issue 21 item 5): box/mask AP in COCO % and the paths of the COCO results
files and of the ground truth they were scored against. The AP itself (2 steps) means nothing here;
the demo's own floors are what `make demo-detection` checks.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_detection_writes_eval_json(tmp_path):
    from stm_dist.models import create_model

    # A classification checkpoint of the demo's model (the weights do not matter, the keys do).
    cls = tmp_path / "cls.pth"
    torch.save(create_model("unified_convnext_micro", num_classes=10).state_dict(), cls)
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # Square 128-px images: one aspect group, so 8 images make 2 steps of 4.
    cmd = [sys.executable, "-m", "stm_dist.cli.demo_detection", "--out", str(out), "--pretrained", str(cls),
           "--train-images", "8", "--val-images", "3", "--min-digits", "1", "--max-digits", "2",
           "--min-size", "32", "--max-size", "48", "--min-canvas", "128", "--max-canvas", "128",
           "--min-bbox-ap", "0", "--min-segm-ap", "0",
           "detection.short_sides=[128]", "detection.max_size=128", "schedule.epochs=1", "schedule.milestones=[]",
           "schedule.warmup_steps=1", "data.eval_batch=2"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "detection demo result" in p.stdout

    with open(out / "train" / "train.log") as f:
        log = f.read()
    assert f"backbone weights from {cls}:" in log and "tensors loaded" in log, log[-2000:]

    with open(out / "eval.json") as f:
        r = json.load(f)
    for key in ("bbox_AP", "segm_AP"):
        assert isinstance(r[key], float) and 0.0 <= r[key] <= 100.0, r
    assert r["annotations"] == str(out / "shards" / "val_annotations.json")
    with open(r["annotations"]) as f:
        gt_ids = {im["id"] for im in json.load(f)["images"]}
    assert len(gt_ids) == 3
    for kind, field in (("bbox", "bbox"), ("segm", "segmentation")):
        with open(r["results"][kind]) as f:
            res = json.load(f)
        assert res, f"no {kind} results"  # an untrained detector still scores >= 0.05 somewhere
        assert {d["image_id"] for d in res} <= gt_ids and all(field in d for d in res)
