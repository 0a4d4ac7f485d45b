"""stm-eval evaluates a weights file at the input size and crop it records (an export of a 32-px
run used to be evaluated at 224 px, silently), says what it used, and the user's flags win."""
import json
import sys

import torch

from engine_launch import REPO, env
from side_by_side import finish, start

MODEL = "unified_convnext_micro"


def _eval(shards, ckpt, out, *extra):
    return start([sys.executable, "-m", "stm_dist.cli.eval", "--model", MODEL, "--checkpoint", ckpt, "--data", shards,
                  "--backend", "pil", "--batch", "100", "--num-threads", "1", "--json", out, *extra],
                 env=env(single_process=True), cwd=REPO)


def test_stm_eval_uses_and_prints_the_files_input_config(digits_shards, tmp_path):
    from stm_dist.engine.export import pretrained_cfg, write
    from stm_dist.models import create_model

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in create_model(MODEL, num_classes=10, img_size=32).state_dict().items()}
    run_cfg = {"model": {"img_size": 32, "num_classes": 10}, "data": {"crop_pct": 0.9}}
    ckpt = str(tmp_path / "demo.safetensors")
    write(sd, ckpt, {"model": MODEL, "pretrained_cfg": pretrained_cfg(MODEL, sd, run_cfg), "source": "test",
                     "step": 1, "ema": False}, "safetensors")
    outs = {k: str(tmp_path / f"{k}.json") for k in ("file", "flags")}
    procs = {"file": _eval(digits_shards, ckpt, outs["file"]),
             "flags": _eval(digits_shards, ckpt, outs["flags"], "--img-size", "32", "--crop-pct", "0.9")}
    done = {k: finish(p) for k, p in procs.items()}
    for k, p in done.items():
        assert p.returncode == 0, (k, p.stdout[-2000:], p.stderr[-2000:])
    res = {k: json.load(open(outs[k])) for k in outs}
    assert (res["file"]["img_size"], res["file"]["crop_pct"]) == (32, 0.9)
    # The same images at the same size: the same loss (and a 224-px run would not give it).
    assert res["file"]["loss"] == res["flags"]["loss"] and res["file"]["samples"] == 300
    said = done["file"].stdout
    assert "img_size 32, crop_pct 0.9 (from demo.safetensors" in said, said
    assert "num_classes 10 (the shard manifest)" in said, said
    assert "img_size 32 (--img-size), crop_pct 0.9 (--crop-pct)" in done["flags"].stdout, done["flags"].stdout


def test_a_best_pth_takes_the_input_config_of_its_run(tmp_path):
    """best.pth records no input size; the run's config.yaml beside it does."""
    import os
    from types import SimpleNamespace

    from stm_dist.engine.config import dump, load
    from stm_dist.engine.export import recorded_input
    from stm_dist.engine.run_eval import BestCheckpoints
    from stm_dist.models import create_model

    cfg = load(os.path.join(REPO, "configs", "demo_digits.yaml"),
               [f"model.name={MODEL}", "model.img_size=48", "data.crop_pct=0.8", "model.num_classes=10"])
    dump(cfg, str(tmp_path / "config.yaml"))
    best = BestCheckpoints(str(tmp_path), 0, MODEL, SimpleNamespace(best={}), start_step=0, log=lambda m: None)
    best.offer("", create_model(MODEL, num_classes=10, img_size=48), {"top1": 50.0, "step": 1, "epoch": 0})
    r = recorded_input(str(tmp_path / "best.pth"))
    assert (r["img_size"], r["crop_pct"], r["num_classes"]) == (48, 0.8, 10), r
    assert r["source"] == "the run config beside best.pth"
