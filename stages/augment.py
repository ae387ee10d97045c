"""Augment: decode and resize every image once into shards; oversample train's minority classes.

Reads data/split/{train,val,test}.csv and data/raw/images/{image_id}.jpg and writes data/augmented/
(the shard contract is stages/lib/shards.py):

- val and test: each image resized to `image_size`, in the CSV's order, never augmented;
- train: each real image resized, plus copies of the minority classes' images, shuffled once.

Oversampling rule, for a class with `real` training images:

    final = max(real, min(target_per_class, max_copies_per_image * real));  added = final - real

so a class at or above the target (nv, or a minority class when the target is set low) keeps its
real images only, and no class grows beyond `max_copies_per_image` images per real image (a few
images copied a hundred times would teach the model those images, not the class).

Copy k of a class is made from real image `k mod real` of a seeded shuffle of the class, so
every source is used about equally. A copy's image_id is its source's id + "+aug<k>". What a copy
is depends on `copies`:

- `repeat` (the recipe): the resized real image itself. Minority classes are then seen more often,
  not differently: train augments every image of every class on-line with one random transform
  (train.augmentation), so no pixel-level trait marks a class. Measured: with synthetic copies
  for the minority classes only, the model learnt "looks synthetic -> not nv"
  (experiments/synthetic_cue.py; docs/experiments.md).
- `synthetic`: a random rotation, shift, zoom, flip and colour change of the real image, made
  here at the source's resolution, with mirrored margins. Its transform is drawn from a
  generator seeded by (seed, class, k) alone, so the output is byte-identical whatever the number
  of worker processes. nv, never oversampled, never gets one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, LABELS, SPLITS
from stages.lib.files import atomic_dir, atomic_write_json, read_table
from stages.lib.images import ImageError, image_file, open_rgb, resize_square
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.progress import track, usable_cpus
from stages.lib.shards import copy_id, write_shards
from stages.transforms import affine_about_centre, check_ranges, contrast_then_brightness

log = logging.getLogger("stages.augment")

# Independent random streams, all derived from augment.seed (numpy SeedSequence spawn keys).
_SOURCE_ORDER, _COPY, _TRAIN_ORDER = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The `augment` section of params.yaml."""

    seed: int
    image_size: int               # side of the square images train and evaluate see
    target_per_class: int         # train's minority classes are oversampled up to this many
    max_copies_per_image: int     # ...but never beyond this many images per real image
    copies: Literal["repeat", "synthetic"]  # what an oversampled copy is (module docstring)
    # The synthetic copies' transform (unused with copies: repeat):
    rotation_degrees: float       # uniform in +-this
    shift_fraction: float         # of width and height, uniform in +-this
    zoom_fraction: float          # scale uniform in 1 +- this
    brightness: float             # multiplier uniform in 1 +- this
    contrast: float               # multiplier of the distance to the mean, uniform in 1 +- this
    shard_images: int             # images per .npz shard

    def __post_init__(self) -> None:
        in_range("seed", self.seed, 0)
        in_range("image_size", self.image_size, 32, 512)  # MobileNet needs at least 32x32
        in_range("target_per_class", self.target_per_class, 1)
        in_range("max_copies_per_image", self.max_copies_per_image, 1)
        in_range("shard_images", self.shard_images, 1)
        ranges = (self.rotation_degrees, self.shift_fraction, self.zoom_fraction, self.brightness,
                  self.contrast)
        check_ranges(*ranges)
        if self.copies == "synthetic" and self.max_copies_per_image > 1 and not any(ranges):
            raise ValueError("rotation_degrees, shift_fraction, zoom_fraction, brightness and "
                             "contrast are all 0, so a quarter of the synthetic copies would "
                             "repeat their source exactly; set one above 0, or "
                             "max_copies_per_image: 1 to turn oversampling off, or copies: repeat")


# --------------------------------------------------------------------------------------------
# Which copies to make: pure functions of the class sizes and the params.
# --------------------------------------------------------------------------------------------
def copies_to_add(real: int, params: AugmentParams) -> int:
    """How many synthetic images a class with `real` training images gets (the module's rule)."""
    final = max(real, min(params.target_per_class, params.max_copies_per_image * real))
    return final - real


