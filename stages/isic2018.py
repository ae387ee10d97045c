"""Stage isic2018 (opt-in): the committed model on the official ISIC 2018 Task 3 test set, scored
by the challenge's own scorer (isic-challenge-scoring), so its figures compare with the leaderboard.

Off (`isic2018.enabled: false`, the default): reads and downloads nothing; writes {"scored": false}
and header-only tables. On: fetches the test zip and ground truth through stages/download.py's path
(Dataverse, HAM10000_MIRROR or download.local_dir; retries, isic2018.sha256 pins, zip checks),
predicts each image from the image alone (stages.lib.prediction.load), writes the submission (the
prior-corrected probabilities: the scorer's argmax is metrics/test.json's rule) and scores it:
metrics/isic2018.json (headline), metrics/isic2018_per_class.csv (per-class AUC, AP). The scorer's
CSV reader needs pandas < 3, so the submission goes to its ClassificationScore directly. A ground
truth with other columns, a row that is not one-hot, an image without a row or a weighted row
without an image stops the stage with one line naming the file. How to run it: README.md.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.download import CACHE_DIR, FILE_NAME, MIRROR_ENV, SHA256_HEX, DownloadParams, build_raw, file_digest, gather
from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES
from stages.lib.files import atomic_write_json, atomic_write_text
from stages.lib.params import PARAMS_FILE, load_params
from stages.lib.prediction import BATCH_SIZE, DEFAULT_MODEL, UsageError, decode, load
from stages.lib.progress import Progress

log = logging.getLogger("stages.isic2018")
ISIC_CODES = tuple(dx.upper() for dx in CLASSES)  # the ground truth's column for each class code
SUBMISSION_COLUMNS = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # the official order
PER_CLASS_HEADER = "dx,auc,average_precision"  # metrics/isic2018_per_class.csv: the scorer's per-class figures
WEIGHT_COLUMNS = ("score_weight", "validation_weight")  # optional in a ground truth (the scorer's)
SCORER = "isic-challenge-scoring"


@dataclass(frozen=True)
class IsicParams:
    enabled: bool
    images: str        # the test images' zip in the release (or its extracted folder in local_dir)
    ground_truth: str  # the one-hot ground truth CSV
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, suffix in (("images", ".zip"), ("ground_truth", ".csv")):
            name = getattr(self, key)
            if not (FILE_NAME.match(name) and name.endswith(suffix)):
                raise ValueError(f"{key} must be a plain file name ending in {suffix}, got {name!r}")
        for name, digest in self.sha256.items():
            if name not in (self.images, self.ground_truth):
                raise ValueError(f"sha256.{name} pins a file that is neither images nor ground_truth")
            if not SHA256_HEX.match(digest):
                raise ValueError(f"sha256.{name} must be 64 lowercase hex digits, got {digest!r}")


def read_ground_truth(path: Path):
    """Each image's score weight (a pandas Series by image), by the scorer's own reader
    (parse_truth_csv), once the file is checked to be ISIC 2018 Task 3's: one row per image, one-hot."""
    import pandas as pd
    from isic_challenge_scoring.load_csv import parse_truth_csv

    try:
        text = Path(path).read_text(encoding="utf-8")
        header = pd.read_csv(io.StringIO(text), nrows=0).columns.tolist()
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise StageError(f"{path}: not a CSV file ({str(err).strip()})") from None
    if sorted(set(header) - set(WEIGHT_COLUMNS)) != sorted(SUBMISSION_COLUMNS) or len(set(header)) != len(header):
        raise StageError(f"{path}: columns {','.join(map(str, header))}; an ISIC 2018 Task 3 ground truth has "
                         f"{','.join(SUBMISSION_COLUMNS)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="isic_challenge_scoring")  # pandas 3's deprecations
        truth, weights = parse_truth_csv(io.StringIO(text))
    if truth.index.hasnans or truth.index.duplicated().any():
        twice = truth.index[truth.index.duplicated()].tolist()
        raise StageError(f"{path}: {'image ' + str(twice[0]) + ' has two rows' if twice else 'a row has no image'}")
    values = truth[list(ISIC_CODES)].apply(pd.to_numeric, errors="coerce")
    one_hot = values.isin([0, 1]).all(axis=1) & values.sum(axis=1).eq(1)
    if not one_hot.all():
        raise StageError(f"{path}: row {truth.index[~one_hot.to_numpy()][0]} is not one-hot "
                         f"(one class 1, the others 0)")
    return weights["score_weight"]


def match_images(ids: list[str], weights, images_from: str, truth_path: Path) -> None:
    """Every image has a ground-truth row and every weighted row (`weights`: by image) an image,
    or a StageError."""
    seen, truth_ids = set(ids), weights.index
    if missing := sorted(seen - set(truth_ids)):
        raise StageError(f"{truth_path}: no row for image {missing[0]} of {images_from} "
                         f"({len(missing)} image(s) without ground truth)")
    if orphans := [i for i in truth_ids if i not in seen and weights[i] != 0]:
        raise StageError(f"{truth_path}: row {orphans[0]} has no image in {images_from} "
                         f"({len(orphans)} such row(s))")


def predict_corrected(predictor, images: list[Path]) -> np.ndarray:
    """(N, 7) prior-corrected probabilities (Judgement.corrected) of the image files, image-only,
    decoded as training did, one batch at a time; an unreadable image is a StageError naming it."""
    rows = []
    with Progress(len(images), what="predict ISIC 2018 test", unit="images", logger=log) as bar:
        for start in range(0, len(images), BATCH_SIZE):
            batch = images[start:start + BATCH_SIZE]
            pixels = np.stack([decode(p, predictor.image_size, str(p)).pixels for p in batch])
            rows.append(predictor.judge(pixels).corrected)
            bar.update(len(batch))
    return np.concatenate(rows)


def submission_csv(ids: list[str], corrected: np.ndarray, unseen: list[str]) -> str:
    """The ISIC submission: one row per image in SUBMISSION_COLUMNS' order, probabilities to float32's
    9 significant digits (no rounding tie); a row without an image (weight 0) gets 1/7 each."""
    order = [CLASSES.index(code.lower()) for code in SUBMISSION_COLUMNS[1:]]
    rows = [(image, [format(float(p), ".9g") for p in probabilities[order]])
            for image, probabilities in zip(ids, corrected)]
    rows += [(image, [format(1 / len(CLASSES), ".9g")] * len(CLASSES)) for image in unseen]
    return ",".join(SUBMISSION_COLUMNS) + "\n" + "".join(f"{i},{','.join(v)}\n" for i, v in sorted(rows))


def score(truth_path: Path, submission: str) -> dict:
    """The scorer's figures for the submission against the ground truth (balanced accuracy first)."""
    from importlib.metadata import version

    import pandas as pd
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
    from isic_challenge_scoring.load_csv import parse_truth_csv, sort_rows, validate_rows
    from isic_challenge_scoring.types import ScoreError

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="isic_challenge_scoring")  # pandas 3's deprecations
        truth, weights = parse_truth_csv(io.StringIO(Path(truth_path).read_text(encoding="utf-8")))
        predicted = pd.read_csv(io.StringIO(submission), header=0, index_col=False, dtype={"image": str})
        predicted = predicted.set_index("image").reindex(truth.columns, axis="columns")
        try:
            validate_rows(truth, predicted)
        except ScoreError as err:
            raise StageError(f"{truth_path}: {err}") from None
        sort_rows(truth)
        sort_rows(predicted)
        result = ClassificationScore(truth, predicted, weights, ClassificationMetric.BALANCED_ACCURACY)
    macro, per = result.macro_average, result.per_category
    return {"balanced_accuracy": float(result.overall), "auc": float(macro["auc"]),
            "auc_sens_80": float(macro["auc_sens_80"]), "average_precision": float(macro["ap"]),
            "per_class": {dx: {"auc": float(per.at[dx.upper(), "auc"]),
                               "average_precision": float(per.at[dx.upper(), "ap"])} for dx in CLASSES},
            "scorer": f"{SCORER} {version(SCORER)}"}


