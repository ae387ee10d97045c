"""The model card (`metrics/report/model_card.md`): text only, from figures the `report` stage gathered.

Every function here turns figures into Markdown; none reads a file or the model. The text is
deterministic (no dates, figures rounded), so `git diff` of the card shows only real changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stages.lib.calibration import BINS
from stages.lib.dataset import CLASS_NAMES, CLASSES, SPLITS
from stages.lib.figures import fmt
from stages.lib.inference import TTA
from stages.lib.ood import FEATURE_LAYER

OFFICIAL_IMAGES = 10_015  # images in the official HAM10000 release (600x450 JPEGs)
MISSING_METADATA = "unknown"  # the group of rows whose metadata value (age, sex, site, dx_type) is missing
SUBGROUP_ATTRIBUTES = ("sex", "age", "localization")  # metadata columns, where the split has them
SUBGROUP_TITLES = {"sex": "Sex", "age": "Age band (years)", "localization": "Body site"}
# Committed settings that test figures helped choose, and how (docs/experiments.md, "Where test helped
# choose"). When one is re-chosen on validation, update its entry here and there.
TEST_INFORMED = (
    ("`export.int8_float_ops` (depthwise convolutions kept float32) and `export.representative_images`",
     "first chosen by the int8 file's agreement with the Keras model on test, on an earlier model; compared on "
     "validation since"),
    ("the learning rate's warm-up and cosine decay (`train.warmup_epochs`, `train.min_learning_rate`), and "
     "oversampling by repetition (`augment.target_per_class`) rather than class weights alone",
     "followed from single-seed test figures of the first experiments; never compared on validation"),
    ("`train.trainable_from`, `train.learning_rate`, `train.average_last_epochs`, `evaluate.tta` and the prior "
     "correction", "first followed from single-seed test figures; compared on validation since"),
    ("the prior of the shown probabilities (training class shares) and the out-of-distribution layer "
     f"(`{FEATURE_LAYER}`)", "their only recorded comparisons are on test (the prior) or name no split (the layer)"),
)


@dataclass(frozen=True)
class TrainFacts:
    """The keys of params.yaml's train section that the card quotes (dvc.yaml lists these)."""

    weights: str
    alpha: float
    trainable_from: str
    freeze_batchnorm: bool


@dataclass(frozen=True)
class EvaluateFacts:
    """The key of params.yaml's evaluate section that the card quotes (dvc.yaml lists it): the views
    each probability is the mean of, as evaluate wrote them into the decision rule."""

    tta: TTA


VIEWS_TEXT = {"flips": "mean over the 4 flips", "none": "of the image as it is, no flips"}  # by evaluate.tta


