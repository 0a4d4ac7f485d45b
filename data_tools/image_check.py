"""Decode every image once at shard-writing time; hand back bytes DALI's JPEG decoders accept.

RGB and grayscale baseline/progressive JPEGs pass through byte-identical (no generation loss;
DALI's decoders and the PIL reader both turn grayscale into RGB when reading). Anything else that
decodes (PNG, CMYK JPEG, palette, 16-bit...) is re-encoded as an RGB JPEG, with its EXIF
orientation applied first (the re-encoded file carries no EXIF, so the rotation would otherwise
be lost); anything that does not decode is rejected with a reason. ImageNet has all of these: one
PNG disguised as JPEG, 22 CMYK files, a few grayscale ones.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

REENCODE_QUALITY = 95
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class BadImage(Exception):
    """The file cannot be used; str(exc) is the reason written to the manifest."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha would turn transparent areas into whatever colour
        # the file happens to store there (often black).
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Wide grayscale: scale into 8 bits instead of clipping.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
        img = Image.fromarray(a.round().astype("uint8"), "L")
    return img.convert("RGB")


def check_image(data: bytes) -> tuple[bytes, str | None, tuple[int, int]]:
    """Return (jpeg_bytes, conversion or None, (width, height)); raise BadImage if unusable."""
    if len(data) == 0:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) on some corrupt EXIF blocks; the pixels are what matter.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt, size = img.format, img.size
            passthrough = fmt == "JPEG" and img.mode in ("RGB", "L")
            if passthrough:
                # Kept bytes need only proof that they decode: libjpeg's 1/8-scale mode still
                # entropy-decodes the whole stream, every component (so truncation and corrupt
                # Huffman data are caught), but skips most of the IDCT work: ~3x faster. Asking
                # for "L" also skips the chroma IDCT, upsampling and colour conversion.
                img.draft("L", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e) or type(e).__name__
        raise BadImage(f"undecodable ({fmt or 'unknown format'}): {msg}") from None
    w, h = size
    if w == 0 or h == 0:
        raise BadImage(f"zero-sized image {w}x{h}")
    if passthrough:
        return data, None, (w, h)
    if fmt != "JPEG":
        conversion = f"format-{(fmt or 'unknown').lower()}"
    elif img.mode == "CMYK":
        conversion = "cmyk"
    elif img.mode in _GRAY_MODES:
        conversion = "grayscale"
    else:
        conversion = f"mode-{img.mode.lower()}"
    try:
        img = ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError):
        pass  # unreadable EXIF: the pixels are fine, keep them as stored
    out = io.BytesIO()
    _to_rgb(img).save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue(), conversion, (w, h)