def copy_sources(real: int, copies: int, seed: int, label: int) -> np.ndarray:
    """For each copy k, the index of its source among the class's `real` (> 0) real images.

    A seeded shuffle of the class, cycled: each source is used about equally, and which sources
    get the one extra copy is not decided by the CSV's order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SOURCE_ORDER, label)))
    return rng.permutation(real)[np.arange(copies) % real]


@dataclasses.dataclass(frozen=True)
class Job:
    """One real image, decoded once: its resized self, then the copies made from it."""

    image_id: str
    path: Path
    label: int
    copies: tuple[int, ...] = ()  # copy indices k within the image's class

    def output_ids(self) -> list[str]:
        return [self.image_id] + [copy_id(self.image_id, k) for k in self.copies]


def plan_jobs(table, images_dir: Path, params: AugmentParams,
              oversample: bool) -> tuple[list[Job], dict[str, int]]:
    """Jobs in the CSV's order, and the number of copies added per class."""
    dx = table["dx"].to_numpy()
    copies_of: dict[int, list[int]] = defaultdict(list)  # row -> copy indices
    added = {}
    for name in CLASSES:
        rows = np.flatnonzero(dx == name)
        added[name] = copies_to_add(len(rows), params) if oversample else 0
        if added[name]:
            sources = copy_sources(len(rows), added[name], params.seed, LABELS[name])
            for k, source in enumerate(sources):
                copies_of[int(rows[source])].append(k)
    jobs = [Job(image_id, image_file(images_dir, image_id), LABELS[name], tuple(copies_of[row]))
            for row, (image_id, name) in enumerate(zip(table["image_id"], dx))]
    return jobs, added


# --------------------------------------------------------------------------------------------
# Making one synthetic image: random draws, then geometry at the source's resolution, then the
# same resize as a real image, then flips and colour at the final size (where they are cheapest).
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Transform:
    """Every random choice behind one synthetic copy."""

    flip_horizontal: bool
    flip_vertical: bool
    degrees: float
    shift: tuple[float, float]  # fractions of width and height
    zoom: float                 # > 1 magnifies
    brightness: float           # multiplier
    contrast: float             # multiplier of each pixel's distance to the image's mean


def copy_rng(seed: int, label: int, k: int) -> np.random.Generator:
    """The generator of copy k of class `label`: depends on nothing else (worker-count free)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_COPY, label, k)))


def draw_transform(rng: np.random.Generator, params: AugmentParams) -> Transform:
    def spread(width: float) -> float:
        return float(rng.uniform(-width, width))

    return Transform(
        flip_horizontal=bool(rng.random() < 0.5),
        flip_vertical=bool(rng.random() < 0.5),
        degrees=spread(params.rotation_degrees),
        shift=(spread(params.shift_fraction), spread(params.shift_fraction)),
        zoom=1 + spread(params.zoom_fraction),
        brightness=1 + spread(params.brightness),
        contrast=1 + spread(params.contrast),
    )


def working_copy(img, size: int):
    """Shrink by the largest integer factor that keeps both sides >= size.

    Geometry runs before the final resize, so it should run above the final size; on 600x450
    originals a 3x box reduction makes it ~9x cheaper and the result is no less sharp at 128.
    """
    factor = max(1, min(img.size) // size)
    return img.reduce(factor) if factor > 1 else img


def affine_coefficients(t: Transform, width: int, height: int) -> tuple[float, ...]:
    """PIL AFFINE data (a, b, c, d, e, f): output pixel (x, y) samples source (ax+by+c, dx+ey+f).

    Rotation and zoom about the image centre, then the shift, in the source's own pixels (so a
    rotated 4:3 photo is then squashed to a square just as a real one is).
    """
    angle = math.radians(t.degrees)
    return affine_about_centre(math.cos(angle) / t.zoom, math.sin(angle) / t.zoom, 1, 1, width / 2, height / 2,
                               t.shift[0] * width, t.shift[1] * height)  # flips come after the resize


def reflect_margins(coefficients: tuple[float, ...], width: int, height: int) -> tuple[int, int]:
    """Padding (x, y) that puts every sampled point inside the padded source (+1 for bilinear)."""
    a, b, c, d, e, f = coefficients
    corners = [(x, y) for x in (0, width) for y in (0, height)]
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    pad_x = max(0.0, -min(xs), max(xs) - width)
    pad_y = max(0.0, -min(ys), max(ys) - height)
    return math.ceil(pad_x) + 1, math.ceil(pad_y) + 1


def augment(img, t: Transform, size: int) -> np.ndarray:
    """One synthetic image (size x size RGB uint8) from a decoded source image.

    Areas that rotation, shift or zoom-out bring into view are filled by mirroring the image, so
    there are no black corners for the model to learn as a sign of "synthetic".
    """
    width, height = img.size
    a, b, c, d, e, f = affine_coefficients(t, width, height)
    pad_x, pad_y = reflect_margins((a, b, c, d, e, f), width, height)
    padded = np.pad(np.asarray(img), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    moved = Image.fromarray(padded).transform(
        (width, height), Image.Transform.AFFINE, (a, b, c + pad_x, d, e, f + pad_y),
        resample=Image.Resampling.BILINEAR)
    pixels = resize_square(moved, size)
    if t.flip_horizontal:
        pixels = pixels[:, ::-1]
    if t.flip_vertical:
        pixels = pixels[::-1]
    return adjust_colour(pixels, t.brightness, t.contrast)


def adjust_colour(pixels: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """stages/transforms.py's colour change, clipped to uint8.

    Contrast and brightness are one mapping of the 256 pixel values, so it is applied as a lookup table.
    """
    levels = contrast_then_brightness(np.arange(256), pixels.mean(), contrast, brightness)
    lookup = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    return lookup[pixels]


def render(job: Job, params: AugmentParams) -> list[np.ndarray]:
    """Decode one image once: the real image resized, then each copy, in output order.

    The real image goes through open_rgb + resize_square, exactly images.load_image, kept apart
    only so the decoded image also feeds the copies.
    """
    img = open_rgb(job.path)
    outputs = [resize_square(img, params.image_size)]
    if params.copies == "repeat":
        outputs += [outputs[0]] * len(job.copies)
    elif job.copies:
        source = working_copy(img, params.image_size)
        for k in job.copies:
            t = draw_transform(copy_rng(params.seed, job.label, k), params)
            outputs.append(augment(source, t, params.image_size))
    return outputs


# --------------------------------------------------------------------------------------------
# A whole split.
# --------------------------------------------------------------------------------------------
Mapper = Callable[[Callable[[Job], list[np.ndarray]], Iterable[Job]], Iterator[list[np.ndarray]]]


@contextlib.contextmanager
def job_mapper(workers: int) -> Iterator[Mapper]:
    """An ordered `map` over jobs: in this process for one worker, else a process pool."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=16)


