"""From model to decision: test-time flips, the class-prior correction and the melanoma operating point.

One module, used by `evaluate` (which chooses the correction and the threshold on validation),
`predict` and `export`'s agreement check, so that a figure in metrics/ and an answer from
`predict` come from the same computation.

- Test-time augmentation ("flips"): the mean of the class probabilities of the image and its
  horizontal, vertical and double flips. Dermoscopy has no "up", and after augment's 4:3 -> square
  resize a flip (unlike a quarter turn) keeps the same axis stretched.
- Prior correction: training sees a class-balanced world (oversampling + balanced class weights),
  so the probabilities reflect that prior, not how common each disease is. A per-class offset
  `bias_k = strength * log(share_k)` (share_k: class k's share of the real training images) shifts
  decisions towards common (strength > 0) or rare (< 0) classes; `strength` is chosen on
  validation from a small grid (0 = none).
- Operating point: melanoma is the one class where a miss costs most. The decision is `mel`
  whenever p(mel) >= `mel_threshold` (chosen on validation for a target sensitivity), else the
  most probable class.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.lib.dataset import CLASSES, MELANOMA

TTA = Literal["none", "flips"]


def flips(images: np.ndarray) -> list[np.ndarray]:
    """The image batch (N, H, W, C) and its horizontal, vertical and double flips."""
    return [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]


VIEWS: dict[str, Callable[[np.ndarray], list[np.ndarray]]] = {"none": lambda images: [images], "flips": flips}
"""The views of an image batch whose probabilities are averaged, by `tta` setting."""


def predict_proba(model, images: np.ndarray, tta: TTA = "none", batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, 7) of `images` (uint8 or float pixels in [0, 255]).

    `model` is a Keras model or any callable mapping a float32 batch to probabilities (a TFLite
    interpreter wrapped by `export`).
    """
    return mean_over_views(model, VIEWS[tta](images), batch_size)


def mean_over_views(model, views: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """The mean class probabilities over several views (N, H, W, C each) of the same images."""
    total = None
    for view in views:
        view = np.ascontiguousarray(view, dtype=np.float32)
        if hasattr(model, "predict"):
            proba = model.predict(view, batch_size=batch_size, verbose=0)
        else:
            proba = np.concatenate([model(view[i:i + batch_size]) for i in range(0, len(view), batch_size)])
        total = proba.astype(np.float64) if total is None else total + proba
    return (total / len(views)).astype(np.float32)


@dataclass(frozen=True)
class Decision:
    """How probabilities become an answer; chosen on validation by `evaluate`, stored with the model."""

    tta: TTA
    class_bias: tuple[float, ...]   # added to log-probabilities, one per class (all 0: no correction)
    prior_strength: float           # the strength that gave class_bias (for people)
    mel_threshold: float            # p(mel) at or above this -> decision "mel"
    mel_sensitivity_target: float   # what the threshold was chosen for, on validation

    def save(self, path: Path) -> dict:
        record = {**asdict(self), "class_bias": dict(zip(CLASSES, self.class_bias)), "chosen_on": "val"}
        from stages.lib.files import atomic_write_json

        atomic_write_json(Path(path), record)
        return record

    @classmethod
    def load(cls, path: Path) -> Decision:
        from stages.lib.cli import StageError
        from stages.lib.files import read_json

        record = read_json(path, made_by="evaluate")
        try:
            return cls(tta=record["tta"], class_bias=tuple(float(record["class_bias"][dx]) for dx in CLASSES),
                       prior_strength=float(record["prior_strength"]), mel_threshold=float(record["mel_threshold"]),
                       mel_sensitivity_target=float(record["mel_sensitivity_target"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StageError(f"{path}: not a valid decision file ({err!r}); re-run: dvc repro evaluate") from None


def prior_bias(train_labels: np.ndarray, strength: float) -> np.ndarray:
    """Per-class offsets strength * log(share of the real training images), centred on 0.

    strength 1 is Bayes' correction from the balanced training prior to the real one (favours
    `nv`); negative strengths favour the rare classes; 0 changes nothing.
    """
    counts = np.bincount(train_labels, minlength=len(CLASSES)).astype(np.float64)
    log_share = np.log(np.maximum(counts, 1) / counts.sum())
    return strength * (log_share - log_share.mean())


def corrected(proba: np.ndarray, class_bias) -> np.ndarray:
    """Probabilities after adding `class_bias` to their logarithms (renormalised)."""
    logits = np.log(np.clip(proba, 1e-12, 1)) + np.asarray(class_bias, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def decide(proba: np.ndarray, mel_threshold: float) -> np.ndarray:
    """Class codes at the operating point: melanoma if p(mel) >= threshold, else the top class."""
    return np.where(proba[:, MELANOMA] >= mel_threshold, MELANOMA, proba.argmax(axis=1))


def threshold_for_sensitivity(labels: np.ndarray, p_mel: np.ndarray, target: float) -> float:
    """The highest threshold whose melanoma sensitivity on these images is at least `target`."""
    scores = np.sort(p_mel[labels == MELANOMA])[::-1]
    if len(scores) == 0:
        return 0.5
    needed = int(np.ceil(target * len(scores)))  # melanomas that must be at or above the threshold
    return float(scores[max(needed, 1) - 1])
