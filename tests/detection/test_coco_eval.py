"""coco_eval: our AP equals pycocotools' own COCOeval on our results JSON; perfect predictions give 100."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stm_dist.detection.coco_eval import STAT_NAMES, coco_evaluate, masks_to_tensor, to_coco_results

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 18, "name": "dog"}]
# image id -> (height, width) of the original image, and its objects: (category id, x1, y1, x2, y2)
IMAGES = {
    11: ((60, 80), [(3, 4, 6, 30, 40), (18, 40, 10, 76, 50), (7, 10, 42, 34, 58)]),
    25: ((64, 48), [(7, 2, 2, 20, 30), (7, 24, 30, 46, 62)]),
    30: ((40, 40), [(18, 5, 5, 35, 35)]),
}


def _rect_mask(h, w, box):
    m = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    return m


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    """A COCO ground-truth file: rectangles, as RLE (exact) for most, as a polygon for one, one crowd."""
    images, anns = [], []
    for img_id, ((h, w), objs) in IMAGES.items():
        images.append({"id": img_id, "height": h, "width": w, "file_name": f"{img_id}.jpg"})
        for cat, *box in objs:
            x1, y1, x2, y2 = box
            if len(anns) == 1:  # a polygon, as most of COCO
                seg = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            else:
                rle = mask_utils.encode(np.asfortranarray(_rect_mask(h, w, box)))
                seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)), "segmentation": seg})
    path = tmp_path_factory.mktemp("coco") / "val_annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def _label(cat):
    return 1 + [c["id"] for c in CATEGORIES].index(cat)


def _outputs(scale, noisy):
    """Model-like outputs at an image resized by `scale` (boxes, labels 1..K, scores, mask probabilities
    (N, 1, h, w)) with targets carrying image_size/orig_size; `noisy` shifts boxes, adds false positives."""
    g = torch.Generator().manual_seed(0)
    outputs, targets = [], []
    for img_id, ((h0, w0), objs) in IMAGES.items():
        h, w = round(h0 * scale), round(w0 * scale)
        boxes, labels, scores = [], [], []
        for cat, *box in objs:
            b = torch.tensor(box, dtype=torch.float32) * scale
            if noisy:
                b = b + torch.randn(4, generator=g) * 3 * scale
            boxes.append(b)
            labels.append(_label(cat))
            scores.append(0.9 if not noisy else float(torch.rand(1, generator=g)))
        if noisy:  # a confident false positive and a wrong class on a true object
            boxes += [torch.tensor([0.0, 0.0, 10.0, 10.0]) * scale, boxes[0].clone()]
            labels += [_label(7), _label(18) if labels[0] != _label(18) else _label(3)]
            scores += [0.95, 0.5]
        boxes = torch.stack(boxes)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        masks = torch.zeros(len(boxes), 1, h, w)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[i, 0, y1:y2, x1:x2] = 0.9
        if noisy:
            masks = masks * torch.rand(masks.shape, generator=g).add(0.3).clamp(max=1)
        outputs.append({"boxes": boxes, "labels": torch.tensor(labels), "scores": torch.tensor(scores), "masks": masks})
        targets.append({"image_id": img_id, "image_size": (h, w), "orig_size": (h0, w0)})
    return outputs, targets


def _pycocotools(gt_path, results_path, iou_type):
    gt = COCO(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(str(results_path)), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_ap_equals_pycocotools_on_results_json(gt_path, tmp_path, scale):
    bbox, segm = to_coco_results(*_outputs(scale, noisy=True), CATEGORIES)
    paths = {}
    for kind, res in (("bbox", bbox), ("segm", segm)):
        paths[kind] = tmp_path / f"{kind}.json"
        paths[kind].write_text(json.dumps(res))  # what stm-eval writes; must round-trip through JSON
    ours = coco_evaluate(gt_path, bbox, segm, log=lambda s: None)
    for kind in ("bbox", "segm"):
        ref = _pycocotools(gt_path, paths[kind], kind)
        got = [ours[kind][n] for n in STAT_NAMES]
        want = [v * 100 if v >= 0 else -1.0 for v in ref]
        assert got == pytest.approx(want, abs=1e-9), kind
    assert ours["bbox_AP"] == ours["bbox"]["AP"] and ours["segm_AP"] == ours["segm"]["AP"]
    assert 0 < ours["bbox_AP"] < 100 and 0 < ours["segm_AP"] < 100  # noisy: neither trivial nor perfect


def test_perfect_predictions_give_100(gt_path):
    outputs, targets = _outputs(1.0, noisy=False)
    bbox, segm = to_coco_results(outputs, targets, CATEGORIES)
    # boxes come back in COCO's [x, y, w, h] at the original size, categories as COCO ids
    assert bbox[0]["bbox"] == [4.0, 6.0, 26.0, 34.0] and bbox[0]["category_id"] == 3
    res = coco_evaluate(gt_path, bbox, segm, log=lambda s: None)
    assert res["bbox_AP"] == pytest.approx(100.0) and res["segm_AP"] == pytest.approx(100.0)


def test_masks_scaled_back_to_original_size(gt_path):
    outputs, targets = _outputs(2.0, noisy=False)
    bbox, segm = to_coco_results(outputs, targets, CATEGORIES)
    assert bbox[0]["bbox"] == pytest.approx([4.0, 6.0, 26.0, 34.0])  # halved back from the 2x image
    m = masks_to_tensor([segm[0]["segmentation"]], 60, 80)[0]
    assert tuple(segm[0]["segmentation"]["size"]) == (60, 80)
    assert torch.equal(m, torch.from_numpy(_rect_mask(60, 80, (4, 6, 30, 40))).bool())


def test_mmdet_compat_masks_pasted_at_original_size(gt_path):
    """Outputs with "masks_28" (mmdet_compat): the 28x28 probabilities go straight to the original size
    inside the scaled-back box, as mmdet's get_seg_masks(rescale=True), not via the resized image."""
    outputs, targets = _outputs(2.0, noisy=False)
    for out in outputs:
        out["masks_28"] = torch.ones(len(out["boxes"]), 1, 28, 28)
        out["masks"] = torch.zeros_like(out["masks"])  # ignored when masks_28 is there
    bbox, segm = to_coco_results(outputs, targets, CATEGORIES)
    m = masks_to_tensor([segm[0]["segmentation"]], 60, 80)[0]
    assert torch.equal(m, torch.from_numpy(_rect_mask(60, 80, (4, 6, 30, 40))).bool())
    res = coco_evaluate(gt_path, bbox, segm, log=lambda s: None)
    assert res["segm_AP"] == pytest.approx(100.0)


def test_bad_input_is_named(gt_path):
    outputs, targets = _outputs(1.0, noisy=False)
    outputs[1]["labels"][0] = 9  # only 3 categories
    with pytest.raises(ValueError, match="image 25: labels outside 1..3"):
        to_coco_results(outputs, targets, CATEGORIES)
    outputs, targets = _outputs(1.0, noisy=False)
    bbox, segm = to_coco_results(outputs, targets, CATEGORIES)
    bbox[0]["image_id"] = 999
    with pytest.raises(ValueError, match=r"val_annotations.json: bbox results for image ids not in the file: \[999\]"):
        coco_evaluate(gt_path, bbox, segm, log=lambda s: None)
    del targets[0]["orig_size"]
    with pytest.raises(KeyError, match="image 11 has no 'orig_size'"):
        to_coco_results(outputs, targets, CATEGORIES)


def test_no_detections_is_zero_ap(gt_path):
    res = coco_evaluate(gt_path, [], [], log=lambda s: None)
    assert res["bbox_AP"] == 0.0 and res["segm_AP"] == 0.0
