"""Stage `evaluate`: choose the decision rule on validation, then score validation and test with it.

Balanced multiclass accuracy (mean per-class recall, the ISIC 2018 ranking metric) comes first:
plain accuracy mostly measures `nv`, two thirds of the images. Every figure is computed with
scikit-learn from the model's probabilities; plots are written as small CSV tables that
`dvc plots show` / `dvc plots diff` draw with the class names on them.

Everything that turns probabilities into answers is chosen on **validation only** and written to
`models/decision.json`, which `predict` applies too (see stages/lib/inference.py): test-time flips
(a param), the class-prior correction strength (the candidate with the best validation balanced
accuracy) and the melanoma threshold (the highest one whose validation sensitivity reaches
`mel_sensitivity_target`). Test is then scored with that fixed rule. Test is also read by
`report` (model card, Grad-CAM) and `export` (agreement of the exported files), never to choose.

Uncertainty: `balanced_accuracy_ci95` is a percentile bootstrap that resamples whole lesion
groups (images of one lesion are not independent), `bootstrap_samples` times, seeded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, MELANOMA
from stages.lib.files import atomic_write_json, atomic_write_text, read_table
from stages.lib.inference import (
    Decision,
    corrected,
    decide,
    predict_proba,
    prior_bias,
    threshold_for_sensitivity,
)
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.shards import read_index, read_shards

log = logging.getLogger("stages.evaluate")
CURVE_POINTS = 101  # ROC and PR curves are sampled on a common grid, one column per class


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    tta: Literal["none", "flips"]       # test-time augmentation: mean over the 4 flips
    prior_strengths: list[float]        # candidates for the class-prior correction; [0.0] turns it off
    mel_sensitivity_target: float       # the melanoma threshold is chosen on val to reach this
    bootstrap_samples: int              # lesion-group bootstrap for balanced_accuracy_ci95
    seed: int

    def __post_init__(self) -> None:
        in_range("batch_size", self.batch_size, 1)
        in_range("mel_sensitivity_target", self.mel_sensitivity_target, 0, 1, lo_open=True)
        in_range("bootstrap_samples", self.bootstrap_samples, 100)
        if not self.prior_strengths:
            raise ValueError("prior_strengths must list at least one value (0.0: no correction)")
        for strength in self.prior_strengths:
            in_range("prior_strengths[]", strength, -2, 2)


def melanoma_rates(labels: np.ndarray, decided: np.ndarray) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of the answer "melanoma"; None where the split has no such image."""
    is_mel, said_mel = labels == MELANOMA, decided == MELANOMA
    positives, negatives = int(is_mel.sum()), int((~is_mel).sum())
    sensitivity = float((said_mel & is_mel).sum() / positives) if positives else None
    specificity = float((~said_mel & ~is_mel).sum() / negatives) if negatives else None
    return sensitivity, specificity


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> tuple[dict, dict]:
    """(headline figures, per-class details) for one split, from true labels and probabilities.

    The headline (balanced accuracy first, per-class recall) goes to metrics/{split}.json, what
    `dvc metrics diff` compares; precision, F1, AUC and support per class go to a plain table.
    """
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
    mel_sensitivity, mel_specificity = melanoma_rates(labels, predicted)
    headline = {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "top2_accuracy": float(top_k_accuracy_score(labels, proba, k=2, labels=codes)),
        "top3_accuracy": float(top_k_accuracy_score(labels, proba, k=3, labels=codes)),
        "mel_sensitivity": mel_sensitivity,
        "mel_specificity": mel_specificity,
        "images": int(len(labels)),
        "per_class": {dx: {"recall": figures["recall"]} for dx, figures in per_class.items()},
    }
    return headline, per_class


def per_class_table(per_class: dict) -> str:
    """precision, recall, F1, AUC and support per class, as CSV (not a metric: too many figures)."""
    rows = ["dx,precision,recall,f1,auc,support"]
    rows += [f"{dx},{f['precision']:.4f},{f['recall']:.4f},{f['f1']:.4f},"
             f"{'' if f['auc'] is None else format(f['auc'], '.4f')},{f['support']}" for dx, f in per_class.items()]
    return "\n".join(rows) + "\n"


