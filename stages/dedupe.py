"""Stage dedupe: data/raw -> data/clean, one row per usable, unique image, each in a lesion group.

Reads data/raw/HAM10000_metadata.csv and data/raw/images/; writes data/clean/images.csv (sorted by
image_id, with lesion_group), excluded.csv (every removed row or orphan file: "rule: detail"),
duplicates.csv (image_id, duplicate_of, kind, evidence) and report.json (counts).
Byte-identical copies (sha256) are removed; near duplicates are kept and, across lesion ids, merge
their lesions into one lesion_group. A pHash match only proposes a near duplicate: the pixels must
prove it (the colour-fit residual of 64x64 RGB thumbnails <= `dedupe.max_colour_fit_residual`).
Invariant: no row leaves silently, and copies of one image always share a lesion_group.
Why: copies in train and test would make test scores measure memory; split keeps groups whole.
The rule table, the proof and its measurements: docs/dedupe.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, LABELS
from stages.lib.files import atomic_dir, atomic_write_json, write_table
from stages.lib.images import MAX_IMAGE_PIXELS, ImageError, open_rgb
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.progress import track, usable_cpus

log = logging.getLogger("stages.dedupe")

METADATA_FILE = "HAM10000_metadata.csv"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_COLUMNS = ("image_id", "lesion_id", "lesion_group", "dx", "label", "dx_type", "age", "sex",
                 "localization")
EXCLUDED_COLUMNS = ("image_id", "lesion_id", "reason")
DUPLICATE_COLUMNS = ("image_id", "duplicate_of", "kind", "evidence")
THUMB_SIZE = 64      # side of the thumbnails: greyscale for pHash, colour for the proof
FLAT_CHANNEL = 1.0   # a thumbnail channel whose spread (0-255) is below this proves nothing
PROOF_MEASURE = "colour-fit residual"  # named in duplicates.csv's evidence
HASH_SIZE = 32       # pHash: DCT of a 32x32 greyscale image ...
HASH_FREQUENCIES = 8  # ... keeping its 8x8 lowest frequencies = 64 bits
EXAMPLES = 10        # ids listed per exclusion rule in report.json


@dataclasses.dataclass(frozen=True)
class DedupeParams:
    near_duplicates: bool
    phash_max_distance: int
    max_colour_fit_residual: float

    def __post_init__(self) -> None:
        in_range("phash_max_distance", self.phash_max_distance, 0, HASH_FREQUENCIES ** 2)  # bits in a hash
        in_range("max_colour_fit_residual", self.max_colour_fit_residual, 0, 1)


# --------------------------------------------------------------------------------------------
# Exclusions: every removed row is kept as (image_id, lesion_id, rule, detail), so that the
# report can count by rule while excluded.csv shows the detail.
# --------------------------------------------------------------------------------------------
def exclusions(rows: pd.DataFrame, rule: str, detail: str | pd.Series = "") -> pd.DataFrame:
    """Rows removed by one rule, in the shape all exclusions share."""
    return pd.DataFrame({"image_id": rows["image_id"].to_numpy(),
                         "lesion_id": rows["lesion_id"].to_numpy(),
                         "rule": rule,
                         "detail": detail.to_numpy() if isinstance(detail, pd.Series) else detail})


def no_exclusions() -> pd.DataFrame:
    return pd.DataFrame(columns=["image_id", "lesion_id", "rule", "detail"], dtype=str)


def excluded_table(excluded: pd.DataFrame) -> pd.DataFrame:
    """excluded.csv: the reason is the rule, followed by its detail where there is one."""
    reason = excluded["rule"].where(excluded["detail"] == "", excluded["rule"] + ": " + excluded["detail"])
    table = excluded.assign(reason=reason).sort_values(["image_id", "reason"], kind="stable")
    return table.loc[:, list(EXCLUDED_COLUMNS)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Metadata and files.
# --------------------------------------------------------------------------------------------
def read_metadata(path: Path) -> pd.DataFrame:
    """The metadata as stripped strings; a missing file or column is an error naming it."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run: dvc repro download)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not a readable CSV ({err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in METADATA_COLUMNS if c not in table.columns]
    if missing:
        raise StageError(f"{path}: missing column '{missing[0]}' (required: {', '.join(METADATA_COLUMNS)})")
    return table.loc[:, list(METADATA_COLUMNS)].apply(lambda column: column.str.strip())


