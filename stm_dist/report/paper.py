"""What the paper published, and how model names map onto its table (spec §3, §4, §8)."""
from __future__ import annotations

import re

MIXERS = ("halo", "pvt", "swin", "convnext", "dcn_v3")
MIXER_TITLES = {"halo": "U-HaloNet", "pvt": "U-PVT", "swin": "U-Swin", "convnext": "U-ConvNeXt",
                "dcn_v3": "U-InternImage"}
SIZES = ("micro", "tiny", "small", "base")
SIZE_TITLES = {"micro": "Micro (~4.5M)", "tiny": "Tiny (~30M)", "small": "Small (~50M)",
               "base": "Base (~100M)"}

# ImageNet-1k top-1 (%) at 224 px after 300 epochs, from the original README (spec §8).
PAPER_TOP1 = {
    ("micro", "halo"): 75.8, ("micro", "pvt"): 72.8, ("micro", "swin"): 74.4,
    ("micro", "convnext"): 75.1, ("micro", "dcn_v3"): 75.3,
    ("tiny", "halo"): 83.0, ("tiny", "pvt"): 82.1, ("tiny", "swin"): 82.3,
    ("tiny", "convnext"): 82.2, ("tiny", "dcn_v3"): 83.3,
    ("small", "halo"): 84.0, ("small", "pvt"): 83.2, ("small", "swin"): 83.3,
    ("small", "convnext"): 83.1, ("small", "dcn_v3"): 84.1,
    ("base", "halo"): 84.6, ("base", "pvt"): 83.4, ("base", "swin"): 83.7,
    ("base", "convnext"): 83.7, ("base", "dcn_v3"): 84.5,
}

# COCO val2017 box AP / mask AP (%) of the released Mask R-CNN 1x detectors (the original's
# detection/readme.md; issue 21).
PAPER_COCO = {
    ("micro", "halo"): (40.3, 37.3), ("micro", "pvt"): (35.9, 34.2), ("micro", "swin"): (36.6, 34.6),
    ("micro", "convnext"): (39.2, 36.4), ("micro", "dcn_v3"): (39.5, 36.6),
    ("tiny", "halo"): (46.9, 42.4), ("tiny", "pvt"): (44.2, 40.6), ("tiny", "swin"): (44.3, 40.5),
    ("tiny", "convnext"): (44.3, 40.5), ("tiny", "dcn_v3"): (47.2, 42.5),
    ("small", "halo"): (48.2, 43.3), ("small", "pvt"): (46.1, 41.9), ("small", "swin"): (46.4, 42.1),
    ("small", "convnext"): (45.6, 41.2), ("small", "dcn_v3"): (47.8, 43.0),
    ("base", "halo"): (49.0, 43.8), ("base", "pvt"): (46.4, 42.3), ("base", "swin"): (47.0, 42.2),
    ("base", "convnext"): (46.7, 42.2), ("base", "dcn_v3"): (48.7, 43.8),
}

_NAME = re.compile(r"^unified_(halo|pvt|swin|convnext|dcn_v3)_(micro|tiny|small|base)$")
# Any registered mixer's model (stm_dist.models.register_mixer): unified_<mixer>_<size>, where a
# size has no '_'. Read from the name, so a report needs no mixer file loaded.
_ANY = re.compile(r"^unified_([a-z][a-z0-9_]*[a-z0-9])_([a-z0-9]+)$")
_ALIASES = {"halonet": "halo", "internimage": "dcn_v3"}  # the release files' mixer names


def mixer_and_size(model_name: str) -> tuple[str, str] | None:
    """('swin', 'tiny') for 'unified_swin_tiny', ('pool', 'micro') for a registered mixer's
    'unified_pool_micro'; None for names outside the unified_<mixer>_<size> scheme."""
    m = _NAME.match(model_name) or _ANY.match(model_name)
    return (_ALIASES.get(m.group(1), m.group(1)), m.group(2)) if m else None


def in_paper(model_name: str) -> bool:
    """One of the paper's 20 models (5 mixers x 4 sizes)."""
    key = mixer_and_size(model_name)
    return key is not None and (key[1], key[0]) in PAPER_TOP1


def mixer_title(mixer: str) -> str:
    """'U-Swin' for the paper's mixers; a registered mixer is labelled by its own name."""
    return MIXER_TITLES.get(mixer, mixer)


def order_key(model_name: str) -> tuple:
    """Sizes in the paper's order, mixers in its order, registered mixers after them."""
    key = mixer_and_size(model_name)
    if key is None:
        return (99, 99, "", model_name)
    mixer, size = key
    size_i = SIZES.index(size) if size in SIZES else len(SIZES)
    mixer_i = MIXERS.index(mixer) if mixer in MIXERS else len(MIXERS)
    return (size_i, mixer_i, mixer, model_name)


def paper_top1(model_name: str) -> float | None:
    key = mixer_and_size(model_name)
    return PAPER_TOP1.get((key[1], key[0])) if key else None


def paper_coco(model_name: str) -> tuple[float, float] | None:
    """(box AP, mask AP) of the paper's Mask R-CNN 1x on `model_name`'s backbone, or None."""
    key = mixer_and_size(model_name)
    return PAPER_COCO.get((key[1], key[0])) if key else None
