"""stm-shards on the COCO layout: the digits-on-photos demo set, detection shards, and their checks."""
import hashlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_tools.tar_index import scan_tar
from tests.data.conftest import PY, run_cli, subprocess_env

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


def _bad_coco_source(demo, root):
    """The demo's train split copied as splits "train" and "val", with one of each problem case."""
    gt = json.loads((demo / "src" / "annotations" / "instances_train.json").read_text())
    ims = gt["images"]
    name = {k: ims[k]["file_name"] for k in range(len(ims))}
    anns = {k: [a for a in gt["annotations"] if a["image_id"] == ims[k]["id"]] for k in range(len(ims))}
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(demo / "src" / "train", root / "train")
    (root / "train" / name[0]).unlink()  # missing file
    jpg = root / "train" / name[1]
    jpg.write_bytes(jpg.read_bytes()[:1500])  # corrupt (truncated) JPEG
    gt["annotations"] = [a for a in gt["annotations"] if a not in anns[2]]  # image 2: no annotations
    im3 = Image.open(root / "train" / name[3])  # a file of another size than its annotations say
    im3.crop((0, 0, im3.width - 10, im3.height)).save(root / "train" / name[3], quality=95)
    w, h = ims[4]["width"], ims[4]["height"]
    part = anns[4][0]
    gone, flat, alien = dict(part), dict(part), dict(part)
    part["bbox"] = [w - 10.0, 5.0, 30.0, 20.0]  # partly outside: clipped
    gone.update(id=900001, bbox=[w + 5.0, 5.0, 10.0, 10.0])  # entirely outside: dropped
    flat.update(id=900002, bbox=[5.0, 5.0, 0.0, 10.0])  # zero area: dropped
    alien.update(id=900003, category_id=99)  # category not listed: dropped
    gt["annotations"] += [gone, flat, alien]
    # Image 5 stored sideways with an EXIF tag saying so: stored upright, without the tag.
    upright = Image.open(root / "train" / name[5])
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "train" / name[5], quality=95, exif=exif.tobytes())
    (root / "annotations" / "instances_train.json").write_text(json.dumps(gt))
    shutil.copytree(root / "train", root / "val")
    (root / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    return gt, name, np.asarray(upright)


def test_bad_coco_inputs_are_named_and_skipped(demo, tmp_path, capsys):
    gt, name, upright = _bad_coco_source(demo, tmp_path / "src")
    out = tmp_path / "out"
    capsys.readouterr()
    for split in ("train", "val"):
        assert run_cli("create", "--src", tmp_path / "src", "--split", split, "--out", out, "--samples-per-shard", 2,
                       "--workers", 2, "--no-progress") == 0
    printed = capsys.readouterr().out
    man = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val")}
    reasons = {s["path"]: s["reason"] for s in man["train"]["skipped"]}
    assert set(reasons) == {name[0], name[1], name[2], name[3]}
    assert reasons[name[0]] == "missing file" and "undecodable" in reasons[name[1]]
    assert "no usable annotations" in reasons[name[2]]
    w3, h3 = gt["images"][3]["width"], gt["images"][3]["height"]
    assert reasons[name[3]] == f"image is {w3 - 10}x{h3}, its annotations say {w3}x{h3}"  # named, not a crash
    # Images without annotations are kept where evaluation needs them (val), dropped in training.
    assert {s["path"] for s in man["val"]["skipped"]} == {name[0], name[1], name[3]}
    assert man["train"]["empty_images"] == "drop" and man["val"]["empty_images"] == "keep"
    fixed = {f["annotation_id"]: f for f in man["train"]["fixed"]}
    assert {900001, 900002, 900003} < set(fixed) and len(fixed) == 4
    w4 = gt["images"][4]["width"]
    assert "outside" in fixed[900001]["reason"] and fixed[900001]["action"] == "dropped"
    assert "zero-area" in fixed[900002]["reason"] and "category_id 99" in fixed[900003]["reason"]
    (clip_id,) = set(fixed) - {900001, 900002, 900003}
    assert fixed[clip_id]["action"] == "clipped" and fixed[clip_id]["path"] == name[4]
    for f in man["train"]["fixed"] + man["train"]["skipped"]:  # the run's output names each case too
        assert f"{f['path']}" in printed and f["reason"] in printed
    # The ground truth holds exactly what was written, with the clipped box.
    for split, written in (("train", [4, 5]), ("val", [2, 4, 5])):
        truth = json.loads((out / f"{split}_annotations.json").read_text())
        assert [im["file_name"] for im in truth["images"]] == [name[k] for k in written]
        ids = {a["id"] for a in truth["annotations"]}
        assert clip_id in ids and not ids & {900001, 900002, 900003}
        clipped = next(a for a in truth["annotations"] if a["id"] == clip_id)
        assert clipped["bbox"] == [w4 - 10.0, 5.0, 10.0, 20.0]
        samples = read_samples(out, split)
        assert sorted(json.loads(m["json"])["file_name"] for m in samples.values()) == [name[k] for k in written]
    # The sideways JPEG was stored upright (what its annotations describe), without an EXIF tag.
    assert man["train"]["counts"]["reencoded_by_kind"] == {"exif-orientation": 1}
    stored = next(m["jpg"] for m in read_samples(out, "train").values() if json.loads(m["json"])["file_name"] == name[5])
    im = Image.open(io.BytesIO(stored))
    assert im.getexif().get(0x0112) is None and im.size == upright.shape[1::-1]
    assert np.abs(np.asarray(im, np.float32) - upright).mean() < 3  # the same picture, one re-encode apart
    assert run_cli("verify", out, "--full", "--quiet") == 0
    # --strict stops at the first unusable input instead, naming it.
    capsys.readouterr()
    assert run_cli("create", "--src", tmp_path / "src", "--split", "train", "--out", tmp_path / "strict",
                   "--strict", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--strict" in err and "instances_train.json" in err and "annotation 9000" in err


def test_failed_or_interrupted_coco_runs_lose_nothing(demo, tmp_path, capsys):
    src, out = demo / "src", tmp_path / "out"
    args = [PY, "-m", "data_tools.cli", "create", "--src", str(src), "--split", "train", "--out", str(out),
            "--samples-per-shard", "2", "--workers", "2", "--no-progress"]
    # Die (os._exit, like a kill) halfway through the second of three shards.
    r = subprocess.run(args, env=subprocess_env(STM_SHARDS_FAIL_AFTER_SHARDS="1"), capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    left = sorted(os.listdir(out))
    assert [p for p in left if p.endswith(".tar")] == ["train-000000.tar"]
    assert "train.json" not in left and "train_annotations.json" not in left
    before = {k: v for k, v in _tree_hashes(out).items() if k.endswith((".tar", ".idx"))}
    r = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    after = {k: v for k, v in _tree_hashes(out).items() if not k.startswith(".")}
    assert {k: after[k] for k in before} == before  # the finished shard was kept, not rewritten
    assert run_cli("create", "--src", src, "--split", "train", "--out", tmp_path / "whole", "--samples-per-shard", 2,
                   "--workers", 1, "--no-progress") == 0
    whole = {k: v for k, v in _tree_hashes(tmp_path / "whole").items() if not k.startswith(".")}
    assert {k: v for k, v in after.items() if k != "train.json"} == {k: v for k, v in whole.items() if k != "train.json"}
    assert len(whole) == 3 * 2 + 2  # three tars and indexes, the manifest, the ground truth

    # Malformed JSON: the run stops naming the file, line and column; what is written stays.
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    text = (bad / "annotations" / "instances_val.json").read_text()
    cut = text.index('"annotations"') + 20
    (bad / "annotations" / "instances_val.json").write_text(text[:cut] + "\n,, " + text[cut:])
    capsys.readouterr()
    assert run_cli("create", "--src", bad, "--split", "val", "--out", out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{bad / 'annotations' / 'instances_val.json'}:2:1: malformed JSON" in err
    # JSON that parses but is not instance annotations names the missing key.
    (bad / "annotations" / "instances_val.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert run_cli("create", "--src", bad, "--split", "val", "--out", out, "--no-progress") == 2
    assert 'no "categories" list' in capsys.readouterr().err
    assert {k: v for k, v in _tree_hashes(out).items() if not k.startswith(".")} == after
    assert not any(p.startswith("val") for p in os.listdir(out))
    assert run_cli("verify", out, "--quiet") == 0
