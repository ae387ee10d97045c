"""Augment: decode and resize every image once into shards; oversample train's minority classes.

Reads data/split/{train,val,test}.csv and data/raw/images/{image_id}.jpg; writes data/augmented/
(the shard contract: stages/lib/shards.py), each image once. val and test: each image resized to
`image_size`, in the CSV's order. train: each real image resized, and a plan that lists it once
plus once per repeat; images and repeats are shuffled once together, and the images are stored in
that shuffled order. A class with `real` training images is read as

    final = max(real, min(target_per_class, max_copies_per_image * real))

examples: repeat k is real image `k mod real` of a seeded shuffle of the class (every source used
about equally). Invariant: the output bytes depend on the inputs and params only (not on the time
or the worker count). Why repeats, not transformed copies: train augments every image of every
class on-line alike, so nothing in the pixels marks a class as oversampled (docs/experiments.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, LABELS, SPLITS
from stages.lib.files import atomic_dir, atomic_write_json, read_table
from stages.lib.images import ImageError, image_file, load_image
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.progress import track, usable_cpus
from stages.lib.shards import write_shards

log = logging.getLogger("stages.augment")

# Independent random streams, all derived from augment.seed (numpy SeedSequence spawn keys;
# 1 was the retired synthetic copies' stream: the others keep their keys, and so their draws).
_SOURCE_ORDER, _TRAIN_ORDER = 0, 2


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The `augment` section of params.yaml."""

    seed: int
    image_size: int               # side of the square images train and evaluate see
    target_per_class: int         # train's minority classes are oversampled up to this many
    max_copies_per_image: int     # ...but never beyond this many images per real image
    shard_images: int             # images per .npz shard

    def __post_init__(self) -> None:
        in_range("seed", self.seed, 0)
        in_range("image_size", self.image_size, 32, 512)  # MobileNet needs at least 32x32
        in_range("target_per_class", self.target_per_class, 1)
        in_range("max_copies_per_image", self.max_copies_per_image, 1)
        in_range("shard_images", self.shard_images, 1)


# --------------------------------------------------------------------------------------------
# Which images repeat, and in what order train reads them: pure functions of the class sizes,
# the params and the seed.
# --------------------------------------------------------------------------------------------
def repeats_to_add(real: int, params: AugmentParams) -> int:
    """How many repeats a class with `real` training images gets (the module's rule)."""
    final = max(real, min(params.target_per_class, params.max_copies_per_image * real))
    return final - real


def repeat_sources(real: int, repeats: int, seed: int, label: int) -> np.ndarray:
    """For each repeat k, the index of its source among the class's `real` (> 0) real images.

    A seeded shuffle of the class, cycled: each source is used about equally, and which sources
    get the one extra repeat is not decided by the CSV's order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SOURCE_ORDER, label)))
    return rng.permutation(real)[np.arange(repeats) % real]


@dataclasses.dataclass(frozen=True)
class Job:
    """One real image, decoded once, and how many more times train reads it (its repeats)."""

    image_id: str
    path: Path
    label: int
    repeats: int = 0


def plan_jobs(table, images_dir: Path, params: AugmentParams,
              oversample: bool) -> tuple[list[Job], dict[str, int]]:
    """Jobs in the CSV's order, and the number of repeats added per class."""
    dx = table["dx"].to_numpy()
    repeats = np.zeros(len(table), np.int64)  # per CSV row
    added = {}
    for name in CLASSES:
        rows = np.flatnonzero(dx == name)
        added[name] = repeats_to_add(len(rows), params) if oversample else 0
        if added[name]:
            np.add.at(repeats, rows[repeat_sources(len(rows), added[name], params.seed, LABELS[name])], 1)
    jobs = [Job(image_id, image_file(images_dir, image_id), LABELS[name], int(repeats[row]))
            for row, (image_id, name) in enumerate(zip(table["image_id"], dx))]
    return jobs, added


def train_order(n: int, seed: int) -> np.ndarray:
    """The one shuffle of train's n examples (images and repeats together): example order[r] is read r-th."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TRAIN_ORDER,)))
    return rng.permutation(n)


def storage_plan(jobs: list[Job], order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the stored row of each job's image, the plan: the row each example reads, in reading order).

    The jobs' examples are numbered job by job (the image, then its repeats) and read in `order`;
    the images are stored in the order their own example (not a repeat) is read, so every shard is
    a fair sample of train.
    """
    reads = np.array([1 + job.repeats for job in jobs], np.int64)
    job_of = np.repeat(np.arange(len(jobs)), reads)  # example -> job
    own = np.cumsum(reads) - reads                   # job -> its own example
    read_at = np.empty_like(order)
    read_at[order] = np.arange(len(order))           # example -> when it is read
    row = np.empty(len(jobs), np.int64)
    row[np.argsort(read_at[own])] = np.arange(len(jobs))
    return row, row[job_of[order]]


def render(job: Job, params: AugmentParams) -> np.ndarray:
    """Decode one image once: the real image resized (images.load_image)."""
    return load_image(job.path, params.image_size)


# --------------------------------------------------------------------------------------------
# A whole split.
# --------------------------------------------------------------------------------------------
Mapper = Callable[[Callable[[Job], np.ndarray], Iterable[Job]], Iterator[np.ndarray]]


