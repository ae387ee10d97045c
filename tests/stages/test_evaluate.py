"""Stage evaluate: every figure against scikit-learn or a hand count, curves, files written, and
the stage's figures are the ones Predictor.describe gives for the same images."""
from __future__ import annotations

import io
import json
import typing

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from stages import evaluate
from stages.lib.cli import ParamError
from stages.lib.dataset import CLASSES
from stages.lib.inference import (
    TTA,
    VIEWS,
    Predictor,
    corrected,
    decide,
    load_decision,
    predict_proba,
    threshold_for_sensitivity,
)
from stages.metadata import main as fit_metadata
from tests.conftest import make_shards
from tests.fixtures import write_params
from tests.tiny_model import tiny_model

EVALUATE = {"batch_size": 8, "tta": "flips", "prior_strengths": [0.0, 0.5], "mel_sensitivity_target": 0.85,
            "bootstrap_samples": 200, "seed": 1, "ood_keep": 0.9, "ood_fit_images": 50, "score_test": True,
            "metadata_weight": 1.0}
METADATA = {"fields": ["age", "sex", "localization"], "regularization": 1.0}
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
    assert "images" not in m, "image counts live in metrics/data.json, not among the figures"


def test_melanoma_rates_are_none_where_a_split_has_no_such_image():
    """The argmax figures and the operating point share one rule: no melanoma, no sensitivity (not 0)."""
    no_mel = LABELS != 4
    proba = hand_made_proba()[no_mel]
    headline, _ = evaluate.classification_metrics(LABELS[no_mel], proba)
    point = evaluate.operating_point(LABELS[no_mel], decide(proba, mel_threshold=0.5))
    assert headline["mel_sensitivity"] is None and point["mel_sensitivity"] is None
    assert headline["mel_specificity"] == pytest.approx(6 / 7) == point["mel_specificity"]
    only_mel = LABELS == 4
    assert evaluate.melanoma_rates(LABELS[only_mel], PREDICTED[only_mel]) == (pytest.approx(2 / 3), None)


