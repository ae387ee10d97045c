"""Grad-CAM: where the model saw evidence; for `report`, one contact sheet per class, for `serve`,
the `overlay` of one uploaded image.

For a seeded sample of test images (up to `report.gradcam_per_class` correctly and as many wrongly
classified per true class), the heatmap of the *predicted* class at MobileNet's last convolution
is blended over the image. Each true class gets one PNG, metrics/report/gradcam/<dx>.png: a row of
correct and a row of wrong cells, each the image beside its overlay, captioned with the image id,
the prediction and its probability.
Invariant: each (class, outcome) cell draws with its own seed from sorted image ids, so a change
in one class's predictions leaves the other sheets' images as they were; memory is bounded by
GRADCAM_BATCH whatever the sample size; TensorFlow is imported only inside `gradcam`.
Why: the model card shows what the model looks at, not only how often it is right.
The sheets: metrics/report/model_card.md; `dvc plots show` draws them.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from stages.lib.cli import StageError
from stages.lib.dataset import CLASS_NAMES, CLASSES, LABELS

GRADCAM_LAYER = "conv_pw_13_relu"  # MobileNet V1's last convolutional activation
GRADCAM_BATCH = 32  # images per backward pass: bounds memory whatever gradcam_per_class is
PANEL_PX = 160  # each half of a cell: the image, then its overlay
CAPTION_PX = 34  # two caption lines above each cell
TITLE_PX = 24  # the sheet's title line
GAP_PX = 8  # between cells
MIN_WIDTH_PX = 560  # room for the title line, however few columns
HEAT_ALPHA = 0.45
# A "jet" colour scale, cold to hot, as anchors interpolated linearly.
HEAT_COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
                        dtype=float)
OUTCOMES = ("correct", "wrong")  # the rows of a sheet


def gradcam(model, images: np.ndarray, classes: np.ndarray, layer: str = GRADCAM_LAYER) -> np.ndarray:
    """Heatmaps (n, H, W) in [0, 1] at the input's size: where `layer` saw evidence for `classes[i]`.

    Grad-CAM (Selvaraju et al., 2017): the gradient of the class score with respect to the layer's
    feature maps, averaged over space, weighs each map; only positive evidence is kept. The model
    ends in a softmax, so the score is the log-probability, whose gradient is the class logit's
    minus the softmax-weighted mean of all logits': evidence for this class against the others. (The
    probability itself gives the same map after scaling, but its gradients vanish in float32 as p_c
    nears 1.) Each map is scaled to its own maximum (an all-zero map stays zero) and resized
    bilinearly. `model` is one loaded from a file: a layer called in several graphs (as in
    train.build_model's fresh model) has no single output to probe.
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


def overlay(model, pixels: np.ndarray, label: int, size: tuple[int, int]) -> np.ndarray | None:
    """The heatmap of class `label` blended over one model input (uint8, side x side x 3), resized
    bilinearly to `size` (width, height); None when the model has no layer GRADCAM_LAYER."""
    from PIL import Image

    try:
        heat = gradcam(model, pixels[None], np.array([label]))[0]
    except ValueError:  # no such layer: another architecture
        return None
    return np.asarray(Image.fromarray(heat_overlay(pixels, heat)).resize(size, Image.Resampling.BILINEAR))


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


def sheet_name(dx: str) -> str:
    return f"{dx}.png"


def caption(actual: str, predicted: str, probability: float, image_id: str) -> list[str]:
    verdict = "correct" if actual == predicted else f"wrong: {predicted}"
    return [f"{image_id}  {verdict}", f"p({predicted})={probability:.2f}   right: Grad-CAM"]


def contact_sheet(dx: str, cells: dict[str, list[tuple[np.ndarray, np.ndarray, list[str]]]], per_class: int) -> bytes:
    """PNG bytes: one row per outcome (correct, wrong), each cell an image beside its overlay.

    `cells[outcome]` holds (image uint8 HWC, heatmap HW, caption lines) in the row's order; a row
    with nothing to show says so.
    """
    from PIL import Image, ImageDraw, ImageFont

    columns = max(1, per_class)
    cell_w, cell_h = 2 * PANEL_PX, CAPTION_PX + PANEL_PX
    width = max(columns * cell_w + (columns - 1) * GAP_PX, MIN_WIDTH_PX)
    height = TITLE_PX + len(OUTCOMES) * (cell_h + GAP_PX)
    sheet = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    draw.text((4, 5), f"true class {dx} ({CLASS_NAMES[dx]}): top row correctly, bottom row wrongly classified",
              fill="black", font=font)
    for row, outcome in enumerate(OUTCOMES):
        top = TITLE_PX + row * (cell_h + GAP_PX)
        if not cells.get(outcome):
            draw.text((4, top + CAPTION_PX), f"no {'correctly' if outcome == 'correct' else 'wrongly'} "
                      "classified test images of this class", fill="grey", font=font)
        for col, (image, heat, lines) in enumerate(cells.get(outcome, [])):
            left = col * (cell_w + GAP_PX)
            for k, pixels in enumerate((image, heat_overlay(image, heat))):
                half = Image.fromarray(pixels).resize((PANEL_PX, PANEL_PX), Image.Resampling.BILINEAR)
                sheet.paste(half, (left + k * PANEL_PX, top + CAPTION_PX))
            for line, text in enumerate(lines):
                draw.text((left + 2, top + 3 + 15 * line), text, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    return buffer.getvalue()


def gradcam_sheets(model, sample: pd.DataFrame, images: np.ndarray, image_ids: np.ndarray,
                   per_class: int) -> dict[str, bytes]:
    """File name (`<dx>.png`) -> PNG contact sheet for every class, heatmaps of the predicted class."""
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    missing = sorted(set(sample["image_id"]) - set(position))
    if missing:
        raise StageError(f"predictions.csv names test images that the test shards lack ({missing[0]}, ...): "
                         "re-run: dvc repro evaluate")
    if per_class == 0:
        return {}
    chosen = images[[position[i] for i in sample["image_id"]]] if len(sample) else images[:0]
    classes = sample["predicted"].map(LABELS).to_numpy()
    heat = (np.concatenate([gradcam(model, chosen[i:i + GRADCAM_BATCH], classes[i:i + GRADCAM_BATCH])
                            for i in range(0, len(chosen), GRADCAM_BATCH)]) if len(chosen) else chosen[..., 0])
    cells: dict[str, dict[str, list]] = {dx: {outcome: [] for outcome in OUTCOMES} for dx in CLASSES}
    for k, row in enumerate(sample.itertuples(index=False)):
        outcome = "correct" if row.actual == row.predicted else "wrong"
        cells[row.actual][outcome].append(
            (chosen[k], heat[k], caption(row.actual, row.predicted, row.probability, row.image_id)))
    return {sheet_name(dx): contact_sheet(dx, cells[dx], per_class) for dx in CLASSES}
