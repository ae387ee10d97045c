"""Stage `evaluate`: choose the decision rule on validation, then score validation and test with it.

Balanced accuracy (mean per-class recall, ISIC 2018's ranking metric) leads: plain accuracy
mostly measures `nv`. Everything that turns model outputs into answers is chosen on **validation
only** and stored in models/decision.json + models/ood.npz (stages/lib/inference.py): the
class-prior strength (best balanced accuracy), the melanoma threshold (the highest that reaches
`mel_sensitivity_target`), the calibration temperature of the shown probabilities (NLL) and the
out-of-distribution threshold (keeps `ood_keep` of validation lesions; Gaussians fitted on
training features); the same for the metadata path (`with_metadata`: the image probabilities
times the metadata model's likelihood ratio, stage `metadata`), scored on each image's own
age, sex and site from the split CSVs. Every figure comes from inference.judge, the computation
predict and the web page use; each validation answer and its explanation go to answers*.csv.
Test is then scored with that fixed rule, and so are data/non_lesions's images
(share answered "unknown"), unless `score_test` is false (seed sweeps): metrics/test.json is then
{"scored": false} and test is not read at all. Outputs: metrics/{val,test}.json (headline
figures, all scalars; the few `dvc exp show` lists also in metrics/headline/, short-named),
metrics/plots/{split}/ (CSV tables `dvc plots` draws). Intervals: a lesion-group bootstrap.
Measurements: docs/experiments.md.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.lib import metadata, ood
from stages.lib.calibration import BINS, CURVES, calibration_figures, fit_temperature, top_class_table
from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, MELANOMA
from stages.lib.figures import lookup
from stages.lib.files import atomic_dir, atomic_write_json, atomic_write_text, read_table
from stages.lib.images import load_image
from stages.lib.inference import (
    Decision,
    Judgement,
    MetadataRule,
    class_shares,
    corrected,
    describe,
    feature_model,
    judge,
    model_outputs,
    prior_bias,
    threshold_for_sensitivity,
)
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.shards import read_index, read_shards, sample_images

log = logging.getLogger("stages.evaluate")
CURVE_POINTS = 101  # ROC and PR curves are sampled on a common grid, one column per class
NEVUS = CLASSES.index("nv")
# metrics/headline/{split}.json: the figures `dvc exp show` lists (README), nested under the split
# with names short enough for its columns: balanced accuracy, melanoma sensitivity at the operating
# point; split -> {name: its key in metrics/{split}.json}.
# (with_metadata's figures are left out: two more columns would not fit 120 with the longest param key)
HEADLINE = {"val": {"bacc": "balanced_accuracy"},
            "test": {"bacc": "balanced_accuracy", "mel_sens": "operating_point.mel_sensitivity"}}


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    tta: Literal["none", "flips"]       # test-time augmentation: mean over the 4 flips
    prior_strengths: list[float]        # candidates for the class-prior correction; [0.0] turns it off
    mel_sensitivity_target: float       # the melanoma threshold is chosen on val to reach this
    bootstrap_samples: int              # lesion-group bootstrap for the balanced accuracy interval
    seed: int
    ood_keep: float = 0.98              # share of validation lesions the out-of-distribution threshold keeps
    ood_fit_images: int = 3000          # real training images (seeded draw) the class Gaussians are fitted on
    score_test: bool = True             # false: test is not read (seed sweeps); test.json says {"scored": false}
    metadata_weight: float = 1.0        # the metadata likelihood ratio's power; 0: no metadata path

    def __post_init__(self) -> None:
        in_range("batch_size", self.batch_size, 1)
        in_range("mel_sensitivity_target", self.mel_sensitivity_target, 0, 1, lo_open=True)
        in_range("bootstrap_samples", self.bootstrap_samples, 100)
        in_range("ood_keep", self.ood_keep, 0.5, 1)
        in_range("ood_fit_images", self.ood_fit_images, 2 * len(CLASSES))
        in_range("metadata_weight", self.metadata_weight, 0, 10)
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
                         seed: int) -> tuple[float, float]:
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
    return float(np.percentile(scores, 2.5)), float(np.percentile(scores, 97.5))


def operating_point(labels: np.ndarray, decided: np.ndarray) -> dict:
    """Figures of the decisions at the operating point ("mel" if p(mel) >= threshold, else the top
    class): melanoma sensitivity, specificity against the six other classes and against nevi only
    (the confusion that matters most: a nevus called melanoma), balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    mel_sensitivity, mel_specificity = melanoma_rates(labels, decided)
    nevi = labels == NEVUS
    return {
        "mel_sensitivity": mel_sensitivity,
        "mel_specificity": mel_specificity,
        "mel_specificity_nv": float(np.mean(decided[nevi] != MELANOMA)) if nevi.any() else None,
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


def with_shown_and_ood(decision: Decision, params: EvaluateParams, val_labels: np.ndarray, val_proba: np.ndarray,
                       val_features: np.ndarray, train_labels: np.ndarray, fit_labels: np.ndarray,
                       fit_features: np.ndarray) -> Decision:
    """The rule plus what is shown and when the answer is "unknown", all from validation and training:
    the temperature (NLL on validation, with the real training class shares as the stated prior)
    and the out-of-distribution detector (Gaussians on training features, threshold on validation)."""
    prior = class_shares(train_labels)
    detector = ood.fit(fit_features, fit_labels, val_features, params.ood_keep, len(CLASSES))
    return dataclasses.replace(decision, temperature=fit_temperature(val_labels, val_proba, prior),
                               class_prior=tuple(float(p) for p in prior), ood=detector)


def with_metadata_rule(decision: Decision, params: EvaluateParams, val: Scored, train_labels: np.ndarray,
                       model: metadata.MetadataModel, model_file: dict[str, str]) -> Decision:
    """`decision` plus the metadata path's rule, chosen on the validation images whose metadata it
    uses, as the image rule is on all: prior strength, melanoma threshold, temperature."""
    used = model.uses(val.rows)
    if params.metadata_weight == 0 or not used.any():
        return decision
    rows = [row for row, u in zip(val.rows, used) if u]
    combined = metadata.combine(val.proba[used], model.log_ratio(rows), params.metadata_weight)
    chosen = choose_decision(params, val.labels[used], combined, train_labels)
    temperature = fit_temperature(val.labels[used], combined, decision.class_prior)
    return dataclasses.replace(decision, with_metadata=MetadataRule(
        weight=params.metadata_weight, class_bias=chosen.class_bias, prior_strength=chosen.prior_strength,
        mel_threshold=chosen.mel_threshold, temperature=temperature, model=model, model_file=model_file))


def metadata_metrics(data: Scored, judged: Judgement, params: EvaluateParams) -> dict:
    """with_metadata's figures, each image with its own metadata: balanced accuracy, its interval,
    the operating point's melanoma figures (few: metrics/ holds at most 100 figures in all)."""
    from sklearn.metrics import balanced_accuracy_score

    low, high = balanced_accuracy_ci(data.labels, judged.corrected.argmax(axis=1), data.groups,
                                     params.bootstrap_samples, params.seed)
    point = operating_point(data.labels, judged.decided)
    return {"balanced_accuracy": float(balanced_accuracy_score(data.labels, judged.corrected.argmax(axis=1))),
            "balanced_accuracy_ci95_low": low, "balanced_accuracy_ci95_high": high,
            "operating_point": {key: point[key] for key in ("mel_sensitivity", "mel_specificity")},
            "images_with_metadata": int(judged.with_metadata.sum())}


def answers_csv(decision: Decision, data: Scored, judged: Judgement, rows: list | None) -> str:
    """Per image, the answer people are shown (inference.describe): decision, its reason, the
    shown probabilities and weighted scores; what tests/test_explanations.py checks the words against."""
    import pandas as pd

    said = describe(decision, judged, rows)
    table = pd.DataFrame({"image_id": data.image_ids, "with_metadata": [a["with_metadata"] for a in said],
                          "decision": [a["decision"] for a in said], "reason": [a["reason"] for a in said],
                          "mel_threshold": [round(a["mel_threshold"], 4) for a in said],
                          **{f"p_{dx}": [a["probabilities"][dx] for a in said] for dx in CLASSES},
                          **{f"w_{dx}": [a["weighted"][dx] for a in said] for dx in CLASSES}})
    return table.to_csv(index=False, lineterminator="\n")


def reliability_csv(labels: np.ndarray, shown: np.ndarray, uncalibrated: np.ndarray) -> str:
    """The reliability diagram of both curves (column `probabilities`: calibrated or uncalibrated),
    top class, equal-width bins: bin, mean confidence, accuracy and count."""
    import pandas as pd

    tables = [top_class_table(labels, proba, BINS).assign(probabilities=curve)
              for curve, proba in zip(CURVES, (shown, uncalibrated))]
    table = pd.concat(tables, ignore_index=True)[["probabilities", "bin", "confidence", "accuracy", "count"]]
    return table.round({"confidence": 4, "accuracy": 4}).to_csv(index=False, lineterminator="\n")


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


def predictions_table(image_ids: np.ndarray, labels: np.ndarray, proba: np.ndarray,
                      shown: np.ndarray | None = None) -> str:
    """Per image: actual and predicted class by name (DVC's confusion plots read these columns).

    `predicted` is the top class of `proba` (the prior-corrected probabilities that decide);
    `probability` is its probability as people are shown it (`shown`, calibrated; default `proba`).
    """
    predicted = proba.argmax(axis=1)
    shown = proba if shown is None else shown
    rows = ["image_id,actual,predicted,probability"]
    rows += [f"{i},{CLASSES[a]},{CLASSES[p]},{shown[n, p]:.4f}"
             for n, (i, a, p) in enumerate(zip(image_ids, labels, predicted))]
    return "\n".join(rows) + "\n"


def real_train_labels(data_dir: Path) -> np.ndarray:
    """Labels of the real training images (each once, not as often as train reads them), from
    augment's index: the true class mix."""
    counts = read_index(data_dir)["splits"]["train"]["class_counts"]
    return np.repeat(np.arange(len(CLASSES)), [counts[dx] for dx in CLASSES])


def rows_of_each_image(split_dir: Path, split: str, image_ids: np.ndarray):
    """split's CSV rows (lesion group, age, sex, localization, ...) of each image, in shard order."""
    path = Path(split_dir) / f"{split}.csv"
    table = read_table(path, required=("image_id", "lesion_group")).set_index("image_id")
    missing = [i for i in image_ids if i not in table.index]
    if missing:
        raise StageError(f"{path}: no row for image {missing[0]} "
                         "(data/augmented is from another split: dvc repro augment)")
    return table.loc[list(image_ids)]


def metadata_of(table, where: Path) -> list[metadata.Metadata]:
    """Each row's Metadata (a bad value: an error naming the file)."""
    try:
        return metadata.of_table(table)
    except ValueError as err:
        raise StageError(f"{where}: {err}") from None


@dataclass(frozen=True)
class Scored:
    """One split's labels, model outputs and lesion groups."""

    labels: np.ndarray
    proba: np.ndarray      # the model's probabilities (mean over the test-time views), uncalibrated
    features: np.ndarray   # pooled features, for the out-of-distribution score
    groups: np.ndarray
    image_ids: np.ndarray
    rows: list             # each image's Metadata (age, sex, localization), from the split CSV


def split_metrics(data: Scored, judged: Judgement, params: EvaluateParams) -> tuple[dict, dict[str, str]]:
    """(metrics, plot tables by file name) of one split under the fixed decision rule."""
    metrics, per_class = classification_metrics(data.labels, judged.corrected)
    low, high = balanced_accuracy_ci(data.labels, judged.corrected.argmax(axis=1), data.groups,
                                     params.bootstrap_samples, params.seed)
    metrics["balanced_accuracy_ci95_low"], metrics["balanced_accuracy_ci95_high"] = low, high
    metrics["operating_point"] = operating_point(data.labels, judged.decided)
    metrics["calibration"] = calibration_figures(data.labels, judged.shown, data.proba)
    tables = {"predictions.csv": predictions_table(data.image_ids, data.labels, judged.corrected, judged.shown),
              "roc.csv": roc_table(data.labels, judged.corrected),
              "precision_recall.csv": pr_table(data.labels, judged.corrected),
              "per_class.csv": per_class_table(per_class),
              "calibration.csv": reliability_csv(data.labels, judged.shown, data.proba)}
    return metrics, tables


def read_non_lesions(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, kind of each) of the non_lesions stage's folder, each file as predict reads it
    (images.load_image, resized to `size`), in its index.csv's order."""
    index = Path(folder) / "index.csv"
    table = read_table(index, required=("file", "kind"))
    if table.empty:
        raise StageError(f"{index}: lists no image (re-run: dvc repro non_lesions)")
    images = np.stack([load_image(Path(folder) / name, size) for name in table["file"]])
    return images, table["kind"].to_numpy(str)


def non_lesion_figures(lesions: Judgement, non_lesions: Judgement, kinds: np.ndarray) -> tuple[dict, str]:
    """(out_of_distribution metrics, a per-kind table): lesions accepted, non-lesion images rejected."""
    rejected = ~non_lesions.in_distribution
    figures = {"lesions_accepted": float(np.mean(lesions.in_distribution)),
               "non_lesion_rejected": float(np.mean(rejected)), "non_lesion_images": int(len(kinds)),
               "method": ood.METHOD}
    rows = ["kind,images,rejected"] + [f"{kind},{int((kinds == kind).sum())},{np.mean(rejected[kinds == kind]):.4f}"
                                       for kind in dict.fromkeys(kinds)]
    return figures, "\n".join(rows) + "\n"


def headline(split: str, metrics: dict) -> dict:
    """{split: {name: figure}}: HEADLINE's figures of one split's metrics (none where test was not scored)."""
    figures = {name: lookup(metrics, key) for name, key in HEADLINE[split].items()}
    return {split: {name: value for name, value in figures.items() if value is not None}}


def log_split(split: str, m: dict) -> None:
    op = m["operating_point"]
    log.info("%s: balanced accuracy %.4f (95%% CI %.3f-%.3f); at the operating point melanoma sensitivity %.4f, "
             "specificity %.4f (vs nevi %.4f); ECE %.4f (uncalibrated %.4f)", split,
             m["balanced_accuracy"], m["balanced_accuracy_ci95_low"], m["balanced_accuracy_ci95_high"],
             op["mel_sensitivity"] or 0.0, op["mel_specificity"] or 0.0, op["mel_specificity_nv"] or 0.0,
             m["calibration"]["ece"], m["calibration"]["ece_uncalibrated"])


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         split_dir: Path = Path("data/split"), model_path: Path = Path("models/model.keras"),
         decision_path: Path = Path("models/decision.json"), ood_path: Path = Path("models/ood.npz"),
         metrics_dir: Path = Path("metrics"), non_lesions_dir: Path = Path("data/non_lesions"),
         metadata_path: Path = Path("models/metadata.json")) -> None:
    params = load_params("evaluate", EvaluateParams, params_path)
    meta_model, meta_file = metadata.MetadataModel.read(Path(metadata_path))
    if not Path(model_path).is_file():
        raise StageError(f"{model_path}: no trained model (run: dvc repro train)")
    import keras

    features_model = feature_model(keras.saving.load_model(model_path))
    data_dir, metrics_dir = Path(data_dir), Path(metrics_dir)

    def outputs(images: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        log.info("%s: %d images, tta %s", what, len(images), params.tta)
        return model_outputs(features_model, images, params.tta, params.batch_size)

    scored = {}
    for split in ("val", "test") if params.score_test else ("val",):
        images, labels, image_ids = read_shards(data_dir, split)
        table = rows_of_each_image(split_dir, split, image_ids)
        scored[split] = Scored(labels, *outputs(images, split), table["lesion_group"].to_numpy(), image_ids,
                               metadata_of(table, Path(split_dir) / f"{split}.csv"))
    val, train_labels = scored["val"], real_train_labels(data_dir)
    fit_images, fit_labels = sample_images(data_dir, "train", params.ood_fit_images, params.seed)
    _, fit_features = outputs(fit_images, "training images (out-of-distribution fit)")
    decision = with_shown_and_ood(choose_decision(params, val.labels, val.proba, train_labels), params, val.labels,
                                  val.proba, val.features, train_labels, fit_labels, fit_features)
    decision = with_metadata_rule(decision, params, val, train_labels, meta_model, meta_file)
    log.info("chosen on val: tta %s, prior strength %.2f, melanoma threshold %.4f, temperature %.3f, "
             "out-of-distribution threshold %.2f", decision.tta, decision.prior_strength, decision.mel_threshold,
             decision.temperature, decision.ood.threshold)
    results, tables, judged = {}, {}, {}
    for split, data in scored.items():
        judged[split] = judge(decision, data.proba, data.features)
        results[split], tables[split] = split_metrics(data, judged[split], params)
        log_split(split, results[split])
        if decision.with_metadata is not None:
            both = judge(decision, data.proba, data.features, data.rows)
            results[split]["with_metadata"] = metadata_metrics(data, both, params)
            log.info("%s with metadata (%d of %d images): balanced accuracy %.4f", split,
                     both.with_metadata.sum(), len(data.labels), results[split]["with_metadata"]["balanced_accuracy"])
            if split == "val":
                tables[split]["answers_with_metadata.csv"] = answers_csv(decision, data, both, data.rows)
    tables["val"]["answers.csv"] = answers_csv(decision, val, judged["val"], None)
    results["val"]["decision"] = {"prior_strength": decision.prior_strength, "mel_threshold": decision.mel_threshold,
                                  "temperature": decision.temperature}
    if params.score_test:
        images, kinds = read_non_lesions(non_lesions_dir, int(features_model.input_shape[1]))
        non_lesions = judge(decision, *outputs(images, "non-lesion images"))
        results["test"]["out_of_distribution"], tables["test"]["non_lesions.csv"] = non_lesion_figures(
            judged["test"], non_lesions, kinds)
        log.info("out of distribution: %.4f of test lesions accepted, %.4f of %d non-lesion images rejected",
                 *(results["test"]["out_of_distribution"][k] for k in
                   ("lesions_accepted", "non_lesion_rejected", "non_lesion_images")))
    else:
        results["test"] = {"scored": False}
    with atomic_dir(metrics_dir / "plots") as out:
        for split, files in tables.items():
            for name, text in files.items():
                atomic_write_text(out / split / name, text)
    for split, metrics in results.items():
        atomic_write_json(metrics_dir / f"{split}.json", metrics)
        atomic_write_json(metrics_dir / "headline" / f"{split}.json", headline(split, metrics))
    decision.save(Path(decision_path), Path(ood_path))


if __name__ == "__main__":
    run_stage(main)
