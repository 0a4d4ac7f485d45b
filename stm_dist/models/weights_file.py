"""Reading a weights file (.pth / .safetensors) and what it says about itself.

`read_file(path)` gives the checkpoint object; `describe(path)` only what the file knows about
the weights (the model it holds, timm's pretrained_cfg: input size, crop, class count) without
reading the tensors. A file that cannot be used is one CheckpointError naming the path, what the
file is (text, an HTML page, a Git LFS pointer, a truncated archive, ...) and why it fails.
"""
import argparse
import json
import os
import struct

import torch

__all__ = ["CheckpointError", "read_file", "describe", "classifier_rows", "DATA_KEYS"]

# The pretrained_cfg entries that describe the weights' data (timm's resolve_data_config and
# the class count): a file that records them is evaluated and configured with them.
DATA_KEYS = ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode", "interpolation",
             "mean", "std", "num_classes", "pool_size")
META_PREFIX = "stm_dist."  # stm-export's safetensors metadata keys


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message names the keys at fault."""


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("1", "true", "yes"))


def _what_is(path: str) -> str:
    """What the bytes of a file that failed to load look like, for the error message."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        with open(path, "rb") as f:  # a whole zip ends with its end-of-central-directory record
            f.seek(max(0, size - 65557))
            whole = b"PK\x05\x06" in f.read()
        return f"a zip archive of {size} bytes (torch.save's format)" + ("" if whole else " that is truncated or damaged")
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them: git lfs pull)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not weights (a failed download?)"
    if head[:1] == b"\x80":
        return f"a pickle of {size} bytes (torch's legacy format)"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if printable == len(head):
        first = head.decode("ascii").splitlines()[0][:40] if head.strip() else ""
        return f"a text file starting {first!r} ({size} bytes)"
    return f"{size} bytes of unknown data starting {head[:8].hex(' ')}"


def _safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file, after checking that the file holds every byte the
    header describes (a copy cut short otherwise fails deep inside the reader)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise CheckpointError(f"{path}: cannot be read as a safetensors file: it is {_what_is(path)}")
        (n,) = struct.unpack("<Q", first)
        if 8 + n > size:
            raise CheckpointError(f"{path}: cannot be read as a safetensors file: truncated, {size} of at least "
                                  f"{8 + n} bytes (the header alone is longer than the file); copy or download it again")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: cannot be read as a safetensors file: its header is not JSON ({e}); "
                                  f"it is {_what_is(path)}") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    want = 8 + n + max(ends, default=0)
    if size < want:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file: truncated, {size} of {want} bytes "
                              "(the header describes more tensor data than the file holds); copy or download it again")
    return header


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file opens with an 8-byte header length and a JSON header: '{'.
    return path.endswith(".safetensors") or (len(head) > 8 and head[8:9] == b"{")


def _torch_load(path: str, mmap: bool = False):
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named and described
            what = _what_is(path)
            # torch's own words only help for a file that is a checkpoint's container at all
            # (for text it says things like "KeyError: 101", the byte it choked on).
            why = f" ({type(e).__name__}: {e})" if what.startswith(("a zip", "a pickle")) else ""
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: it is {what}{why}") from e


def _sidecar(path: str) -> dict:
    """stm-export's (and best.pth's) description beside the file ({} when there is none)."""
    try:
        with open(path + ".json") as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _named_model(obj, meta: dict):
    """The model a checkpoint names: stm-export's metadata, or the original release's args."""
    name = meta.get(f"{META_PREFIX}model")
    if name is None and isinstance(obj, dict):
        name = obj.get("model") if isinstance(obj.get("model"), str) else None
        args = obj.get("args")
        if name is None and isinstance(args, argparse.Namespace):
            name = getattr(args, "model", None)
    return name if isinstance(name, str) and name else None


def read_file(path: str):
    """(checkpoint object, is an EMA export, the model the file names or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    side = _sidecar(path)
    is_ema = _truthy(side.get("ema"))
    if _is_safetensors(path):
        _safetensors_header(path)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                obj = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read as a safetensors file: {e}") from e
        return obj, is_ema or _truthy(meta.get(f"{META_PREFIX}ema")), _named_model(obj, meta) or side.get("model")
    obj = _torch_load(path)
    return obj, is_ema, _named_model(obj, {}) or side.get("model")


def classifier_rows(sd) -> "int | None":
    """The class count of a state dict's classifier (`head.weight` rows, DDP/compile prefixes
    allowed); None without one."""
    if not isinstance(sd, dict):
        return None
    for prefix in ("", "module.", "_orig_mod.", "module._orig_mod."):
        w = sd.get(prefix + "head.weight")
        if torch.is_tensor(w) and w.dim() == 2:
            return int(w.shape[0])
    return None


def describe(path: str) -> dict:
    """What a weights file knows about its weights, read without the tensors: {'model': the
    registered name it names or None, 'pretrained_cfg': its timm pretrained_cfg ({} if none),
    'num_classes': the classifier's row count (None without a classifier)}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    side = _sidecar(path)
    cfg = side.get("pretrained_cfg") if isinstance(side.get("pretrained_cfg"), dict) else {}
    if _is_safetensors(path):
        header = _safetensors_header(path)
        meta = header.get("__metadata__") or {}
        try:
            cfg = json.loads(meta[f"{META_PREFIX}pretrained_cfg"])
        except (KeyError, ValueError):
            pass
        shape = (header.get("head.weight") or {}).get("shape")
        rows = int(shape[0]) if isinstance(shape, list) and len(shape) == 2 else None
        model = _named_model(None, meta)
    else:
        # Memory-mapped: only the classifier's bytes are touched (a legacy pickle reads it all).
        try:
            obj = _torch_load(path, mmap=True)
        except CheckpointError:
            obj = _torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("pretrained_cfg"), dict):
            cfg = obj["pretrained_cfg"]
        inner = next((obj[k] for k in ("model", "module", "state_dict") if isinstance(obj, dict)
                      and isinstance(obj.get(k), dict)), obj)
        rows = classifier_rows(inner)
        model = _named_model(obj, {})
    cfg = dict(cfg or {})
    if rows is not None:
        cfg["num_classes"] = rows  # the tensor is the truth about the class count
    return {"model": model or side.get("model"), "pretrained_cfg": cfg, "num_classes": rows}