def is_figure(cell: Any) -> bool:
    return cell is None or isinstance(cell, (int, float, np.number))


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; columns of figures are right-aligned, text columns left-aligned."""
    figures = [bool(rows) and all(is_figure(row[c]) for row in rows) for c in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if f else ":---|" for f in figures)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def class_label(dx: str) -> str:
    return f"{dx} ({CLASS_NAMES[dx]})"


def describe_model(model) -> dict[str, Any]:
    """Sizes the card quotes, read from the saved model itself (what was actually frozen)."""
    with_weights = [layer for layer in model.layers if layer.weights]
    return {
        "parameters": int(model.count_params()),
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "layers_with_weights": len(with_weights),
        "frozen_layers": sum(not layer.trainable for layer in with_weights),
    }


def model_section(train: TrainFacts, model_facts: dict[str, Any], image_size: int) -> str:
    weights = "ImageNet" if train.weights == "imagenet" else "none (trained from scratch)"
    frozen = ("none (every layer trains)" if train.trainable_from == "all"
              else f"every layer before `{train.trainable_from}`")
    if train.freeze_batchnorm:
        frozen += ", and every BatchNormalization layer (kept in inference mode with its initial statistics)"
    return "\n".join([
        "## Model",
        "",
        f"- Architecture: MobileNet V1 (width multiplier alpha = {train.alpha}) with global average pooling, "
        "dropout and a 7-way softmax `probabilities`, as one flat Keras model.",
        f"- Input: RGB {image_size}x{image_size} pixels in 0..255 (the model scales them itself); "
        "output: 7 probabilities in class-code order.",
        f"- Initial weights: {weights}. Frozen (params.yaml `train.trainable_from`): {frozen}.",
        f"- Parameters: {fmt(model_facts['parameters'])}, of which {fmt(model_facts['trainable_parameters'])} "
        f"trainable; {model_facts['frozen_layers']} of {model_facts['layers_with_weights']} layers with weights "
        "frozen.",
        "- How probabilities become an answer (prior strength, melanoma threshold, temperature, out-of-distribution "
        "threshold) is chosen on the validation split. The test split is scored by `evaluate`, and read by this "
        "report (calibration, subgroups, Grad-CAM) and by `export` (agreement of the exported files). Test figures "
        "did help choose these committed settings (docs/experiments.md, \"Where test helped choose\"):",
        *(f"  - {setting}: {how}." for setting, how in TEST_INFORMED),
    ])


def source_text(source: dict[str, Any]) -> str:
    """The files data/raw was made from, from download's data/raw/source.json: each one's size and
    sha256 (a folder of extracted images: its image count). Where they were fetched from is not
    recorded in the data, so that the same files give the same data from any server."""
    listed = []
    for name, facts in sorted(source.get("files", {}).items()):
        if facts.get("sha256"):
            listed.append(f"`{name}` ({fmt(facts.get('bytes'))} bytes, sha256 {facts['sha256'][:12]}…)")
        else:
            listed.append(f"`{name}` (a folder of {fmt(facts.get('images'))} extracted images)")
    return "the HAM10000 release files " + (", ".join(listed) or "(none recorded)")


def excluded_text(excluded: dict[str, dict[str, Any]]) -> str:
    """dedupe's exclusions by rule ({rule: {rows, image_ids}}) as one phrase."""
    return "; ".join(f"{rule}: {fmt(detail['rows'])}" for rule, detail in excluded.items()) or "none"


def data_section(data: dict[str, Any], splits: dict[str, pd.DataFrame], source: dict[str, Any]) -> str:
    exact, near = data.get("exact_duplicates", {}), data.get("near_duplicates", {})
    facts = [
        f"- Source: {source_text(source)}.",
        f"- The official release has {OFFICIAL_IMAGES:,} images; after de-duplication this data has "
        f"{fmt(data.get('images'))} images of {fmt(data.get('lesions'))} lesions.",
        f"- Exact duplicates: {fmt(exact.get('found'))} found, {fmt(exact.get('removed'))} removed, "
        f"{fmt(exact.get('across_lesions'))} across lesions. Near duplicates (re-encoded copies, proven by pixels): "
        f"{fmt(near.get('found'))} found, {fmt(near.get('across_lesions'))} across lesions; "
        f"lesion groups merged: {fmt(data.get('merged_lesion_groups'))}.",
        f"- Excluded metadata rows: {excluded_text(data.get('excluded', {}))}; age missing: "
        f"{fmt(data.get('age_missing'))}; sex unknown: {fmt(data.get('sex_unknown'))}.",
        "- Split by lesion group (all images of a lesion, and of its duplicates, stay in one split), "
        "stratified by class:",
    ]
    header = ["class"] + [f"{s} images" for s in SPLITS] + ["all"]
    rows = [[class_label(dx)] + [int((splits[s]["dx"] == dx).sum()) for s in SPLITS]
            + [sum(int((splits[s]["dx"] == dx).sum()) for s in SPLITS)] for dx in CLASSES]
    rows.append(["**all images**"] + [len(splits[s]) for s in SPLITS] + [sum(len(splits[s]) for s in SPLITS)])
    rows.append(["**lesion groups**"] + [splits[s]["lesion_group"].nunique() for s in SPLITS]
                + [sum(splits[s]["lesion_group"].nunique() for s in SPLITS)])
    return "\n".join(["## Data", ""] + facts + ["", md_table(header, rows)])