def list_images(folder: Path) -> dict[str, Path]:
    """image_id -> file, for every `*.jpg` in the images folder."""
    if not folder.is_dir():
        raise StageError(f"{folder}: not found (run: dvc repro download)")
    return {path.stem: path for path in sorted(folder.glob("*.jpg"))}


def check_rows(meta: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metadata rules, in this order (docs/dedupe.md, "Rules"): empty image_id or lesion_id;
    a row identical to an earlier one (that one is kept); rows of one image_id that differ (all
    removed); a dx not among the seven classes; every row of a lesion with two diagnoses.
    Returns (usable rows, exclusions)."""
    removed = []
    missing_id = (meta["image_id"] == "") | (meta["lesion_id"] == "")
    removed.append(exclusions(meta[missing_id], "missing id"))
    rows = meta[~missing_id]

    copy = rows.duplicated(keep="first")
    removed.append(exclusions(rows[copy], "duplicate row", "identical to another row, which is kept"))
    rows = rows[~copy]

    conflicting = rows["image_id"].duplicated(keep=False)
    differ = rows[conflicting]["image_id"].map(differing_columns(rows[conflicting]))
    removed.append(exclusions(rows[conflicting], "conflicting rows", "rows differ in " + differ))
    rows = rows[~conflicting]

    unknown = ~rows["dx"].isin(CLASSES)
    removed.append(exclusions(rows[unknown], "unknown dx", "'" + rows.loc[unknown, "dx"] + "'"))
    rows = rows[~unknown]

    two = rows.groupby("lesion_id")["dx"].transform("nunique") > 1
    diagnoses = rows[two].groupby("lesion_id")["dx"].agg(lambda dx: ", ".join(sorted(set(dx))))
    detail = rows.loc[two, "lesion_id"].map(diagnoses)
    removed.append(exclusions(rows[two], "lesion with two diagnoses", detail))
    rows = rows[~two]
    return rows.reset_index(drop=True), pd.concat(removed, ignore_index=True)


def differing_columns(rows: pd.DataFrame) -> dict[str, str]:
    """image_id -> the columns in which its rows disagree, e.g. "dx, age"."""
    return {image_id: ", ".join(c for c in METADATA_COLUMNS if group[c].nunique() > 1)
            for image_id, group in rows.groupby("image_id")}


def match_files(meta: pd.DataFrame, rows: pd.DataFrame,
                files: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows need a file and files need a row (any row of `meta`, even one excluded by a rule)."""
    has_file = rows["image_id"].isin(list(files))
    orphans = sorted(set(files) - set(meta["image_id"]))
    orphan_rows = pd.DataFrame({"image_id": orphans, "lesion_id": ""})
    removed = pd.concat([exclusions(rows[~has_file], "no image file"),
                         exclusions(orphan_rows, "no metadata row")], ignore_index=True)
    return rows[has_file].reset_index(drop=True), removed


# --------------------------------------------------------------------------------------------
# Reading images: the only slow part, so it runs in worker processes.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageScan:
    sha256: str
    converted: bool     # not RGB in the file (greyscale, CMYK, ...): converted by the loader
    thumb: np.ndarray   # THUMB_SIZE x THUMB_SIZE greyscale uint8: pHash
    colour: np.ndarray  # THUMB_SIZE x THUMB_SIZE x 3 RGB uint8: the pixel proof


def scan_image(path: Path, max_pixels: int) -> ImageScan | str:
    """Decode one image with the pipeline's own loader; a problem comes back as its message."""
    try:
        img = open_rgb(path, max_pixels)
    except ImageError as err:
        return str(err).removeprefix(f"{path}: ")  # no machine-specific paths in outputs
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as original:
        converted = original.mode != "RGB"
    thumb = img.convert("L").resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    colour = img.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return ImageScan(hashlib.sha256(data).hexdigest(), converted, np.asarray(thumb, dtype=np.uint8),
                     np.asarray(colour, dtype=np.uint8))


def scan_images(paths: list[Path], max_pixels: int, workers: int) -> list[ImageScan | str]:
    """scan_image for every path, in `workers` processes (decoding is CPU-bound), in order.

    Progress is a bar in a terminal, one line per tenth in logs (stages/lib/progress.py).
    """
    jobs = [(path, max_pixels) for path in paths]
    what = "decode and hash"
    if workers <= 1:
        return [scan_image(*job) for job in track(jobs, len(jobs), what, "images", log)]
    with multiprocessing.Pool(workers) as pool:
        return list(track(pool.imap(_scan_job, jobs, chunksize=64), len(jobs), what, "images", log))


def _scan_job(job: tuple[Path, int]) -> ImageScan | str:
    return scan_image(*job)



# --------------------------------------------------------------------------------------------
# Perceptual hash and its 8 flips/rotations.
# --------------------------------------------------------------------------------------------
def dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II basis: row k is frequency k (scale does not matter for a median hash)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


# Averaging the thumbnail 2x2 down to HASH_SIZE and taking the low DCT frequencies, in one matrix.
HASH_DCT = np.repeat(dct_matrix(HASH_SIZE)[:HASH_FREQUENCIES], THUMB_SIZE // HASH_SIZE, axis=1) / 2
ODD = (-1.0) ** np.arange(HASH_FREQUENCIES)  # mirroring an axis flips the sign of its odd frequencies

# The dihedral group as (transpose, flip rows, flip columns), applied in that order; index 0 is "as is".
SYMMETRIES: tuple[tuple[bool, bool, bool], ...] = tuple(
    (t, r, c) for t in (False, True) for r in (False, True) for c in (False, True))
SYMMETRY_NAMES = ("", "flipping left-right", "flipping top-bottom", "rotating 180", "transposing",
                  "rotating 90 clockwise", "rotating 90 anticlockwise", "anti-transposing")


def transform_pixels(images: np.ndarray, symmetry: int) -> np.ndarray:
    """Flip/rotate a stack of square images (n, h, w) or (n, h, w, channels) by one of SYMMETRIES."""
    transpose, flip_rows, flip_columns = SYMMETRIES[symmetry]
    if transpose:
        images = np.swapaxes(images, 1, 2)
    if flip_rows:
        images = images[:, ::-1, :]
    if flip_columns:
        images = images[:, :, ::-1]
    return images


def transform_dct(coefficients: np.ndarray, symmetry: int) -> np.ndarray:
    """The same flip/rotation as transform_pixels, done exactly on DCT coefficients (n, k, k)."""
    transpose, flip_rows, flip_columns = SYMMETRIES[symmetry]
    if transpose:
        coefficients = np.swapaxes(coefficients, 1, 2)
    if flip_rows:
        coefficients = coefficients * ODD[:, None]
    if flip_columns:
        coefficients = coefficients * ODD[None, :]
    return coefficients


def phashes(thumbs: np.ndarray) -> np.ndarray:
    """DCT pHash (64 bits: low frequencies above their median) of each thumbnail and of its
    flips/rotations, as uint64 of shape (len(SYMMETRIES), n)."""
    low = HASH_DCT @ thumbs.astype(np.float64) @ HASH_DCT.T
    hashes = []
    for symmetry in range(len(SYMMETRIES)):
        coefficients = transform_dct(low, symmetry).reshape(len(thumbs), -1)
        bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
        hashes.append(np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64))
    return np.stack(hashes)


def candidate_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256) -> pd.DataFrame:
    """Pairs i < j whose hashes are within `max_distance` bits (i as is, j under some symmetry),
    one row per matching symmetry. All pairs are compared, a chunk of rows at a time."""
    n = hashes.shape[1]
    first, second = [], []
    for start in range(0, n, chunk):
        rows = hashes[0, start:start + chunk, None]
        nearest = np.minimum.reduce([np.bitwise_count(rows ^ hashes[symmetry, None, start:])
                                     for symmetry in range(len(hashes))])
        i, j = np.nonzero(nearest <= max_distance)
        first.append(i[j > i] + start)
        second.append(j[j > i] + start)
    i, j = np.concatenate(first), np.concatenate(second)
    distance = np.bitwise_count(hashes[0, i] ^ hashes[:, j])  # (symmetries, pairs)
    symmetry, pair = np.nonzero(distance <= max_distance)
    return pd.DataFrame({"i": i[pair], "j": j[pair], "symmetry": symmetry,
                         "distance": distance[symmetry, pair]})


