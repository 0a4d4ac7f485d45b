"""Read the COCO layout (``ROOT/annotations/instances_<split>.json`` + ``ROOT/<split>/<file_name>``)
into records whose label is the image's cleaned annotations, ready for the shard writer.

What is cleaned, and why (each case is named in the manifest: whole images under "skipped",
single annotations under "fixed"):

* a box partly outside its image is clipped to it ("clipped"); one entirely outside, one with
  zero width or height, one whose category is not listed, one whose segmentation cannot be read,
  one without an id or with an id already seen, one whose image_id names no image: "dropped".
  Polygon masks are kept as they are (rasterised at the image size, they are clipped by that);
* an image without annotations (after cleaning) is dropped from training splits, as mmdet's
  ``filter_empty_gt`` does, and kept in the others: COCO val keeps such images and evaluation
  counts them (false positives there lower AP). ``--empty-images`` overrides; "auto" drops them
  only when the split's name starts with "train";
* an image entry without a usable id, file name or size, or with the id or file name of an
  earlier entry, is skipped; a missing or undecodable file is skipped by the worker, as for
  classification.

The JSON itself being unreadable (malformed, no "images"/"annotations"/"categories" list, a
category without an int id or a name) stops the run with the file, line and column or key.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from data_tools.imagenet_src import SourceError

EMPTY_POLICIES = ("auto", "keep", "drop")


def annotation_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def is_coco_layout(root: str, split: str) -> bool:
    return os.path.isfile(annotation_path(os.path.abspath(root), split))


@dataclass(frozen=True)
class DetLabel:
    """What a shard worker needs of one image: the sample's JSON (written as is), the size the
    stored image must have, and annotations per category index (for the manifest's counts)."""

    json: bytes
    width: int
    height: int
    class_counts: tuple  # ((str(category index), count), ...)


@dataclass(frozen=True)
class CocoRecord:
    rel: str  # file_name, relative to ROOT/<split>
    label: DetLabel
    image_id: int


@dataclass
class CocoSource:
    root: str
    split: str
    records: list[CocoRecord]
    categories: list[dict]  # the JSON's own category entries, sorted by id
    empty_images: str  # the resolved policy: "keep" | "drop"
    skipped: list[dict] = field(default_factory=list)  # images not sharded: {"path", "reason"}
    fixed: list[dict] = field(default_factory=list)  # {"path", "annotation_id", "action", "reason"}
    meta: dict = field(default_factory=dict)  # info and licenses, copied into the ground truth
    images: dict = field(default_factory=dict)  # image id -> the JSON's image entry
    annotations: dict = field(default_factory=dict)  # image id -> cleaned annotations (with image_id)
    layout: str = "coco"
    task: str = "detection"

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def path_of(self, rec: CocoRecord) -> str:
        return os.path.join(self.root, self.split, rec.rel)

    def fingerprint(self) -> str:
        """Hash of what will be written: a resumed run must be writing the same samples."""
        h = hashlib.sha256()
        h.update(json.dumps(self.categories, sort_keys=True).encode())
        for r in self.records:
            h.update(r.rel.encode() + b"\t" + r.label.json + b"\n")
        return h.hexdigest()

    def ground_truth(self, written_ids) -> dict:
        """A COCO-format file holding exactly the written images and their cleaned annotations."""
        ids = sorted(written_ids)
        return {
            "info": self.meta.get("info", {}),
            "licenses": self.meta.get("licenses", []),
            "images": [self.images[i] for i in ids],
            "annotations": [a for i in ids for a in self.annotations[i]],
            "categories": self.categories,
        }


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{e.lineno}:{e.colno}: malformed JSON (char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror or e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _categories(data: dict, path: str) -> list[dict]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise SourceError(f"{path}: no \"categories\" list (instance annotations need one)")
    seen = set()
    for k, c in enumerate(cats):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise SourceError(f"{path}: categories[{k}] needs an int \"id\" and a str \"name\", got {c!r}"[:300])
        if c["id"] in seen:
            raise SourceError(f"{path}: categories[{k}]: id {c['id']} listed twice")
        seen.add(c["id"])
    return sorted(cats, key=lambda c: c["id"])


def _segmentation_problem(seg, w: int, h: int):
    """(cleaned segmentation, None) or (None, reason); polygons shorter than a triangle dropped."""
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_num, p))]
        if not polys:
            return None, "segmentation has no polygon of 3 or more points"
        return polys, None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if size != [h, w]:
            return None, f"RLE size {size!r} is not the image's [{h}, {w}]"
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(map(_is_int, counts)))):
            return None, "RLE counts is neither a string nor a list of ints"
        return seg, None
    return None, f"segmentation is {type(seg).__name__}, not polygons or RLE"