def train_order(n: int, seed: int) -> np.ndarray:
    """The one shuffle of train (real images and copies mixed), so that every shard is a fair sample."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TRAIN_ORDER,)))
    return rng.permutation(n)


def render_split(jobs: list[Job], params: AugmentParams, mapper: Mapper,
                 order: np.ndarray | None, what: str = "augment") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, image_ids) of all the jobs' outputs, permuted by `order` if given.

    Each image is written straight to its final row, so the split is held in memory once.
    Progress (`what`) is a bar in a terminal, one line per tenth in logs (stages/lib/progress.py).
    """
    ids = np.array([i for job in jobs for i in job.output_ids()], dtype=str)
    labels = np.array([job.label for job in jobs for _ in job.output_ids()], dtype=np.int64)
    order = np.arange(len(ids)) if order is None else order
    row_of = np.empty_like(order)
    row_of[order] = np.arange(len(order))
    images = np.empty((len(ids), params.image_size, params.image_size, 3), dtype=np.uint8)
    outputs = (image for result in mapper(functools.partial(render, params=params), jobs)
               for image in result)
    try:
        for j, image in enumerate(track(outputs, len(ids), what, "images", log)):
            images[row_of[j]] = image
    except ImageError as err:
        raise StageError(f"{err}; dedupe keeps only readable images, so data/split and the "
                         "images are out of sync (re-run: dvc repro)") from None
    return images, labels[order], ids[order]


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
    """Per class of train: real and added images, and why a class got fewer than the target."""
    for dx in CLASSES:
        log.info("train %-5s %5d real + %5d %s copies = %5d", dx, real[dx], added[dx],
                 params.copies, real[dx] + added[dx])
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
            n = len(jobs) + sum(added.values())
            order = train_order(n, params.seed) if split == "train" else None
            images, labels, ids = render_split(jobs, params, mapper, order, f"render {split}")
            counts = class_counts(labels)
            if split == "train":
                log_oversampling({dx: counts[dx] - added[dx] for dx in CLASSES}, added, params)
            else:
                log.info("%s: %d images, resized only: %s", split, n, counts)
            shards, stored = write_shards(tmp, split, images, labels, ids, params.shard_images)
            index["splits"][split] = {"images": n, "stored_images": stored, "shards": shards,
                                      "class_counts": counts, "augmented": added}
        atomic_write_json(tmp / "index.json", index)
    size_mb = sum(p.stat().st_size for p in Path(out_dir).iterdir()) / 1e6
    log.info("wrote %s: %s images at %dx%d, %.0f MB, in %.1f s with %d worker(s)", out_dir,
             {s: v["images"] for s, v in index["splits"].items()}, params.image_size,
             params.image_size, size_mb, time.perf_counter() - started, workers)


if __name__ == "__main__":
    run_stage(main)