def standardised(colours: np.ndarray) -> np.ndarray:
    """Colour thumbnails (n, h, w, 3) uint8 -> float32 with zero mean and unit spread per image and
    channel; a channel flatter than FLAT_CHANNEL is only centred (it then correlates with nothing)."""
    x = colours.astype(np.float32)
    x -= x.mean(axis=(1, 2), keepdims=True)
    x /= np.maximum(x.std(axis=(1, 2), keepdims=True), FLAT_CHANNEL)
    return x


def colour_fit_residuals(colours: np.ndarray, pairs: pd.DataFrame, chunk: int = 1024) -> np.ndarray:
    """The proof that pHash cannot give, per candidate pair (i, j, symmetry): how much of colour
    thumbnail i the best per-channel linear colour change (gain > 0, offset) of thumbnail j,
    flipped/rotated by `symmetry`, leaves unexplained.

    Per channel, the least-squares fit i ~ gain * j + offset leaves a residual whose RMS, as a
    fraction of channel i's spread, is sqrt(1 - r^2) (r: the channel's Pearson correlation; r <= 0,
    a negative or unrelated image, counts as 1). The result is the mean over R, G, B: 0 for the
    same picture under any brightness, contrast or white-balance change, about 0.7 for unrelated
    dermoscopic images. The measure is symmetric in i and j.
    """
    i, j, symmetries = (pairs[column].to_numpy() for column in ("i", "j", "symmetry"))
    result = np.empty(len(pairs))
    for symmetry in np.unique(symmetries):
        where = np.flatnonzero(symmetries == symmetry)
        for part in np.split(where, range(chunk, len(where), chunk)):
            a = standardised(colours[i[part]])
            b = standardised(transform_pixels(colours[j[part]], symmetry))
            r = np.clip((a * b).mean(axis=(1, 2), dtype=np.float64), 0.0, 1.0)  # (pairs, channels)
            result[part] = np.sqrt(1.0 - r ** 2).mean(axis=1)
    return result


