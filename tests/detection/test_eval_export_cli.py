"""stm-eval and stm-export on detection (issue 21 Must show: 2-rank evaluation equals 1-rank
evaluation): one tiny Mask R-CNN run of a shipped recipe (mask_rcnn_unified_convnext_micro_1x cut
to a slim head, 128-px demo-coco images, one epoch of 8 images, ZeRO 2 bf16, 2 DeepSpeed processes) is exported
in both layouts and evaluated by the real launchers:
* the run directory under torchrun with 2 ranks == our export with 1 process: the same COCO results,
  image for image, and the same AP (every val image counted once: the split has an odd count);
* the mmdet-layout export (found by its keys, as the paper's release files are) gives the same
  boxes; the round trip loads strictly and only our never-read background rows differ.
Launches run side by side; the whole module is one training launch plus one round of evaluations.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from side_by_side import finish, start

pytestmark = pytest.mark.slow  # a training launch and three evaluation launches (~1 min on 2 cores)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
VAL_IMAGES = 5  # odd: 2 ranks hold 3 and 2
MODEL = "unified_convnext_micro"


def _env(single: bool = False) -> dict:
    e = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), DS_ACCELERATOR="cpu",
             OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if single:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
    return e


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """(shards, run dir) of a one-epoch ZeRO 2 detection run of the shipped micro recipe."""
    from data_tools.demo_coco import write_demo_coco
    from data_tools.writer import create_shards

    root = tmp_path_factory.mktemp("det_eval")
    write_demo_coco(str(root / "coco"), train_images=8, val_images=VAL_IMAGES, seed=0, min_digits=1, max_digits=3,
                    digit_sizes=(24, 48), canvas_sizes=(96, 128))
    shards = str(root / "shards")
    for split in ("train", "val"):
        create_shards(str(root / "coco"), split, shards, samples_per_shard=100, progress=False)
    run = str(root / "run")
    cmd = [os.path.join(BIN, "deepspeed"), "--num_accelerators", "2", "--master_port", str(_port()),
           "--module", "stm_dist.cli.train", "--config", "mask_rcnn_unified_convnext_micro_1x",
           f"run.out_dir={run}", f"data.train_shards={shards}", f"data.val_shards={shards}", "model.num_classes=10",
           "data.train_split=train", "data.val_split=val",  # the recipe's are COCO's train2017 / val2017
           "detection.head=slim", "detection.short_sides=[128]", "detection.max_size=160", "data.num_threads=1",
           "train.global_batch=4", "train.micro_batch=2", "train.eval_every_epochs=0", "train.log_every=1",
           "schedule.epochs=1", "schedule.warmup_steps=1", "schedule.milestones=[]", "optim.lr=2e-4",
           "checkpoint.every_steps=0", "deepspeed.config=ds_configs/zero2_bf16.json"]
    p = subprocess.run(cmd, env=_env(), cwd=str(root), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return shards, run


@pytest.fixture(scope="module")
def exports(det_run, tmp_path_factory):
    """stm-export of the run in our layout and in mmdet's (in-process: the CLI's main)."""
    from stm_dist.cli.export import main

    _, run = det_run
    out = tmp_path_factory.mktemp("det_exports")
    ours, mmdet = str(out / "ours.pth"), str(out / "released_layout.pth")
    assert main([run, "-o", ours]) == 0
    assert main([run, "-o", mmdet, "--mmdet"]) == 0
    # as a release file comes: mmdet's tensors, no description of ours (no sidecar, no meta entry)
    os.remove(mmdet + ".json")
    obj = torch.load(mmdet, map_location="cpu", weights_only=True)
    assert obj["meta"]["stm_dist"]["detector"]["layout"] == "mmdet"
    torch.save({"meta": {"epoch": 12}, "state_dict": obj["state_dict"]}, mmdet)
    return ours, mmdet


def test_export_round_trips(det_run, exports):
    from stm_dist.detection.detector import build_detector
    from stm_dist.detection.mmdet_keys import load_mmdet_detector
    from stm_dist.engine.export import consolidate, locate

    _, run = det_run
    ours, mmdet = exports
    ckpt_dir, tag, marker = locate(run, warn=lambda m: None)
    trained = consolidate(ckpt_dir, tag, marker)
    obj = torch.load(ours, map_location="cpu", weights_only=True)
    assert obj["model"] == MODEL and obj["step"] == marker["step"] >= 1 and obj["detector"]["task"] == "detection"
    assert (obj["detector"]["head"], obj["detector"]["num_classes"], obj["detector"]["short_sides"]) == ("slim", 10, [128.0])
    sd = obj["state_dict"]
    assert set(sd) == set(trained) and all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert all(torch.equal(sd[k], trained[k].float()) for k in sd)  # the fp32 master weights, bit for bit
    with open(ours + ".json") as f:
        assert json.load(f)["detector"]["layout"] == "ours"

    model = build_detector(MODEL, 10, head="slim")
    model.load_state_dict(sd, strict=True)
    released = torch.load(mmdet, map_location="cpu", weights_only=True)
    assert any(k.startswith("roi_head.bbox_head.fc_cls.") for k in released["state_dict"])
    assert not any(k.startswith("roi_heads.") for k in released["state_dict"])
    load_mmdet_detector(model, mmdet, log=lambda *a: None)  # strict: every tensor placed, shapes equal
    back = model.state_dict()
    never_read = {"roi_heads.box_predictor.bbox_pred.weight": 4, "roi_heads.box_predictor.bbox_pred.bias": 4,
                  "roi_heads.mask_predictor.mask_fcn_logits.weight": 1, "roi_heads.mask_predictor.mask_fcn_logits.bias": 1}
    for k, v in sd.items():
        if k in never_read:  # our background rows: mmdet has none, they come back as zeros
            n = never_read[k]
            assert torch.equal(back[k][n:], v[n:]) and not back[k][:n].any(), k
        else:
            assert torch.equal(back[k], v), k


def test_two_rank_evaluation_equals_one_rank(det_run, exports, tmp_path):
    shards, run = det_run
    ours, mmdet = exports
    eval_args = ["--model", MODEL, "--data", shards, "--batch", "1", "--num-threads", "1"]
    out = {k: str(tmp_path / k) for k in ("two", "one", "mmdet")}
    procs = {
        # the run directory (ZeRO 2 consolidated by each rank), 2 ranks
        "two": start([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()),
                      "-m", "stm_dist.cli.eval", "--checkpoint", run, "--out", out["two"], *eval_args], env=_env()),
        "one": start([sys.executable, "-m", "stm_dist.cli.eval", "--checkpoint", ours, "--out", out["one"],
                      *eval_args], env=_env(single=True)),
        # a release file does not know the run's test scale (the paper's is 1333x800): given here
        "mmdet": start([sys.executable, "-m", "stm_dist.cli.eval", "--checkpoint", mmdet, "--out", out["mmdet"],
                        "--short-side", "128", "--max-size", "160", *eval_args], env=_env(single=True)),
    }
    done = {k: finish(p, timeout=600) for k, p in procs.items()}
    for k, p in done.items():
        assert p.returncode == 0, (k, p.stdout[-2000:], p.stderr[-3000:])
    r = {}
    for k in out:
        with open(os.path.join(out[k], "eval.json")) as f:
            r[k] = json.load(f)
    assert r["two"]["world_size"] == 2 and r["one"]["world_size"] == 1
    gt = os.path.join(shards, "val_annotations.json")
    for k, rec in r.items():
        assert rec["annotations"] == gt and rec["images"] == VAL_IMAGES
        assert set(rec["results"]) == {"bbox", "segm"} and all(os.path.isfile(p) for p in rec["results"].values())
        assert f"box AP {rec['bbox_AP']:.2f}" in done[k].stdout
    res = {k: {kind: json.load(open(p)) for kind, p in rec["results"].items()} for k, rec in r.items()}
    with open(gt) as f:
        image_ids = {im["id"] for im in json.load(f)["images"]}
    assert {d["image_id"] for d in res["one"]["bbox"]} == image_ids  # detections for every image
    # 2 ranks == 1 rank: the same detections, masks and AP
    assert res["two"] == res["one"]
    for key in ("bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50"):
        assert r["two"][key] == r["one"][key], key
    # the mmdet layout is recognised and evaluated with mmdet's numerics; boxes do not depend on them
    assert r["mmdet"]["mmdet_compat"] is True and r["one"]["mmdet_compat"] is False
    assert "mmdet layout" in done["mmdet"].stdout
    assert res["mmdet"]["bbox"] == res["one"]["bbox"]
    assert len(res["mmdet"]["segm"]) == len(res["one"]["segm"])


def test_classification_weights_are_not_taken_for_a_detector(tmp_path):
    """A classification export evaluated as a detector names what it is instead of a key dump."""
    from stm_dist.engine.detection_weights import load_detector_source
    from stm_dist.models import create_model

    path = str(tmp_path / "cls.pth")
    torch.save({"state_dict": create_model(MODEL, num_classes=10).state_dict(), "model": MODEL}, path)
    with pytest.raises(ValueError, match="not a Mask R-CNN detector"):
        load_detector_source(path)
