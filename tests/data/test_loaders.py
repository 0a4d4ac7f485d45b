"""The DALI CPU pipelines (and the PIL reader) on real shards: exact-once, epochs, seeds, resume,
one pipeline for the run, augmentation a function of the sample."""
import json
import warnings

import pytest
import torch

from stm_dist.data import build_train_loader, build_val_loader, read_manifest

warnings.filterwarnings("ignore", category=DeprecationWarning)  # DALI's auto_aug uses deprecated aliases


def _threads(backend):
    return 0 if backend == "pil" else 1  # PIL: read in the test process, no worker start-up


def _epoch_labels(loaders, epoch):
    """Labels each rank reads in ``epoch`` (label == sample identity in the unique set)."""
    out = []
    for L in loaders:
        L.set_epoch(epoch)
        labs = []
        for images, labels in L:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert images.shape == (L.batch_size, 3, 32, 32)
            labs += labels.tolist()
        out.append(labs)
    return out


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_train_exact_once_epochs_and_seeds(unique_shards, backend):
    n = read_manifest(unique_shards, "train")["num_samples"]
    assert n == 24
    for world, batch in ((1, 8), (2, 4)):
        loaders = [build_train_loader(unique_shards, batch, rank=r, world_size=world, seed=7, img_size=32,
                                      randaug=False, backend=backend, num_threads=_threads(backend)) for r in range(world)]
        assert [len(L) for L in loaders] == [24 // world // batch] * world
        e0, e1 = _epoch_labels(loaders, 0), _epoch_labels(loaders, 1)
        for ranks in (e0, e1):
            assert sorted(sum(ranks, [])) == list(range(24))  # every sample once per epoch, across ranks
        assert e0 != e1
    again = [build_train_loader(unique_shards, 4, rank=r, world_size=2, seed=7, img_size=32, randaug=False,
                                backend=backend, num_threads=_threads(backend)) for r in range(2)]
    assert _epoch_labels(again, 0) == e0 and _epoch_labels(again, 1) == e1
    other = [build_train_loader(unique_shards, 4, rank=r, world_size=2, seed=8, img_size=32, randaug=False,
                                backend=backend, num_threads=_threads(backend)) for r in range(2)]
    assert _epoch_labels(other, 0) != e0


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_one_stream_for_the_run_same_plan_both_backends(unique_shards, backend):
    # 2 ranks x 4 x accumulation 2 = global batch 16: one step per epoch of the 24 samples.
    loaders = [build_train_loader(unique_shards, 4, rank=r, world_size=2, accum=2, seed=9, img_size=32,
                                  randaug=False, backend=backend, num_threads=_threads(backend)) for r in range(2)]
    streams = []
    for L in loaders:
        got = []
        for epoch in range(3):
            L.set_epoch(epoch)
            steps = [L.next_step()]
            assert L.last_step == (epoch, 0) and len(steps[0]) == 2
            if epoch == 0:
                stream = L._it
            got += [y.tolist() for step in steps for _, y in step]
            assert [L.table.keys([i])[0] for j in range(2) for i in L.micro_indices(epoch, 0, j)] == sum(
                L.keys(epoch, 0), [])
        assert L._it is stream  # no rebuild (DALI) or restart (PIL workers) at epoch ends
        streams.append(got)
    from stm_dist.data.plan_source import TarReader

    t = loaders[0].table
    reader = TarReader(t.tars, dont_use_mmap=True)
    for epoch in range(3):  # each global batch: the plan's first 16 samples, micro-batches in order
        labels = sum(streams[0][2 * epoch : 2 * epoch + 2] + streams[1][2 * epoch : 2 * epoch + 2], [])
        order = loaders[0].plan.order(epoch)[:16]
        assert labels == [reader.label(int(t.file[i]), int(t.cls_off[i]), int(t.cls_size[i])) for i in order]
        assert len(set(labels)) == 16
    if backend == "dali":
        pil = [build_train_loader(unique_shards, 4, rank=r, world_size=2, accum=2, seed=9, img_size=32,
                                  randaug=False, backend="pil", num_threads=0) for r in range(2)]
        for L, want in zip(pil, streams):
            got = []
            for epoch in range(3):
                got += [y.tolist() for _, y in L.next_step()]
            assert got == want  # the PIL reader follows the very same plan


def test_randaug_pixels_are_a_function_of_the_sample(unique_shards):
    # The same global batches of 8 read as 1 x 8 or as 4 x accumulation 2: identical pixels,
    # RandAugment included (its choices come from (seed, epoch, sample), not the pipeline).
    kw = dict(seed=2, img_size=32, randaug=True, num_threads=1)
    whole = build_train_loader(unique_shards, 8, **kw)
    halves = build_train_loader(unique_shards, 4, accum=2, **kw)
    a = [x for _ in range(4) for x, _ in whole.next_step()]  # 3 steps of epoch 0, 1 of epoch 1
    b = [torch.cat([x for x, _ in halves.next_step()]) for _ in range(4)]
    for s, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), s
    plain = build_train_loader(unique_shards, 8, **dict(kw, randaug=False))
    assert not torch.equal(plain.next_step()[0][0], a[0])  # RandAugment did change the pixels