# --------------------------------------------------------------------------------------------
# Duplicates and lesion groups.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Duplicates:
    found: int                           # copies (exact) or proven pairs (near), conflicts included
    duplicates: pd.DataFrame             # duplicates.csv rows
    excluded: pd.DataFrame               # copies with different dx
    removed: set[str]                    # exact copies dropped (their original is kept)
    links: list[tuple[str, str]]         # lesion ids shown to hold the same image


def exact_duplicates(images: pd.DataFrame) -> Duplicates:
    """Group images by sha256: keep the first by image_id, drop the others; different dx: drop all."""
    rows, conflicts, links, removed = [], [no_exclusions()], [], set()
    copies = images[images["sha256"].duplicated(keep=False)].sort_values("image_id")
    for sha256, group in copies.groupby("sha256", sort=True):
        first = group.iloc[0]
        if group["dx"].nunique() > 1:
            listing = ", ".join(f"{i} ({dx})" for i, dx in zip(group["image_id"], group["dx"]))
            conflicts.append(exclusions(group, "same image, different dx", f"identical bytes: {listing}"))
            continue
        for copy in group.iloc[1:].itertuples():
            rows.append((copy.image_id, first["image_id"], "exact", f"sha256 {sha256}"))
            links.append((first["lesion_id"], copy.lesion_id))
            removed.add(copy.image_id)
    found = len(copies) - copies["sha256"].nunique()
    return Duplicates(found, pd.DataFrame(rows, columns=list(DUPLICATE_COLUMNS)),
                      pd.concat(conflicts, ignore_index=True), removed, links)


