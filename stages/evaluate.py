"""Stage `evaluate`: score the trained model on validation and, once, on the test split.

Balanced multiclass accuracy (mean per-class recall, the ISIC 2018 ranking metric) comes first:
plain accuracy mostly measures `nv`, two thirds of the images. Every figure is computed with
scikit-learn from the model's probabilities; plots are written as small CSV tables that
`dvc plots show` / `dvc plots diff` draw with the class names on them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import (
    CLASSES,
    MELANOMA,
    PARAMS_FILE,
    StageError,
    atomic_write_json,
    atomic_write_text,
    load_params,
    read_shards,
    run_stage,
)

log = logging.getLogger("stages.evaluate")
CURVE_POINTS = 101  # ROC and PR curves are sampled on a common grid, one column per class


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> dict:
    """All reported figures for one split, from true labels and predicted probabilities."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
        top_k_accuracy_score,
    )

    codes = list(range(len(CLASSES)))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=codes, zero_division=0)
    per_class, aucs = {}, []
    for k, dx in enumerate(CLASSES):
        positives = labels == k
        auc = float(roc_auc_score(positives, proba[:, k])) if 0 < positives.sum() < len(labels) else None
        if auc is not None:
            aucs.append(auc)
        per_class[dx] = {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                         "auc": auc, "support": int(support[k])}
    is_mel, said_mel = labels == MELANOMA, predicted == MELANOMA
    negatives = int((~is_mel).sum())
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "top2_accuracy": float(top_k_accuracy_score(labels, proba, k=2, labels=codes)),
        "top3_accuracy": float(top_k_accuracy_score(labels, proba, k=3, labels=codes)),
        "mel_sensitivity": float(recall[MELANOMA]),
        "mel_specificity": float((~said_mel & ~is_mel).sum() / negatives) if negatives else None,
        "images": int(len(labels)),
        "per_class": per_class,
    }


def roc_table(labels: np.ndarray, proba: np.ndarray) -> str:
    """One-vs-rest ROC per class, TPR sampled at common false-positive rates (CSV: fpr, akiec, ...)."""
    from sklearn.metrics import roc_curve

    grid = np.linspace(0, 1, CURVE_POINTS)
    columns = {"fpr": grid}
    for k, dx in enumerate(CLASSES):
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, proba[:, k])
            columns[dx] = np.interp(grid, fpr, tpr)
    return _csv(columns)


def pr_table(labels: np.ndarray, proba: np.ndarray) -> str:
    """One-vs-rest precision-recall per class; precision interpolated as the best at recall >= r."""
    from sklearn.metrics import precision_recall_curve

    grid = np.linspace(0, 1, CURVE_POINTS)
    columns = {"recall": grid}
    for k, dx in enumerate(CLASSES):
        positives = labels == k
        if positives.any():
            precision, recall, _ = precision_recall_curve(positives, proba[:, k])
            order = np.argsort(recall)
            best_from = np.maximum.accumulate(precision[order][::-1])[::-1]  # best precision at recall >= r
            columns[dx] = [best_from[np.searchsorted(recall[order], r, side="left")] if r <= recall.max() else 0.0
                           for r in grid]
    return _csv(columns)


def predictions_table(image_ids: np.ndarray, labels: np.ndarray, proba: np.ndarray) -> str:
    """Per image: actual and predicted class by name (DVC's confusion plots read these columns)."""
    predicted = proba.argmax(axis=1)
    rows = ["image_id,actual,predicted,probability"]
    rows += [f"{i},{CLASSES[a]},{CLASSES[p]},{proba[n, p]:.4f}"
             for n, (i, a, p) in enumerate(zip(image_ids, labels, predicted))]
    return "\n".join(rows) + "\n"


def _csv(columns: dict) -> str:
    names = list(columns)
    rows = [",".join(names)]
    rows += [",".join(f"{float(columns[n][i]):.4f}" for n in names) for i in range(len(columns[names[0]]))]
    return "\n".join(rows) + "\n"


def evaluate_split(model, data_dir: Path, split: str, batch_size: int, plots_dir: Path) -> dict:
    images, labels, image_ids = read_shards(data_dir, split)
    proba = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    metrics = classification_metrics(labels, proba)
    out = plots_dir / split
    atomic_write_text(out / "predictions.csv", predictions_table(image_ids, labels, proba))
    atomic_write_text(out / "roc.csv", roc_table(labels, proba))
    atomic_write_text(out / "precision_recall.csv", pr_table(labels, proba))
    log.info("%s: balanced accuracy %.4f, accuracy %.4f, melanoma sensitivity %.4f (%d images)", split,
             metrics["balanced_accuracy"], metrics["accuracy"], metrics["mel_sensitivity"], len(labels))
    return metrics


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         model_path: Path = Path("models/model.keras"), metrics_dir: Path = Path("metrics")) -> None:
    params = load_params("evaluate", EvaluateParams, params_path)
    if not Path(model_path).is_file():
        raise StageError(f"{model_path}: no trained model (run: dvc repro train)")
    import keras

    model = keras.saving.load_model(model_path)
    metrics_dir = Path(metrics_dir)
    for split in ("val", "test"):  # the only place the test split is read
        metrics = evaluate_split(model, Path(data_dir), split, params.batch_size, metrics_dir / "plots")
        atomic_write_json(metrics_dir / f"{split}.json", metrics)


if __name__ == "__main__":
    run_stage(main)
