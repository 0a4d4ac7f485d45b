"""Fine-tuning through the real CLI: a 10-class digits model trained and exported with stm-train /
stm-export starts a 5-class run (new head, layer-wise lr decay 0.75) that beats the same run from
scratch after one epoch; each optimizer group's lr is the layer-decay formula; best.pth /
best_ema.pth hold the best top-1 (the files, loaded and evaluated, give the logged numbers)."""
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from engine_launch import REPO, env, records

from stm_dist.engine.config import ConfigError, from_dict

CLASSES = ["0", "1", "2", "3", "4"]
TRAIN_PER_CLASS = 40  # 200 images: one epoch of 10 steps, far from converged from scratch
MODEL = ["model.name=unified_convnext_micro", "model.img_size=32", "data.num_threads=1", "data.randaug=false",
         "data.eval_batch=150", "train.log_every=5", "checkpoint.every_steps=0", "checkpoint.every_epochs=0",
         "schedule.warmup_epochs=0", "optim.lr=3e-3"]


def _cmd(module, *args):
    return [sys.executable, "-m", module, *map(str, args)]


def _start(module, *args, log):
    return subprocess.Popen(_cmd(module, *args), env=env(single_process=True), cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait(p, log, timeout=600):
    code = p.wait(timeout=timeout)
    with open(log) as f:
        text = f.read()
    assert code == 0, f"{' '.join(p.args)} failed (exit {code}):\n{text[-4000:]}"
    return text


def _train(run, shards, extra, log):
    return _start("stm_dist.cli.train", "--config", os.path.join(REPO, "configs", "demo_digits.yaml"),
                  f"run.out_dir={run}", f"data.train_shards={shards}", f"data.val_shards={shards}", *MODEL, *extra,
                  log=log)


def _five_class_shards(src, root):
    """The digits 0-4 as a class-folder source (40 train images a class, every val image) and
    stm-shards create over it."""
    from data_tools.cli import main as shards_main

    for split in ("train", "val"):
        for c in CLASSES:
            files = sorted(os.listdir(os.path.join(src, split, c)))
            if split == "train":
                files = files[:TRAIN_PER_CLASS]
            os.makedirs(os.path.join(root, "src", split, c))
            for name in files:
                shutil.copy(os.path.join(src, split, c, name), os.path.join(root, "src", split, c, name))
        assert shards_main(["create", "--src", str(root / "src"), "--split", split, "--out", str(root / "shards"),
                            "--samples-per-shard", "100", "--workers", "1", "--no-progress"]) == 0
    return str(root / "shards")


def _evals(run):
    return [r for r in records(run) if r["kind"] == "eval"]


@pytest.mark.slow
def test_finetune_new_head_layer_decay_beats_scratch_and_keeps_best(digits_shards, tmp_path):
    # 1. A 10-class digits model (one epoch, no EMA) and its export.
    pre = tmp_path / "pre"
    p = _train(pre, digits_shards, ["model.num_classes=10", "schedule.epochs=1", "train.ema=false",
                                    "train.global_batch=32", "train.micro_batch=32"], log=tmp_path / "pre.log")
    # The 5-class shards while it trains (the source is the digits fixture's, beside its shards).
    five = _five_class_shards(os.path.join(os.path.dirname(digits_shards), "source"), tmp_path / "five")
    _wait(p, tmp_path / "pre.log")
    exported = tmp_path / "digits10.pth"
    _wait(_start("stm_dist.cli.export", pre, "-o", exported, log=tmp_path / "export.log"), tmp_path / "export.log")

    # 2. Fine-tune beside the same recipe from scratch, one epoch each (10 steps of 20 images).
    common = ["model.num_classes=5", "optim.layer_decay=0.75", "schedule.epochs=1", "train.global_batch=20",
              "train.micro_batch=20", "train.ema_decay=0.5"]
    ft, scratch = tmp_path / "ft", tmp_path / "scratch"
    p_ft = _train(ft, five, common + [f"model.pretrained={exported}"], log=tmp_path / "ft.log")
    p_sc = _train(scratch, five, common, log=tmp_path / "scratch.log")
    ft_text, _ = _wait(p_ft, tmp_path / "ft.log"), _wait(p_sc, tmp_path / "scratch.log")

    assert "new classifier: head.weight, head.bias" in ft_text and "(10 -> 5 classes)" in ft_text, ft_text[-3000:]
    (ft_eval,), (sc_eval,) = _evals(ft), _evals(scratch)
    assert ft_eval["step"] == sc_eval["step"] == 10
    print(f"\nafter one epoch: fine-tuned top-1 {ft_eval['top1']:.2f} (EMA {ft_eval['top1_ema']:.2f}), "
          f"from scratch {sc_eval['top1']:.2f} (EMA {sc_eval['top1_ema']:.2f})")
    assert ft_eval["top1"] > sc_eval["top1"] + 10

    # 3. Each group's lr, read back from the optimizer at the evaluation, is the formula:
    #    stem = layer 0, one layer per block (3+3+8+3), conv head + classifier = layer 18.
    train_lr = {r["step"]: r["lr"] for r in records(ft) if r["kind"] == "train"}
    (rec,) = [r for r in records(ft) if r["kind"] == "lr_groups"]
    assert rec["step"] == 10 and sorted({g["layer_id"] for g in rec["groups"]}) == list(range(19))
    for g in rec["groups"]:
        assert math.isclose(g["lr"], train_lr[10] * 0.75 ** (18 - g["layer_id"]), rel_tol=1e-12), g
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05), g

    # 4. best.pth / best_ema.pth in the run dir (outside checkpoints/), described by their JSON,
    #    give the logged top-1 when loaded and evaluated again.
    from stm_dist.data import build_val_loader
    from stm_dist.engine.evaluate import evaluate
    from stm_dist.models import create_model, load_pretrained

    for run, suffix, num_classes, shards in ((ft, "", 5, five), (ft, "_ema", 5, five), (pre, "", 10, digits_shards)):
        name = "best_ema" if suffix else "best"
        info = json.loads((run / f"{name}.pth.json").read_text())
        (logged,) = _evals(run)
        assert info[f"top1{suffix}"] == logged[f"top1{suffix}"] and info["step"] == logged["step"], (info, logged)
        assert info["epoch"] == logged["epoch"] == 0 and info["ema"] == bool(suffix)
        model = create_model("unified_convnext_micro", num_classes=num_classes, img_size=32)
        load_pretrained(model, str(run / f"{name}.pth"), use_ema=bool(suffix))
        loader = build_val_loader(shards, 150, img_size=32, num_threads=1)
        assert evaluate(model, loader, torch.device("cpu"))["top1"] == pytest.approx(info[f"top1{suffix}"], abs=1e-9)
    assert not (pre / "best_ema.pth").exists()  # that run kept no EMA
    assert not [f for f in os.listdir(ft / "checkpoints") if f.startswith("best")]


