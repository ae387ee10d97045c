"""The shard contract between augment and the stages that read images as arrays.

data/augmented/ holds index.json ({"image_size", "seed", "splits": {split: {"images", "shards",
...}}}) and, per split, uncompressed .npz shards with images (uint8 NHWC), labels and image_ids.
Readers of shards never decode an image file. An image_id is a real image's id, or, for one of
augment's oversampled copies, its source's id + "+aug<k>" (`copy_id`, `is_copy`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import StageError
from stages.files import read_json

COPY_MARK = "+aug"


def copy_id(source_id: str, k: int) -> str:
    """The image_id of copy k (within its class) of real image `source_id`."""
    return f"{source_id}{COPY_MARK}{k}"


def is_copy(image_id: str) -> bool:
    """True for augment's oversampled copies, False for real images."""
    return COPY_MARK in str(image_id)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:03d}.npz"


def write_shards(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 image_ids: np.ndarray, shard_images: int) -> list[str]:
    """Write one split as a few uncompressed .npz shards (images uint8 NHWC, labels, image_ids)."""
    names = []
    for k, start in enumerate(range(0, max(len(images), 1), shard_images)):
        name = shard_name(split, k)
        stop = start + shard_images
        with open(Path(folder) / name, "wb") as f:
            np.savez(f, images=images[start:stop], labels=labels[start:stop],
                     image_ids=np.asarray(image_ids[start:stop], dtype=str))
        names.append(name)
    return names


def read_shards(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one split written by augment: (images uint8 NHWC, labels int64, image_ids str)."""
    folder = Path(folder)
    index = read_index(folder)
    if split not in index["splits"]:
        raise StageError(f"{folder / 'index.json'}: no split '{split}'")
    parts = []
    for name in index["splits"][split]["shards"]:
        path = folder / name
        try:
            with np.load(path, allow_pickle=False) as z:
                parts.append((z["images"], z["labels"].astype(np.int64), z["image_ids"]))
        except (OSError, ValueError, KeyError) as err:
            raise StageError(f"{path}: unreadable shard ({err}); re-run: dvc repro augment") from None
    images, labels, ids = (np.concatenate(p) for p in zip(*parts))
    size = index["image_size"]
    if images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise StageError(f"{folder}: {split} images are {images.shape[1:]} {images.dtype}, "
                         f"index.json says ({size}, {size}, 3) uint8")
    return images, labels, ids


def read_index(folder: Path) -> dict[str, Any]:
    """data/augmented/index.json: image size, seed, and each split's shards."""
    return read_json(Path(folder) / "index.json", made_by="augment")