def balanced_accuracy_ci(labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray, samples: int,
                         seed: int) -> list[float]:
    """95% percentile interval of balanced accuracy, resampling lesion groups with replacement.

    Each bootstrap sample draws as many groups as there are, with replacement; an image counts as
    often as its group was drawn. Classes missing from a sample are left out of its mean recall.
    """
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = group_index.max() + 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=samples)  # (samples, groups)
    weight = draws[:, group_index].astype(np.float64)                                  # (samples, images)
    correct = (predicted == labels).astype(np.float64)
    recalls = []
    for k in range(len(CLASSES)):
        in_class = labels == k
        if not in_class.any():
            continue
        total = weight[:, in_class].sum(axis=1)
        hits = weight[:, in_class] @ correct[in_class]
        recalls.append(np.where(total > 0, hits / np.maximum(total, 1e-12), np.nan))
    scores = np.nanmean(np.stack(recalls), axis=0)
    return [float(np.percentile(scores, 2.5)), float(np.percentile(scores, 97.5))]


def operating_point(labels: np.ndarray, proba: np.ndarray, mel_threshold: float) -> dict:
    """Figures of the decision rule "mel if p(mel) >= threshold, else the top class"."""
    from sklearn.metrics import balanced_accuracy_score

    decided = decide(proba, mel_threshold)
    mel_sensitivity, mel_specificity = melanoma_rates(labels, decided)
    return {
        "mel_threshold": float(mel_threshold),
        "mel_sensitivity": mel_sensitivity,
        "mel_specificity": mel_specificity,
        "balanced_accuracy": float(balanced_accuracy_score(labels, decided)),
    }