def fetch(params: IsicParams, params_path: Path, cache_dir: Path) -> tuple[DownloadParams, Path, Path, str]:
    """(the download params used, images zip or folder, ground truth CSV, which source), through
    download.py's path: the download section's source and limits, this section's files and pins."""
    source = dataclasses.replace(load_params("download", DownloadParams, params_path),
                                 files=[params.images, params.ground_truth], sha256=params.sha256)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat Retries.sleep's
    (images, truth), where = gather(source, os.environ.get(MIRROR_ENV) or None, cache_dir,
                                    "isic2018.sha256")
    return source, images, truth, where["source"]


def main(params_path: Path = PARAMS_FILE, model_path: Path = DEFAULT_MODEL,
         decision_path: Path = Path("models/decision.json"), metrics_path: Path = Path("metrics/isic2018.json"),
         submission_path: Path = Path("metrics/isic2018_submission.csv"),
         per_class_path: Path = Path("metrics/isic2018_per_class.csv"), cache_dir: Path = CACHE_DIR) -> None:
    """Score the model on the ISIC 2018 Task 3 test set if `isic2018.enabled`, else record that it was not."""
    params = load_params("isic2018", IsicParams, params_path)
    if not params.enabled:
        atomic_write_text(Path(submission_path), ",".join(SUBMISSION_COLUMNS) + "\n")
        atomic_write_text(Path(per_class_path), PER_CLASS_HEADER + "\n")
        atomic_write_json(Path(metrics_path), {"scored": False})
        log.info("isic2018.enabled is false: nothing read or downloaded; %s says so", metrics_path)
        return
    source, images_from, truth_path, where = fetch(params, params_path, Path(cache_dir))
    weights = read_ground_truth(truth_path)
    try:
        predictor = load(Path(model_path), Path(decision_path))
    except UsageError as err:
        raise StageError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="isic2018-") as tmp:
        build_raw([images_from], Path(tmp), source, Path(cache_dir))
        images = sorted((Path(tmp) / "images").iterdir())
        ids = [p.stem for p in images]
        match_images(ids, weights, str(images_from), truth_path)
        corrected = predict_corrected(predictor, images)
    unseen = sorted(set(weights.index) - set(ids))
    submission = submission_csv(ids, corrected, unseen)
    figures = score(truth_path, submission)
    atomic_write_text(Path(submission_path), submission)
    per_class = figures.pop("per_class")  # a plain table: metrics/ holds at most 100 figures in all
    atomic_write_text(Path(per_class_path), PER_CLASS_HEADER + "\n" + "".join(
        f"{dx},{f['auc']:.6f},{f['average_precision']:.6f}\n" for dx, f in per_class.items()))
    atomic_write_json(Path(metrics_path), {"scored": True, "images": len(ids), **figures,
                                           "rows_without_image": unseen,
                                           "sha256": {p.name: file_digest(p, "sha256")
                                                      for p in (images_from, truth_path) if p.is_file()}})
    log.info("ISIC 2018 Task 3 test: %d images from the %s source, balanced accuracy %.4f, macro AUC %.4f (%s)",
             len(ids), where, figures["balanced_accuracy"], figures["auc"], metrics_path)


if __name__ == "__main__":
    run_stage(main)
