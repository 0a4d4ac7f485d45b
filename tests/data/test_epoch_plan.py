"""The epoch plan: a global permutation per epoch, the same on every rank, cut into global
batches and micro-batches; shuffle quality like the original's DistributedSampler."""
import numpy as np
import pytest

from stm_dist.data import build_train_loader
from stm_dist.data.epoch_plan import EpochPlan, random_resized_crop, sample_augment


def test_permutation_per_epoch_same_on_every_rank_disjoint_across_ranks(digits_shards):
    world, mb, accum = 3, 8, 2  # global batch 48: 31 steps of 1,497 samples
    loaders = [build_train_loader(digits_shards, mb, rank=r, world_size=world, accum=accum, seed=4, img_size=32,
                                  randaug=False) for r in range(world)]
    steps, g = len(loaders[0]), 48
    assert steps == 1497 // g and all(len(L) == steps for L in loaders)
    orders = []
    for epoch in (0, 1):
        order = loaders[0].plan.order(epoch)
        assert sorted(order.tolist()) == list(range(1497))  # a permutation of every sample
        for L in loaders[1:]:  # each rank draws it on its own, from (seed, epoch) only
            assert np.array_equal(L.plan.order(epoch), order)
        mine = [[int(i) for s in range(steps) for j in range(accum) for i in L.micro_indices(epoch, s, j)]
                for L in loaders]
        for a in range(world):
            assert len(mine[a]) == steps * accum * mb
            for b in range(a + 1, world):
                assert not set(mine[a]) & set(mine[b])
        for s in range(steps):  # global batch s is the plan's slice s, micro-batch k = its k-th part
            got = [int(i) for L in loaders for j in range(accum) for i in L.micro_indices(epoch, s, j)]
            assert got == order[s * g : (s + 1) * g].tolist()
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    other = build_train_loader(digits_shards, mb, world_size=world, accum=accum, seed=5, randaug=False)
    assert not np.array_equal(other.plan.order(0), orders[0])


def _shared_pairs(batch_a, batch_b):
    """Pairs of samples that share a batch in both epochs (batch ids; -1 = dropped)."""
    keep = (batch_a >= 0) & (batch_b >= 0)
    _, counts = np.unique(batch_a[keep] * 100003 + batch_b[keep], return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _batch_ids(order, g):
    ids = np.full(len(order), -1)
    used = (len(order) // g) * g
    ids[order[:used]] = np.arange(used) // g
    return ids


def test_batch_cooccurrence_matches_a_random_permutation():
    n, g = 2000, 50
    # A pair that shares a batch in epoch e shares one in e+1 with probability (g-1)/(n-1).
    expected = (n // g) * g * (g - 1) / 2 * (g - 1) / (n - 1)
    observed = []
    for seed in range(6):
        plan = EpochPlan(n, g, seed)
        for e in (0, 3):
            observed.append(_shared_pairs(_batch_ids(plan.order(e), g), _batch_ids(plan.order(e + 1), g)))
    assert all(abs(o - expected) < 6 * expected ** 0.5 for o in observed), (observed, expected)
    assert abs(np.mean(observed) - expected) < 3 * expected ** 0.5 / len(observed) ** 0.5
    # The statistic sees fixed neighbourhoods: shuffling inside fixed 1,000-sample shards only
    # (the old reader's kind of mixing) keeps far more pairs together.
    rng = np.random.default_rng(0)
    local = [np.concatenate([rng.permutation(1000) + 1000 * k for k in rng.permutation(2)]) for _ in range(2)]
    assert _shared_pairs(_batch_ids(local[0], g), _batch_ids(local[1], g)) > 1.5 * expected


def test_sample_augment_is_a_function_of_the_sample():
    a = sample_augment(1, 2, 3, 500, 375)
    assert repr(a) == repr(sample_augment(1, 2, 3, 500, 375))
    draws = [sample_augment(1, 2, i, 500, 375) for i in range(400)]
    crops = np.array([d[0] for d in draws])
    x, y, w, h = crops.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 500).all() and (y + h <= 375).all()
    area = w * h / (500 * 375)
    assert 0.07 < area.min() and area.max() <= 1.0
    # The same distribution as torchvision's RandomResizedCrop (which the original used): large
    # windows that do not fit are redrawn, so the mean area is well below U(0.08, 1)'s 0.54.
    import torch
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(1, 375, 500)
    tv = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)])
    tv_area = tv[:, 2] * tv[:, 3] / (500 * 375)
    ours = np.array([random_resized_crop(np.random.default_rng(i), 500, 375) for i in range(2000)])
    our_area = ours[:, 2] * ours[:, 3] / (500 * 375)
    assert abs(our_area.mean() - tv_area.mean()) < 0.03 and abs(np.median(our_area) - np.median(tv_area)) < 0.04
    our_ratio, tv_ratio = np.log(ours[:, 2] / ours[:, 3]), np.log(tv[:, 3] / tv[:, 2])
    assert abs(our_ratio.mean() - tv_ratio.mean()) < 0.03 and abs(our_ratio.std() - tv_ratio.std()) < 0.03
    assert 0.4 < np.mean([d[1] for d in draws]) < 0.6  # flip
    ops = np.array([d[2] for d in draws])
    assert 0.4 < (ops == 15).mean() < 0.6 and set(ops[ops < 15].tolist()) == set(range(15))
    bins = np.array([d[3] for d in draws])
    assert 34 < bins.mean() < 38 and bins.min() >= 0 and bins.max() <= 40


@pytest.mark.parametrize("size", [(10, 1000), (1000, 10), (7, 7)])
def test_random_resized_crop_fallback_stays_inside(size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y, w, h = random_resized_crop(rng, *size)
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= size[0] and y + h <= size[1]
