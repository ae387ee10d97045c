"""Out-of-distribution score: is this image like the dermoscopy the model was trained on?

Method "mahalanobis": an intermediate layer's activations (`conv_pw_11_relu`, averaged over the
image) of real training images are modelled as one Gaussian per class with a shared covariance
(Ledoit-Wolf shrinkage); an image's score is its Mahalanobis distance to the nearest class mean.
That layer, not the final pooling: the last features (`pool`) keep what separates the classes
and let half of the non-lesion images through; earlier ones also reject lesions under another
white balance, JPEG or blur. The threshold is the `keep` quantile of validation lesions' scores
(no non-lesion image tunes it). Parameters go to one .npz beside models/decision.json, whose
record names the file and its sha256: a file from another run is refused, never used.
Measurements: docs/experiments.md, "Calibration and out-of-distribution".
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.lib.cli import ParamError, StageError
from stages.lib.params import from_dict, in_range

METHOD = "mahalanobis"
FEATURE_LAYER = "conv_pw_11_relu"  # a MobileNet layer of train.build_model; its mean over the image is the feature


@dataclass(frozen=True, eq=False)
class OodDetector:
    """Score and threshold; `in_distribution` is score <= threshold."""

    threshold: float          # Mahalanobis distance: above it, the image is "not a lesion I can judge"
    keep: float               # the share of validation lesions at or below the threshold, chosen for
    means: np.ndarray         # (classes, features) class means of the training features
    precision: np.ndarray     # (features, features) inverse of the shared covariance

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance of each feature vector (N, features) to the nearest class mean."""
        features = np.asarray(features, np.float64)
        best = None
        for mean in self.means:
            centred = features - mean
            d2 = np.einsum("nd,nd->n", centred @ self.precision, centred)
            best = d2 if best is None else np.minimum(best, d2)
        return np.sqrt(np.maximum(best, 0.0))

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.threshold

    def save(self, path: Path) -> dict[str, Any]:
        """Write the parameters to `path` (.npz, atomically); returns the record for decision.json."""
        from stages.lib.files import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, means=self.means.astype(np.float32), precision=self.precision.astype(np.float32))
        data = buffer.getvalue()
        atomic_write_bytes(Path(path), data)
        return {"method": METHOD, "layer": FEATURE_LAYER, "threshold": float(self.threshold), "keep": float(self.keep),
                "parameters": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()}

    @classmethod
    def load(cls, record: Any, folder: Path, where: str) -> OodDetector:
        """The detector that decision.json's `ood` record describes; `where` (the decision file)
        starts each error about the record."""
        try:
            checked = from_dict(OodRecord, record, "ood")
        except ParamError as err:
            raise StageError(f"{where}: {err}") from None
        path = Path(folder) / checked.parameters
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StageError(f"{path}: cannot read the out-of-distribution parameters ({err.strerror})") from None
        if hashlib.sha256(data).hexdigest() != checked.sha256:
            raise StageError(f"{path}: not the file {where} was written with (sha256 differs)")
        with np.load(io.BytesIO(data)) as arrays:
            means, precision = arrays["means"].astype(np.float64), arrays["precision"].astype(np.float64)
        if means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
            raise StageError(f"{path}: means {means.shape} and precision {precision.shape} do not fit together")
        return cls(threshold=checked.threshold, keep=checked.keep, means=means, precision=precision)


@dataclass(frozen=True)
class OodRecord:
    """decision.json's `ood` record as OodDetector.save writes it, read as params.yaml's sections
    are (params.from_dict: types, finite numbers, no key missing or unknown)."""

    method: Literal[METHOD]     # another method or layer is refused: this code could not score it
    layer: Literal[FEATURE_LAYER]
    threshold: float
    keep: float
    parameters: str           # the .npz file's name, beside decision.json
    sha256: str

    def __post_init__(self) -> None:
        in_range("threshold", self.threshold, 0)
        in_range("keep", self.keep, 0, 1, lo_open=True)


def fit_gaussians(features: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means, shared precision matrix) of features (N, D) with labels; Ledoit-Wolf shrinkage
    keeps the precision finite however few images a class has."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    present = [k for k in range(classes) if (labels == k).any()]
    means = np.stack([features[labels == k].mean(axis=0) for k in present])
    centred = features - means[np.searchsorted(present, labels)]
    return means, LedoitWolf(assume_centered=True).fit(centred).precision_


def threshold_for_keep(scores: np.ndarray, keep: float) -> float:
    """The smallest score with at least `keep` of `scores` at or below it."""
    ordered = np.sort(np.asarray(scores, np.float64))
    return float(ordered[max(int(np.ceil(keep * len(ordered))), 1) - 1])


def fit(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray, keep: float,
        classes: int) -> OodDetector:
    """Gaussians from training features, threshold from validation lesions' scores."""
    means, precision = fit_gaussians(train_features, train_labels, classes)
    detector = OodDetector(threshold=np.inf, keep=keep, means=means, precision=precision)
    return OodDetector(threshold=threshold_for_keep(detector.score(val_features), keep), keep=keep,
                       means=means, precision=precision)
