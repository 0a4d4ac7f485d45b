"""The DALI graphs: train (random-resized-crop decode, flip, RandAugment, normalise) and val.

``device='gpu'`` decodes with nvJPEG (``mixed``) and keeps the images on the GPU; ``'cpu'``
runs the very same graph on the CPU. Labels stay as the ``.cls`` bytes (ASCII digits), padded
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


def _read(paths, index_paths, *, shard_id, num_shards, shuffle, shuffle_buffer, reader_seed, pad_last_batch, stick):
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=stick,
        pad_last_batch=pad_last_batch,
        seed=reader_seed,
        name="reader",
    )


def _labels(cls):
    return fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])


@pipeline_def(enable_conditionals=True)
def train_pipeline(paths, index_paths, *, shard_id, num_shards, img_size, device, randaug, shuffle_buffer, reader_seed):
    from stm_dist.data.dali_randaug import rand_augment_timm

    jpg, cls = _read(paths, index_paths, shard_id=shard_id, num_shards=num_shards, shuffle=True,
                     shuffle_buffer=shuffle_buffer, reader_seed=reader_seed, pad_last_batch=False, stick=True)
    # Decoding only the random crop window saves most of the decode work on large images.
    images = fn.decoders.image_random_crop(
        jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
        random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
    )
    images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC, antialias=True)
    if randaug:
        images = rand_augment_timm(images, img_size=img_size)
    # timm flips before RandAugment; flipping after is the same distribution (every geometric op
    # has a random sign) and folds the flip into the normalisation pass.
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
        mirror=fn.random.coin_flip(probability=0.5),
    )
    return images, _labels(cls)


@pipeline_def
def val_pipeline(paths, index_paths, *, shard_id, num_shards, img_size, resize_size, device):
    jpg, cls = _read(paths, index_paths, shard_id=shard_id, num_shards=num_shards, shuffle=False,
                     shuffle_buffer=1, reader_seed=0, pad_last_batch=True, stick=True)
    images = fn.decoders.image(jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
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
