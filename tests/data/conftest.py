"""Real small data sets for the data tests: the scikit-learn digits in the ImageNet layout, and
a class-folder set of real photos (scikit-image / scikit-learn) where every image is its own
class, so a label identifies a sample and exact-once reading can be checked."""
import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as shards_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = ["chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "astronaut", "retina"]


def real_photos(max_side=96):
    """(name, RGB uint8 array) for the bundled colour photos, downscaled to keep tests quick."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays = [(n, getattr(skimage.data, n)()) for n in PHOTOS]
    sk = load_sample_images()
    arrays += [(os.path.splitext(os.path.basename(f))[0], im) for f, im in zip(sk.filenames, sk.images)]
    for name, a in arrays:
        im = Image.fromarray(a[..., :3])
        im.thumbnail((max_side, max_side), Image.BICUBIC)
        out.append((name, np.asarray(im)))
    return out


def run_cli(*args):
    return shards_main([str(a) for a in args])


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


PY = sys.executable


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert run_cli("demo-source", "--out", root / "src", "--size", 32) == 0
    for split in ("train", "val"):
        assert run_cli("create", "--src", root / "src", "--split", split, "--out", root / "shards",
                       "--samples-per-shard", 400, "--workers", 1, "--no-progress") == 0
    return root / "shards"


@pytest.fixture(scope="session")
def unique_shards(tmp_path_factory):
    """24 samples, 24 classes: 10 real photos + 14 digits, each image its own class; both splits."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("unique")
    images = [(n, a) for n, a in real_photos()]
    digits = load_digits()
    for i in range(24 - len(images)):
        d = (digits.images[i] * (255 / 16)).astype(np.uint8)
        images.append((f"digit{i:02d}", np.asarray(Image.fromarray(d).resize((40, 40), Image.BICUBIC).convert("RGB"))))
    for split in ("train", "val"):
        for k, (name, a) in enumerate(images):
            d = root / "src" / split / f"c{k:02d}_{name}"
            d.mkdir(parents=True)
            Image.fromarray(a).save(d / f"{name}.jpg", quality=95)
        assert run_cli("create", "--src", root / "src", "--split", split, "--out", root / "shards",
                       "--samples-per-shard", 5, "--workers", 1, "--no-progress") == 0
    return root / "shards"