METRIC_ROWS = (("balanced_accuracy", "**balanced accuracy** (mean recall over classes)"), ("accuracy", "accuracy"),
               ("macro_f1", "macro F1"), ("macro_auc", "macro AUC (one-vs-rest)"), ("top2_accuracy", "top-2 accuracy"),
               ("top3_accuracy", "top-3 accuracy"), ("mel_sensitivity", "melanoma sensitivity"),
               ("mel_specificity", "melanoma specificity"))
OPERATING_POINT_ROWS = (("mel_sensitivity", "melanoma sensitivity at the threshold"),
                        ("mel_specificity", "melanoma specificity at the threshold (vs the six other classes)"),
                        ("mel_specificity_nv", "melanoma specificity at the threshold (vs nevi only)"),
                        ("balanced_accuracy", "balanced accuracy at the threshold"))
PER_CLASS_COLUMNS = (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("auc", "AUC"),
                     ("support", "images"))


def interval(metrics: dict[str, Any]) -> str | None:
    """The balanced accuracy's 95% interval as "low – high", where the metrics file has it."""
    low, high = metrics.get("balanced_accuracy_ci95_low"), metrics.get("balanced_accuracy_ci95_high")
    if all(isinstance(v, (int, float)) for v in (low, high)):
        return f"{low:.3f} – {high:.3f}"
    return None


def per_class_rows(headline: dict[str, Any], details: pd.DataFrame | None) -> list[list[Any]]:
    """One row per class: the details table (evaluate's per_class.csv) where there is one, else the
    per-class figures of the metrics file."""
    rows = []
    for dx in CLASSES:
        if details is not None and dx in set(details["dx"]):
            found = details[details["dx"] == dx].iloc[0]
            values = [None if pd.isna(found.get(key)) else found.get(key) for key, _ in PER_CLASS_COLUMNS]
            values = [int(v) if key == "support" and v is not None else (None if v is None else float(v))
                      for (key, _), v in zip(PER_CLASS_COLUMNS, values)]
        else:
            figures = headline.get("per_class", {}).get(dx, {})
            values = [figures.get(key) for key, _ in PER_CLASS_COLUMNS]
        rows.append([class_label(dx)] + values)
    return rows


def metrics_section(val: dict[str, Any], test: dict[str, Any],
                    details: dict[str, pd.DataFrame | None] | None = None) -> str:
    """Headline metrics led by balanced accuracy (accuracy mostly measures nv), then per class."""
    details = details or {}
    images = {split: None if table is None else int(table["support"].sum()) for split, table in details.items()}
    rows = [[label, val.get(key), test.get(key)] for key, label in METRIC_ROWS]
    rows.append(["images", images.get("val"), images.get("test")])
    ci = [interval(val), interval(test)]
    if any(ci):
        rows.insert(1, ["balanced accuracy, 95% interval (lesion-group bootstrap)"] + [c or "–" for c in ci])
    if val.get("operating_point") or test.get("operating_point"):
        rows.append(["melanoma threshold on the corrected p(mel) (chosen on validation)",
                     (val.get("decision") or {}).get("mel_threshold"), None])
        rows += [[label, (val.get("operating_point") or {}).get(key), (test.get("operating_point") or {}).get(key)]
                 for key, label in OPERATING_POINT_ROWS]
    both = [val.get("with_metadata") or {}, test.get("with_metadata") or {}]
    if any(both):
        rows += [["**balanced accuracy with age, sex and site** (each image's own metadata)"] +
                 [m.get("balanced_accuracy") for m in both],
                 ["balanced accuracy with metadata, 95% interval"] + [interval(m) or "–" for m in both]]
        rows += [[f"{label}, with metadata"] + [(m.get("operating_point") or {}).get(key) for m in both]
                 for key, label in OPERATING_POINT_ROWS[:2]]
        rows.append(["images whose metadata was used"] + [m.get("images_with_metadata") for m in both])
    test_details = details.get("test")
    nv = "most" if test_details is None else \
        f"{int(test_details.loc[test_details['dx'] == 'nv', 'support'].sum()) / max(images['test'], 1):.0%}"
    parts = ["## Metrics", "",
             f"Balanced accuracy leads: `nv` is {nv} of the test images, so plain accuracy mostly measures it.",
             "", md_table(["metric", "validation", "test"], rows)]
    for name, split, headline in (("Validation", "val", val), ("Test", "test", test)):
        parts += ["", f"{name}, per class:", "",
                  md_table(["class"] + [label for _, label in PER_CLASS_COLUMNS],
                           per_class_rows(headline, details.get(split)))]
    return "\n".join(parts)