def test_melanoma_specificity_against_nevi_counts_nevi_only():
    point = evaluate.operating_point(LABELS, PREDICTED)
    assert point["mel_specificity"] == pytest.approx(6 / 7), "one of the 7 non-melanomas (a nevus) called mel"
    assert point["mel_specificity_nv"] == pytest.approx(3 / 4), "one of the 4 nevi called mel"
    assert point["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(LABELS, PREDICTED))
    no_nevi = LABELS != 5
    assert evaluate.operating_point(LABELS[no_nevi], PREDICTED[no_nevi])["mel_specificity_nv"] is None


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
    assert evaluate.balanced_accuracy_ci(labels, labels, np.arange(4), 200, seed=1) == (1.0, 1.0)


def test_interval_is_the_central_95_percent_of_the_bootstrap_distribution():
    """One class, 40 lesions of one image each, 20 right: a bootstrap sample's balanced accuracy is
    X / 40, X ~ Binomial(40, 1/2) (the draws that land on a right lesion). By hand, P(X <= 13) =
    0.019 and P(X <= 14) = 0.040, so the 2.5th percentile is 14 / 40 (the 5th: 15 / 40, as
    P(X <= 15) = 0.077); by symmetry the 97.5th is 26 / 40 (the 95th: 25 / 40). With 20,000
    samples the empirical quantiles sit well inside those steps."""
    labels = np.full(40, 4)
    predicted = np.where(np.arange(40) < 20, 4, 5)
    low, high = evaluate.balanced_accuracy_ci(labels, predicted, np.arange(40), 20_000, seed=3)
    assert (low, high) == (14 / 40, 26 / 40)


def test_melanoma_threshold_reaches_the_target_sensitivity_on_the_images_it_was_chosen_on():
    rng = np.random.default_rng(0)
    labels = np.array([4] * 40 + [5] * 160)
    proba = rng.dirichlet(np.ones(len(CLASSES)), size=len(labels)).astype(np.float32)
    threshold = threshold_for_sensitivity(labels, proba[:, 4], 0.85)
    point = evaluate.operating_point(labels, decide(proba, threshold))
    assert point["mel_sensitivity"] >= 0.85
    assert evaluate.operating_point(labels, decide(proba, threshold + 1e-6))["mel_sensitivity"] < 0.85, \
        "the highest such"
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


SITES = ("back", "face", "lower extremity")


def metadata_columns(n: int, k: int, split: str) -> str:
    """age, sex, localization of image n of class k: age says something of the class; outside
    train every 5th row lacks its age, every 7th its sex, every 9th its site (never all three)."""
    age = "" if split != "train" and n % 5 == 4 else str(20 + 10 * k)
    sex = "unknown" if split != "train" and n % 7 == 6 else ("female", "male")[n % 2]
    site = "unknown" if split != "train" and n % 9 == 8 else SITES[n % 3]
    return f"{age},{sex},{site}"


def write_split_csvs(folder, shards):
    from stages.lib.shards import read_shards

    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        _, labels, ids = read_shards(shards, split)
        rows = ["image_id,lesion_id,lesion_group,dx,label,age,sex,localization,dx_type"]
        rows += [f"{i},L{n // 2},L{n // 2},{CLASSES[k]},{k},{metadata_columns(n, k, split)},histo"
                 for n, (i, k) in enumerate(zip(ids, labels))]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


NON_LESIONS = (("blank", (40, 30), "white"), ("blank", (20, 20), "black"), ("noise", (50, 40), None),
               ("photo crop", (30, 60), None))


def write_non_lesions(folder):
    """A non_lesions folder as the stage writes it: PNGs of any size, index.csv (file, kind)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng, rows = np.random.default_rng(5), ["file,kind"]
    for k, (kind, size, colour) in enumerate(NON_LESIONS):
        image = Image.new("RGB", size, colour) if colour else Image.fromarray(
            rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(folder / f"{k}.png")
        rows.append(f"{k}.png,{kind}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate run once on tiny shards with a tiny model: (folder, its inputs)."""
    from stages.lib.shards import read_shards

    tmp = tmp_path_factory.mktemp("evaluate")
    shards = make_shards(tmp / "augmented")
    tiny_model(read_shards(shards, "train")[0]).save(tmp / "model.keras")
    params = write_params(tmp / "params.yaml", evaluate=EVALUATE, metadata=METADATA)
    split_dir = write_split_csvs(tmp / "split", shards)
    fit_metadata(params, split_dir, tmp / "models" / "metadata.json")
    paths = {"params_path": params, "data_dir": shards, "split_dir": split_dir, "model_path": tmp / "model.keras",
             "decision_path": tmp / "models" / "decision.json", "ood_path": tmp / "models" / "ood.npz",
             "metrics_dir": tmp / "metrics", "non_lesions_dir": write_non_lesions(tmp / "non_lesions"),
             "metadata_path": tmp / "models" / "metadata.json"}
    evaluate.main(**paths)
    return tmp, paths


def read_metrics(folder, split):
    return json.loads((folder / "metrics" / f"{split}.json").read_text())


def test_main_writes_val_and_test_metrics_plots_and_the_decision(evaluated):
    tmp, _ = evaluated
    decision = load_decision(tmp / "models" / "decision.json")
    assert decision.tta == "flips" and decision.mel_sensitivity_target == 0.85
    assert decision.ood is not None and decision.ood.keep == 0.9 and decision.temperature > 0
    assert sum(decision.class_prior) == pytest.approx(1.0)
    for split in ("val", "test"):
        m = read_metrics(tmp, split)
        for key in ("balanced_accuracy", "accuracy", "macro_f1", "top2_accuracy", "top3_accuracy",
                    "mel_sensitivity", "mel_specificity", "per_class"):
            assert key in m
        assert m["balanced_accuracy_ci95_low"] <= m["balanced_accuracy"] <= m["balanced_accuracy_ci95_high"]
        assert set(m["operating_point"]) == {"mel_sensitivity", "mel_specificity", "mel_specificity_nv",
                                             "balanced_accuracy"}
        assert set(m["calibration"]) == {"ece", "ece_uncalibrated", "nll", "brier"}
        for plot in ("predictions.csv", "roc.csv", "precision_recall.csv", "per_class.csv", "calibration.csv"):
            assert (tmp / "metrics" / "plots" / split / plot).exists()
    val, test = read_metrics(tmp, "val"), read_metrics(tmp, "test")
    assert val["operating_point"]["mel_sensitivity"] >= 0.85, "the threshold was chosen on val for this target"
    assert val["decision"] == {"prior_strength": decision.prior_strength, "mel_threshold": decision.mel_threshold,
                               "temperature": decision.temperature}
    assert "decision" not in test and "out_of_distribution" not in val
    ood = test["out_of_distribution"]
    assert ood["method"] == "mahalanobis" and ood["non_lesion_images"] == len(NON_LESIONS)
    assert 0 <= ood["lesions_accepted"] <= 1 and 0 <= ood["non_lesion_rejected"] <= 1


def test_the_unknown_threshold_keeps_at_least_ood_keep_of_the_validation_lesions(evaluated):
    """28 validation images, ood_keep 0.9: 0.9 x 28 = 25.2, so at least 26 must be kept (25 would
    be 0.893)."""
    import keras

    from stages.lib.shards import read_shards

    _, paths = evaluated
    images, _, _ = read_shards(paths["data_dir"], "val")
    decision = load_decision(paths["decision_path"])
    kept = Predictor(keras.saving.load_model(paths["model_path"]), decision, 8).judge(images).in_distribution
    assert len(kept) == 28 and EVALUATE["ood_keep"] == decision.ood.keep == 0.9
    assert kept.sum() >= 26 and kept.mean() >= 0.9


def test_every_headline_figure_is_a_scalar_dvc_can_diff(evaluated):
    def leaves(value, path=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from leaves(v, f"{path}.{k}")
        else:
            yield path, value

    for split in ("val", "test"):
        for path, value in leaves(read_metrics(evaluated[0], split)):
            assert not isinstance(value, list), f"{split}{path} is a list"


def test_the_stages_figures_are_what_predictor_describe_gives(evaluated):
    """Same images, same numbers: the shown probabilities, decisions and "unknown"s behind the test
    figures are those of Predictor.describe, the computation predict and the web page use."""
    import keras
    import pandas as pd

    from stages.lib.shards import read_shards

    tmp, paths = evaluated
    images, labels, _ = read_shards(paths["data_dir"], "test")
    decision = load_decision(paths["decision_path"])
    predictor = Predictor(keras.saving.load_model(paths["model_path"]), decision, 8)
    described, judged = predictor.describe(images), predictor.judge(images)
    table = pd.read_csv(tmp / "metrics" / "plots" / "test" / "predictions.csv")
    for row, result in zip(table.itertuples(index=False), described):
        assert result["probabilities"][row.predicted] == pytest.approx(row.probability, abs=2e-4)
    test = read_metrics(tmp, "test")
    assert test["out_of_distribution"]["lesions_accepted"] == pytest.approx(
        np.mean([r["in_distribution"] for r in described]))
    assert evaluate.operating_point(labels, judged.decided) == pytest.approx(test["operating_point"])
    for result, code in zip(described, judged.decided):
        said = CLASSES[code] if result["in_distribution"] else "unknown"
        assert result["decision"] == said
        if result["in_distribution"] and abs(result["mel_probability"] - decision.mel_threshold) > 1e-4:
            assert (result["decision"] == "mel") == (result["mel_probability"] > decision.mel_threshold)


def test_with_metadata_figures_are_predictors_answers_with_each_images_metadata(evaluated):
    """Every tiny val/test row knows at least one field (never all three missing: see
    metadata_columns), so every image takes the metadata path; its figures are those of
    Predictor.judge given each image's own metadata, and the rule was chosen on val."""
    import keras
    import pandas as pd

    from stages.lib import metadata
    from stages.lib.shards import read_shards

    tmp, paths = evaluated
    decision = load_decision(paths["decision_path"])
    assert decision.with_metadata is not None and decision.with_metadata.weight == 1.0
    predictor = Predictor(keras.saving.load_model(paths["model_path"]), decision, 8)
    for split in ("val", "test"):
        images, labels, ids = read_shards(paths["data_dir"], split)
        table = pd.read_csv(paths["split_dir"] / f"{split}.csv").set_index("image_id").loc[list(ids)]
        judged = predictor.judge(images, metadata.of_table(table))
        figures = read_metrics(tmp, split)["with_metadata"]
        assert figures["images_with_metadata"] == 28 and judged.with_metadata.all()
        bacc = figures["balanced_accuracy"]
        assert bacc == pytest.approx(balanced_accuracy_score(labels, judged.corrected.argmax(1)))
        assert figures["balanced_accuracy_ci95_low"] <= bacc <= figures["balanced_accuracy_ci95_high"]
        point = evaluate.operating_point(labels, judged.decided)
        point = {k: point[k] for k in ("mel_sensitivity", "mel_specificity")}
        assert figures["operating_point"] == pytest.approx(point)
    val = read_metrics(tmp, "val")["with_metadata"]
    assert val["operating_point"]["mel_sensitivity"] >= 0.85


def test_every_validation_answer_is_written_with_a_true_explanation(evaluated):
    import pandas as pd

    from tests.explanations import check_answer

    tmp, _ = evaluated
    for name, with_metadata in (("answers.csv", False), ("answers_with_metadata.csv", True)):
        table = pd.read_csv(tmp / "metrics" / "plots" / "val" / name)
        assert len(table) == 28 and (table["with_metadata"] == with_metadata).all()
        for row in table.to_dict("records"):
            check_answer(row)


def test_metadata_weight_0_answers_from_images_alone(evaluated, tmp_path):
    tmp, paths = evaluated
    params = write_params(tmp_path / "params.yaml", evaluate={**EVALUATE, "metadata_weight": 0.0}, metadata=METADATA)
    out = {**paths, "params_path": params, "metrics_dir": tmp_path / "metrics",
           "decision_path": tmp_path / "decision.json", "ood_path": tmp_path / "ood.npz"}
    evaluate.main(**out)
    assert load_decision(tmp_path / "decision.json").with_metadata is None
    assert "with_metadata" not in json.loads((tmp_path / "decision.json").read_text())
    for split in ("val", "test"):
        alone, both = read_metrics(tmp_path, split), read_metrics(tmp, split)
        both.pop("with_metadata")
        assert alone == both, "the image path does not depend on the metadata"
    assert not (tmp_path / "metrics" / "plots" / "val" / "answers_with_metadata.csv").exists()


def test_reliability_table_has_both_curves_and_the_shown_ece(evaluated):
    import pandas as pd

    from stages.lib.calibration import expected_calibration_error

    tmp, _ = evaluated
    table = pd.read_csv(tmp / "metrics" / "plots" / "test" / "calibration.csv")
    assert list(table.columns) == ["probabilities", "bin", "confidence", "accuracy", "count"]
    assert set(table["probabilities"]) == {"calibrated", "uncalibrated"}
    for curve, key in (("calibrated", "ece"), ("uncalibrated", "ece_uncalibrated")):
        rows = table[table["probabilities"] == curve]
        assert rows["count"].sum() == 4 * len(CLASSES)
        assert expected_calibration_error(rows) == pytest.approx(
            read_metrics(tmp, "test")["calibration"][key], abs=1e-3)  # the CSV is rounded


def test_non_lesion_figures_are_predictors_answers_on_the_folders_files(evaluated):
    """Each file as predict reads it (load_image at the model's size); the table lists the index's
    kinds in its order, with their images and the share answered "unknown"."""
    import keras
    import pandas as pd

    from stages.lib.images import load_image

    tmp, paths = evaluated
    folder = paths["non_lesions_dir"]
    images = np.stack([load_image(folder / f"{k}.png", 32) for k in range(len(NON_LESIONS))])
    predictor = Predictor(keras.saving.load_model(paths["model_path"]), load_decision(paths["decision_path"]), 8)
    rejected = (~predictor.judge(images).in_distribution).astype(float)
    table = pd.read_csv(tmp / "metrics" / "plots" / "test" / "non_lesions.csv")
    assert table["kind"].tolist() == ["blank", "noise", "photo crop"] and table["images"].tolist() == [2, 1, 1]
    assert table["rejected"].tolist() == pytest.approx([rejected[:2].mean(), rejected[2], rejected[3]], abs=1e-4)
    ood = read_metrics(tmp, "test")["out_of_distribution"]
    assert ood["non_lesion_rejected"] == rejected.mean() and ood["non_lesion_images"] == 4


def test_a_missing_or_empty_non_lesion_index_is_an_error_naming_it(tmp_path):
    from stages.lib.cli import StageError

    with pytest.raises(StageError, match=r"non_lesions/index.csv: not found"):
        evaluate.read_non_lesions(tmp_path / "non_lesions", 32)
    (tmp_path / "index.csv").write_text("file,kind\n")
    with pytest.raises(StageError, match=r"index.csv: lists no image \(re-run: dvc repro non_lesions\)"):
        evaluate.read_non_lesions(tmp_path, 32)


def test_score_test_false_never_reads_test_and_says_so(evaluated, tmp_path):
    """A seed sweep: test.json is {"scored": false}, no test plots, and test shards are never opened
    (they are removed here: reading one would fail)."""
    import shutil

    _, paths = evaluated
    shards = tmp_path / "augmented"
    shutil.copytree(paths["data_dir"], shards)
    for shard in shards.glob("test-*.npz"):
        shard.unlink()
    params = write_params(tmp_path / "params.yaml", evaluate={**EVALUATE, "score_test": False})
    out = {**paths, "params_path": params, "data_dir": shards, "metrics_dir": tmp_path / "metrics",
           "decision_path": tmp_path / "decision.json", "ood_path": tmp_path / "ood.npz"}
    (tmp_path / "metrics" / "plots" / "test").mkdir(parents=True)
    (tmp_path / "metrics" / "plots" / "test" / "roc.csv").write_text("stale\n")
    evaluate.main(**out)
    assert json.loads((tmp_path / "metrics" / "test.json").read_text()) == {"scored": False}
    assert not (tmp_path / "metrics" / "plots" / "test").exists(), "no stale test tables"
    assert read_metrics(tmp_path, "val") == read_metrics(evaluated[0], "val"), "val does not depend on test"


@pytest.mark.parametrize("values, message", [
    ({**EVALUATE_KEYS, "batch": 64}, r"^unknown key evaluate.batch \(known keys: batch_size, "),
    ({**EVALUATE_KEYS, "batch_size": "64"}, r"^evaluate.batch_size must be int, got '64'$"),
    ({**EVALUATE_KEYS, "batch_size": 0}, r"^evaluate: batch_size must be >= 1, got 0$"),
    ({**EVALUATE_KEYS, "tta": "rotations"}, r"^evaluate.tta must be one of \['none', 'flips'\], got 'rotations'$"),
    ({**EVALUATE_KEYS, "mel_sensitivity_target": 1.5}, r"^evaluate: mel_sensitivity_target must be in \(0, 1\]"),
    ({**EVALUATE_KEYS, "ood_keep": 0.3}, r"^evaluate: ood_keep must be in \[0.5, 1\], got 0.3$"),
    ({**EVALUATE_KEYS, "ood_fit_images": 5}, r"^evaluate: ood_fit_images must be >= 14, got 5$"),
    ({**EVALUATE_KEYS, "score_test": "no"}, r"^evaluate.score_test must be bool, got 'no'$"),
], ids=["unknown-key", "wrong-type", "zero", "tta", "target", "ood-keep", "ood-fit", "score-test"])
def test_bad_params_are_refused_before_the_model_is_read(tmp_path, values, message):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "test.json").write_text('{"balanced_accuracy": 0.7}\n')
    params = write_params(tmp_path / "params.yaml", evaluate=values)
    with pytest.raises(ParamError, match=message):  # not "model not found": params come first
        evaluate.main(params, tmp_path / "missing", tmp_path / "split", tmp_path / "missing.keras",
                      tmp_path / "decision.json", tmp_path / "ood.npz", metrics)
    assert (metrics / "test.json").read_text() == '{"balanced_accuracy": 0.7}\n', "left as it was"
