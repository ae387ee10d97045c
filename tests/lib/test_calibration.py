"""Calibration: reliability bins and ECE by hand, the temperature fit recovers a known one, the
stated prior moves the probabilities and never the decision's inputs."""
from __future__ import annotations

import numpy as np
import pytest

from stages.lib import calibration
from stages.lib.calibration import (
    brier,
    calibrated,
    calibration_figures,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_table,
)


def test_a_perfectly_calibrated_model_has_zero_calibration_error():
    confidence = np.array([0.95] * 20 + [0.65] * 20)
    correct = np.array([True] * 19 + [False] + [True] * 13 + [False] * 7)
    table = reliability_table(confidence, correct, bins=10)
    assert table["bin"].tolist() == ["0.60-0.70", "0.90-1.00"]
    assert expected_calibration_error(table) == pytest.approx(0.0)


def test_calibration_bins_and_error_by_hand():
    confidence = np.array([0.3, 0.35, 0.5, 0.9, 1.0])
    correct = np.array([True, False, True, False, True])
    table = reliability_table(confidence, correct, bins=5)
    # bins of 0.2: 0.3 and 0.35 -> [0.2, 0.4); 0.5 -> [0.4, 0.6); 0.9 and 1.0 -> [0.8, 1.0]
    assert table["bin"].tolist() == ["0.20-0.40", "0.40-0.60", "0.80-1.00"]
    assert table["count"].tolist() == [2, 1, 2]
    np.testing.assert_allclose(table["confidence"], [0.325, 0.5, 0.95])
    np.testing.assert_allclose(table["accuracy"], [0.5, 1.0, 0.5])
    # ECE = 2/5 |0.5 - 0.325| + 1/5 |1 - 0.5| + 2/5 |0.5 - 0.95|
    assert expected_calibration_error(table) == pytest.approx(0.4 * 0.175 + 0.2 * 0.5 + 0.4 * 0.45)
    assert reliability_table(np.array([0.3]), np.array([True]), 10)["bin"].tolist() == ["0.30-0.40"]
    assert calibration.BINS == 10


def test_nll_and_brier_by_hand():
    labels = np.array([0, 1])
    proba = np.array([[0.5, 0.5], [0.2, 0.8]])
    assert nll(labels, proba) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)
    assert brier(labels, proba) == pytest.approx(((0.5 ** 2 + 0.5 ** 2) + (0.2 ** 2 + 0.2 ** 2)) / 2)


def synthetic(temperature: float, prior: np.ndarray, n: int = 6000, seed: int = 0):
    """Labels drawn from softmax(logits / temperature + log prior): the model's proba is
    softmax(logits), so the true calibration is that temperature and prior."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, len(prior)))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = calibrated(proba, temperature, prior)
    labels = np.array([rng.choice(len(prior), p=p) for p in truth])
    return labels, proba


def test_the_temperature_fit_recovers_the_temperature_the_labels_were_drawn_with():
    prior = np.array([0.1, 0.2, 0.7])
    labels, proba = synthetic(2.0, prior)
    assert fit_temperature(labels, proba, prior) == pytest.approx(2.0, rel=0.08)
    sharp_labels, _ = synthetic(0.5, prior)
    assert fit_temperature(sharp_labels, proba, prior) == pytest.approx(0.5, rel=0.08)


def test_calibrating_lowers_the_error_on_the_images_it_was_fitted_on():
    prior = np.array([0.1, 0.2, 0.7])
    labels, proba = synthetic(2.0, prior)
    shown = calibrated(proba, fit_temperature(labels, proba, prior), prior)
    figures = calibration_figures(labels, shown, proba)
    assert set(figures) == {"ece", "ece_uncalibrated", "nll", "brier"}
    assert figures["ece"] < 0.03 < figures["ece_uncalibrated"]
    assert figures["nll"] < nll(labels, proba)


def test_the_prior_shifts_towards_common_classes_and_no_prior_is_a_uniform_one():
    proba = np.array([[0.5, 0.5]])
    np.testing.assert_allclose(calibrated(proba, 1.0, [0.25, 0.75]), [[0.25, 0.75]])
    # log 0.5 / 2 is the same for both classes, so the prior alone decides: tempering the prior
    # too would give sqrt(0.25) : sqrt(0.75), 0.366 : 0.634
    np.testing.assert_allclose(calibrated(proba, 2.0, [0.25, 0.75]), [[0.25, 0.75]])
    np.testing.assert_allclose(calibrated(proba, 1.0), calibrated(proba, 1.0, [0.5, 0.5]))
    np.testing.assert_allclose(calibrated(np.array([[0.2, 0.8]]), 1.0), [[0.2, 0.8]], rtol=1e-9)
    flat = calibrated(np.array([[0.2, 0.8]]), 1e6)  # a huge temperature: no information left
    np.testing.assert_allclose(flat, [[0.5, 0.5]], atol=1e-5)