def confusion_section(counts: pd.DataFrame) -> str:
    """`counts`: rows true class, columns predicted class, all seven of each."""
    rows = [[f"**{class_label(dx)}**"] + [int(v) for v in counts.loc[dx]] for dx in CLASSES]
    return "\n".join(["## Confusion matrix (test)", "", "Rows: true class; columns: predicted class; counts of images.",
                      "", md_table(["true \\ predicted"] + list(CLASSES), rows)])


def calibration_section(table: pd.DataFrame, val: dict[str, Any], test: dict[str, Any], tta: TTA) -> str:
    """What the shown probabilities mean, and how well they keep it on test (both curves)."""
    figures, decision = test.get("calibration") or {}, val.get("decision") or {}
    calibrated = table[table["probabilities"] == "calibrated"]
    rows = [[r.bin, r.confidence, r.accuracy, int(r.count)] for r in calibrated.itertuples(index=False)]
    return "\n".join([
        "## Probabilities and calibration (test)", "",
        "The probabilities `predict` and the web page show are calibrated to HAM10000's class mix: "
        f"softmax(log p / T + log share), where p is the model's probability ({VIEWS_TEXT[tta]}), "
        f"T = {fmt(decision.get('temperature'))} a temperature fitted on the validation split by log-likelihood, "
        "and share each class's share of the real training images. Read \"30% mel\" as: among images like this one, "
        "in a population with HAM10000's mix of diagnoses, about 30% are melanomas. In a clinic with another mix "
        "(fewer melanomas, say) the real chance differs. These probabilities do not decide: the answer comes from "
        "the decision rule (a class-prior correction chosen for balanced accuracy, and the melanoma threshold on "
        "its corrected p(mel), reported per image as `mel_probability`).",
        "",
        f"Expected calibration error (top class, {len(calibrated)} non-empty of {BINS} equal-width bins): "
        f"**{fmt(figures.get('ece'))}** calibrated, {fmt(figures.get('ece_uncalibrated'))} for the model's own "
        f"probabilities; log-likelihood loss {fmt(figures.get('nll'))}, Brier score {fmt(figures.get('brier'))}. "
        "A well-calibrated model's accuracy matches its confidence in every bin (reliability diagram of both: "
        "`metrics/plots/test/calibration.csv`, drawn by `dvc plots show`).",
        "", md_table(["confidence bin", "mean confidence", "accuracy", "images"], rows)])


