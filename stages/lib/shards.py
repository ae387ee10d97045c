"""The shard contract between augment and the stages that read images as arrays.

data/augmented/ holds index.json ({"image_size", "seed", "splits": {split: {"images", "shards",
...}}}) and, per split, uncompressed .npz shards. A split is a list of rows (label, image_id,
pixels). Rows with the same pixels (augment's repeated copies) share one stored image, so each
shard holds its rows' `labels`, `image_ids` and `stored` (the index of each row's image among the
split's stored images) and `images`: the stored images (uint8 NHWC) whose first row falls in the
shard. `read_shards` gives every row its pixels back. An image_id is a real image's id, or, for
one of augment's oversampled copies, its source's id + "+aug<k>" (`copy_id`, `is_copy`).
Invariant: readers never decode an image file; a damaged shard or index is an error naming it.
Why: images are decoded and resized once, so an epoch reads memory, not JPEGs: docs/scaling.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.cli import StageError
from stages.lib.files import read_json

COPY_MARK = "+aug"


def copy_id(source_id: str, k: int) -> str:
    """The image_id of copy k (within its class) of real image `source_id`."""
    return f"{source_id}{COPY_MARK}{k}"


def is_copy(image_id: str) -> bool:
    """True for augment's oversampled copies, False for real images."""
    return COPY_MARK in str(image_id)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:03d}.npz"


def stored_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, stored): the rows whose pixels are stored (first of each distinct image, in row
    order) and, for every row, the index of its pixels among them. A hash only finds candidates:
    a row shares a stored image only if their pixels are equal, so a collision stores both."""
    first: list[int] = []
    by_digest: dict[bytes, list[int]] = {}
    stored = np.empty(len(images), np.int64)
    for row, image in enumerate(images):
        candidates = by_digest.setdefault(hashlib.blake2b(image.tobytes(), digest_size=16).digest(), [])
        k = next((k for k in candidates if np.array_equal(images[first[k]], image)), None)
        if k is None:
            k = len(first)
            first.append(row)
            candidates.append(k)
        stored[row] = k
    return np.asarray(first, np.int64), stored


def write_shards(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 image_ids: np.ndarray, shard_images: int) -> tuple[list[str], int]:
    """Write one split as a few uncompressed .npz shards of `shard_images` rows each (see module
    docstring); returns the shard names and the number of stored images."""
    first, stored = stored_images(images)
    names = []
    for k, start in enumerate(range(0, max(len(images), 1), shard_images)):
        name = shard_name(split, k)
        stop = start + shard_images
        new = first[(first >= start) & (first < stop)]  # images first needed by this shard's rows
        with open(Path(folder) / name, "wb") as f:
            np.savez(f, images=images[new], labels=labels[start:stop], stored=stored[start:stop],
                     image_ids=np.asarray(image_ids[start:stop], dtype=str))
        names.append(name)
    return names, len(first)


def read_shards(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one split written by augment, one entry per row: (images uint8 NHWC, labels int64, image_ids str)."""
    folder = Path(folder)
    index = read_index(folder)
    if split not in index["splits"]:
        raise StageError(f"{folder / 'index.json'}: no split '{split}'")
    parts = []
    for name in index["splits"][split]["shards"]:
        path = folder / name
        try:
            with np.load(path, allow_pickle=False) as z:
                parts.append((z["images"], z["labels"].astype(np.int64), z["image_ids"], z["stored"]))
        except (OSError, ValueError, KeyError) as err:
            raise StageError(f"{path}: unreadable shard ({err}); re-run: dvc repro augment") from None
    pixels, labels, ids, stored = (np.concatenate(p) for p in zip(*parts))
    if len(stored) and not 0 <= stored.min() <= stored.max() < len(pixels):
        raise StageError(f"{folder}: {split} rows point past its {len(pixels)} stored images; "
                         "re-run: dvc repro augment")
    size = index["image_size"]
    if pixels.shape[1:] != (size, size, 3) or pixels.dtype != np.uint8:
        raise StageError(f"{folder}: {split} images are {pixels.shape[1:]} {pixels.dtype}, "
                         f"index.json says ({size}, {size}, 3) uint8")
    return pixels[stored], labels, ids


def read_index(folder: Path) -> dict[str, Any]:
    """data/augmented/index.json: image size, seed, and each split's shards."""
    return read_json(Path(folder) / "index.json", made_by="augment")
