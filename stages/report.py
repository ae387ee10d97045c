"""Stage `report`: what a reader needs beyond the headline metrics, in one folder `metrics/report/`.

- `gradcam/<dx>.png`: one Grad-CAM contact sheet per true class, for a seeded sample of test
  images, up to N correctly and N wrongly classified (stages/lib/gradcam.py).
- `subgroups.json`: metrics by sex, age band and body site (a plain output: too many figures to
  be metrics, and most groups are too small to compare run against run).
- `model_card.md`: model, data and its origin, metrics, confusion matrix, calibration, the
  "unknown" answer, subgroups, intended use, limitations, how to reproduce (stages/lib/model_card.py).
Everything comes from files earlier stages wrote (evaluate's metrics and tables: predictions,
calibration, non-lesions; the model only for Grad-CAM), sorted, seeded and rounded, with no
timestamps: the same inputs give byte-identical files. Small subgroups are flagged, never hidden.
The test split must have been scored (evaluate.score_test: true).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, SPLIT_COLUMNS, SPLITS
from stages.lib.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_table
from stages.lib.gradcam import GRADCAM_LAYER, gradcam_sample, gradcam_sheets
from stages.lib.model_card import (
    MISSING_METADATA,
    SUBGROUP_ATTRIBUTES,
    EvaluateFacts,
    TrainFacts,
    describe_model,
    model_card,
)
from stages.lib.params import PARAMS_FILE, from_dict, in_range, load_params, read_params
from stages.lib.shards import read_index, read_shards

log = logging.getLogger("stages.report")

PREDICTION_COLUMNS = ("image_id", "actual", "predicted", "probability")
CALIBRATION_COLUMNS = ("probabilities", "bin", "confidence", "accuracy", "count")
NON_LESION_COLUMNS = ("kind", "images", "rejected")
DIGITS = 4  # rounding of every written figure: diffs show changes, not float noise


@dataclass(frozen=True)
class ReportParams:
    seed: int
    gradcam_per_class: int  # correctly and wrongly classified, each
    age_bands: list[int]  # band edges in years: [30, 45] gives <30, 30-44, 45+
    min_group_size: int  # smaller subgroups are flagged as too few images

    def __post_init__(self) -> None:
        in_range("seed", self.seed, 0)
        in_range("gradcam_per_class", self.gradcam_per_class, 0)
        if any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:])):
            raise ValueError(f"age_bands must be strictly increasing, got {self.age_bands}")
        in_range("min_group_size", self.min_group_size, 1)


def quoted(params: dict[str, Any], section: str, facts: type) -> Any:
    """The keys of params.yaml's `section` that dataclass `facts` names (the rest are that stage's own)."""
    values = params.get(section, {})
    names = {f.name for f in dataclasses.fields(facts)}
    return {k: v for k, v in values.items() if k in names} if isinstance(values, dict) else values


def load_quoted_params(path: Path) -> tuple[TrainFacts, EvaluateFacts]:
    """The other stages' params.yaml keys the model card quotes, checked like their stages check them."""
    params = read_params(path)
    return (from_dict(TrainFacts, quoted(params, "train", TrainFacts), "train"),
            from_dict(EvaluateFacts, quoted(params, "evaluate", EvaluateFacts), "evaluate"))


def read_source(path: Path) -> dict[str, Any]:
    """download's record of the files data/raw was made from: {"files": {name: {"bytes", "sha256"}}}
    (a folder of extracted images: {"images", "bytes"})."""
    source = read_json(path, "download")
    if not isinstance(source, dict) or not isinstance(source.get("files"), dict) or not all(
            isinstance(facts, dict) for facts in source["files"].values()):
        raise StageError(f"{path}: must hold 'files', each file's size and sha256 (re-run: dvc repro download)")
    return source


def rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


# --------------------------------------------------------------------------------------------
# Confusion
# --------------------------------------------------------------------------------------------
def confusion_counts(predictions: pd.DataFrame) -> pd.DataFrame:
    """Counts of (actual, predicted) over all seven classes, absent ones included as zeros.

    Rows are the true class, columns the predicted class.
    """
    counts = pd.crosstab(predictions["actual"], predictions["predicted"])
    return counts.reindex(index=list(CLASSES), columns=list(CLASSES), fill_value=0)