def unknown_section(test: dict[str, Any], non_lesions: pd.DataFrame) -> str:
    """When the answer is "unknown": the out-of-distribution check and how it did."""
    ood = test.get("out_of_distribution") or {}
    rows = [[r.kind, int(r.images), r.rejected] for r in non_lesions.itertuples(index=False)]
    return "\n".join([
        "## \"Unknown\": images the model cannot judge", "",
        "The model only knows dermoscopic images of the seven HAM10000 classes. Before answering, what one of its "
        f"inner layers (`{FEATURE_LAYER}`, averaged over the image) sees is compared with what it saw in the training "
        "images: the Mahalanobis distance to the nearest class (one Gaussian per class, shared covariance). Above a "
        "threshold, the answer is `unknown` (\"not a lesion I can judge\"), whatever the probabilities say. "
        "The threshold keeps a fixed share of the validation lesions (params.yaml `evaluate.ood_keep`); no "
        "non-lesion image was used to choose it.",
        "",
        f"On test: {fmt(ood.get('lesions_accepted'))} of the lesions are judged; of "
        f"{fmt(ood.get('non_lesion_images'))} non-lesion images made in code (photos and their crops, screenshots, "
        f"icons, text pages, blank, noise, gradients, plain skin), {fmt(ood.get('non_lesion_rejected'))} are "
        "answered `unknown`. Images between the two (a lesion photographed with a phone instead of a dermatoscope, "
        "other skin diseases) were not measured: the check may let them through, and their answer means little.",
        "", md_table(["kind of image", "images", "share answered unknown"], rows)])


def subgroup_section(subgroups: dict[str, dict[str, dict]], min_size: int) -> str:
    parts = ["## Subgroups (test)", "",
             f"Groups with fewer than {min_size} images are flagged: their figures are shown but are mostly noise. "
             "Balanced accuracy is over the classes present in the group; melanoma sensitivity needs melanomas. "
             "The same figures are in `subgroups.json`."]
    for attribute in SUBGROUP_ATTRIBUTES:
        if attribute not in subgroups:
            parts += ["", f"{SUBGROUP_TITLES[attribute]}: not in the split's metadata."]
            continue
        rows = [[group, m["n"], m["melanomas"], m["balanced_accuracy"], m["accuracy"], m["mel_sensitivity"],
                 "too few images" if m["too_few_images"] else ""] for group, m in subgroups[attribute].items()]
        parts += ["", f"{SUBGROUP_TITLES[attribute]}:", "",
                  md_table(["group", "images", "melanomas", "balanced accuracy", "accuracy", "melanoma sensitivity",
                            "note"], rows)]
    return "\n".join(parts)


def gradcam_section(sample: pd.DataFrame, sheets: list[str], per_class: int, layer: str) -> str:
    """The contact sheets, one per true class, and the images on each."""
    parts = ["## Grad-CAM (test)", "",
             f"Up to {per_class} correctly and {per_class} wrongly classified test images per true class, drawn with a "
             f"fixed seed, on one contact sheet per class. In each cell, left: the image; right: where `{layer}` "
             "found evidence for the *predicted* class. A heatmap on the background or the ruler, not the lesion, "
             "is a warning sign.", ""]
    for dx in CLASSES:
        if f"{dx}.png" not in sheets:
            parts.append(f"- {class_label(dx)}: no sheet (report.gradcam_per_class is 0)")
            continue
        of_class = sample[sample["actual"] == dx]
        shown = ", ".join(row.image_id if row.predicted == dx else f"{row.image_id} (as {row.predicted})"
                          for row in of_class.itertuples(index=False)) or "no test images"
        parts.append(f"- [{class_label(dx)}](gradcam/{dx}.png): {shown}")
    return "\n".join(parts)


INTENDED_USE = """## Intended use

- Research and education: studying dermoscopic image classification, its errors, calibration and
  subgroup behaviour, and reproducible ML pipelines.
- **Not a medical device.** Not for diagnosis, screening, triage or any decision about a patient.
  Any suspicious skin lesion needs a clinician."""


