"""The trainer's input (DataFeed over the epoch plan) at different world sizes and micro-batches:
the same samples, with the same augmented pixels, in the same global batches, also after a
state_dict/load_state_dict across a change of layout mid-epoch and at an epoch's end. One
DataFeed per rank in this process (no launcher), real DALI CPU pipelines on the real digits."""
import json
import warnings

import pytest
import torch

from stm_dist.engine.config import ConfigError, ExperimentConfig
from stm_dist.engine.data_feed import DataFeed

warnings.filterwarnings("ignore", category=DeprecationWarning)

GLOBAL = 96  # 1,497 digits -> 15 steps per epoch


def _cfg(shards, micro, out_dir, **data):
    cfg = ExperimentConfig()
    cfg.data.train_shards, cfg.data.num_threads, cfg.data.randaug = shards, 1, False
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed = GLOBAL, micro, 11
    cfg.model.img_size = 32
    cfg.run.out_dir = str(out_dir)
    return cfg


def _feeds(shards, world, micro, out_dir, **data):
    accum = GLOBAL // (world * micro)
    return [DataFeed(_cfg(shards, micro, out_dir, **data), r, accum, "cpu") for r in range(world)]


def _run(feeds, steps):
    """Per step: (keys, images, labels) of the whole global batch, ranks and micro-batches in order."""
    out = []
    for _ in range(steps):
        keys, images, labels = [], [], []
        for f in feeds:
            batches = f.next_step()
            keys += sum(f.loader.keys(*f.loader.last_step), [])
            images += [x for x, _ in batches]
            labels += [y for _, y in batches]
        out.append((keys, torch.cat(images), torch.cat(labels)))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for s, ((ka, xa, ya), (kb, xb, yb)) in enumerate(zip(a, b)):
        assert ka == kb, f"step {s}: different samples"
        assert torch.equal(ya, yb) and torch.equal(xa, xb), f"step {s}: same samples, different pixels or labels"


def test_same_global_batches_at_any_layout_and_after_resume(digits_shards, tmp_path):
    ref = _run(_feeds(digits_shards, 2, 48, tmp_path), 20)  # 15 steps of epoch 0, 5 of epoch 1
    flat = [k for keys, _, _ in ref[:15] for k in keys]
    assert len(flat) == len(set(flat)) == 15 * GLOBAL  # no sample twice in an epoch
    assert [k for keys, _, _ in ref[15:] for k in keys] != flat[: 5 * GLOBAL]  # a new order in epoch 1
    # The labels served are the planned samples' labels, read from the tars independently.
    from stm_dist.data.plan_source import TarReader

    plan = _feeds(digits_shards, 1, 96, tmp_path)[0].loader
    t = plan.table
    reader = TarReader(t.tars, dont_use_mmap=True)
    for s in (0, 14, 19):
        idx = plan.micro_indices(s // 15, s % 15, 0)
        assert t.keys(idx) == ref[s][0]
        assert [reader.label(int(t.file[i]), int(t.cls_off[i]), int(t.cls_size[i])) for i in idx] == ref[s][2].tolist()

    _same(_run(_feeds(digits_shards, 3, 32, tmp_path), 20), ref)

    # Saved on 2 x 48 after 7 steps, resumed on 3 x 32 ...
    two = _feeds(digits_shards, 2, 48, tmp_path)
    _same(_run(two, 7), ref[:7])
    saved = json.loads(json.dumps([f.state_dict() for f in two]))  # survives a checkpoint's JSON/pickle
    assert saved[0] == saved[1] and saved[0]["samples"] == 7 * GLOBAL
    three = _feeds(digits_shards, 3, 32, tmp_path)
    for f in three:
        f.load_state_dict(saved, 0, "ckpt/step7")
        f.set_epoch(0)  # the trainer's call at an epoch's first step must keep the position
    _same(_run(three, 8), ref[7:15])
    # ... saved there at the end of epoch 0 (the trainer has moved to epoch 1) and resumed on
    # one process with 3 accumulation micro-steps of 32, which records its keys.
    saved = [f.state_dict() for f in three]
    one = _feeds(digits_shards, 1, 32, tmp_path, record_keys=True)
    one[0].load_state_dict(saved, 1, "ckpt/step15")
    one[0].set_epoch(1)
    _same(_run(one, 5), ref[15:])
    one[0].close()
    lines = [json.loads(x) for x in (tmp_path / "sample_keys_rank0.jsonl").read_text().splitlines()]
    assert [(x["step"], x["rank"], x["micro"]) for x in lines] == [(s, 0, j) for s in range(16, 21) for j in range(3)]
    assert [k for x in lines for k in x["keys"]] == [k for keys, _, _ in ref[15:] for k in keys]


def test_foreign_or_old_states_refused_by_name(digits_shards, tmp_path):
    f = _feeds(digits_shards, 1, 96, tmp_path)[0]
    good = f.state_dict()
    with pytest.raises(ConfigError, match=r"ckpt/x: .*train\.seed = 5, this run has 11"):
        f.load_state_dict([dict(good, seed=5)], 0, "ckpt/x")
    with pytest.raises(ConfigError, match=r"shard set"):
        f.load_state_dict([dict(good, shards="0123")], 0, "ckpt/x")
    with pytest.raises(ConfigError, match=r"train\.global_batch"):
        f.load_state_dict([dict(good, global_batch=48)], 0, "ckpt/x")
    with pytest.raises(ConfigError, match=r"earlier version.*--fresh"):
        f.load_state_dict([{0: {"epoch": 0, "step": 3}}], 0, "ckpt/x")
    with pytest.raises(ConfigError, match="ranks 0 and 1 saved different"):
        f.load_state_dict([good, dict(good, samples=96)], 0, "ckpt/x")
