"""RandAugment's ops are traced as plain Python (dali_randaug.apply_rand_augment: ~8 s less per
pipeline); the pipeline must give exactly the images that the ops converted by DALI's autograph
(its default) give."""
import hashlib

import pytest

import stm_dist.data.dali_randaug as dali_randaug
from stm_dist.data import build_train_loader


def _epoch_digest(shards) -> tuple[int, str]:
    # 512 samples, 2 ops each: every one of the 16 choices is drawn ~30 times at each level.
    loader = build_train_loader(shards, 64, img_size=32, num_threads=1, randaug=True, seed=3)
    digest, n = hashlib.sha256(), 0
    for images, labels in loader:
        digest.update(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        n += 1
        if n == 8:
            break
    return n, digest.hexdigest()


@pytest.mark.slow
def test_plain_traced_ops_give_the_converted_ops_images(digits_shards, monkeypatch):
    plain = _epoch_digest(digits_shards)
    monkeypatch.setattr(dali_randaug, "do_not_convert", lambda op: op)  # autograph converts each op again
    converted = _epoch_digest(digits_shards)
    assert plain[0] == 8 and plain == converted