def near_duplicates(images: pd.DataFrame, thumbs: np.ndarray, colours: np.ndarray,
                    params: DedupeParams) -> Duplicates:
    """Pairs that pHash proposes (greyscale `thumbs`) and the pixels prove (`colours`, see
    colour_fit_residuals); both images stay (different dx: both go)."""
    pairs = candidate_pairs(phashes(thumbs), params.phash_max_distance)
    pairs["residual"] = colour_fit_residuals(colours, pairs)
    pairs = pairs.sort_values(["residual", "distance", "symmetry"]).drop_duplicates(["i", "j"])
    proven = pairs[pairs["residual"] <= params.max_colour_fit_residual].sort_values(["i", "j"])
    log.info("near duplicates: %d candidate pairs (pHash), %d proven (pixels)", len(pairs), len(proven))
    rows, conflicts, links = [], [no_exclusions()], []
    for pair in proven.itertuples():
        first, second = images.iloc[pair.i], images.iloc[pair.j]
        how = f", after {SYMMETRY_NAMES[pair.symmetry]}" if pair.symmetry else ""
        evidence = (f"{PROOF_MEASURE} {pair.residual:.3f} <= {params.max_colour_fit_residual:.3f}, "
                    f"phash distance {pair.distance}{how}")
        if first["dx"] != second["dx"]:
            listing = f"{first['image_id']} ({first['dx']}), {second['image_id']} ({second['dx']})"
            conflicts.append(exclusions(images.iloc[[pair.i, pair.j]], "same image, different dx",
                                        f"near duplicates ({evidence}): {listing}"))
            continue
        rows.append((second["image_id"], first["image_id"], "near", evidence))
        links.append((first["lesion_id"], second["lesion_id"]))
    excluded = pd.concat(conflicts, ignore_index=True).drop_duplicates("image_id")
    duplicates = pd.DataFrame(rows, columns=list(DUPLICATE_COLUMNS))
    return Duplicates(len(proven), duplicates, excluded, set(), links)


