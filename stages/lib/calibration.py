"""Calibrated probabilities: the numbers shown to people, and how far they are from the truth.

The model's probabilities p come from a class-balanced training world. Shown probabilities are
softmax(log p / T + log prior): a temperature T fitted on validation by negative log-likelihood,
and a stated class prior (the real training images' class shares). So "30% mel" means about 30%
of such images are melanomas, in HAM10000's class mix. Calibration changes what is shown, never
the decision rule (stages/lib/inference.py).
Figures: top-class reliability in equal-width confidence bins, the expected calibration error
(ECE), NLL and the multiclass Brier score. One implementation, used by `evaluate` and `report`.
Measurements: docs/experiments.md, "Calibration and out-of-distribution".
"""
from __future__ import annotations

import numpy as np

BINS = 10  # equal-width bins of top-class confidence for the reliability diagram and ECE
CURVES = ("calibrated", "uncalibrated")  # the `probabilities` column of a reliability table


def reweighted(proba: np.ndarray, temperature: float, log_prior=None) -> np.ndarray:
    """softmax(log proba / temperature + log_prior), rows renormalised: the one computation behind
    the shown probabilities (`calibrated`) and the decision rule's class-prior correction
    (`inference.corrected`: temperature 1, log_prior its class_bias). The logarithm is taken in
    proba's own precision (float32 for the decision rule, float64 for `calibrated`), as each
    stored figure was computed; the rest in float64."""
    logits = np.log(np.clip(proba, 1e-12, 1)) / temperature
    if log_prior is not None:
        logits = logits + log_prior
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def calibrated(proba: np.ndarray, temperature: float, class_prior=None) -> np.ndarray:
    """softmax(log proba / temperature + log class_prior), in float64; no prior: a uniform one."""
    log_prior = None if class_prior is None else np.log(np.asarray(class_prior, np.float64))
    return reweighted(np.asarray(proba, np.float64), temperature, log_prior)


def nll(labels: np.ndarray, proba: np.ndarray, floor: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true classes, each probability floored at `floor`, in
    proba's own precision (float64 for the shown probabilities; train's float32 model outputs)."""
    proba = np.asarray(proba)
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], floor, 1))))


def brier(labels: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass Brier score: mean over images of the squared distance to the one-hot truth."""
    truth = np.eye(proba.shape[1])[labels]
    return float(np.mean(np.sum((np.asarray(proba, np.float64) - truth) ** 2, axis=1)))


def fit_temperature(labels: np.ndarray, proba: np.ndarray, class_prior=None) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of calibrated(proba, T, class_prior)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: nll(labels, calibrated(proba, np.exp(log_t), class_prior)),
                            bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x))


def reliability_table(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS):
    """Reliability diagram: for equal-width confidence bins, mean confidence, accuracy and count.

    Bin k holds confidences in [k/bins, (k+1)/bins), the last bin also 1.0. Empty bins are left
    out: they have no point to draw and weigh nothing in the calibration error.
    """
    import pandas as pd

    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    index = np.clip(np.floor(confidence * bins + 1e-9).astype(int), 0, bins - 1)  # 1e-9: 0.3*10 is bin 3
    rows = [{"bin": f"{k / bins:.2f}-{(k + 1) / bins:.2f}", "confidence": confidence[index == k].mean(),
             "accuracy": correct[index == k].mean(), "count": int((index == k).sum())}
            for k in range(bins) if (index == k).any()]
    return pd.DataFrame(rows, columns=["bin", "confidence", "accuracy", "count"])


def top_class_table(labels: np.ndarray, proba: np.ndarray, bins: int = BINS):
    """The reliability table of the most probable class of each image."""
    return reliability_table(proba.max(axis=1), proba.argmax(axis=1) == labels, bins)


def expected_calibration_error(table) -> float:
    """Top-label ECE: the count-weighted mean gap between accuracy and confidence over the bins."""
    if table.empty:
        return 0.0
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


def calibration_figures(labels: np.ndarray, shown: np.ndarray, uncalibrated: np.ndarray) -> dict[str, float]:
    """{ece, ece_uncalibrated, nll, brier}: ECE of both, NLL and Brier of the shown probabilities."""
    return {"ece": expected_calibration_error(top_class_table(labels, shown)),
            "ece_uncalibrated": expected_calibration_error(top_class_table(labels, uncalibrated)),
            "nll": nll(labels, shown), "brier": brier(labels, shown)}