def corrected_ba(labels: np.ndarray, proba: np.ndarray, class_bias) -> float:
    """Balanced accuracy of the top class after the class-prior correction `class_bias`."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, corrected(proba, class_bias).argmax(axis=1)))


def choose_decision(params: EvaluateParams, val_labels: np.ndarray, val_proba: np.ndarray,
                    train_labels: np.ndarray) -> Decision:
    """The prior strength with the best validation balanced accuracy (ties: the weakest), then the
    melanoma threshold that reaches the target sensitivity on validation."""

    def score(strength: float) -> tuple[float, float]:
        return corrected_ba(val_labels, val_proba, prior_bias(train_labels, strength)), -abs(strength)

    strength = max(params.prior_strengths, key=score)
    bias = prior_bias(train_labels, strength)
    threshold = threshold_for_sensitivity(val_labels, corrected(val_proba, bias)[:, MELANOMA],
                                          params.mel_sensitivity_target)
    return Decision(tta=params.tta, class_bias=tuple(float(b) for b in bias), prior_strength=float(strength),
                    mel_threshold=threshold, mel_sensitivity_target=params.mel_sensitivity_target)


def roc_table(labels: np.ndarray, proba: np.ndarray) -> str:
    """One-vs-rest ROC per class, TPR sampled at common false-positive rates.

    Long format (CSV: class, fpr, tpr; one block of rows per class) so that a plot colours by class.
    Classes without positives or without negatives have no curve.
    """
    from sklearn.metrics import roc_curve

    grid = np.linspace(0, 1, CURVE_POINTS)
    rows = ["class,fpr,tpr"]
    for k, dx in enumerate(CLASSES):
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, proba[:, k])
            rows += [f"{dx},{x:.4f},{y:.4f}" for x, y in zip(grid, np.interp(grid, fpr, tpr))]
    return "\n".join(rows) + "\n"


def pr_table(labels: np.ndarray, proba: np.ndarray) -> str:
    """One-vs-rest precision-recall per class; precision interpolated as the best at recall >= r.

    Long format (CSV: class, recall, precision, prevalence). `prevalence`, the class's share of the
    images, is the precision of a classifier that guesses: the chance line of that class's curve.
    """
    from sklearn.metrics import precision_recall_curve

    grid = np.linspace(0, 1, CURVE_POINTS)
    rows = ["class,recall,precision,prevalence"]
    for k, dx in enumerate(CLASSES):
        positives = labels == k
        if positives.any():
            precision, recall, _ = precision_recall_curve(positives, proba[:, k])
            order = np.argsort(recall)
            best_from = np.maximum.accumulate(precision[order][::-1])[::-1]  # best precision at recall >= r
            curve = [best_from[np.searchsorted(recall[order], r, side="left")] if r <= recall.max() else 0.0
                     for r in grid]
            rows += [f"{dx},{r:.4f},{p:.4f},{positives.mean():.4f}" for r, p in zip(grid, curve)]
    return "\n".join(rows) + "\n"


def predictions_table(image_ids: np.ndarray, labels: np.ndarray, proba: np.ndarray) -> str:
    """Per image: actual and predicted class by name (DVC's confusion plots read these columns)."""
    predicted = proba.argmax(axis=1)
    rows = ["image_id,actual,predicted,probability"]
    rows += [f"{i},{CLASSES[a]},{CLASSES[p]},{proba[n, p]:.4f}"
             for n, (i, a, p) in enumerate(zip(image_ids, labels, predicted))]
    return "\n".join(rows) + "\n"


def real_train_labels(data_dir: Path) -> np.ndarray:
    """Labels of the real training images (not augment's copies), from augment's index: the true class mix."""
    split = read_index(data_dir)["splits"]["train"]
    real = {dx: split["class_counts"][dx] - split.get("augmented", {}).get(dx, 0) for dx in CLASSES}
    return np.repeat(np.arange(len(CLASSES)), [real[dx] for dx in CLASSES])


def lesion_groups(split_dir: Path, split: str, image_ids: np.ndarray) -> np.ndarray:
    """The lesion group of each image, in shard order (from split's CSV)."""
    table = read_table(Path(split_dir) / f"{split}.csv", required=("image_id", "lesion_group"))
    group_of = dict(zip(table["image_id"], table["lesion_group"]))
    missing = [i for i in image_ids if i not in group_of]
    if missing:
        raise StageError(f"{Path(split_dir) / f'{split}.csv'}: no row for image {missing[0]} "
                         f"(data/augmented is from another split: dvc repro augment)")
    return np.array([group_of[i] for i in image_ids])


def score_split(split: str, labels: np.ndarray, proba: np.ndarray, groups: np.ndarray, image_ids: np.ndarray,
                decision: Decision, params: EvaluateParams, plots_dir: Path) -> dict:
    """Metrics of one split under the fixed decision rule; writes its plot tables."""
    metrics, per_class = classification_metrics(labels, proba)
    metrics["balanced_accuracy_ci95"] = balanced_accuracy_ci(
        labels, proba.argmax(axis=1), groups, params.bootstrap_samples, params.seed)
    metrics["operating_point"] = operating_point(labels, proba, decision.mel_threshold)
    out = plots_dir / split
    atomic_write_text(out / "predictions.csv", predictions_table(image_ids, labels, proba))
    atomic_write_text(out / "roc.csv", roc_table(labels, proba))
    atomic_write_text(out / "precision_recall.csv", pr_table(labels, proba))
    atomic_write_text(out / "per_class.csv", per_class_table(per_class))
    log.info("%s: balanced accuracy %.4f (95%% CI %.3f-%.3f), melanoma sensitivity %.4f; at the operating "
             "point %.4f / specificity %.4f (%d images)", split, metrics["balanced_accuracy"],
             *metrics["balanced_accuracy_ci95"], metrics["mel_sensitivity"],
             metrics["operating_point"]["mel_sensitivity"], metrics["operating_point"]["mel_specificity"], len(labels))
    return metrics


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         split_dir: Path = Path("data/split"), model_path: Path = Path("models/model.keras"),
         decision_path: Path = Path("models/decision.json"), metrics_dir: Path = Path("metrics")) -> None:
    params = load_params("evaluate", EvaluateParams, params_path)
    if not Path(model_path).is_file():
        raise StageError(f"{model_path}: no trained model (run: dvc repro train)")
    import keras

    model = keras.saving.load_model(model_path)
    data_dir, metrics_dir = Path(data_dir), Path(metrics_dir)
    scored = {}
    for split in ("val", "test"):
        images, labels, image_ids = read_shards(data_dir, split)
        groups = lesion_groups(split_dir, split, image_ids)
        scored[split] = (labels, predict_proba(model, images, params.tta, params.batch_size), groups, image_ids)
    decision = choose_decision(params, scored["val"][0], scored["val"][1], real_train_labels(data_dir))
    log.info("chosen on val: tta %s, prior strength %.2f, melanoma threshold %.4f", decision.tta,
             decision.prior_strength, decision.mel_threshold)
    results = {}
    for split, (labels, proba, groups, image_ids) in scored.items():
        proba = corrected(proba, decision.class_bias)
        results[split] = score_split(split, labels, proba, groups, image_ids, decision, params,
                                     metrics_dir / "plots")
    for split, metrics in results.items():
        atomic_write_json(metrics_dir / f"{split}.json", metrics)
    decision.save(Path(decision_path))


if __name__ == "__main__":
    run_stage(main)