# --------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------
def age_band_names(edges: list[int]) -> list[str]:
    """[30, 45, 60] -> <30, 30-44, 45-59, 60+ (ages in whole years; HAM10000 gives multiples of 5)."""
    if not edges:
        return ["all ages"]
    return [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def age_band(age: float, edges: list[int]) -> str:
    if pd.isna(age):
        return MISSING_METADATA
    return age_band_names(edges)[int(np.searchsorted(edges, age, side="right"))]


def group_metrics(actual: pd.Series, predicted: pd.Series, min_size: int) -> dict[str, Any]:
    """The headline figures for one subgroup; small groups are flagged (their figures are noise)."""
    correct = actual == predicted
    melanoma = actual == "mel"
    return {
        "n": int(len(actual)),
        "balanced_accuracy": rounded(correct.groupby(actual).mean().mean()),  # over classes present
        "accuracy": rounded(correct.mean()),
        "melanomas": int(melanoma.sum()),
        "mel_sensitivity": rounded(correct[melanoma].mean()) if melanoma.any() else None,
        "too_few_images": bool(len(actual) < min_size),
    }


def subgroup_metrics(table: pd.DataFrame, age_edges: list[int], min_size: int) -> dict[str, dict[str, dict]]:
    """Metrics per sex, age band and body site, for the attributes the table has.

    `table` has actual, predicted and metadata columns. Missing values form an `unknown` group.
    Age bands keep their natural order; other groups come largest first, then by name.
    """
    result = {}
    for attribute in (a for a in SUBGROUP_ATTRIBUTES if a in table.columns):
        if attribute == "age":
            groups = table["age"].map(lambda age: age_band(age, age_edges))
            order = [g for g in age_band_names(age_edges) + [MISSING_METADATA] if (groups == g).any()]
        else:
            groups = table[attribute].fillna(MISSING_METADATA).astype(str)
            sizes = groups.value_counts()
            order = sorted(sizes.index, key=lambda g: (-sizes[g], g))
        result[attribute] = {g: group_metrics(table["actual"][groups == g], table["predicted"][groups == g], min_size)
                             for g in order}
    return result


def with_metadata(predictions: pd.DataFrame, test_split: pd.DataFrame) -> pd.DataFrame:
    """Predictions joined with the test split's metadata by image id; every prediction must match."""
    columns = ["image_id"] + [a for a in SUBGROUP_ATTRIBUTES if a in test_split.columns]
    joined = predictions.merge(test_split[columns], on="image_id", how="left", indicator=True)
    unmatched = joined.loc[joined["_merge"] != "both", "image_id"]
    if len(unmatched):
        raise StageError(f"predictions.csv has {len(unmatched)} image(s) not in the test split "
                         f"(e.g. {unmatched.iloc[0]}): re-run: dvc repro evaluate")
    return joined.drop(columns="_merge")


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
def scored_test(test: dict[str, Any], path: Path) -> dict[str, Any]:
    """metrics/test.json, refused when evaluate did not score test (a seed sweep's setting)."""
    if test.get("scored") is False:
        raise StageError(f"{path}: test was not scored (params.yaml evaluate.score_test is false); the report "
                         "describes the test split: set it to true, then: dvc repro evaluate")
    return test


def subgroups_file(subgroups: dict, images: int, min_size: int) -> dict[str, Any]:
    """subgroups.json: a plain output (not a DVC metric)."""
    return {"test_images": images, "min_group_size": min_size, "subgroups": subgroups}


def per_class_details(plots_dir: Path) -> dict[str, pd.DataFrame | None]:
    """evaluate's per-class tables (precision, recall, F1, AUC, support), where it wrote them."""
    details: dict[str, pd.DataFrame | None] = {}
    for split in ("val", "test"):
        path = plots_dir / split / "per_class.csv"
        details[split] = read_table(path, ("dx",)) if path.is_file() else None
    return details


def main(params_path: Path = PARAMS_FILE, model_path: Path = Path("models/model.keras"),
         data_dir: Path = Path("data/augmented"), split_dir: Path = Path("data/split"),
         source_path: Path = Path("data/raw/source.json"), metrics_dir: Path = Path("metrics"),
         report_dir: Path = Path("metrics/report")) -> None:
    params = load_params("report", ReportParams, params_path)
    train, evaluate = load_quoted_params(params_path)
    metrics_dir, split_dir = Path(metrics_dir), Path(split_dir)
    source = read_source(Path(source_path))
    splits = {s: read_table(split_dir / f"{s}.csv", SPLIT_COLUMNS) for s in SPLITS}
    data, val, test = (read_json(metrics_dir / name, stage) for name, stage in
                       (("data.json", "split"), ("val.json", "evaluate"), ("test.json", "evaluate")))
    test = scored_test(test, metrics_dir / "test.json")
    predictions = read_table(metrics_dir / "plots" / "test" / "predictions.csv", PREDICTION_COLUMNS)
    calibration = read_table(metrics_dir / "plots" / "test" / "calibration.csv", CALIBRATION_COLUMNS)
    non_lesions = read_table(metrics_dir / "plots" / "test" / "non_lesions.csv", NON_LESION_COLUMNS)
    details = per_class_details(metrics_dir / "plots")
    images, _, image_ids = read_shards(data_dir, "test")
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_path)
    tf.config.experimental.enable_op_determinism()
    sample = gradcam_sample(predictions, params.gradcam_per_class, params.seed)
    sheets = gradcam_sheets(model, sample, images, image_ids, params.gradcam_per_class)
    subgroups = subgroup_metrics(with_metadata(predictions, splits["test"]), params.age_bands, params.min_group_size)
    card = model_card(train=train, evaluate=evaluate, model_facts=describe_model(model),
                      image_size=read_index(data_dir)["image_size"], data=data, source=source, splits=splits,
                      val=val, test=test, details=details, confusion=confusion_counts(predictions),
                      calibration=calibration, non_lesions=non_lesions, subgroups=subgroups,
                      min_group_size=params.min_group_size, gradcam_sample=sample, gradcam_sheets=sorted(sheets),
                      gradcam_per_class=params.gradcam_per_class, gradcam_layer=GRADCAM_LAYER)

    with atomic_dir(Path(report_dir)) as out:
        for name, png in sorted(sheets.items()):
            atomic_write_bytes(out / "gradcam" / name, png)
        atomic_write_json(out / "subgroups.json", subgroups_file(subgroups, len(predictions), params.min_group_size))
        atomic_write_text(out / "model_card.md", card)
    log.info("%s: %d Grad-CAM sheets (%d images), subgroups, model card", report_dir, len(sheets), len(sample))


if __name__ == "__main__":
    run_stage(main)
