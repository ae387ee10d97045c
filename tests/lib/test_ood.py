"""Out-of-distribution score: Gaussians of known features, the threshold keeps its share of
validation lesions, far points are rejected, and the parameters file is checked on load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stages.lib import ood
from stages.lib.cli import StageError


def clusters(n_per_class: int = 200, dims: int = 16, seed: int = 0):
    """Three classes: Gaussians around different means, with correlated features."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (dims, dims))
    means = rng.normal(0, 5, (3, dims))
    labels = np.repeat(np.arange(3), n_per_class)
    return means[labels] + rng.normal(0, 1, (len(labels), dims)) @ mix, labels, mix, means


def test_the_score_is_the_distance_to_the_nearest_class_under_the_shared_covariance():
    features, labels, mix, means = clusters(2000)
    fitted_means, precision = ood.fit_gaussians(features, labels, 3)
    np.testing.assert_allclose(fitted_means, means, atol=0.5)  # features have sd up to ~6: 5 standard errors
    covariance = mix.T @ mix
    assert np.linalg.norm(np.linalg.inv(precision) - covariance) / np.linalg.norm(covariance) < 0.1
    detector = ood.OodDetector(threshold=5.0, keep=0.95, means=fitted_means, precision=precision)
    point = means[1] + np.ones(16) @ mix * 0.5   # half a unit along the covariance: distance 0.5 * sqrt(16)
    assert detector.score(point[None])[0] == pytest.approx(2.0, rel=0.15)


def test_the_threshold_keeps_the_share_of_validation_lesions_asked_and_rejects_far_images():
    features, labels, _, _ = clusters()
    val, _, _, _ = clusters(seed=1)
    detector = ood.fit(features, labels, val, keep=0.95, classes=3)
    inside = detector.in_distribution(detector.score(val))
    assert inside.mean() >= 0.95 and inside.mean() < 0.96, "the smallest threshold that keeps 95%"
    far = np.random.default_rng(2).normal(0, 1, (50, 16)) * 40
    assert not detector.in_distribution(detector.score(far)).any()
    assert ood.threshold_for_keep(np.array([3.0, 1.0, 2.0, 4.0]), 0.5) == 2.0
    assert ood.threshold_for_keep(np.array([3.0, 1.0, 2.0, 4.0]), 1.0) == 4.0
    # 0.95 of 10 scores is 9.5: keeping at least that many means all 10, so the largest, 9
    assert ood.threshold_for_keep(np.arange(10), 0.95) == 9


def test_a_class_without_images_is_left_out_of_the_means():
    features, labels, _, _ = clusters()
    means, _ = ood.fit_gaussians(features, labels, classes=5)
    assert means.shape == (3, 16)


def saved(tmp_path):
    features, labels, _, _ = clusters()
    detector = ood.fit(features, labels, features, 0.9, 3)
    record = detector.save(tmp_path / "ood.npz")
    return detector, record


def test_save_and_load_give_the_same_scores(tmp_path):
    detector, record = saved(tmp_path)
    assert (record["method"], record["layer"], record["parameters"]) == ("mahalanobis", ood.FEATURE_LAYER, "ood.npz")
    loaded = ood.OodDetector.load(json.loads(json.dumps(record)), tmp_path, "decision.json")
    features, _, _, _ = clusters(seed=3)
    np.testing.assert_allclose(loaded.score(features), detector.score(features), rtol=1e-4)
    assert loaded.threshold == detector.threshold and loaded.keep == 0.9


@pytest.mark.parametrize("change, message", [
    (lambda r, d: r.pop("threshold"), r"^decision.json: missing key ood.threshold$"),
    (lambda r, d: r.update(threshold=float("nan")), r"^decision.json: ood.threshold must be a finite number, got nan$"),
    (lambda r, d: r.update(threshold=-1), r"^decision.json: ood: threshold must be >= 0, got -1.0$"),
    (lambda r, d: r.update(method="energy"),
     r"^decision.json: ood.method must be one of \['mahalanobis'\], got 'energy'$"),
    (lambda r, d: r.update(keep=1.5), r"^decision.json: ood: keep must be in \(0, 1\], got 1.5$"),
    (lambda r, d: r.update(keep=True), r"^decision.json: ood.keep must be float, got True$"),
    (lambda r, d: (d / "ood.npz").unlink(), r"ood.npz: cannot read the out-of-distribution parameters"),
    (lambda r, d: (d / "ood.npz").write_bytes(b"other run"), r"ood.npz: not the file decision.json was written "
                                                              r"with \(sha256 differs\)$"),
], ids=["missing", "nan", "negative", "method", "keep", "bool", "no-file", "other-file"])
def test_a_bad_record_or_parameters_file_is_one_clear_line(tmp_path, change, message):
    _, record = saved(tmp_path)
    change(record, tmp_path)
    with pytest.raises(StageError, match=message) as caught:
        ood.OodDetector.load(record, tmp_path, "decision.json")
    assert "\n" not in str(caught.value)
