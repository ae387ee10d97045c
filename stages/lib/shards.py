"""The shard contract between augment and the stages that read images as arrays.

data/augmented/ holds index.json ({"image_size", "seed", "splits": {split: {"images",
"class_counts", "shards", "plan"?}}}) and, per split, uncompressed .npz shards of `images`
(uint8 NHWC), `labels` and `image_ids`: each real image once (`read_images`). A split with a
"plan" (train: augment's oversampling) also has {split}-plan.npy: for each example, in the order
train reads them, the row of its image, so an image listed k times is read k times. A split
without one is read in stored order. `read_shards` gives the examples, `sample_images` the one
seeded sample of a split's images. Invariant: readers never decode an image file; a damaged
shard, plan or index is an error naming it.
Why: images are decoded and resized once, so an epoch reads memory, not JPEGs: docs/scaling.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.cli import StageError
from stages.lib.files import read_json


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:03d}.npz"


def plan_name(split: str) -> str:
    return f"{split}-plan.npy"


def write_shards(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, image_ids: np.ndarray,
                 shard_images: int, plan: np.ndarray | None = None) -> tuple[list[str], str | None]:
    """Write one split's images as uncompressed .npz shards of `shard_images` images each, and its
    `plan` if given (see module docstring); returns the shard names and the plan's file name."""
    names = []
    for k, start in enumerate(range(0, max(len(images), 1), shard_images)):
        name = shard_name(split, k)
        stop = start + shard_images
        with open(Path(folder) / name, "wb") as f:
            np.savez(f, images=images[start:stop], labels=labels[start:stop],
                     image_ids=np.asarray(image_ids[start:stop], dtype=str))
        names.append(name)
    if plan is None:
        return names, None
    with open(Path(folder) / plan_name(split), "wb") as f:
        np.save(f, np.asarray(plan, np.int64), allow_pickle=False)
    return names, plan_name(split)


def _index_with(folder: Path, split: str) -> dict[str, Any]:
    """index.json, which must list `split`."""
    index = read_index(folder)
    if split not in index["splits"]:
        raise StageError(f"{folder / 'index.json'}: no split '{split}'")
    return index


def read_images(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One split's images, each once, in stored order: (images uint8 NHWC, labels int64, image_ids str)."""
    folder = Path(folder)
    index = _index_with(folder, split)
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


def read_plan(folder: Path, split: str, images: int) -> np.ndarray | None:
    """The split's plan (the row of each example, in reading order), checked against its `images`
    stored images; None for a split read in stored order."""
    folder = Path(folder)
    name = _index_with(folder, split)["splits"][split].get("plan")
    if name is None:
        return None
    path = folder / name
    try:
        plan = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: unreadable plan ({err}); re-run: dvc repro augment") from None
    if plan.ndim != 1 or plan.dtype.kind not in "iu" or (len(plan) and not 0 <= plan.min() <= plan.max() < images):
        raise StageError(f"{path}: not a list of rows of the {images} stored {split} images; "
                         "re-run: dvc repro augment")
    return plan


def read_shards(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One split's examples in the order train reads them (its plan; else each image once, in
    stored order): (images uint8 NHWC, labels int64, image_ids str), one entry per example."""
    images, labels, ids = read_images(folder, split)
    plan = read_plan(folder, split, len(images))
    if plan is None:
        return images, labels, ids
    return images[plan], labels[plan], ids[plan]


def sample_rows(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct rows of `n` stored images (all, when fewer), drawn with `seed`, in increasing
    order: the one seeded sample of real training images (evaluate's out-of-distribution fit,
    export's int8 calibration)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))


def sample_images(folder: Path, split: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `count` of the split's images (each once), drawn with `seed` (`sample_rows`)."""
    images, labels, _ = read_images(folder, split)
    rows = sample_rows(len(images), count, seed)
    return images[rows], labels[rows]


def read_index(folder: Path) -> dict[str, Any]:
    """data/augmented/index.json: image size, seed, and each split's shards, class counts and plan."""
    return read_json(Path(folder) / "index.json", made_by="augment")
