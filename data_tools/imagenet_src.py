"""Read a source data set into (path, label) records.

Two layouts are understood:

* the original ImageNet layout: ``ROOT/meta/{split}.txt`` with lines ``relative/path.JPEG label``
  and the files under ``ROOT/{split}/``. Class names come from the folders of ``meta/train.txt``
  for every split: ImageNet's ``val.txt`` is flat (``ILSVRC2012_val_00000001.JPEG 65``), so on
  its own it would name classes "0".."999" where train names them by wnid;
* plain class folders: ``ROOT/{split}/{class}/*``. Classes are the sorted folder names of
  ``ROOT/train`` when it exists (so train and val agree on the mapping), else of the split itself.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


class SourceError(ValueError):
    """The source folder cannot be read as a data set; the message names the file at fault."""


@dataclass(frozen=True)
class Record:
    rel: str  # path relative to ROOT/{split}, as written in meta/ or found on disk
    label: int


@dataclass
class Source:
    root: str
    split: str
    layout: str  # "imagenet-meta" | "class-folders"
    records: list[Record]
    classes: list[str]

    def path_of(self, rec: Record) -> str:
        return os.path.join(self.root, self.split, rec.rel)

    def fingerprint(self) -> str:
        """Hash of the record list: a resumed run must be writing the same data set."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.rel}\t{r.label}\n".encode())
        return h.hexdigest()


def _folder_names(records: list[Record]) -> dict[int, str]:
    """label -> its folder, for labels whose samples all live in one folder of their own."""
    names: dict[int, set[str]] = {}
    for r in records:
        names.setdefault(r.label, set()).add(r.rel.split("/", 1)[0] if "/" in r.rel else "")
    out = {c: next(iter(n)) for c, n in names.items() if len(n) == 1 and "" not in n}
    if len(set(out.values())) != len(out):
        return {}
    return out


def _read_meta(root: str, split: str) -> Source:
    meta = os.path.join(root, "meta", f"{split}.txt")
    records = []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise SourceError(f"{meta}:{lineno}: expected '<relative path> <int label>', got {line!r}")
            label = int(parts[1])
            if label < 0:
                raise SourceError(f"{meta}:{lineno}: negative label {label}")
            records.append(Record(parts[0], label))
    if not records:
        raise SourceError(f"{meta}: no samples listed")
    num_classes = max(r.label for r in records) + 1
    # Name classes after their folder when every label lives in exactly one folder (ImageNet
    # wnids); otherwise the label number is the only name there is.
    names = _folder_names(records)
    classes = [names.get(c, str(c)) for c in range(num_classes)]
    if len(set(classes)) != len(classes):
        classes = [str(c) for c in range(num_classes)]
    train_meta = os.path.join(root, "meta", "train.txt")
    if split != "train" and os.path.isfile(train_meta):
        # The train split defines the label -> name mapping; this split must agree with it.
        train = _read_meta(root, "train")
        by_label = {}
        for r in records:
            by_label.setdefault(r.label, r)
        for c in sorted(by_label):
            if c >= len(train.classes):
                raise SourceError(f"{meta}: label {c} (e.g. {by_label[c].rel}) is not a class of {train_meta}, "
                                  f"which has {len(train.classes)} classes")
            if c in names and names[c] != train.classes[c] and train.classes[c] != str(c):
                raise SourceError(f"{meta}: label {c} is folder {names[c]!r} here but {train.classes[c]!r} in "
                                  f"{train_meta} (e.g. {by_label[c].rel}); the two splits disagree on the classes")
        classes = train.classes
    return Source(root, split, "imagenet-meta", records, classes)


def _list_classes(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _read_class_folders(root: str, split: str) -> Source:
    split_dir = os.path.join(root, split)
    train_dir = os.path.join(root, "train")
    classes = _list_classes(train_dir if os.path.isdir(train_dir) else split_dir)
    if not classes:
        raise SourceError(f"{split_dir}: no class folders found")
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for c in _list_classes(split_dir):
        if c not in index:
            raise SourceError(f"{os.path.join(split_dir, c)}: class folder not present in {train_dir}")
        for dirpath, dirnames, files in os.walk(os.path.join(split_dir, c)):
            dirnames.sort()
            for name in sorted(files):
                if not name.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, name), split_dir)
                    records.append(Record(rel.replace(os.sep, "/"), index[c]))
    if not records:
        raise SourceError(f"{split_dir}: class folders hold no files")
    return Source(root, split, "class-folders", records, classes)


def read_source(root: str, split: str) -> Source:
    """Records of ``split`` under ``root``, in a deterministic order (meta file order, or sorted)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise SourceError(f"--src {root}: not a directory")
    if os.path.isfile(os.path.join(root, "meta", f"{split}.txt")):
        return _read_meta(root, split)
    if os.path.isdir(os.path.join(root, split)):
        return _read_class_folders(root, split)
    raise SourceError(
        f"--src {root}: neither {root}/meta/{split}.txt (ImageNet layout) nor {root}/{split}/<class>/ "
        f"nor {root}/annotations/instances_{split}.json (COCO layout) found"
    )