def limitations_section(data: dict[str, Any], splits: dict[str, pd.DataFrame],
                        image_size: int) -> str:
    everything = pd.concat(list(splits.values()), ignore_index=True)
    counts = everything["dx"].value_counts()
    share_nv = counts.get("nv", 0) / max(len(everything), 1)
    lines = ["## Limitations", ""]
    lines.append(f"- Which copy of the release: published HAM10000 figures are comparable only on the official "
                 f"files ({OFFICIAL_IMAGES:,} images at 600x450); a mirror's copy may hold fewer or smaller images "
                 f"({fmt(data.get('images'))} images after de-duplication here). The files' sha256 under Data say "
                 "which copy this is.")
    lines += [
        f"- Low resolution: images are resized to {image_size}x{image_size} so that training runs on a CPU.",
        "- Dataset bias: dermoscopy of mostly fair-skinned patients from two sources (Vienna, Austria and "
        "Queensland, Australia); performance on darker skin, other populations, devices or clinical "
        "(non-dermoscopic) photos is unknown.",
        f"- Class imbalance: nv is {share_nv:.0%} of the images; df and vasc have only "
        f"{fmt(int(counts.get('df', 0)))} and {fmt(int(counts.get('vasc', 0)))} images in all "
        f"({fmt(int((splits['test']['dx'] == 'df').sum()))} and {fmt(int((splits['test']['dx'] == 'vasc').sum()))} "
        "in test), so their figures are uncertain.",
    ]
    if "dx_type" in everything.columns:
        mix = everything["dx_type"].fillna(MISSING_METADATA).value_counts()
        text = ", ".join(f"{kind} {n / len(everything):.0%}"
                         for kind, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"- Ground truth of mixed strength (dx_type): {text}; only histopathology is a confirmed "
                     "diagnosis.")
    lines.append("- One test split from the same sources: no external validation (the ISIC 2018 test set is opt-in: "
                 "`isic2018.enabled`).")
    return "\n".join(lines)


REPRODUCE = """## How to use and reproduce

```
pip install -r requirements.txt
dvc pull      # data and model from the DVC remote, if one is configured
dvc repro     # re-runs only the stages whose code, data or params changed
python -m stages.predict IMAGE...   # per image: the 3 most probable classes and the answer, or "unknown"
python -m stages.predict --age 60 --sex female --site back IMAGE   # with what is known of the patient (each optional)
python -m stages.serve              # starts a local web page that gives the same answers for uploaded images
```

`HAM10000_MIRROR=<base URL> dvc repro` fetches the images from a mirror instead of Harvard Dataverse.
Figures here come from `metrics/val.json`, `metrics/test.json`, `metrics/plots/{val,test}/` and
`metrics/report/subgroups.json`; params from `params.yaml`; the data's files from
`data/raw/source.json`."""


def model_card(*, train: TrainFacts, evaluate: EvaluateFacts, model_facts: dict[str, Any], image_size: int,
               data: dict[str, Any], source: dict[str, Any], splits: dict[str, pd.DataFrame], val: dict[str, Any],
               test: dict[str, Any], details: dict[str, pd.DataFrame | None], confusion: pd.DataFrame,
               calibration: pd.DataFrame, non_lesions: pd.DataFrame, subgroups: dict[str, dict[str, dict]],
               min_group_size: int, gradcam_sample: pd.DataFrame, gradcam_sheets: list[str], gradcam_per_class: int,
               gradcam_layer: str) -> str:
    """The whole card; deterministic text (no dates), so a diff shows only real changes."""
    sections = [
        "# Model card: HAM10000 skin-lesion classifier (MobileNet V1)",
        "Written by `dvc repro report` (stages/report.py, stages/lib/model_card.py) from the pipeline's outputs; "
        "do not edit by hand.\n\n"
        "Classes: " + ", ".join(f"{code} {class_label(dx)}" for code, dx in enumerate(CLASSES)) + ".",
        model_section(train, model_facts, image_size),
        data_section(data, splits, source),
        metrics_section(val, test, details),
        confusion_section(confusion),
        calibration_section(calibration, val, test, evaluate.tta),
        unknown_section(test, non_lesions),
        subgroup_section(subgroups, min_group_size),
        gradcam_section(gradcam_sample, gradcam_sheets, gradcam_per_class, gradcam_layer),
        INTENDED_USE,
        limitations_section(data, splits, image_size),
        REPRODUCE,
    ]
    return "\n\n".join(sections) + "\n"
