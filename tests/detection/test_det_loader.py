"""The detection input pipeline (DALI, CPU here): targets follow the pixels through resize and
flip, padding, aspect grouping, world-size invariance, exact mid-epoch resume, val partition.

Two shard sets: ``demo`` is what users get (stm-shards demo-coco + create: digits on photos,
compressed RLE); ``drawn`` (det_loader_shards.py) holds white shapes on a dark ground, so an
object's pixels can be found in the decoded image, plus polygons, uncompressed RLE, a crowd
region and non-contiguous category ids, which the demo set does not have."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from data_tools.cli import main as shards_main
from stm_dist.data.epoch_plan import EpochPlan
from stm_dist.detection.loaders import build_det_train_loader, build_det_val_loader
from stm_dist.detection.transforms import MULTI_SCALE_3X, SampleError, full_mask, rescale_size
from tests.detection.det_loader_shards import write_split

pytestmark = pytest.mark.filterwarnings(  # pycocotools 2.0.11's decode under numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
SCALES = ((96, 64), (128, 80))
# Small canvases keep generation to ~3 s; both aspect groups get a few global batches of 4.
DEMO = ["--train-images", 24, "--val-images", 9, "--min-canvas", 64, "--max-canvas", 112, "--min-size", 24,
        "--max-size", 48, "--min-digits", 2, "--max-digits", 3]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("drawn_shards"))
    write_split(out, "train", 21, seed=0)  # 12 landscape + 9 portrait
    write_split(out, "val", 11, seed=5, per_shard=4)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_coco")
    assert shards_main([str(a) for a in ("demo-coco", "--out", root / "src", *DEMO)]) == 0
    for split in ("train", "val"):
        assert shards_main([str(a) for a in ("create", "--src", root / "src", "--split", split, "--out",
                                             root / "shards", "--samples-per-shard", 7, "--workers", 1,
                                             "--no-progress")]) == 0
    return str(root / "shards")


def train(shards, batch_size=2, **kw):
    kw.setdefault("scales", SCALES)
    kw.setdefault("num_threads", 1)
    return build_det_train_loader(shards, batch_size, **kw)


def run_steps(loader, n):
    return [loader.next_step() for _ in range(n)]


def unpadded(images, targets):
    return [images[i, :, : t["image_size"][0], : t["image_size"][1]] for i, t in enumerate(targets)]


def same_sample(a_img, a_t, b_img, b_t):
    assert a_t["key"] == b_t["key"] and a_t["image_size"] == b_t["image_size"]
    assert torch.equal(a_img, b_img), a_t["key"]
    for k in ("boxes", "labels", "masks"):
        assert torch.equal(a_t[k], b_t[k]), (a_t["key"], k)


def test_targets_follow_pixels_and_padding(drawn):
    loader = train(drawn, batch_size=3, flip_prob=0.5)
    flips, ious = 0, []
    for _ in range(2 * len(loader)):  # two epochs: each image at several scales and flips
        for images, targets in loader.next_step():
            hs, ws = zip(*(t["image_size"] for t in targets))
            assert images.dtype == torch.float32
            assert images.shape == (len(targets), 3, math.ceil(max(hs) / 32) * 32, math.ceil(max(ws) / 32) * 32)
            for img, t in zip(images, targets):
                h, w = t["image_size"]
                assert (h, w)[::-1] in [rescale_size(t["orig_size"][1], t["orig_size"][0], s) for s in SCALES]
                pad = img.clone()
                pad[:, :h, :w] = 0
                assert not pad.any(), f"{t['key']}: padding is not zero"
                assert t["labels"].tolist() == [1, 2]  # the crowd region is dropped
                assert t["masks"].shape == (2, h, w) and t["masks"].dtype == torch.uint8
                bright = ((img[:, :h, :w] * STD + MEAN).mean(0) > 128)
                union = t["masks"].bool().any(0)
                iou = (bright & union).sum() / (bright | union).sum()
                assert iou > 0.85, f"{t['key']}: mask vs the decoded image's object pixels IoU {iou:.3f}"
                ious.append(iou)
                # a box is its mask's extent: the blob's exactly up to rounding, the polygon's to
                # within its sharp tips, which may cover no pixel centre
                for box, m, tol in zip(t["boxes"], t["masks"], (2.0, 0.75)):
                    ys, xs = torch.nonzero(m, as_tuple=True)
                    ref = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                    assert (box - ref).abs().max() <= tol, (t["key"], box, ref)
                # the polygon sits on the left (top) and the blob on the right (bottom): a flip swaps sides
                wide = t["orig_size"][1] >= t["orig_size"][0]
                if wide:
                    flips += int(t["boxes"][0, 0] > t["boxes"][1, 0])
    assert flips > 0
    assert sum(ious) / len(ious) > 0.88


def test_flip_mirrors_boxes_masks_and_pixels(drawn):
    plain = run_steps(train(drawn, flip_prob=0.0, scales=SCALES[:1]), 2)
    flipped = run_steps(train(drawn, flip_prob=1.0, scales=SCALES[:1]), 2)
    for step_a, step_b in zip(plain, flipped):
        for (ia, ta), (ib, tb) in zip(step_a, step_b):
            for a, b, x, y in zip(unpadded(ia, ta), unpadded(ib, tb), ta, tb):
                assert x["key"] == y["key"]
                w = x["image_size"][1]
                torch.testing.assert_close(a.flip(-1), b, atol=1e-4, rtol=0)
                assert torch.equal(x["masks"].flip(-1), y["masks"])
                x1, y1, x2, y2 = x["boxes"].unbind(1)
                mirror = torch.stack([w - x2, y1, w - x1, y2], 1)
                torch.testing.assert_close(mirror, y["boxes"], atol=1e-4, rtol=0)


def test_demo_targets_match_the_ground_truth_file_as_the_pixels_moved(demo):
    """On stm-shards' own output: each image is the original JPEG resized (and maybe mirrored),
    found from the pixels alone; its masks and boxes are the COCO ground-truth file's, resized
    nearest-neighbour by pixel centres (torch's nearest-exact) and mirrored the same way."""
    import io

    from PIL import Image
    from pycocotools import mask as mask_utils

    from stm_dist.data.plan_source import TarReader

    with open(os.path.join(demo, "train_annotations.json")) as f:
        gt = json.load(f)
    anns = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    loader = train(demo, flip_prob=0.5)
    reader = TarReader(loader.table.tars)
    jpg_of = {k: i for i, k in enumerate(loader.table.keys(range(len(loader.table))))}
    seen_flips = set()
    for step in run_steps(loader, len(loader)):
        for images, targets in step:
            for img, t in zip(unpadded(images, targets), targets):
                h, w = t["image_size"]
                i, tb = jpg_of[t["key"]], loader.table
                raw = reader.read(int(tb.file[i]), int(tb.jpg_off[i]), int(tb.jpg_size[i])).tobytes()
                ref = torch.from_numpy(np.array(Image.open(io.BytesIO(raw)).convert("RGB"))).permute(2, 0, 1)
                ref = torch.nn.functional.interpolate(ref[None].float(), size=(h, w), mode="bilinear",
                                                      antialias=False)[0]
                pix = img * STD + MEAN
                err = [float((pix - r).abs().mean()) for r in (ref, ref.flip(-1))]
                flip = int(err[1] < err[0])
                assert min(err) < 1.0 < max(err), (t["key"], err)
                seen_flips.add(flip)
                want = anns[t["image_id"]]
                assert t["labels"].tolist() == [loader.labels_of[a["category_id"]] for a in want]
                for m, box, a in zip(t["masks"], t["boxes"], want):
                    full = torch.from_numpy(mask_utils.decode(a["segmentation"]))[None, None].float()
                    small = torch.nn.functional.interpolate(full, size=(h, w), mode="nearest-exact")[0, 0]
                    small = small.flip(-1) if flip else small
                    assert torch.equal(m, small.to(torch.uint8)), (t["key"], a["id"])
                    x, y, bw, bh = a["bbox"]
                    sx, sy = w / t["orig_size"][1], h / t["orig_size"][0]
                    ref_box = [x * sx, y * sy, (x + bw) * sx, (y + bh) * sy]
                    if flip:
                        ref_box = [w - ref_box[2], ref_box[1], w - ref_box[0], ref_box[3]]
                    torch.testing.assert_close(box, torch.tensor(ref_box), atol=1e-4, rtol=0)
    assert seen_flips == {0, 1}


def test_windowed_polygon_masks_equal_full_image_rasterisation():
    """Masks are rasterised inside each polygon's window (speed): the same pixels as pycocotools
    on the whole resized image, polygons crossing the border and with several parts included."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for _ in range(40):
        width, height = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        new_w, new_h = int(rng.integers(10, 200)), int(rng.integers(10, 200))
        segm = [rng.uniform(-15, max(width, height) + 15, 2 * int(rng.integers(3, 9))).tolist()
                for _ in range(int(rng.integers(1, 3)))]
        scaled = [(np.asarray(p) * np.tile([new_w / width, new_h / height], len(p) // 2)).tolist() for p in segm]
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(scaled, new_h, new_w)))
        assert np.array_equal(full_mask(segm, height, width, new_h, new_w), ref)


def test_rescale_is_mmdets_rule():
    # mmcv.rescale_size: factor min(long / longer side, short / shorter side), sides rounded
    assert rescale_size(640, 480, (1333, 800)) == (1067, 800)
    assert rescale_size(427, 640, (1333, 800)) == (800, 1199)
    assert rescale_size(1000, 200, (1333, 800)) == (1333, 267)  # the long side caps
    assert rescale_size(640, 480, (800, 1333)) == (1067, 800)  # (short, long) means the same
    assert MULTI_SCALE_3X[0] == (1333, 480) and MULTI_SCALE_3X[-1] == (1333, 800) and len(MULTI_SCALE_3X) == 11


def test_aspect_groups_and_plan():
    groups = np.array([0] * 13 + [1] * 9)
    plan = EpochPlan(len(groups), 4, seed=3, groups=groups)
    assert plan.steps == 13 // 4 + 9 // 4
    for epoch in range(3):
        order = plan.order(epoch)
        assert len(order) == plan.steps * 4 and len(set(order.tolist())) == len(order)
        assert all(len(set(groups[b].tolist())) == 1 for b in order.reshape(-1, 4))
    assert not np.array_equal(plan.order(0), plan.order(1))
    # the plain plan is unchanged by the option
    assert np.array_equal(EpochPlan(22, 4, 3).order(1), EpochPlan(22, 4, 3, groups=None).order(1))


def test_global_batches_one_aspect_group(demo):
    loader = train(demo, batch_size=2, accum=2)
    assert len(loader) == sum(n // 4 for n in np.bincount(loader.groups))
    micro = list(loader)  # iterating gives the epoch's micro-batches (the engine's other way in)
    assert len(micro) == 2 * len(loader)
    loader.set_epoch(1)
    steps = [micro[k : k + 2] for k in range(0, len(micro), 2)] + run_steps(loader, len(loader))
    assert loader.last_step == (1, len(loader) - 1)
    for step in steps:
        sides = [t["image_size"] for _, targets in step for t in targets]
        assert len({h > w for h, w in sides}) == 1, sides


def test_world_size_and_resume(demo):
    """rank 0 + rank 1 of 2 == rank 0 of 1 (accum 2), sample for sample; a state saved mid-epoch
    and loaded into fresh loaders at the other world size continues with the same batches, across
    the epoch end."""
    one = train(demo, batch_size=2, accum=2, seed=7)
    steps = len(one)
    assert steps >= 4
    ref = run_steps(one, 3)
    state = one.state_dict()
    ref += run_steps(one, steps + 1)  # past the end of epoch 0
    ranks = [train(demo, batch_size=2, world_size=2, rank=r, seed=7) for r in range(2)]
    got = [run_steps(ld, steps + 4) for ld in ranks]
    resumed = [train(demo, batch_size=2, world_size=2, rank=r, seed=7) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    tail = [run_steps(ld, steps + 1) for ld in resumed]
    for s in range(steps + 4):
        for r in range(2):
            (ia, ta), = got[r][s]
            ib, tb = ref[s][r]
            assert ranks[r].keys(*divmod(s, steps))[0] == [t["key"] for t in ta]
            for a, x, b, y in zip(unpadded(ia, ta), ta, unpadded(ib, tb), tb):
                same_sample(a, x, b, y)
            if s >= 3:
                (ic, tc), = tail[r][s - 3]
                for a, x, c, z in zip(unpadded(ia, ta), ta, unpadded(ic, tc), tc):
                    same_sample(a, x, c, z)
    assert resumed[0].state_dict()["epoch"] == 1 and resumed[0].state_dict() == ranks[0].state_dict()


def test_val_ranks_partition_the_split(demo):
    ids = {}
    for r in range(3):
        val = build_det_val_loader(demo, 2, rank=r, world_size=3, scale=(96, 64), num_threads=1)
        first = [(images.clone(), [t["image_id"] for t in targets]) for images, targets in val]
        second = [(images, [t["image_id"] for t in targets]) for images, targets in val]
        assert [i for _, b in first for i in b] == [i for _, b in second for i in b]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second))  # a second pass is the same
        ids[r] = [i for _, b in first for i in b]
        assert len(ids[r]) == val.num_samples
    every = [i for r in range(3) for i in ids[r]]
    with open(os.path.join(demo, "val_annotations.json")) as f:
        assert sorted(every) == sorted(im["id"] for im in json.load(f)["images"])


def test_damaged_jpeg_names_the_samples(tmp_path):
    write_split(str(tmp_path), "val", 4, seed=9, truncate=(2,))
    with pytest.raises(RuntimeError, match=r"DALI pipeline failed on a batch of samples among \[.*'s10002'"):
        list(build_det_val_loader(str(tmp_path), 4, scale=(96, 64), num_threads=1))


def test_unknown_category_names_the_sample(drawn, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(drawn, bad)
    path = os.path.join(bad, "val.json")
    with open(path) as f:
        man = json.load(f)
    man["categories"], man["num_classes"] = man["categories"][:1], 1
    with open(path, "w") as f:
        json.dump(man, f)
    with pytest.raises(SampleError, match=r"sample 's6000'.*category_id 7 is not in the manifest"):
        next(iter(build_det_val_loader(bad, 2, scale=(96, 64), num_threads=1)))


def test_pil_backend_matches_dali(demo):
    """The torch/PIL backend: the same samples, choices and targets, pixels within rounding."""
    for kind in ("train", "val"):
        if kind == "train":
            dali = [mb for step in run_steps(train(demo, seed=3), 3) for mb in step]
            pil = [mb for step in run_steps(train(demo, seed=3, backend="pil", num_threads=0), 3) for mb in step]
        else:
            make = lambda **kw: build_det_val_loader(demo, 4, scale=(96, 64), **kw)  # noqa: E731
            dali, pil = list(make(num_threads=1)), list(make(backend="pil", num_threads=0))
        assert len(dali) == len(pil)
        for (ia, ta), (ib, tb) in zip(dali, pil):
            assert ia.shape == ib.shape
            for a, x, b, y in zip(unpadded(ia, ta), ta, unpadded(ib, tb), tb):
                assert x["key"] == y["key"] and x["image_size"] == y["image_size"]
                for k in ("boxes", "labels", "masks"):
                    assert torch.equal(x[k], y[k])
                diff = ((a - b).abs() * STD).flatten()  # in 0..255 pixel units
                # seen: max 1 (a .5 rounded the other way), mean <= 0.03
                assert diff.max() <= 1.01 and diff.mean() < 0.06, (x["key"], float(diff.max()), float(diff.mean()))
