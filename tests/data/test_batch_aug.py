"""BatchAugment: timm's random erasing + mixup/cutmix on a real batch from the shards."""
import pytest
import torch

from stm_dist.data import BatchAugment, build_val_loader


@pytest.fixture(scope="module")
def batch(unique_shards):
    (x, y), = list(build_val_loader(unique_shards, 24, img_size=32, backend="pil", num_threads=0))
    return x, y


def test_mixup_cutmix_soft_targets(batch):
    x, y = batch
    torch.manual_seed(0)
    aug = BatchAugment(num_classes=24)
    xa, t = aug(x.clone(), y)
    assert xa.shape == x.shape and t.shape == (24, 24) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(24))
    # Mixing pairs sample i with sample 23 - i (timm's batch mode): mass only on those two labels
    # (plus the smoothing floor), and the images really changed.
    floor = 0.1 / 24
    for i in range(24):
        big = (t[i] > floor + 1e-6).nonzero().flatten().tolist()
        assert set(big) <= {int(y[i]), int(y[23 - i])}
    assert not torch.equal(xa, x)


def test_all_off_gives_smoothed_one_hot_and_untouched_images(batch):
    x, y = batch
    xa, t = BatchAugment(mixup=0, cutmix=0, reprob=0, num_classes=24)(x.clone(), y)
    assert torch.equal(xa, x)
    want = torch.full((24, 24), 0.1 / 24)
    want[torch.arange(24), y] = 0.9 + 0.1 / 24
    assert torch.allclose(t, want)
    _, t0 = BatchAugment(mixup=0, cutmix=0, reprob=0, smoothing=0, num_classes=24)(x.clone(), y)
    assert torch.equal(t0, torch.nn.functional.one_hot(y, 24).float())


def test_random_erasing_pixel_mode(batch):
    x, y = batch
    torch.manual_seed(1)
    xa, _ = BatchAugment(mixup=0, cutmix=0, reprob=1.0, num_classes=24)(x.clone(), y)
    changed = (xa != x).flatten(1).any(1)
    assert changed.all()  # p = 1: every image has one erased box
    frac = (xa != x).float().mean(dim=(1, 2, 3))
    assert (frac > 0.01).all() and (frac < 0.5).all()  # timm's area range is 2%..33%


def test_bad_input_named(batch):
    x, y = batch
    with pytest.raises(ValueError, match="even batch"):
        BatchAugment(num_classes=24)(x[:5].clone(), y[:5])
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        BatchAugment(num_classes=10)(x.clone(), y)
