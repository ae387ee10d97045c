"""Stage `report`: what a reader needs beyond the headline metrics, in one folder `metrics/report/`.

- `gradcam/*.png`: Grad-CAM heatmaps for a seeded sample of test images, up to N correctly and N
  wrongly classified per true class (`mel_correct_ISIC_….png`, `mel_wrong_as_nv_ISIC_….png`).
- `calibration.csv`: the reliability diagram (top-label confidence per bin against accuracy).
- `summary.json`: expected calibration error and metrics by sex, age band and body site.
- `model_card.md`: model, data, metrics, confusion matrix, calibration, subgroups, intended use,
  limitations and how to reproduce.

Everything is computed from files earlier stages wrote (predictions.csv for calibration and the
confusion matrix; the model only for Grad-CAM), sorted, seeded and rounded, with no timestamps:
the same inputs give byte-identical files, so `git diff` shows only real changes. Subgroups that
are too small are flagged, never hidden.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from stages.common import (
    CLASS_NAMES,
    CLASSES,
    LABELS,
    PARAMS_FILE,
    SPLIT_COLUMNS,
    SPLITS,
    StageError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    from_dict,
    load_params,
    read_index,
    read_shards,
    read_table,
    run_stage,
)

log = logging.getLogger("stages.report")

GRADCAM_LAYER = "conv_pw_13_relu"  # MobileNet V1's last convolutional activation
GRADCAM_BATCH = 32  # images per backward pass: bounds memory whatever gradcam_per_class is
PREDICTION_COLUMNS = ("image_id", "actual", "predicted", "probability")
SUBGROUP_ATTRIBUTES = ("sex", "age", "localization")  # metadata columns, where the split has them
UNKNOWN = "unknown"
OFFICIAL_IMAGES = 10_015  # images in the official HAM10000 release (600x450 JPEGs)
DIGITS = 4  # rounding of every written figure: diffs show changes, not float noise
PANEL_PX = 256  # each half of a Grad-CAM panel
CAPTION_PX = 34
HEAT_ALPHA = 0.45
# A "jet" colour scale, cold to hot, as anchors interpolated linearly.
HEAT_COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
                        dtype=float)


@dataclass(frozen=True)
class ReportParams:
    seed: int
    gradcam_per_class: int  # correctly and wrongly classified, each
    calibration_bins: int
    age_bands: list[int]  # band edges in years: [30, 45] gives <30, 30-44, 45+
    min_group_size: int  # smaller subgroups are flagged as too few images
    data_source: Literal["official", "mirror"]  # where data/raw came from (download does not record it)

    def __post_init__(self) -> None:
        if self.gradcam_per_class < 0:
            raise ValueError(f"gradcam_per_class must be >= 0, got {self.gradcam_per_class}")
        if self.calibration_bins < 1:
            raise ValueError(f"calibration_bins must be >= 1, got {self.calibration_bins}")
        if any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:])):
            raise ValueError(f"age_bands must be strictly increasing, got {self.age_bands}")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {self.min_group_size}")


@dataclass(frozen=True)
class TrainFacts:
    """The keys of params.yaml's train section that the card quotes (dvc.yaml lists these)."""

    weights: str
    alpha: float
    trainable_from: str
    freeze_batchnorm: bool


def load_train_facts(path: Path) -> TrainFacts:
    section = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("train", {})
    quoted = {f.name for f in dataclasses.fields(TrainFacts)}
    return from_dict(TrainFacts, {k: v for k, v in section.items() if k in quoted}, "train")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the stage that makes it: dvc repro)") from None
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err})") from None


def rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


