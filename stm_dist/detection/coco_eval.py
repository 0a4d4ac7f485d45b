"""COCO box and mask AP of Mask R-CNN outputs with pycocotools (the metric of the original's mmdet
CocoDataset.evaluate and of the paper's tables).

`to_coco_results` turns the model's eval outputs (resized-image pixels, contiguous labels) into COCO's
result format at the ORIGINAL image size; `coco_evaluate` runs COCOeval on them against the ground-truth
file the shards tool wrote beside the shards.
"""
import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_THRESHOLD = 0.5  # mmdet test_cfg.rcnn.mask_thr_binary (mask >= 0.5)


def _rle(binary):
    """(N, H, W) bool -> N COCO RLEs with str counts (JSON-writable)."""
    from pycocotools import mask as mask_utils

    if binary.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
        r["size"] = [int(v) for v in r["size"]]  # numpy uint32 for a batch of masks: not JSON-writable
    return rles


def _scaled_boxes(boxes, size, orig):
    (h, w), (h0, w0) = size, orig
    scale = boxes.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    return boxes * scale


def _rles_from_resized(masks, size, orig, image_id, chunk):
    """Probabilities at the resized size -> bilinear to the original size -> >= 0.5 -> RLE."""
    h, w = size
    if masks.shape[0] and tuple(masks.shape[-2:]) != (h, w):
        raise ValueError(f"image {image_id}: masks are {tuple(masks.shape[-2:])}, image_size is {(h, w)}")
    rles = []
    for s in range(0, masks.shape[0], chunk):  # chunks: 100 full-size float masks are large
        m = masks[s:s + chunk].float().reshape(-1, 1, h, w)
        if (h, w) != orig:
            m = F.interpolate(m, size=orig, mode="bilinear", align_corners=False)
        rles.extend(_rle((m[:, 0] >= MASK_THRESHOLD).cpu()))
    return rles


def _rles_from_small(masks, boxes, orig, chunk):
    """mmdet's get_seg_masks with rescale: the RoI head's 28x28 probabilities pasted at the original size
    into the boxes scaled back to it (grid_sample), then >= 0.5."""
    from .rcnn_parts import paste_masks_mmdet

    rles = []
    for s in range(0, masks.shape[0], chunk):
        m = paste_masks_mmdet(masks[s:s + chunk].float().cpu(), boxes[s:s + chunk].float(), *orig)
        rles.extend(_rle(m[:, 0] >= MASK_THRESHOLD))
    return rles


def to_coco_results(outputs, targets, categories, mask_chunk=16):
    """outputs: the model's eval outputs for a batch; targets: the batch's targets (need "image_id",
    "image_size" (h, w) of the resized image, "orig_size" (H0, W0)); categories: the manifest's
    [{"id", "name"}] sorted by id (label l -> categories[l - 1]["id"]). Returns (bbox results, segm
    results): lists of {"image_id", "category_id", "bbox" [x, y, w, h] | "segmentation" RLE, "score"}
    with boxes scaled to the original image and masks resized to it (bilinear) and cut at 0.5; outputs
    of a detector built with mmdet_compat carry "masks_28", which are pasted at the original size
    directly, as mmdet does."""
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    cat_ids = [int(c["id"]) for c in categories]
    bbox_res, segm_res = [], []
    for out, tgt in zip(outputs, targets):
        for field in ("image_id", "image_size", "orig_size"):
            if field not in tgt:
                raise KeyError(f"target of image {tgt.get('image_id', tgt.get('key', '?'))} has no {field!r}")
        image_id = int(tgt["image_id"])
        size = tuple(int(v) for v in tgt["image_size"])
        orig = tuple(int(v) for v in tgt["orig_size"])
        labels = out["labels"].detach().cpu().long()
        if labels.numel() and (labels.min() < 1 or labels.max() > len(cat_ids)):
            raise ValueError(f"image {image_id}: labels outside 1..{len(cat_ids)}: {labels.unique().tolist()}")
        scores = out["scores"].detach().cpu().float().tolist()
        cats = [cat_ids[i - 1] for i in labels.tolist()]
        boxes = _scaled_boxes(out["boxes"].detach().cpu().double(), size, orig)
        for b, c, s in zip(boxes.tolist(), cats, scores):
            bbox_res.append({"image_id": image_id, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                             "score": s})
        if "masks_28" in out:  # mmdet_compat: paste the 28x28 probabilities at the original size, as mmdet
            rles = _rles_from_small(out["masks_28"].detach(), boxes, orig, mask_chunk)
        elif "masks" in out:
            rles = _rles_from_resized(out["masks"].detach(), size, orig, image_id, mask_chunk)
        else:
            continue
        for r, c, sc in zip(rles, cats, scores):
            segm_res.append({"image_id": image_id, "category_id": c, "segmentation": r, "score": sc})
    return bbox_res, segm_res


def _evaluate(gt, results, iou_type, log):
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes refuses an empty list; no detections means zero AP/AR
        return {n: 0.0 for n in STAT_NAMES}, ""
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iou_type)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):  # pycocotools prints progress; keep the summary for the log
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log(f"COCO {iou_type}:\n" + "\n".join(l for l in text.getvalue().splitlines() if l.startswith(" Average")))
    # COCO %, as the paper's tables; -1 (no ground truth of that size) stays -1
    return {n: (float(v) * 100 if v >= 0 else -1.0) for n, v in zip(STAT_NAMES, ev.stats)}, text.getvalue()


def coco_evaluate(gt_json_path, bbox_results, segm_results, log=print):
    """COCO box and mask AP of the results against the ground-truth file (pycocotools' COCOeval, all
    images of the file). Returns {"bbox_AP", "segm_AP" (COCO %, 0-100), "bbox": {12 stats by name},
    "segm": {...}} with every stat in % (-1 where the file has no ground truth of that size)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json_path))
    known = set(gt.getImgIds())
    for kind, res in (("bbox", bbox_results), ("segm", segm_results)):
        stray = {r["image_id"] for r in res} - known
        if stray:
            raise ValueError(f"{gt_json_path}: {kind} results for image ids not in the file: {sorted(stray)[:8]}")
    # Copies: COCO.loadRes adds numpy "area"/"bbox" fields to the dicts it is given, which would
    # leave the caller's results no longer JSON-writable.
    bbox, _ = _evaluate(gt, [dict(r) for r in bbox_results], "bbox", log)
    segm, _ = _evaluate(gt, [dict(r) for r in segm_results], "segm", log)
    return {"bbox_AP": bbox["AP"], "segm_AP": segm["AP"], "bbox": bbox, "segm": segm}


def masks_to_tensor(rles, height, width):
    """COCO RLEs -> (N, H, W) bool tensor (for tests and visualisation)."""
    from pycocotools import mask as mask_utils

    if not rles:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(mask_utils.decode(list(rles))).permute(2, 0, 1).bool()
