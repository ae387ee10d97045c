"""Inference: the decision file is checked key by key (one line naming file, key and fix), and
Predictor.describe gives the contract's fields, the same numbers whatever the batch, "unknown"
for images out of distribution, and calibrated probabilities that never move the decision."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stages.lib import ood
from stages.lib.cli import StageError
from stages.lib.dataset import CLASS_NAMES, CLASSES, LABELS
from stages.lib.inference import PLAIN, Decision, Predictor, load_decision, threshold_for_sensitivity
from stages.lib.shards import read_shards
from tests.conftest import make_shards
from tests.tiny_model import tiny_model

PRIOR = (0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02)


def a_decision(features_dim: int = 4, threshold: float = 10.0) -> Decision:
    rng = np.random.default_rng(0)
    detector = ood.OodDetector(threshold=threshold, keep=0.95, means=rng.normal(0, 1, (7, features_dim)),
                               precision=np.eye(features_dim))
    return Decision(tta="flips", class_bias=tuple(np.linspace(-0.3, 0.3, 7)), prior_strength=-0.25,
                    mel_threshold=0.2, mel_sensitivity_target=0.85, temperature=1.7, class_prior=PRIOR,
                    ood=detector)


def test_a_saved_decision_loads_back_the_same(tmp_path):
    decision = a_decision()
    record = decision.save(tmp_path / "decision.json")
    assert (tmp_path / "ood.npz").is_file() and record["ood"]["parameters"] == "ood.npz"
    loaded = load_decision(tmp_path / "decision.json")
    for field in ("tta", "class_bias", "prior_strength", "mel_threshold", "mel_sensitivity_target", "temperature",
                  "class_prior"):
        assert getattr(loaded, field) == pytest.approx(getattr(decision, field)), field
    np.testing.assert_allclose(loaded.ood.means, decision.ood.means, rtol=1e-6)
    PLAIN.save(tmp_path / "plain" / "decision.json")
    assert load_decision(tmp_path / "plain" / "decision.json").ood is None, "no detector: every image is judged"


def edit(key, value):
    def change(record):
        if value is KeyError:
            del record[key]
        else:
            record[key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (edit("tta", "rotations"), r"decision.tta must be one of \['none', 'flips'\], got 'rotations' \(run: dvc"),
    (edit("mel_threshold", float("nan")), r"decision.mel_threshold must be a finite number, got nan"),
    (edit("mel_threshold", 1.5), r"decision: mel_threshold must be in \[0, 1\], got 1.5"),
    (edit("mel_threshold", "0.2"), r"decision.mel_threshold must be float, got '0.2'"),
    (edit("prior_strength", True), r"decision.prior_strength must be float, got True"),
    (edit("temperature", 0), r"decision: temperature must be in \(0, 1000\], got 0.0"),
    (edit("class_bias", [0.0] * 7), r"decision.class_bias must be a mapping, got \[0.0,"),
    (edit("class_bias", {"mel": 0.1}), r"decision: class_bias must have one value per class \(akiec, bcc"),
    (edit("class_prior", {dx: 0.0 if dx == "df" else 0.2 for dx in CLASSES}),
     r"decision: class_prior.df must be > 0, got 0.0"),
    (edit("temperature", KeyError), r"missing key decision.temperature \(run: dvc repro evaluate\)"),
    (edit("threshold", 0.3), r"unknown key decision.threshold \(known keys: tta, class_bias"),
    (edit("ood", {"method": "mahalanobis"}), r"decision.json: missing key ood.layer \(run: dvc"),
], ids=["tta", "nan", "range", "text", "bool", "temperature", "bias-list", "bias-keys", "prior", "missing",
        "unknown", "ood"])
def test_a_bad_decision_file_is_one_line_naming_the_file_key_and_fix(tmp_path, change, message):
    path = tmp_path / "decision.json"
    a_decision().save(path)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(StageError, match=message) as caught:
        load_decision(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text and text.endswith("dvc repro evaluate)")


def test_a_missing_or_broken_decision_file_says_what_to_run(tmp_path):
    with pytest.raises(StageError, match=r"decision.json: not found \(run: dvc repro evaluate\)"):
        load_decision(tmp_path / "decision.json")
    (tmp_path / "decision.json").write_text("[1, 2]")
    with pytest.raises(StageError, match=r"decision must be a mapping of keys, got \[1, 2\] .*dvc repro evaluate"):
        load_decision(tmp_path / "decision.json")


def test_the_melanoma_threshold_reaches_at_least_the_target_sensitivity():
    """By hand: with 3 melanomas, a target of 0.9 (2.7 melanomas) needs all 3 caught (2 of 3 is
    0.67), so the threshold is the lowest melanoma score; 0.4 (1.2) needs 2 (1 of 3 is 0.33), so
    the second highest. Rounding 2.7 down, or 1.2 to the nearest, would miss the target."""
    mel, nv = LABELS["mel"], LABELS["nv"]
    labels = np.array([mel, nv, mel, nv, mel])
    p_mel = np.array([0.9, 0.5, 0.6, 0.1, 0.3])
    assert threshold_for_sensitivity(labels, p_mel, 0.9) == 0.3
    assert threshold_for_sensitivity(labels, p_mel, 0.4) == 0.6


def width_of(model) -> int:
    """Features per image of the out-of-distribution score: the channels of its layer."""
    return int(model.get_layer(ood.FEATURE_LAYER).output.shape[-1])


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    images, _, _ = read_shards(make_shards(tmp_path_factory.mktemp("shards") / "augmented"), "val")
    return tiny_model(images), images


def test_describe_gives_the_contracts_fields_rounded_and_calibrated(model_and_images):
    model, images = model_and_images
    width = width_of(model)
    predictor = Predictor(model, a_decision(width, threshold=1e9), batch_size=5)
    results = predictor.describe(images)
    assert len(results) == len(images)
    for result in results:
        assert set(result) == {"top", "probabilities", "weighted", "decision", "reason", "weighting",
                               "in_distribution", "ood_score", "mel_probability", "mel_threshold", "with_metadata",
                               "metadata"}
        assert result["with_metadata"] is False and result["metadata"] == {}
        assert [set(c) for c in result["top"]] == [{"dx", "name", "probability"}] * 3
        assert all(CLASS_NAMES[c["dx"]] == c["name"] for c in result["top"])
        assert list(result["probabilities"]) == list(CLASSES)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert [c["probability"] for c in result["top"]] == sorted(result["probabilities"].values(), reverse=True)[:3]
        assert all(round(p, 4) == p for p in result["probabilities"].values())
        assert result["in_distribution"] is True and result["decision"] in CLASSES
        assert result["mel_threshold"] == 0.2
        if abs(result["mel_probability"] - 0.2) > 1e-4:
            assert (result["decision"] == "mel") == (result["mel_probability"] > 0.2)
    judged = predictor.judge(images)
    assert not np.allclose(judged.shown, judged.corrected, atol=1e-3), "shown (calibrated) is not what decides"


def test_the_same_image_gets_the_same_numbers_in_any_batch(model_and_images):
    model, images = model_and_images
    predictor = Predictor(model, a_decision(width_of(model), 1e9), batch_size=4)
    together = predictor.describe(images[:6])
    alone = [predictor.describe(images[k:k + 1])[0] for k in range(6)]
    for a, b in zip(together, alone):
        assert a["decision"] == b["decision"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=2e-4)


def test_calibration_changes_what_is_shown_and_never_the_decision(model_and_images):
    model, images = model_and_images
    decision = a_decision(width_of(model), 1e9)
    plain = Predictor(model, dataclasses.replace(decision, temperature=1.0, class_prior=None)).describe(images)
    shown = Predictor(model, decision).describe(images)
    assert [r["decision"] for r in plain] == [r["decision"] for r in shown]
    assert [r["mel_probability"] for r in plain] == [r["mel_probability"] for r in shown]
    assert [r["probabilities"] for r in plain] != [r["probabilities"] for r in shown]


def test_an_image_out_of_distribution_is_unknown_whatever_its_probabilities(model_and_images):
    model, images = model_and_images
    width = width_of(model)
    predictor = Predictor(model, a_decision(width))
    scores = predictor.judge(images).ood_score
    cut = float(np.median(scores))
    results = Predictor(model, a_decision(width, threshold=cut)).describe(images)
    for result, score in zip(results, scores):
        assert result["in_distribution"] == (score <= cut)
        assert (result["decision"] == "unknown") == (score > cut)
        assert result["ood_score"] == pytest.approx(score, abs=1e-4)
    assert {r["decision"] == "unknown" for r in results} == {True, False}


def test_a_model_without_the_feature_layer_is_a_clear_error():
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(inputs)))
    with pytest.raises(StageError, match=r"has no layer 'conv_pw_11_relu' \(not made by stages/train.py\)"):
        Predictor(model, PLAIN)
