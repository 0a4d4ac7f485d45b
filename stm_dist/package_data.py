"""Where the files shipped with stm_dist live: the recipes (configs/), the DeepSpeed configs
(ds_configs/) and the sweep files (sweeps/).

In a source checkout (and its editable install) they are the top-level folders beside
`stm_dist/`; a wheel carries copies inside the package (`stm_dist/configs/` ...; setup.py maps
the folders there). Paths such as `configs/unified_swin_tiny.yaml` in recipes, sweep files and
scripts therefore resolve the same way from any directory: from the working directory if the
file is there, else from the package's copy, else from the source checkout.
"""
from __future__ import annotations

import difflib
import glob
import os

FOLDERS = ("configs", "ds_configs", "sweeps")
_PKG = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_PKG)


def _roots() -> list[str]:
    """Folders that may hold FOLDERS: the installed package, then the source checkout (only when
    this package is imported from one: a site-packages parent is nobody's checkout)."""
    roots = [_PKG]
    if os.path.isfile(os.path.join(_CHECKOUT, "setup.py")):
        roots.append(_CHECKOUT)
    return roots


def folder(name: str) -> str | None:
    """The shipped folder `name` (one of FOLDERS), or None when this install has none."""
    for root in _roots():
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def shipped(path: str) -> str | None:
    """The shipped file or folder a relative path such as `ds_configs/zero1_bf16.json` names, or
    None. Only paths inside FOLDERS are looked up (a missing data path stays missing)."""
    if os.path.isabs(path):
        return None
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] not in FOLDERS or ".." in parts:
        return None
    for root in _roots():
        candidate = os.path.join(root, *parts)
        if os.path.exists(candidate):
            return candidate
    return None


def resolve(path: str) -> str:
    """An absolute path: `path` itself when it exists (relative to the working directory), else
    the shipped file it names, else `path` made absolute (the caller reports it missing)."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return shipped(path) or os.path.abspath(path)


def _yaml_files(where: str) -> list[str]:
    """The YAML files of a shipped folder and of its subfolders (configs/detection/), top level first."""
    return sorted(glob.glob(os.path.join(where, "*.yaml"))) + sorted(glob.glob(os.path.join(where, "*", "*.yaml")))


def names(name: str) -> list[str]:
    """The names of the shipped YAML files in FOLDERS' `name` (recipe or sweep names), those of
    its subfolders included (the detection recipes: `mask_rcnn_unified_swin_tiny_1x`)."""
    where = folder(name)
    if where is None:
        return []
    return sorted({os.path.splitext(os.path.basename(p))[0] for p in _yaml_files(where)})


def find_named(arg: str, kind: str) -> str | None:
    """A bare name (`unified_swin_tiny`, or `unified_swin_tiny.yaml` with no folder) of a YAML
    file in the shipped folder `kind` or one of its subfolders (a top-level file wins); None
    when `arg` is a path or no such file is shipped."""
    if os.sep in arg or (os.altsep and os.altsep in arg):
        return None
    stem = arg[:-5] if arg.endswith(".yaml") else arg[:-4] if arg.endswith(".yml") else arg
    where = folder(kind)
    if where is None:
        return None
    for path in _yaml_files(where):
        if os.path.basename(path) == stem + ".yaml":
            return path
    return None


def close_names(arg: str, kind: str, n: int = 5) -> list[str]:
    stem = os.path.splitext(os.path.basename(arg))[0]
    return difflib.get_close_matches(stem, names(kind), n=n, cutoff=0.5)
