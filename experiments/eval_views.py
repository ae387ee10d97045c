"""Score trained models on validation under other test-time views: symmetries, sizes, white balance.

    python -m experiments.eval_views --models models/model.keras runs/seed1.keras ... --out runs/views

Views: `flips` (what evaluate does), `none`, `dihedral` (the flips and their transposes), any of
them at another input size (`flips@192`: the same weights rebuilt, images re-read from data/raw),
and `warm` / `cool` (the flips with red and blue scaled by 1.1 and 0.9, or the reverse).
Each view's probabilities go through `evaluate.choose_decision` (prior strength chosen on val) and
are scored on validation only; test is never read. Writes `<out>/views.json`: per model and view
the validation balanced accuracy, per view the mean, sd and paired difference from `flips`.
Why: a change to `evaluate` costs minutes, not a training; `warm`/`cool` measure what another
white balance costs (a lower bound: the prior strength is re-chosen on the shifted images).
Results: docs/experiments.md (rows on test-time views and white balance).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from experiments.score_seeds import mean_sd
from stages.evaluate import EvaluateParams, choose_decision, real_train_labels
from stages.lib.files import atomic_write_json
from stages.lib.images import image_file, load_image
from stages.lib.inference import VIEWS as PIPELINE_VIEWS
from stages.lib.inference import corrected, flips, mean_over_views
from stages.lib.params import load_params
from stages.lib.shards import read_shards
from stages.train import TrainParams, build_model

log = logging.getLogger("eval_views")


def dihedral(images: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square: the 4 flips and the 4 flips of the transpose."""
    return flips(images) + flips(images.transpose(0, 2, 1, 3))


def white_balanced(images: np.ndarray, red: float, blue: float) -> np.ndarray:
    """`images` (0-255) with the red and blue channels scaled, clipped to 0-255, in their own dtype
    (rounded, not truncated, when that is an integer type)."""
    shifted = np.clip(images.astype(np.float32) * np.array([red, 1.0, blue], np.float32), 0, 255)
    return (np.rint(shifted) if np.issubdtype(images.dtype, np.integer) else shifted).astype(images.dtype)


VIEWS = {  # evaluate's own views and more
    **PIPELINE_VIEWS,
    "dihedral": dihedral,
    "warm": lambda images: flips(white_balanced(images, 1.1, 0.9)),
    "cool": lambda images: flips(white_balanced(images, 0.9, 1.1)),
}


def resized_model(model, size: int, params: TrainParams):
    """The same weights in a model built for `size` x `size` inputs."""
    other = build_model(size, params)
    other.set_weights(model.get_weights())
    return other


def parse_view(text: str) -> tuple[str, int | None]:
    """`flips` or `flips@192` -> (view, input size; None: the training size)."""
    kind, _, size = text.partition("@")
    if kind not in VIEWS:
        raise argparse.ArgumentTypeError(f"unknown view {text!r}: {', '.join(VIEWS)}, optionally @<size>")
    return kind, int(size) if size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--views", nargs="+", default=["flips", "dihedral", "flips@176", "flips@192"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--images", type=Path, default=Path("data/raw/images"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import keras
    from sklearn.metrics import balanced_accuracy_score

    params = load_params("evaluate", EvaluateParams)
    train_params = load_params("train", TrainParams)
    train_labels = real_train_labels(args.data)
    images, labels, image_ids = read_shards(args.data, "val")
    train_size = images.shape[1]
    views = [parse_view(v) for v in args.views]
    by_size = {train_size: images}
    for size in sorted({s for _, s in views if s and s != train_size}):
        by_size[size] = np.stack([load_image(image_file(args.images, i), size) for i in image_ids])
    args.out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    for path in args.models:
        model = keras.saving.load_model(path)
        nets = {train_size: model}  # the same weights per input size, built once per model
        scores[str(path)] = {}
        for name, (kind, size) in zip(args.views, views):
            started = time.perf_counter()
            size = size or train_size
            if size not in nets:
                nets[size] = resized_model(model, size, train_params)
            proba = mean_over_views(nets[size], VIEWS[kind](by_size[size]), params.batch_size)
            decision = choose_decision(params, labels, proba, train_labels)
            score = balanced_accuracy_score(labels, corrected(proba, decision.class_bias).argmax(axis=1))
            scores[str(path)][name] = float(score)
            log.info("%s %s: val balanced accuracy %.4f (prior %.2f), %.0f s", path, name, score,
                     decision.prior_strength, time.perf_counter() - started)
    summary = {"models": scores, "views": {}}
    for name in args.views:
        values = np.array([s[name] for s in scores.values()])
        summary["views"][name] = {"val_balanced_accuracy": mean_sd(values)}
        if "flips" in args.views:  # paired: the same model, the same images
            summary["views"][name]["minus_flips"] = mean_sd(values - [s["flips"] for s in scores.values()])
    atomic_write_json(args.out / "views.json", summary)
    print(json.dumps(summary["views"], indent=2))


if __name__ == "__main__":
    main()
