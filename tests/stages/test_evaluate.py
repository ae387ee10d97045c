"""Stage evaluate: every figure against scikit-learn or a hand count, curves, files written."""
from __future__ import annotations

import io
import json
import typing

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from stages import evaluate, train
from stages.lib.cli import ParamError
from stages.lib.dataset import CLASSES
from stages.lib.inference import TTA, VIEWS, Decision, corrected, decide, predict_proba, threshold_for_sensitivity
from tests.conftest import TINY_TRAIN
from tests.fixtures import write_params

EVALUATE = {"batch_size": 8, "tta": "flips", "prior_strengths": [0.0, 0.5], "mel_sensitivity_target": 0.85,
            "bootstrap_samples": 200, "seed": 1}
EVALUATE_KEYS = {k: v for k, v in EVALUATE.items() if k != "batch_size"}

# 10 hand-made cases: true label and the predicted probabilities.
LABELS = np.array([4, 4, 4, 5, 5, 5, 5, 0, 1, 6])
PREDICTED = np.array([4, 4, 5, 5, 5, 4, 5, 0, 5, 6])


def hand_made_proba(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    proba = rng.uniform(0, 0.1, (len(LABELS), len(CLASSES)))
    proba[np.arange(len(LABELS)), PREDICTED] = 0.9
    return proba / proba.sum(axis=1, keepdims=True)


def test_metrics_match_scikit_learn_and_hand_counts():
    proba = hand_made_proba()
    m, details = evaluate.classification_metrics(LABELS, proba)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(LABELS, PREDICTED))
    # by hand: recalls mel 2/3, nv 3/4, akiec 1, bcc 0, vasc 1 -> mean over the 5 classes present
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 1 + 0 + 1) / 5)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["macro_f1"] == pytest.approx(f1_score(LABELS, PREDICTED, average="macro"))
    assert m["mel_sensitivity"] == pytest.approx(2 / 3)
    assert m["mel_specificity"] == pytest.approx(6 / 7)  # one nv of 7 non-melanomas called mel
    assert m["per_class"]["nv"]["recall"] == pytest.approx(recall_score(LABELS, PREDICTED, labels=[5], average=None)[0])
    assert list(m["per_class"]) == list(CLASSES) and set(m["per_class"]["nv"]) == {"recall"}
    assert details["mel"]["auc"] == pytest.approx(roc_auc_score(LABELS == 4, proba[:, 4]))
    assert details["df"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auc": None, "support": 0}
    table = evaluate.per_class_table(details).splitlines()
    assert table[0] == "dx,precision,recall,f1,auc,support" and table[4] == "df,0.0000,0.0000,0.0000,,0"
    assert m["top2_accuracy"] >= m["accuracy"] and m["top3_accuracy"] >= m["top2_accuracy"]
    assert m["images"] == 10


def test_melanoma_rates_are_none_where_a_split_has_no_such_image():
    """The argmax figures and the operating point share one rule: no melanoma, no sensitivity (not 0)."""
    no_mel = LABELS != 4
    proba = hand_made_proba()[no_mel]
    headline, _ = evaluate.classification_metrics(LABELS[no_mel], proba)
    point = evaluate.operating_point(LABELS[no_mel], proba, mel_threshold=0.5)
    assert headline["mel_sensitivity"] is None and point["mel_sensitivity"] is None
    assert headline["mel_specificity"] == pytest.approx(6 / 7) == point["mel_specificity"]
    only_mel = LABELS == 4
    assert evaluate.melanoma_rates(LABELS[only_mel], PREDICTED[only_mel]) == (pytest.approx(2 / 3), None)


def test_top_k_counts_the_true_class_among_the_k_most_probable():
    labels = np.array([0, 1])
    proba = np.array([[0.3, 0.5, 0.2, 0, 0, 0, 0], [0.5, 0.1, 0.4, 0, 0, 0, 0]])
    m, _ = evaluate.classification_metrics(labels, proba)
    assert (m["accuracy"], m["top2_accuracy"], m["top3_accuracy"]) == (0.0, 0.5, 1.0)


def test_curves_are_long_tables_with_one_block_per_class():
    import pandas as pd

    proba = hand_made_proba()
    roc = pd.read_csv(io.StringIO(evaluate.roc_table(LABELS, proba)))
    assert list(roc.columns) == ["class", "fpr", "tpr"]
    assert list(roc["class"].unique()) == ["akiec", "bcc", "mel", "nv", "vasc"]  # bkl, df: no positives
    assert (roc.groupby("class").size() == evaluate.CURVE_POINTS).all()
    ends = roc.groupby("class").last()
    assert (ends["fpr"] == 1.0).all() and (ends["tpr"] == 1.0).all()
    mel = roc[roc["class"] == "mel"]
    assert mel["fpr"].is_monotonic_increasing and mel["tpr"].is_monotonic_increasing
    pr = pd.read_csv(io.StringIO(evaluate.pr_table(LABELS, proba)))
    assert list(pr.columns) == ["class", "recall", "precision", "prevalence"] and "df" not in set(pr["class"])
    assert pr.groupby("class")["prevalence"].first().to_dict() == pytest.approx(
        {"akiec": 0.1, "bcc": 0.1, "mel": 0.3, "nv": 0.4, "vasc": 0.1}), "the chance line: each class's share"
    perfect = np.eye(len(CLASSES))[LABELS]
    assert (pd.read_csv(io.StringIO(evaluate.pr_table(LABELS, perfect)))["precision"] == 1.0).all()


def test_predictions_use_class_names():
    table = evaluate.predictions_table(np.array(["ISIC_1", "ISIC_2"]), np.array([4, 5]),
                                       np.eye(len(CLASSES))[[4, 2]]).splitlines()
    assert table == ["image_id,actual,predicted,probability", "ISIC_1,mel,mel,1.0000", "ISIC_2,nv,bkl,1.0000"]


def test_bootstrap_resamples_lesion_groups_not_images():
    """Two lesions, one image each vs. the same two lesions with many images each: resampling
    groups gives the same interval whatever the images per lesion; a perfect model gives [1, 1]."""
    labels = np.array([4, 4, 5, 5])
    predicted = np.array([4, 5, 5, 5])
    few = evaluate.balanced_accuracy_ci(labels, predicted, np.array(["a", "b", "c", "d"]), 500, seed=1)
    many = evaluate.balanced_accuracy_ci(np.repeat(labels, 5), np.repeat(predicted, 5),
                                         np.repeat(np.array(["a", "b", "c", "d"]), 5), 500, seed=1)
    assert few == many
    assert few[0] < 0.75 < few[1]
    assert evaluate.balanced_accuracy_ci(labels, labels, np.arange(4), 200, seed=1) == [1.0, 1.0]


def test_melanoma_threshold_reaches_the_target_sensitivity_on_the_images_it_was_chosen_on():
    rng = np.random.default_rng(0)
    labels = np.array([4] * 40 + [5] * 160)
    proba = rng.dirichlet(np.ones(len(CLASSES)), size=len(labels)).astype(np.float32)
    threshold = threshold_for_sensitivity(labels, proba[:, 4], 0.85)
    point = evaluate.operating_point(labels, proba, threshold)
    assert point["mel_sensitivity"] >= 0.85
    assert evaluate.operating_point(labels, proba, threshold + 1e-6)["mel_sensitivity"] < 0.85, "the highest such"
    decided = decide(proba, threshold)
    assert np.all(decided[proba[:, 4] >= threshold] == 4)
    assert np.all(decided[proba[:, 4] < threshold] == proba[proba[:, 4] < threshold].argmax(axis=1))


def test_prior_strength_is_chosen_on_validation_and_zero_wins_ties():
    params = evaluate.EvaluateParams(**{**EVALUATE, "prior_strengths": [-0.5, 0.0, 0.5]})
    train_labels = np.array([5] * 90 + [4] * 10)
    labels = np.array([4, 5])
    # Decisions here do not depend on the strength (one class far ahead): the tie goes to 0.
    proba = np.full((2, len(CLASSES)), 0.01, np.float32)
    proba[0, 4], proba[1, 5] = 0.94, 0.94
    assert evaluate.choose_decision(params, labels, proba, train_labels).prior_strength == 0.0
    # A melanoma just behind nv: only a negative strength (towards the rarer class) gets it right.
    proba[0, 4], proba[0, 5] = 0.45, 0.49
    chosen = evaluate.choose_decision(params, labels, proba, train_labels)
    assert chosen.prior_strength == -0.5
    assert corrected(proba, chosen.class_bias).argmax(axis=1).tolist() == [4, 5]


def test_flip_tta_averages_the_four_flips():
    seen = []

    class Model:
        def predict(self, images, batch_size, verbose):
            seen.append(images.copy())
            return np.tile(images[:, 0, 0, :1], (1, len(CLASSES))) / len(CLASSES)

    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    proba = predict_proba(Model(), images, tta="flips")
    assert len(seen) == 4
    corners = [images[:, 0, 0, 0], images[:, 0, 1, 0], images[:, 1, 0, 0], images[:, 1, 1, 0]]
    np.testing.assert_allclose(proba[:, 0], np.mean(corners, axis=0) / len(CLASSES), rtol=1e-6)
    assert len(predict_proba(Model(), images, tta="none")) == 2 and len(seen) == 5


def test_every_tta_setting_has_its_views():
    assert set(VIEWS) == set(typing.get_args(TTA))


def write_split_csvs(folder, shards):
    from stages.lib.shards import read_shards

    folder.mkdir(parents=True)
    for split in ("val", "test"):
        _, labels, ids = read_shards(shards, split)
        rows = ["image_id,lesion_id,lesion_group,dx,label"]
        rows += [f"{i},L{n // 2},L{n // 2},{CLASSES[k]},{k}" for n, (i, k) in enumerate(zip(ids, labels))]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_main_writes_val_and_test_metrics_plots_and_the_decision(tiny_shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN, evaluate=EVALUATE)
    train.main(params, tiny_shards, tmp_path / "model.keras", tmp_path / "live")
    split_dir = write_split_csvs(tmp_path / "split", tiny_shards)
    decision_path = tmp_path / "decision.json"
    evaluate.main(params, tiny_shards, split_dir, tmp_path / "model.keras", decision_path, tmp_path / "metrics")
    decision = Decision.load(decision_path)
    assert decision.tta == "flips" and decision.mel_sensitivity_target == 0.85
    for split in ("val", "test"):
        m = json.loads((tmp_path / "metrics" / f"{split}.json").read_text())
        for key in ("balanced_accuracy", "accuracy", "macro_f1", "top2_accuracy", "top3_accuracy",
                    "mel_sensitivity", "mel_specificity", "per_class"):
            assert key in m
        lo, hi = m["balanced_accuracy_ci95"]
        assert lo <= m["balanced_accuracy"] <= hi
        assert m["operating_point"]["mel_threshold"] == pytest.approx(decision.mel_threshold)
        assert set(m["operating_point"]) == {"mel_threshold", "mel_sensitivity", "mel_specificity",
                                             "balanced_accuracy"}
        assert m["images"] == 4 * len(CLASSES)
        for plot in ("predictions.csv", "roc.csv", "precision_recall.csv", "per_class.csv"):
            assert (tmp_path / "metrics" / "plots" / split / plot).exists()
    val = json.loads((tmp_path / "metrics" / "val.json").read_text())
    assert val["operating_point"]["mel_sensitivity"] >= 0.85, "the threshold was chosen on val for this target"


@pytest.mark.parametrize("values, message", [
    ({**EVALUATE_KEYS, "batch": 64}, r"^unknown key evaluate.batch \(known keys: batch_size, "),
    ({**EVALUATE_KEYS, "batch_size": "64"}, r"^evaluate.batch_size must be int, got '64'$"),
    ({**EVALUATE_KEYS, "batch_size": 0}, r"^evaluate: batch_size must be >= 1, got 0$"),
    ({**EVALUATE_KEYS, "tta": "rotations"}, r"^evaluate.tta must be one of \['none', 'flips'\], got 'rotations'$"),
    ({**EVALUATE_KEYS, "mel_sensitivity_target": 1.5}, r"^evaluate: mel_sensitivity_target must be in \(0, 1\]"),
], ids=["unknown-key", "wrong-type", "zero", "tta", "target"])
def test_bad_params_are_refused_before_the_model_is_read(tmp_path, values, message):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "test.json").write_text('{"balanced_accuracy": 0.7}\n')
    params = write_params(tmp_path / "params.yaml", evaluate=values)
    with pytest.raises(ParamError, match=message):  # not "model not found": params come first
        evaluate.main(params, tmp_path / "missing", tmp_path / "split", tmp_path / "missing.keras",
                      tmp_path / "decision.json", metrics)