def _clean_annotation(a, image: dict, cat_ids: set, seen_ids: set, path: str):
    """(cleaned annotation or None, fix record or None)."""
    w, h = image["width"], image["height"]
    aid = a.get("id")

    def fix(action, reason):
        return {"path": image["file_name"], "annotation_id": aid, "action": action, "reason": reason}

    if not _is_int(aid):
        return None, fix("dropped", f"annotation id {aid!r} is not an int")
    if aid in seen_ids:
        return None, fix("dropped", f"annotation id {aid} appears twice in {os.path.basename(path)}")
    seen_ids.add(aid)
    if a.get("category_id") not in cat_ids:
        return None, fix("dropped", f"category_id {a.get('category_id')!r} is not in the categories")
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_num, box))):
        return None, fix("dropped", f"bbox {box!r} is not [x, y, w, h]")
    x, y, bw, bh = (float(v) for v in box)
    if bw <= 0 or bh <= 0:
        return None, fix("dropped", f"zero-area box {box}")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x1 <= x0 or y1 <= y0:
        return None, fix("dropped", f"box {box} lies outside the {w}x{h} image")
    seg, problem = _segmentation_problem(a.get("segmentation"), w, h)
    if problem:
        return None, fix("dropped", problem)
    out_fix = None
    if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
        clipped = [x0, y0, x1 - x0, y1 - y0]
        out_fix = fix("clipped", f"box {box} reaches outside the {w}x{h} image; clipped to {clipped}")
        x, y, bw, bh = clipped
    area = a.get("area")
    iscrowd = a.get("iscrowd", 0)
    return {
        "id": aid,
        "category_id": a["category_id"],
        "bbox": [x, y, bw, bh],
        # COCO's area is the mask's; evaluation uses it for its size ranges, so it is kept.
        "area": float(area) if _is_num(area) and area > 0 else bw * bh,
        "iscrowd": 1 if iscrowd else 0,
        "segmentation": seg,
    }, out_fix


