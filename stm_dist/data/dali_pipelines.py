"""The DALI graphs: train (crop-window decode, resize, RandAugment, flip, normalise) and val.

``device='gpu'`` decodes with nvJPEG (``mixed``) and keeps the images on the GPU; ``'cpu'``
runs the very same graph on the CPU. Train labels come from the host (the plan's reader);
val labels stay as the ``.cls`` bytes (ASCII digits), padded
to a fixed width so batches stack; :func:`labels_from_ascii` turns them into int64. (Casting in
DALI would go through floats, which round, and cannot parse variable-length text.)
"""
from __future__ import annotations

import torch
from nvidia.dali import fn, pipeline_def, types

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
LABEL_BYTES = 8  # up to 8 ASCII digits per label
WARP_FROM = 384  # val: resize shorter side + centre crop below this size, square warp from it


# nvJPEG hints for the mixed decoder: buffers sized for ImageNet's largest JPEGs up front (no
# re-allocation during the first epochs), and the share of images sent to the A100/H100 hardware
# JPEG decoder (the rest go to the CUDA decoder). CPU decoding ignores them.
NVJPEG_HINTS = dict(device_memory_padding=211025920, host_memory_padding=140544512, hw_decoder_load=0.65)


def _decoder_args(device):
    # Fancy (smooth) chroma upsampling: libjpeg's default, which the original decoded with (PIL).
    args = dict(device="mixed" if device == "gpu" else "cpu", output_type=types.RGB, jpeg_fancy_upsampling=True)
    if device == "gpu":
        args.update(NVJPEG_HINTS)
    return args


def _labels(cls):
    return fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, *, img_size, device, randaug, parallel=False):
    """One pipeline for the whole run: `source` (plan_source.PlanSource) supplies each sample's
    bytes, label and random choices; nothing here draws random numbers."""
    from nvidia.dali.auto_aug.core import signed_bin

    from stm_dist.data.dali_randaug import apply_rand_augment

    dtypes = [types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32] + [types.INT32] * (3 if randaug else 0)
    jpg, labels, anchor, shape, flip, *ra = fn.external_source(source=source, num_outputs=len(dtypes), batch=True,
                                                                parallel=parallel, batch_info=parallel, dtype=dtypes)
    # Decoding only the crop window saves most of the decode work on large images.
    images = fn.decoders.image_slice(jpg, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                     axis_names="WH", **_decoder_args(device))
    images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC, antialias=True)
    if randaug:
        ops, bins, signs = ra
        images = apply_rand_augment(images, ops, signed_bin(bins, random_sign=signs), img_size=img_size)
    # timm flips before RandAugment; flipping after is the same distribution (every geometric op
    # has a random sign) and folds the flip into the normalisation pass.
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                      mirror=flip)
    return images, labels


@pipeline_def
def val_pipeline(paths, index_paths, *, shard_id, num_shards, img_size, resize_size, device, dont_use_mmap=False):
    jpg, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=False, shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
        dont_use_mmap=dont_use_mmap, name="reader",
    )
    images = fn.decoders.image(jpg, **_decoder_args(device))
    if img_size >= WARP_FROM:
        # The original (timm's eval transform) warps to a square from 384 px up: no crop.
        images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC,
                           antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD)
        return images, _labels(cls)
    images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_CUBIC, antialias=True)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(img_size, img_size),
        crop_pos_x=0.5, crop_pos_y=0.5, mean=MEAN, std=STD,
    )
    return images, _labels(cls)


def labels_from_ascii(raw: torch.Tensor) -> torch.Tensor:
    """(B, LABEL_BYTES) uint8 of ASCII digits padded with zeros -> (B,) int64, exactly."""
    raw = raw.to(torch.int64)
    digit = (raw >= 48) & (raw <= 57)
    out = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)
    for j in range(raw.shape[1]):
        out = torch.where(digit[:, j], out * 10 + (raw[:, j] - 48), out)
    bad = ~digit.any(dim=1) | ((raw != 0) & ~digit & (raw != 10) & (raw != 32)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"a .cls member is not an ASCII integer: bytes {raw[row].tolist()}")
    return out