@contextlib.contextmanager
def job_mapper(workers: int) -> Iterator[Mapper]:
    """An ordered `map` over jobs: in this process for one worker, else a process pool."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=16)


def render_split(jobs: list[Job], params: AugmentParams, mapper: Mapper, rows: np.ndarray,
                 what: str = "augment") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, image_ids) of the jobs, job j's at row `rows[j]`.

    Each image is written straight to its row, so the split is held in memory once.
    Progress (`what`) is a bar in a terminal, one line per tenth in logs (stages/lib/progress.py).
    """
    images = np.empty((len(jobs), params.image_size, params.image_size, 3), dtype=np.uint8)
    results = mapper(functools.partial(render, params=params), jobs)
    try:
        for row, image in zip(rows, track(results, len(jobs), what, "images", log)):
            images[row] = image
    except ImageError as err:
        raise StageError(f"{err}; dedupe keeps only readable images, so data/split and the "
                         "images are out of sync (re-run: dvc repro)") from None
    by_row = np.argsort(rows)
    labels = np.array([job.label for job in jobs], dtype=np.int64)[by_row]
    return images, labels, np.array([job.image_id for job in jobs], dtype=str)[by_row]


def read_split(path: Path):
    """A split CSV, with its dx and label columns checked against the one class mapping."""
    table = read_table(path, required=("image_id", "dx", "label"))
    unknown = sorted(set(table["dx"]) - set(CLASSES), key=str)
    if unknown:
        raise StageError(f"{path}: unknown dx {unknown[0]!r} (known: {', '.join(CLASSES)})")
    wrong = table["label"] != table["dx"].map(LABELS)
    if wrong.any():
        row = table[wrong].iloc[0]
        raise StageError(f"{path}: image {row['image_id']} has label {row['label']!r}, "
                         f"but {row['dx']} is class {LABELS[row['dx']]}")
    return table


def check_files(jobs: list[Job], split_dir: Path, images_dir: Path) -> None:
    """Fail before any long work if an image the splits list is missing."""
    missing = [job.path for job in jobs if not job.path.is_file()]
    if missing:
        raise StageError(f"{missing[0]}: not found ({len(missing)} image(s) listed in {split_dir} "
                         f"are missing from {images_dir}; data/split and the images are out of "
                         "sync, re-run: dvc repro)")


def log_oversampling(real: dict[str, int], added: dict[str, int], params: AugmentParams) -> None:
    """Per class of train: real images, repeats, and why a class got fewer than the target."""
    for dx in CLASSES:
        log.info("train %-5s %5d real + %5d repeats = %5d", dx, real[dx], added[dx], real[dx] + added[dx])
        if real[dx] >= params.target_per_class:
            log.info("train %s: %d real images, at or above target_per_class %d: not augmented",
                     dx, real[dx], params.target_per_class)
        elif 0 < params.max_copies_per_image * real[dx] < params.target_per_class:
            log.info("train %s: capped at max_copies_per_image x %d real = %d, below target %d",
                     dx, real[dx], real[dx] + added[dx], params.target_per_class)


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {dx: int(np.sum(labels == LABELS[dx])) for dx in CLASSES}


def main(split_dir: Path = Path("data/split"), images_dir: Path = Path("data/raw/images"),
         out_dir: Path = Path("data/augmented"), params_path: Path = PARAMS_FILE,
         workers: int | None = None) -> None:
    started = time.perf_counter()
    params = load_params("augment", AugmentParams, params_path)
    workers = workers or usable_cpus()
    plans = {split: plan_jobs(read_split(Path(split_dir) / f"{split}.csv"), images_dir, params,
                              oversample=split == "train")
             for split in SPLITS}
    check_files([job for jobs, _ in plans.values() for job in jobs], split_dir, images_dir)

    index = {"image_size": params.image_size, "seed": params.seed, "splits": {}}
    with job_mapper(workers) as mapper, atomic_dir(out_dir) as tmp:
        for split, (jobs, added) in plans.items():
            if split == "train":
                rows, plan = storage_plan(jobs, train_order(len(jobs) + sum(added.values()), params.seed))
            else:
                rows, plan = np.arange(len(jobs)), None
            images, labels, ids = render_split(jobs, params, mapper, rows, f"render {split}")
            counts = class_counts(labels)
            if split == "train":
                log_oversampling(counts, added, params)
            else:
                log.info("%s: %d images, resized only: %s", split, len(jobs), counts)
            shards, plan_file = write_shards(tmp, split, images, labels, ids, params.shard_images, plan)
            index["splits"][split] = {"images": len(jobs), "class_counts": counts, "shards": shards}
            if plan_file:
                index["splits"][split]["plan"] = plan_file
        atomic_write_json(tmp / "index.json", index)
    size_mb = sum(p.stat().st_size for p in Path(out_dir).iterdir()) / 1e6
    log.info("wrote %s: %s images at %dx%d (train read as %d examples), %.0f MB, in %.1f s with %d "
             "worker(s)", out_dir, {s: v["images"] for s, v in index["splits"].items()}, params.image_size,
             params.image_size, len(plans["train"][0]) + sum(plans["train"][1].values()), size_mb,
             time.perf_counter() - started, workers)


if __name__ == "__main__":
    run_stage(main)
