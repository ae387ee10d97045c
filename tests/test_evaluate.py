"""Stage evaluate: every figure against scikit-learn or a hand count, curves, files written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from stages import evaluate, train
from stages.common import CLASSES, ParamError
from tests.conftest import TINY_TRAIN
from tests.fixtures import write_params

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
    m = evaluate.classification_metrics(LABELS, proba)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(LABELS, PREDICTED))
    # by hand: recalls mel 2/3, nv 3/4, akiec 1, bcc 0, vasc 1 -> mean over the 5 classes present
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 1 + 0 + 1) / 5)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["macro_f1"] == pytest.approx(f1_score(LABELS, PREDICTED, average="macro"))
    assert m["mel_sensitivity"] == pytest.approx(2 / 3)
    assert m["mel_specificity"] == pytest.approx(6 / 7)  # one nv of 7 non-melanomas called mel
    assert m["per_class"]["nv"]["recall"] == pytest.approx(recall_score(LABELS, PREDICTED, labels=[5], average=None)[0])
    assert m["per_class"]["mel"]["auc"] == pytest.approx(roc_auc_score(LABELS == 4, proba[:, 4]))
    assert m["per_class"]["df"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auc": None, "support": 0}
    assert list(m["per_class"]) == list(CLASSES)
    assert m["top2_accuracy"] >= m["accuracy"] and m["top3_accuracy"] >= m["top2_accuracy"]
    assert m["images"] == 10


def test_top_k_counts_the_true_class_among_the_k_most_probable():
    labels = np.array([0, 1])
    proba = np.array([[0.3, 0.5, 0.2, 0, 0, 0, 0], [0.5, 0.1, 0.4, 0, 0, 0, 0]])
    m = evaluate.classification_metrics(labels, proba)
    assert (m["accuracy"], m["top2_accuracy"], m["top3_accuracy"]) == (0.0, 0.5, 1.0)


def test_curves_have_one_named_column_per_class():
    proba = hand_made_proba()
    roc = evaluate.roc_table(LABELS, proba).splitlines()
    assert roc[0].split(",") == ["fpr", "akiec", "bcc", "mel", "nv", "vasc"]  # bkl, df: no positives
    assert len(roc) == 1 + evaluate.CURVE_POINTS
    last = roc[-1].split(",")
    assert last[0] == "1.0000" and all(v == "1.0000" for v in last[1:])
    pr = evaluate.pr_table(LABELS, proba).splitlines()
    assert pr[0].split(",")[0] == "recall" and "df" not in pr[0]
    perfect = np.eye(len(CLASSES))[LABELS]
    assert all(float(v) == 1.0 for row in evaluate.pr_table(LABELS, perfect).splitlines()[1:]
               for v in row.split(",")[1:])


def test_predictions_use_class_names():
    table = evaluate.predictions_table(np.array(["ISIC_1", "ISIC_2"]), np.array([4, 5]),
                                       np.eye(len(CLASSES))[[4, 2]]).splitlines()
    assert table == ["image_id,actual,predicted,probability", "ISIC_1,mel,mel,1.0000", "ISIC_2,nv,bkl,1.0000"]


def test_main_writes_val_and_test_metrics_and_plots(tiny_shards, tmp_path):
    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN, evaluate={"batch_size": 8})
    train.main(params, tiny_shards, tmp_path / "model.keras", tmp_path / "live")
    evaluate.main(params, tiny_shards, tmp_path / "model.keras", tmp_path / "metrics")
    for split in ("val", "test"):
        m = json.loads((tmp_path / "metrics" / f"{split}.json").read_text())
        for key in ("balanced_accuracy", "accuracy", "macro_f1", "top2_accuracy", "top3_accuracy",
                    "mel_sensitivity", "mel_specificity", "per_class"):
            assert key in m
        assert m["images"] == 4 * len(CLASSES)
        for plot in ("predictions.csv", "roc.csv", "precision_recall.csv"):
            assert (tmp_path / "metrics" / "plots" / split / plot).exists()


@pytest.mark.parametrize("values, message", [
    ({"batch": 64}, r"^unknown key evaluate.batch \(known keys: batch_size\)$"),
    ({"batch_size": "64"}, r"^evaluate.batch_size must be int, got '64'$"),
    ({"batch_size": 0}, r"^evaluate: batch_size must be >= 1, got 0$"),
], ids=["unknown-key", "wrong-type", "zero"])
def test_bad_params_are_refused_before_the_model_is_read(tmp_path, values, message):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "test.json").write_text('{"balanced_accuracy": 0.7}\n')
    params = write_params(tmp_path / "params.yaml", evaluate=values)
    with pytest.raises(ParamError, match=message):  # not "model not found": params come first
        evaluate.main(params, tmp_path / "missing", tmp_path / "missing.keras", metrics)
    assert [p.name for p in metrics.iterdir()] == ["test.json"]
    assert (metrics / "test.json").read_text() == '{"balanced_accuracy": 0.7}\n'