def lesion_groups(lesions: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over lesion ids: lesion -> its group, named by its lesions joined with '+'."""
    parent = {lesion: lesion for lesion in lesions}

    def root(lesion: str) -> str:
        while parent.setdefault(lesion, lesion) != lesion:
            parent[lesion] = parent[parent[lesion]]
            lesion = parent[lesion]
        return lesion

    for a, b in links:
        parent[root(a)] = root(b)
    members = defaultdict(list)
    for lesion in list(parent):
        members[root(lesion)].append(lesion)
    return {lesion: "+".join(sorted(group)) for group in members.values() for lesion in group}


# --------------------------------------------------------------------------------------------
# The whole stage, without I/O.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cleaned:
    images: pd.DataFrame       # images.csv
    excluded: pd.DataFrame     # with rule and detail, see exclusions()
    duplicates: pd.DataFrame   # duplicates.csv
    report: dict


def usable_rows(meta: pd.DataFrame, files: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows that pass the metadata rules and have a file: the only images worth decoding."""
    rows, excluded = check_rows(meta)
    rows, missing = match_files(meta, rows, files)
    return rows, pd.concat([excluded, missing], ignore_index=True)


def clean(rows: pd.DataFrame, excluded: pd.DataFrame, scans: dict[str, ImageScan | str],
          params: DedupeParams) -> Cleaned:
    """Usable rows (see usable_rows) + the scan of each one's file -> kept images in lesion
    groups, all exclusions, duplicates and the report."""
    outcome = rows["image_id"].map(scans)
    unreadable = outcome.map(lambda scan: isinstance(scan, str)).astype(bool)
    excluded = [excluded, exclusions(rows[unreadable], "unreadable image", outcome[unreadable])]
    images = rows[~unreadable].sort_values("image_id").reset_index(drop=True)
    images["sha256"] = images["image_id"].map(lambda image_id: scans[image_id].sha256)

    exact = exact_duplicates(images)
    images = images[~images["image_id"].isin(exact.removed | set(exact.excluded["image_id"]))]
    images = images.reset_index(drop=True)
    near = Duplicates(0, pd.DataFrame(columns=list(DUPLICATE_COLUMNS)), no_exclusions(), set(), [])
    if params.near_duplicates and len(images) > 1:
        thumbs = np.stack([scans[image_id].thumb for image_id in images["image_id"]])
        colours = np.stack([scans[image_id].colour for image_id in images["image_id"]])
        near = near_duplicates(images, thumbs, colours, params)
        images = images[~images["image_id"].isin(near.excluded["image_id"])].reset_index(drop=True)
    excluded = pd.concat([*excluded, exact.excluded, near.excluded], ignore_index=True)
    check_outcome(images, excluded)

    groups = lesion_groups(images["lesion_id"], exact.links + near.links)
    images["lesion_group"] = images["lesion_id"].map(groups)
    images["label"] = images["dx"].map(LABELS)
    images["age"] = pd.to_numeric(images["age"], errors="coerce")
    converted = int(images["image_id"].map(lambda image_id: scans[image_id].converted).sum())
    duplicates = pd.concat([exact.duplicates, near.duplicates], ignore_index=True)
    duplicates = duplicates.sort_values(["image_id", "kind"]).reset_index(drop=True)
    report = make_report(images, excluded, exact, near, converted)
    return Cleaned(images.loc[:, list(IMAGE_COLUMNS)], excluded, duplicates, report)


def check_outcome(images: pd.DataFrame, excluded: pd.DataFrame) -> None:
    """Training on nothing, or on fewer classes than the model has, is an error, not a warning."""
    counts = excluded["rule"].value_counts().to_dict()
    if images.empty:
        raise StageError(f"no image left: every row was excluded (rows by rule: {counts})")
    empty = [dx for dx in CLASSES if not (images["dx"] == dx).any()]
    if empty:
        raise StageError(f"class {empty[0]} has no image left (excluded rows by rule: {counts})")


def make_report(images: pd.DataFrame, excluded: pd.DataFrame, exact: Duplicates, near: Duplicates,
                converted: int) -> dict:
    """report.json: what is kept, what was merged, what was excluded and why."""
    per_class = images.groupby("dx")
    merged = images["lesion_group"] != images["lesion_id"]
    return {
        "images": len(images),
        "lesions": images["lesion_id"].nunique(),
        "lesion_groups": images["lesion_group"].nunique(),
        "images_per_class": {dx: int(per_class.size().get(dx, 0)) for dx in CLASSES},
        "lesions_per_class": {dx: int(per_class["lesion_id"].nunique().get(dx, 0)) for dx in CLASSES},
        "exact_duplicates": {"found": exact.found, "removed": len(exact.removed),
                             "across_lesions": sum(a != b for a, b in exact.links)},
        "near_duplicates": {"found": near.found, "across_lesions": sum(a != b for a, b in near.links)},
        "merged_lesion_groups": images.loc[merged, "lesion_group"].nunique(),
        "excluded": {rule: {"rows": len(group), "image_ids": sorted(group["image_id"])[:EXAMPLES]}
                     for rule, group in excluded.groupby("rule", sort=True)},
        "age_missing": int(images["age"].isna().sum()),
        "sex_unknown": int((~images["sex"].isin(["male", "female"])).sum()),
        "converted_to_rgb": converted,
    }


# --------------------------------------------------------------------------------------------
# I/O.
# --------------------------------------------------------------------------------------------
def main(raw_dir: Path = Path("data/raw"), out_dir: Path = Path("data/clean"), params_path: Path = PARAMS_FILE,
         workers: int | None = None) -> None:
    params = load_params("dedupe", DedupeParams, params_path)
    raw, out = Path(raw_dir), Path(out_dir)
    started = time.perf_counter()
    meta = read_metadata(Path(raw) / METADATA_FILE)
    files = list_images(Path(raw) / "images")
    rows, excluded = usable_rows(meta, files)
    scans = scan_images([files[image_id] for image_id in rows["image_id"]], MAX_IMAGE_PIXELS,
                        workers or usable_cpus())
    log.info("decoded %d images in %.1f s", len(rows), time.perf_counter() - started)
    result = clean(rows, excluded, dict(zip(rows["image_id"], scans)), params)
    with atomic_dir(Path(out)) as tmp:
        write_table(tmp / "images.csv", result.images)
        write_table(tmp / "excluded.csv", excluded_table(result.excluded))
        write_table(tmp / "duplicates.csv", result.duplicates)
        atomic_write_json(tmp / "report.json", result.report)
    report = result.report
    log.info("kept %d images of %d lesions in %d lesion groups; %d exact and %d near duplicates; "
             "%d rows excluded; %.1f s in all", report["images"], report["lesions"], report["lesion_groups"],
             report["exact_duplicates"]["found"], report["near_duplicates"]["found"], len(result.excluded),
             time.perf_counter() - started)


if __name__ == "__main__":
    run_stage(main)