def _images(data: dict, path: str, skipped: list) -> dict:
    images, names = {}, set()
    for k, im in enumerate(data["images"]):
        name = im.get("file_name") if isinstance(im, dict) else None
        where = name if isinstance(name, str) and name else f"images[{k}]"
        if not isinstance(im, dict) or not isinstance(name, str) or not name or not _is_int(im.get("id")):
            skipped.append({"path": where, "reason": "image entry without an int id or a file_name"})
        elif not (_is_int(im.get("width")) and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            skipped.append({"path": where, "reason": f"image size {im.get('width')!r}x{im.get('height')!r} "
                                                     f"is not two positive ints"})
        elif im["id"] in images:
            skipped.append({"path": where, "reason": f"image id {im['id']} already used by "
                                                     f"{images[im['id']]['file_name']}"})
        elif name in names:
            skipped.append({"path": where, "reason": "file_name listed twice"})
        else:
            images[im["id"]] = im
            names.add(name)
    return images


def read_coco(root: str, split: str, *, empty_images: str = "auto", strict: bool = False) -> CocoSource:
    """The images of ``split`` with their cleaned annotations, sorted by image id.

    ``strict``: an unusable image entry or a dropped annotation stops the run (SourceError)
    instead of being listed; clipping and the empty-image policy are not failures."""
    if empty_images not in EMPTY_POLICIES:
        raise SourceError(f"--empty-images must be one of {EMPTY_POLICIES}, got {empty_images!r}")
    root = os.path.abspath(root)
    path = annotation_path(root, split)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: top level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise SourceError(f"{path}: no \"{key}\" list")
    categories = _categories(data, path)
    policy = empty_images if empty_images != "auto" else ("drop" if split.startswith("train") else "keep")
    skipped, fixed = [], []
    images = _images(data, path, skipped)
    cat_index = {c["id"]: k for k, c in enumerate(categories)}
    per_image: dict[int, list] = {i: [] for i in images}
    seen_ids: set = set()
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            fixed.append({"path": None, "annotation_id": None, "action": "dropped",
                          "reason": f"annotations[{k}] is not an object"})
            continue
        image = images.get(a.get("image_id"))
        if image is None:
            fixed.append({"path": None, "annotation_id": a.get("id"), "action": "dropped",
                          "reason": f"image_id {a.get('image_id')!r} is not a usable image of {os.path.basename(path)}"})
            continue
        ann, note = _clean_annotation(a, image, cat_index.keys(), seen_ids, path)
        if note:
            fixed.append(note)
        if ann is not None:
            per_image[image["id"]].append(ann)

    if strict and (skipped or any(f["action"] == "dropped" for f in fixed)):
        what = skipped[0] if skipped else next(f for f in fixed if f["action"] == "dropped")
        name = what["path"] or "?"
        if "annotation_id" in what:
            name += f" annotation {what['annotation_id']}"
        raise SourceError(f"{path}: {name}: {what['reason']} (--strict)")
    records, kept = [], {}
    for iid in sorted(images):
        im, anns = images[iid], per_image[iid]
        if not anns and policy == "drop":
            skipped.append({"path": im["file_name"], "reason": f"no usable annotations (split {split!r} "
                                                               f"drops such images; --empty-images keep keeps them)"})
            continue
        sample = {"image_id": iid, "file_name": im["file_name"], "height": im["height"], "width": im["width"],
                  "annotations": anns}
        counts: dict[str, int] = {}
        for a in anns:
            c = str(cat_index[a["category_id"]])
            counts[c] = counts.get(c, 0) + 1
        blob = json.dumps(sample, sort_keys=True, separators=(",", ":")).encode()
        records.append(CocoRecord(im["file_name"], DetLabel(blob, im["width"], im["height"],
                                                            tuple(sorted(counts.items()))), iid))
        kept[iid] = [dict(a, image_id=iid) for a in anns]
    if not records:
        raise SourceError(f"{path}: no usable image ({len(skipped)} skipped, e.g. "
                          f"{skipped[0] if skipped else 'none listed'})")
    meta = {k: data[k] for k in ("info", "licenses") if k in data}
    return CocoSource(root, split, records, categories, policy, skipped, fixed, meta,
                      {i: images[i] for i in kept}, kept)


def fit_to_annotations(jpeg: bytes, label: DetLabel) -> tuple[bytes, str | None]:
    """The validated JPEG as it must be stored for its annotations: (bytes, conversion or None).

    Readers disagree on EXIF orientation (DALI applies it by default, PIL does not), so a JPEG
    that carries one is re-encoded upright - or as stored, when only the stored size matches
    the annotations' - without the tag, and every reader then sees the annotated pixels. A size
    that matches neither way is a wrong file: BadImage names both sizes."""
    import io

    from PIL import Image, ImageOps

    from data_tools.image_check import REENCODE_QUALITY, BadImage

    want = (label.width, label.height)
    with Image.open(io.BytesIO(jpeg)) as im:
        raw = im.size
        orient = im.getexif().get(0x0112, 1)
        if orient not in range(2, 9):  # 1, absent, or a value no reader acts on
            if raw != want:
                raise BadImage(f"image is {raw[0]}x{raw[1]}, its annotations say {want[0]}x{want[1]}")
            return jpeg, None
        upright = raw[::-1] if orient >= 5 else raw
        if upright != want and raw != want:
            raise BadImage(f"image is {upright[0]}x{upright[1]} upright ({raw[0]}x{raw[1]} stored, EXIF "
                           f"orientation {orient}), its annotations say {want[0]}x{want[1]}")
        im.load()
        pixels = ImageOps.exif_transpose(im) if upright == want else im
        out = io.BytesIO()
        pixels.convert("RGB").save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue(), "exif-orientation"