def test_finetune_keys_are_validated_naming_the_key():
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"'optim.layer_decay' must be in \(0, 1\]"):
            from_dict({"optim": {"layer_decay": bad}})
    assert from_dict({"optim": {"layer_decay": 1}}).optim.layer_decay == 1.0
    assert from_dict({"model": {"pretrained": "w.pth", "pretrained_ema": True}}).model.pretrained_ema is True
    with pytest.raises(ConfigError, match="'model.pretrained_ema' is true but model.pretrained names no file"):
        from_dict({"model": {"pretrained_ema": True}})


def test_best_checkpoints_keep_only_improvements_and_this_runs_history(tmp_path):
    from stm_dist.engine.run_eval import BestCheckpoints
    from stm_dist.models import create_model, load_pretrained

    logged = []
    model = create_model("unified_convnext_micro", num_classes=5)
    keeper = BestCheckpoints(str(tmp_path), 0, "unified_convnext_micro", SimpleNamespace(best={}), start_step=0, log=logged.append)
    keeper.offer("", model, {"top1": 50.0, "step": 10, "epoch": 1})
    first = torch.load(tmp_path / "best.pth", weights_only=True)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    keeper.offer("", model, {"top1": 40.0, "step": 20, "epoch": 2})  # worse: the file stays
    assert torch.equal(torch.load(tmp_path / "best.pth", weights_only=True)["head.bias"], first["head.bias"])
    keeper.offer("", model, {"top1": 60.0, "step": 30, "epoch": 3})
    assert json.loads((tmp_path / "best.pth.json").read_text())["step"] == 30 and len(logged) == 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    dst = create_model("unified_convnext_micro", num_classes=5)
    load_pretrained(dst, str(tmp_path / "best.pth"))
    assert torch.equal(dst.head.bias, model.head.bias)
    # A start that resumed at step 30 knows 60 from the file (its checkpoint predates the eval);
    # one that resumed at step 20 discards the step-30 best as another history's.
    assert BestCheckpoints(str(tmp_path), 0, "m", SimpleNamespace(best={}), 30).state.best == {"top1": 60.0}
    assert BestCheckpoints(str(tmp_path), 0, "m", SimpleNamespace(best={}), 20).state.best == {}


@pytest.mark.slow
def test_resumed_run_knows_the_best_so_far(digits_shards, tmp_path):
    # The final checkpoint is written before the final evaluation: the restart learns that
    # evaluation's top-1 from best.pth.json (its step is the one it resumes from).
    run = tmp_path / "run"
    extra = ["model.num_classes=10", "schedule.epochs=1", "train.ema=false", "train.global_batch=16",
             "train.micro_batch=16", "data.eval_batch=300"]
    for stop in (3, 6):
        log = tmp_path / f"to{stop}.log"
        text = _wait(_train(run, digits_shards, extra + [f"schedule.max_steps={stop}"], log=log), log)
    first, second = _evals(run)
    assert (first["step"], second["step"]) == (3, 6)
    assert "resumed from" in text
    info = json.loads((run / "best.pth.json").read_text())
    best = max((first, second), key=lambda e: (e["top1"], -e["step"]))
    assert (info["top1"], info["step"]) == (best["top1"], best["step"])
    if second["top1"] > first["top1"]:
        assert f"(was {first['top1']:.3f}) at step 6" in text, text[-2000:]
    else:
        assert "new best" not in text, text[-2000:]
