"""stm-shards on the COCO layout: the digits-on-photos demo set, detection shards, and their checks."""
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_tools.tar_index import scan_tar
from tests.data.conftest import PY, run_cli

# Small canvases and digits keep generation and sharding to a fraction of a second.
DEMO = ["--train-images", 6, "--val-images", 4, "--min-canvas", 96, "--max-canvas", 128, "--min-size", 24,
        "--max-size", 48, "--min-digits", 2, "--max-digits", 4]


def _tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_samples(shard_dir, split):
    """{key: {ext: bytes}} of every sample in a split's tars."""
    out = {}
    for tar in sorted(shard_dir.glob(f"{split}-*.tar")):
        with open(tar, "rb") as f:
            for s in scan_tar(str(tar)):
                members = {}
                for ext, off, size, name in s:
                    f.seek(off)
                    members[ext] = f.read(size)
                    key = name.split(".", 1)[0]
                out[key] = members
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demococo")
    assert run_cli("demo-coco", "--out", root / "src", *DEMO) == 0
    for split, workers in (("train", 1), ("val", 2)):
        assert run_cli("create", "--src", root / "src", "--split", split, "--out", root / "shards",
                       "--samples-per-shard", 4, "--workers", workers, "--no-progress") == 0
    return root


def test_demo_coco_masks_are_exact_and_deterministic(demo, tmp_path):
    from data_tools.demo_coco import _digit

    src = demo / "src"
    for split, n in (("train", 6), ("val", 4)):
        gt = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        assert len(gt["images"]) == n and [c["name"] for c in gt["categories"]] == [str(d) for d in range(10)]
        by_image = {}
        for a in gt["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        assert len(by_image) == n and len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
        for im in gt["images"]:
            from PIL import Image

            assert Image.open(src / split / im["file_name"]).size == (im["width"], im["height"])
            masks = []
            for a in by_image[im["id"]]:
                m = mask_utils.decode(a["segmentation"])
                assert m.shape == (im["height"], im["width"]) and a["area"] == m.sum() > 0
                ys, xs = np.nonzero(m)  # the box is the visible mask's tight box
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                masks.append(m)
            # Occlusion: a pixel belongs to one digit at most (the one on top).
            assert (np.sum(masks, axis=0) <= 1).all()
    # The blend crosses 1/2 exactly where the mask ends, so the mask is what is seen.
    rng = np.random.default_rng(0)
    alpha, mask = _digit(rng, rng.uniform(0, 1, (8, 8)), 37)
    assert ((alpha >= 0.5) == mask).all() and 0 < mask.sum() < 37 * 37
    # Same seed, same bytes; another seed, other images.
    assert run_cli("demo-coco", "--out", tmp_path / "again", *DEMO) == 0
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(src)
    assert run_cli("demo-coco", "--out", tmp_path / "seed1", *DEMO, "--seed", 1) == 0
    other = _tree_hashes(tmp_path / "seed1")
    assert not set(other.items()) & set(_tree_hashes(src).items())


def test_demo_coco_drops_fully_hidden_digits(tmp_path):
    from data_tools.demo_coco import write_demo_coco

    # Many big digits on a small canvas, any occlusion allowed: some end up entirely covered.
    counts = write_demo_coco(str(tmp_path), train_images=4, val_images=1, min_digits=8, max_digits=8,
                             digit_sizes=(60, 64), canvas_sizes=(64, 64), max_hidden=1.0)
    assert counts["train"]["dropped_hidden"] > 0
    gt = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(gt["annotations"]) + counts["train"]["dropped_hidden"] == 4 * 8  # every digit placed
    assert all(a["area"] > 0 for a in gt["annotations"])


def test_coco_shards_hold_each_image_with_its_annotations(demo, tmp_path):
    src, shards = demo / "src", demo / "shards"
    for split in ("train", "val"):
        gt_src = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        man = json.loads((shards / f"{split}.json").read_text())
        assert man["task"] == "detection" and man["num_classes"] == 10 and man["skipped"] == man["fixed"] == []
        assert man["categories"] == [{"id": d + 1, "name": str(d)} for d in range(10)]
        assert man["annotations"] == f"{split}_annotations.json" and man["num_samples"] == len(gt_src["images"])
        assert sum(man["class_counts"]) == len(gt_src["annotations"]) == man["annotation_counts"]["written"]
        # The ground truth beside the shards is the (clean) source's.
        assert json.loads((shards / man["annotations"]).read_text()) == gt_src
        samples = read_samples(shards, split)
        images = {im["file_name"]: im for im in gt_src["images"]}
        assert len(samples) == len(images)
        for key, members in samples.items():
            assert set(members) == {"jpg", "json"} and "." not in key
            d = json.loads(members["json"])
            im = images[d["file_name"]]
            assert (d["image_id"], d["width"], d["height"]) == (im["id"], im["width"], im["height"])
            want = [{k: v for k, v in a.items() if k != "image_id"} for a in gt_src["annotations"]
                    if a["image_id"] == im["id"]]
            assert d["annotations"] == want
            assert members["jpg"] == (src / split / d["file_name"]).read_bytes()  # valid JPEGs pass as they are
        # DALI's own index tool agrees with ours.
        for sh in man["shards"]:
            out = tmp_path / "ref.idx"
            subprocess.run([os.path.join(os.path.dirname(PY), "wds2idx"), str(shards / sh["name"]), str(out)],
                           check=True, capture_output=True)
            assert out.read_bytes() == (shards / sh["index_file"]).read_bytes()
    assert run_cli("verify", shards, "--full", "--quiet") == 0