# --------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------
def gradcam(model, images: np.ndarray, classes: np.ndarray, layer: str = GRADCAM_LAYER) -> np.ndarray:
    """Heatmaps (n, H, W) in [0, 1] at the input's size: where `layer` saw evidence for `classes[i]`.

    Grad-CAM (Selvaraju et al., 2017): the gradient of the class score with respect to the layer's
    feature maps, averaged over space, weighs each map; only positive evidence is kept. The model
    ends in a softmax, so the score is the log-probability, whose gradient is the class logit's
    minus the softmax-weighted mean of all logits': evidence for this class against the others. (The probability
    itself gives the same map after scaling, but its gradients vanish in float32 as p_c nears 1.)
    Each map is scaled to its own maximum (an all-zero map stays zero) and resized bilinearly.
    `model` is one loaded from a file: a layer called in several graphs (as in train.build_model's
    fresh model) has no single output to probe.
    """
    import keras
    import tensorflow as tf

    probe = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    pixels = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(pixels)  # record the graph even where the layer has no weights before it
        features, proba = probe(pixels, training=False)
        chosen = tf.gather(proba, tf.constant(classes, tf.int32), axis=1, batch_dims=1)
        score = tf.math.log(tf.maximum(chosen, 1e-12))
    grads = tape.gradient(score, features)  # images are independent: one backward pass for all
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
    return np.clip(cam.numpy(), 0.0, 1.0)


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image with the heatmap blended over it in a cold-to-hot colour scale (uint8 RGB)."""
    anchors = np.linspace(0.0, 1.0, len(HEAT_COLOURS))
    colours = np.stack([np.interp(heat, anchors, HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.round((1 - HEAT_ALPHA) * image + HEAT_ALPHA * colours).astype(np.uint8)


def gradcam_panel(image: np.ndarray, heat: np.ndarray, caption: list[str]) -> bytes:
    """PNG bytes: the image and its overlay side by side, enlarged, under a caption."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (2 * PANEL_PX, PANEL_PX + CAPTION_PX), "white")
    for k, pixels in enumerate((image, heat_overlay(image, heat))):
        half = Image.fromarray(pixels).resize((PANEL_PX, PANEL_PX), Image.Resampling.BILINEAR)
        canvas.paste(half, (k * PANEL_PX, CAPTION_PX))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for line, text in enumerate(caption):
        draw.text((4, 3 + 15 * line), text, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def gradcam_sample(predictions: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to `per_class` correctly and `per_class` wrongly classified test images per true class.

    Each (class, outcome) cell draws with its own seeded generator from image ids in sorted order,
    so a change in one class's predictions leaves the other classes' images as they were.
    """
    table = predictions.sort_values("image_id", kind="stable")
    picked = []
    for code, dx in enumerate(CLASSES):
        of_class = table[table["actual"] == dx]
        for outcome, cell in enumerate((of_class[of_class["predicted"] == dx], of_class[of_class["predicted"] != dx])):
            rng = np.random.default_rng([seed, code, outcome])
            take = rng.choice(len(cell), size=min(per_class, len(cell)), replace=False)
            picked.append(cell.iloc[np.sort(take)])
    return pd.concat(picked, ignore_index=True)


def gradcam_file_name(actual: str, predicted: str, image_id: str) -> str:
    outcome = "correct" if actual == predicted else f"wrong_as_{predicted}"
    return f"{actual}_{outcome}_{image_id}.png"


def gradcam_caption(actual: str, predicted: str, probability: float, image_id: str) -> list[str]:
    return [f"{image_id}   true: {actual} ({CLASS_NAMES[actual]})",
            f"predicted: {predicted} ({CLASS_NAMES[predicted]}) p={probability:.2f}   right: Grad-CAM"]


def gradcam_panels(model, sample: pd.DataFrame, images: np.ndarray, image_ids: np.ndarray) -> dict[str, bytes]:
    """File name -> PNG for each sampled image, the heatmap explaining its predicted class."""
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    missing = sorted(set(sample["image_id"]) - set(position))
    if missing:
        raise StageError(f"predictions.csv names test images that the test shards lack ({missing[0]}, ...): "
                         "re-run: dvc repro evaluate")
    if sample.empty:
        return {}
    chosen = images[[position[i] for i in sample["image_id"]]]
    classes = sample["predicted"].map(LABELS).to_numpy()
    heat = np.concatenate([gradcam(model, chosen[i:i + GRADCAM_BATCH], classes[i:i + GRADCAM_BATCH])
                           for i in range(0, len(chosen), GRADCAM_BATCH)])
    return {gradcam_file_name(row.actual, row.predicted, row.image_id):
            gradcam_panel(chosen[k], heat[k], gradcam_caption(row.actual, row.predicted, row.probability, row.image_id))
            for k, row in enumerate(sample.itertuples(index=False))}


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
def calibration_table(confidence: np.ndarray, correct: np.ndarray, bins: int) -> pd.DataFrame:
    """Reliability diagram: for equal-width confidence bins, mean confidence, accuracy and count.

    Bin k holds confidences in [k/bins, (k+1)/bins), the last bin also 1.0. Empty bins are left
    out: they have no point to draw and weigh nothing in the calibration error.
    """
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    index = np.clip(np.floor(confidence * bins + 1e-9).astype(int), 0, bins - 1)  # 1e-9: 0.3*10 is bin 3
    rows = [{"bin": f"{k / bins:.2f}-{(k + 1) / bins:.2f}", "confidence": confidence[index == k].mean(),
             "accuracy": correct[index == k].mean(), "count": int((index == k).sum())}
            for k in range(bins) if (index == k).any()]
    return pd.DataFrame(rows, columns=["bin", "confidence", "accuracy", "count"])


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Top-label ECE: the count-weighted mean gap between accuracy and confidence over the bins."""
    if table.empty:
        return 0.0
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


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
        return UNKNOWN
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
            order = [g for g in age_band_names(age_edges) + [UNKNOWN] if (groups == g).any()]
        else:
            groups = table[attribute].fillna(UNKNOWN).astype(str)
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
# Model card (Markdown)
# --------------------------------------------------------------------------------------------
def fmt(x: Any) -> str:
    """A figure as the card shows it: 3 decimals, thousands separators, a dash for none."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.3f}"
    return str(x)


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


def confusion_counts(predictions: pd.DataFrame) -> pd.DataFrame:
    """Counts of (actual, predicted) over all seven classes, absent ones included as zeros."""
    counts = pd.crosstab(predictions["actual"], predictions["predicted"])
    return counts.reindex(index=list(CLASSES), columns=list(CLASSES), fill_value=0)


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
        "- Checkpoint chosen on the validation split by balanced accuracy; the test split is used only "
        "by `evaluate` and this report.",
    ])


def excluded_text(excluded: dict[str, dict[str, Any]]) -> str:
    """dedupe's exclusions by rule ({rule: {rows, image_ids}}) as one phrase."""
    return "; ".join(f"{rule}: {fmt(detail['rows'])}" for rule, detail in excluded.items()) or "none"


def data_section(data: dict[str, Any], splits: dict[str, pd.DataFrame], source: str) -> str:
    origin = ("the official HAM10000 release (Harvard Dataverse, doi:10.7910/DVN/DBW86T)" if source == "official"
              else "a HAM10000 mirror (same file names as the official release; downscaled images)")
    exact, near = data.get("exact_duplicates", {}), data.get("near_duplicates", {})
    facts = [
        f"- Source: {origin}. The official release has {OFFICIAL_IMAGES:,} images; "
        f"after de-duplication this data has {fmt(data.get('images'))} images of {fmt(data.get('lesions'))} lesions.",
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
               ("mel_specificity", "melanoma specificity"), ("images", "images"))


PER_CLASS_KEYS = ("precision", "recall", "f1", "auc", "support")


def metrics_section(val: dict[str, Any], test: dict[str, Any]) -> str:
    """Headline metrics led by balanced accuracy (accuracy mostly measures nv), then per class."""
    nv_share = test.get("per_class", {}).get("nv", {}).get("support", 0) / max(test.get("images", 0), 1)
    parts = ["## Metrics", "",
             f"Balanced accuracy leads: `nv` is {nv_share:.0%} of the test images, so plain accuracy mostly "
             "measures it.", "",
             md_table(["metric", "validation", "test"],
                      [[label, val.get(key), test.get(key)] for key, label in METRIC_ROWS])]
    for name, split in (("Validation", val), ("Test", test)):
        per_class = split.get("per_class", {})
        rows = [[class_label(dx)] + [per_class.get(dx, {}).get(k) for k in PER_CLASS_KEYS] for dx in CLASSES]
        parts += ["", f"{name}, per class:", "",
                  md_table(["class", "precision", "recall", "F1", "AUC", "images"], rows)]
    return "\n".join(parts)


def confusion_section(predictions: pd.DataFrame) -> str:
    counts = confusion_counts(predictions)
    rows = [[f"**{class_label(dx)}**"] + [int(v) for v in counts.loc[dx]] for dx in CLASSES]
    return "\n".join(["## Confusion matrix (test)", "", "Rows: true class; columns: predicted class; counts of images.",
                      "", md_table(["true \\ predicted"] + list(CLASSES), rows)])


def calibration_section(table: pd.DataFrame, ece: float) -> str:
    rows = [[r.bin, r.confidence, r.accuracy, int(r.count)] for r in table.itertuples(index=False)]
    return "\n".join([
        "## Calibration (test)", "",
        f"Expected calibration error (top label, {len(table)} non-empty equal-width bins): **{ece:.3f}**. "
        "A well-calibrated model's accuracy matches its confidence in every bin "
        "(reliability diagram: `calibration.csv`, drawn by `dvc plots show`).",
        "", md_table(["confidence bin", "mean confidence", "accuracy", "images"], rows)])


SUBGROUP_TITLES = {"sex": "Sex", "age": "Age band (years)", "localization": "Body site"}


def subgroup_section(subgroups: dict[str, dict[str, dict]], min_size: int) -> str:
    parts = ["## Subgroups (test)", "",
             f"Groups with fewer than {min_size} images are flagged: their figures are shown but are mostly noise. "
             "Balanced accuracy is over the classes present in the group; melanoma sensitivity needs melanomas."]
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


def gradcam_section(names: list[str], per_class: int) -> str:
    parts = ["## Grad-CAM (test)", "",
             f"Up to {per_class} correctly and {per_class} wrongly classified test images per true class, drawn with a "
             f"fixed seed. Left: the image; right: where `{GRADCAM_LAYER}` found evidence for the *predicted* class. "
             "A heatmap on the background or the ruler, not the lesion, is a warning sign.", ""]
    for dx in CLASSES:
        links = [f"[{n.removesuffix('.png')}](gradcam/{n})" for n in names if n.startswith(f"{dx}_")]
        parts.append(f"- {class_label(dx)}: " + (", ".join(links) if links else "no test images"))
    return "\n".join(parts)


INTENDED_USE = """## Intended use

- Research and education: studying dermoscopic image classification, its errors, calibration and
  subgroup behaviour, and reproducible ML pipelines.
- **Not a medical device.** Not for diagnosis, screening, triage or any decision about a patient.
  Any suspicious skin lesion needs a clinician."""


def limitations_section(data: dict[str, Any], splits: dict[str, pd.DataFrame], source: str, image_size: int) -> str:
    everything = pd.concat(list(splits.values()), ignore_index=True)
    counts = everything["dx"].value_counts()
    share_nv = counts.get("nv", 0) / max(len(everything), 1)
    lines = ["## Limitations", ""]
    if source == "mirror":
        lines.append("- Downscaled images: the mirror holds fewer and smaller JPEGs than the official release "
                     f"({fmt(data.get('images'))} images after de-duplication here, {OFFICIAL_IMAGES:,} at 600x450 "
                     "there), "
                     "so fine structures are lost and results are not comparable with published HAM10000 figures.")
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
        mix = everything["dx_type"].fillna(UNKNOWN).value_counts()
        text = ", ".join(f"{kind} {n / len(everything):.0%}"
                         for kind, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"- Ground truth of mixed strength (dx_type): {text}; only histopathology is a confirmed "
                     "diagnosis.")
    lines.append("- One test split from the same sources: no external validation.")
    return "\n".join(lines)


REPRODUCE = """## How to reproduce

```
pip install -r requirements.txt
dvc pull      # data and model from the DVC remote, if one is configured
dvc repro     # re-runs only the stages whose code, data or params changed
```

`HAM10000_MIRROR=<base URL> dvc repro` fetches the images from a mirror instead of Harvard Dataverse.
Figures here come from `metrics/val.json`, `metrics/test.json`, `metrics/plots/test/predictions.csv`
and `metrics/report/summary.json`; params from `params.yaml`."""


def model_card(*, train: TrainFacts, model_facts: dict[str, Any], image_size: int, data: dict[str, Any],
               splits: dict[str, pd.DataFrame], val: dict[str, Any], test: dict[str, Any], predictions: pd.DataFrame,
               calibration: pd.DataFrame, ece: float, subgroups: dict[str, dict[str, dict]],
               gradcam_names: list[str], params: ReportParams) -> str:
    """The whole card; deterministic text (no dates), so a diff shows only real changes."""
    sections = [
        "# Model card: HAM10000 skin-lesion classifier (MobileNet V1)",
        "Written by `dvc repro report` (stages/report.py) from the pipeline's outputs; do not edit by hand.\n\n"
        "Classes: " + ", ".join(f"{code} {class_label(dx)}" for code, dx in enumerate(CLASSES)) + ".",
        model_section(train, model_facts, image_size),
        data_section(data, splits, params.data_source),
        metrics_section(val, test),
        confusion_section(predictions),
        calibration_section(calibration, ece),
        subgroup_section(subgroups, params.min_group_size),
        gradcam_section(gradcam_names, params.gradcam_per_class),
        INTENDED_USE,
        limitations_section(data, splits, params.data_source, image_size),
        REPRODUCE,
    ]
    return "\n\n".join(sections) + "\n"


def describe_model(model) -> dict[str, Any]:
    """Sizes the card quotes, read from the saved model itself (what was actually frozen)."""
    with_weights = [layer for layer in model.layers if layer.weights]
    return {
        "parameters": int(model.count_params()),
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "layers_with_weights": len(with_weights),
        "frozen_layers": sum(not layer.trainable for layer in with_weights),
    }


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
def summary(ece: float, subgroups: dict, images: int, bins: int) -> dict[str, Any]:
    """summary.json, declared as DVC metrics: `dvc metrics diff` compares every figure in it."""
    return {"images": images, "ece": rounded(ece), "calibration_bins": bins, "subgroups": subgroups}


def calibration_csv(table: pd.DataFrame) -> str:
    return table.round({"confidence": DIGITS, "accuracy": DIGITS}).to_csv(index=False, lineterminator="\n")


def main(params_path: Path = PARAMS_FILE, model_path: Path = Path("models/model.keras"),
         data_dir: Path = Path("data/augmented"), split_dir: Path = Path("data/split"),
         metrics_dir: Path = Path("metrics"), report_dir: Path = Path("metrics/report")) -> None:
    import keras
    import tensorflow as tf

    params = load_params("report", ReportParams, params_path)
    train = load_train_facts(params_path)
    metrics_dir, split_dir = Path(metrics_dir), Path(split_dir)
    predictions = read_table(metrics_dir / "plots" / "test" / "predictions.csv", PREDICTION_COLUMNS)
    splits = {s: read_table(split_dir / f"{s}.csv", SPLIT_COLUMNS) for s in SPLITS}
    data, val, test = (read_json(metrics_dir / name) for name in ("data.json", "val.json", "test.json"))
    images, _, image_ids = read_shards(data_dir, "test")
    model = keras.saving.load_model(model_path)

    tf.config.experimental.enable_op_determinism()
    sample = gradcam_sample(predictions, params.gradcam_per_class, params.seed)
    panels = gradcam_panels(model, sample, images, image_ids)
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy()
    calibration = calibration_table(predictions["probability"].to_numpy(), correct, params.calibration_bins)
    ece = expected_calibration_error(calibration)
    subgroups = subgroup_metrics(with_metadata(predictions, splits["test"]), params.age_bands, params.min_group_size)
    card = model_card(train=train, model_facts=describe_model(model), image_size=read_index(data_dir)["image_size"],
                      data=data, splits=splits, val=val, test=test, predictions=predictions, calibration=calibration,
                      ece=ece, subgroups=subgroups, gradcam_names=sorted(panels), params=params)

    with atomic_dir(Path(report_dir)) as out:
        for name, png in sorted(panels.items()):
            atomic_write_bytes(out / "gradcam" / name, png)
        atomic_write_text(out / "calibration.csv", calibration_csv(calibration))
        atomic_write_json(out / "summary.json", summary(ece, subgroups, len(predictions), params.calibration_bins))
        atomic_write_text(out / "model_card.md", card)
    log.info("%s: %d Grad-CAM panels, ECE %.4f, model card", report_dir, len(panels), ece)


if __name__ == "__main__":
    run_stage(main)