def test_digits_labels_and_drop_last(digits_shards):
    man = read_manifest(digits_shards, "train")
    loaders = [build_train_loader(digits_shards, 32, rank=r, world_size=2, seed=0, img_size=32, randaug=False,
                                  num_threads=1) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (1497 // 2) // 32
    counts = torch.zeros(10, dtype=torch.int64)
    for L in loaders:
        for images, labels in L:
            assert torch.isfinite(images).all() and images.shape == (32, 3, 32, 32)
            counts += torch.bincount(labels, minlength=10)
    # Each rank read 736 of its ~748 samples, no sample twice: no class can exceed its count.
    assert int(counts.sum()) == 2 * 23 * 32 and (counts <= torch.tensor(man["class_counts"])).all()
    assert (counts >= torch.tensor(man["class_counts"]) - 25).all()


def _take(it, n):
    return [(x.clone(), y.clone()) for _, (x, y) in zip(range(n), it)]


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_mid_epoch_resume_identical(digits_shards, backend):
    kw = dict(world_size=2, rank=1, seed=3, img_size=32, randaug=True, backend=backend, num_threads=_threads(backend))
    L = build_train_loader(digits_shards, 16, **kw)
    L.set_epoch(0)
    _take(iter(L), 5)
    sd = json.loads(json.dumps(L.state_dict()))  # must survive a round trip through a checkpoint
    assert sd["epoch"] == 0 and sd["samples"] == 5 * 32
    want = _take(iter(L), 4)
    R = build_train_loader(digits_shards, 16, **kw)
    R.load_state_dict(sd)
    R.set_epoch(0)  # the engine calls this on resume; it must keep the position
    got = _take(iter(R), 4)
    for (a, b), (c, d) in zip(want, got):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(want[0][0], want[1][0])


def test_dali_resume_across_epoch_end(unique_shards):
    kw = dict(world_size=1, seed=5, img_size=32, randaug=False, num_threads=1)
    L = build_train_loader(unique_shards, 8, **kw)
    list(L)  # the whole of epoch 0
    sd = L.state_dict()
    L.set_epoch(1)
    want = [y.clone() for _, y in L]
    R2 = build_train_loader(unique_shards, 8, **kw)
    R2.load_state_dict(sd)
    R2.set_epoch(1)
    got = [y.clone() for _, y in R2]
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and len(got) == 3


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_val_exact_once_two_ranks_short_last_batch(unique_shards, backend):
    loaders = [build_val_loader(unique_shards, 5, rank=r, world_size=2, img_size=32, backend=backend, num_threads=_threads(backend))
               for r in range(2)]
    assert [L.num_samples for L in loaders] == [12, 12]
    seen = []
    for L in loaders:
        sizes = [len(y) for _, y in L]
        assert sizes == [5, 5, 2]
        for _ in range(2):  # a second pass gives the same samples again
            seen.append(sorted(y for _, ys in L for y in ys.tolist()))
    assert seen[0] == seen[1] and seen[2] == seen[3]
    assert sorted(seen[0] + seen[2]) == list(range(24))


def test_val_views_and_labels_match_the_source(unique_shards):
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(32, is_training=False, interpolation="bicubic", crop_pct=0.875)  # timm as reference
    src = sorted((unique_shards.parent / "src" / "val").iterdir())  # class k = k-th sorted folder
    expected = torch.stack([tf(Image.open(next(d.iterdir())).convert("RGB")) for d in src])
    for backend in ("dali", "pil"):
        L = build_val_loader(unique_shards, 24, img_size=32, backend=backend, num_threads=_threads(backend))
        (x, y), = list(L)
        assert sorted(y.tolist()) == list(range(24))
        # Every image is closest to the source image of its own label, and close in absolute terms
        # (DALI decodes and resamples with its own kernels, so not bit-equal).
        dist = (x[:, None] - expected[None]).abs().mean(dim=(2, 3, 4))
        assert torch.equal(dist.argmin(dim=1), y), backend
        own = dist[torch.arange(24), y]
        # (a star field, hubble_deep_field, is the worst case for two different bicubic kernels)
        assert own.median() < 0.01 and own.max() < 0.25, (backend, own)


def test_missing_or_unfinished_split_named(tmp_path, unique_shards):
    from stm_dist.data import ShardError

    with pytest.raises(ShardError, match=r"train\.json: no manifest for split 'train'"):
        build_train_loader(tmp_path, 4)
    (tmp_path / ".val.progress").mkdir()
    with pytest.raises(ShardError, match="interrupted"):
        build_val_loader(tmp_path, 4)
    with pytest.raises(ValueError, match="backend"):
        build_train_loader(unique_shards, 4, backend="torchvision")
    with pytest.raises(ShardError, match="cannot fill one global batch of 32"):
        build_train_loader(unique_shards, 16, world_size=2, randaug=False)


@pytest.mark.gpu
def test_dali_gpu_decode_matches_cpu(unique_shards):
    views = {}
    for device in ("cpu", "cuda"):
        (x, y), = list(build_val_loader(unique_shards, 24, img_size=32, device=device, num_threads=1))
        assert x.device.type == device and y.device.type == device
        views[device] = (x.cpu(), y.cpu())
    assert torch.equal(views["cpu"][1], views["cuda"][1])
    assert (views["cpu"][0] - views["cuda"][0]).abs().mean() < 0.02  # nvJPEG vs libjpeg-turbo
    L = build_train_loader(unique_shards, 8, img_size=32, device="cuda", randaug=True, num_threads=1)
    labels = []
    for x, y in L:
        assert x.is_cuda and x.shape == (8, 3, 32, 32) and y.is_cuda
        labels += y.tolist()
    assert sorted(labels) == list(range(24))


def test_val_warps_from_384(unique_shards):
    (xd, _), = list(build_val_loader(unique_shards, 24, img_size=384, num_threads=1))
    (xp, _), = list(build_val_loader(unique_shards, 24, img_size=384, backend="pil", num_threads=0))
    assert xd.shape == xp.shape == (24, 3, 384, 384)
    assert (xd - xp).abs().mean() < 0.05  # same square warp (upsampled: no crop margins differ)


def test_import_is_lazy():
    import subprocess
    import sys

    code = ("import sys, stm_dist.data as d; "
            "heavy = [m for m in ('nvidia.dali', 'timm', 'torchvision') if m in sys.modules]; "
            "assert not heavy, heavy; d.BatchAugment(num_classes=2); assert 'timm' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_uneven_slices_same_steps_no_repeats(unique_shards):
    # 24 samples over 5 ranks: slices of 4 and 5, batch 2 -> 2 steps everywhere; ranks with 5
    # samples have a third (padded) DALI batch that must be dropped, not leak into the next epoch.
    loaders = [build_train_loader(unique_shards, 2, rank=r, world_size=5, seed=1, img_size=32, randaug=False,
                                  num_threads=1) for r in range(5)]
    assert {len(L) for L in loaders} == {2}
    for epoch in range(3):
        ranks = _epoch_labels(loaders, epoch)
        flat = sum(ranks, [])
        assert len(flat) == 20 and len(set(flat)) == 20, (epoch, ranks)


def test_parallel_source_workers_serve_the_same_stream(unique_shards):
    # DALI's parallel external_source calls the plan callback out of order in spawned processes;
    # the stream must be the in-process one, across an epoch end (3 steps per epoch here).
    kw = dict(rank=1, world_size=2, accum=2, seed=3, img_size=32, randaug=False, num_threads=1)
    a = build_train_loader(unique_shards, 2, **kw)
    b = build_train_loader(unique_shards, 2, source_workers=2, **kw)
    for step in range(5):
        for (xa, ya), (xb, yb) in zip(a.next_step(), b.next_step()):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), step
    assert b.epoch == 1
