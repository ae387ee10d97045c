"""Patient metadata: checked values, the one-hot features, the likelihood ratio and its weight,
the fall-back to fewer fields, and the metadata path of the decision rule, each against a hand
computation; the explanation of a decision against hand-built figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stages.evaluate import EvaluateParams, Scored, with_metadata_rule
from stages.lib import metadata
from stages.lib.cli import StageError
from stages.lib.inference import (
    Decision,
    Judgement,
    MetadataRule,
    judge,
    load_decision,
    reason,
    weighting,
)
from stages.lib.metadata import NONE, Metadata, MetadataModel, combine, parse

UNIFORM = np.full((1, 7), 1 / 7)


def test_values_are_read_as_ham10000_writes_them_and_blanks_are_not_known():
    assert parse("60", " Female ", "Lower_Extremity") == Metadata(60.0, "female", "lower extremity")
    assert parse("", "unknown", "UNKNOWN") == NONE == parse(float("nan"), None, " ")
    assert parse(0, "male", "back").known == ("age", "sex", "localization")
    assert parse(None, "male", None).as_dict() == {"sex": "male"}


@pytest.mark.parametrize("values, message", [
    (("-3", None, None), "age '-3': not a number of years from 0 to 120"),
    (("121", None, None), "age '121': not a number"),
    (("old", None, None), "age 'old': not a number"),
    ((None, "other", None), "sex 'other': not one of female, male"),
    ((None, None, "elbow"), "localization 'elbow': not one of abdomen, acral, back,"),
])
def test_a_bad_value_names_the_field_the_value_and_what_is_accepted(values, message):
    with pytest.raises(ValueError, match="^" + message):
        parse(*values)


def test_features_are_one_hot_age_bands_of_5_years_up_to_85_sex_and_site():
    x = metadata.features([Metadata(37, "male", "back"), Metadata(99, "female", "trunk")], metadata.FIELDS)
    assert x.shape == (2, 18 + 2 + 14)
    assert np.flatnonzero(x[0]).tolist() == [7, 18 + 1, 20 + 2]     # 35-39: band 7; male: 1; back: 2
    assert np.flatnonzero(x[1]).tolist() == [17, 18 + 0, 20 + 12]   # 99 counts as 85: band 17; trunk: 12


def sex_model() -> MetadataModel:
    """sex alone: male doubles melanoma's odds (logit ln 2), female says nothing; uniform shares."""
    coef = np.zeros((7, 2))
    coef[4, 1] = math.log(2)
    return MetadataModel(("sex",), {("sex",): {"coef": coef, "intercept": np.zeros(7), "shares": np.full(7, 1 / 7)}})


def test_the_log_ratio_is_the_fields_evidence_and_0_where_no_fitted_field_is_known():
    """male: p = (1,1,1,1,2,1,1)/8, ratio p / (1/7): 7/8 for six classes, 14/8 for melanoma."""
    ratio = sex_model().log_ratio([parse(sex="male"), parse(sex="female"), NONE, parse(age=50)])
    np.testing.assert_allclose(ratio[0], np.log([7 / 8] * 4 + [14 / 8] + [7 / 8] * 2))
    np.testing.assert_allclose(ratio[1:], 0, atol=1e-12)


def test_combine_multiplies_by_the_ratio_to_the_weight():
    ratio = np.log([[2, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(combine(UNIFORM, ratio, 1.0), [[2 / 8] + [1 / 8] * 6], rtol=1e-6)
    np.testing.assert_allclose(combine(UNIFORM, ratio, 2.0), [[4 / 10] + [1 / 10] * 6], rtol=1e-6)
    np.testing.assert_allclose(combine(UNIFORM, ratio, 0.0), UNIFORM, rtol=1e-6)


def test_a_set_of_fields_whose_rows_lack_a_class_falls_back_to_the_largest_fitted_set():
    """Age is known everywhere and is the class (20 + 10 k years); sex is unknown for vasc, so
    sex and age+sex are not fitted and a row knowing both is answered from age alone."""
    rows = [Metadata(20 + 10 * k, None if k == 6 else ("female", "male")[n % 2], None)
            for k in range(7) for n in range(4)]
    labels = np.repeat(np.arange(7), 4)
    model = metadata.fit(rows, labels, ("age", "sex"), 1.0)
    assert set(model.fits) == {("age",)}
    assert model.fitted(("age", "sex")) == ("age",) and model.fitted(("sex",)) == ()
    ratio = model.log_ratio([Metadata(20 + 10 * k, "male", None) for k in range(7)])
    assert ratio.argmax(axis=1).tolist() == list(range(7)), "each age points to its own class"
    both = MetadataModel(("age", "sex"), {("age",): {}, ("sex",): {}})
    assert both.fitted(("age", "sex")) == ("age",), "a tie goes to the first field in FIELDS order"


def test_read_csv_matches_ham10000_columns_ignores_extra_ones_and_reports_a_bad_row(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("Image_ID,age,sex,localization,dx\nISIC_1,60,female,back,mel\nISIC_2,-3,male,,nv\n"
                    "ISIC_3,,,,bkl\n")
    rows = metadata.read_csv(path)
    assert rows["ISIC_1"] == Metadata(60.0, "female", "back") and rows["ISIC_3"] == NONE
    assert rows["ISIC_2"] == f"{path}, line 3: age '-3': not a number of years from 0 to 120"
    (tmp_path / "no_id.csv").write_text("id,age\nISIC_1,60\n")
    with pytest.raises(StageError, match=r"no_id.csv: no image_id column"):
        metadata.read_csv(tmp_path / "no_id.csv")
    (tmp_path / "twice.csv").write_text("image_id,age\nISIC_1,60\nISIC_1,65\n")
    with pytest.raises(StageError, match=r"twice.csv: image_id 'ISIC_1' is on more than one row"):
        metadata.read_csv(tmp_path / "twice.csv")


def image_rule() -> Decision:
    return Decision(tta="none", class_bias=(0.0,) * 7, prior_strength=0.0, mel_threshold=1.0,
                    mel_sensitivity_target=0.85)


def with_sex_rule(tmp_path) -> Decision:
    record = sex_model().save(tmp_path / "metadata.json")
    return Decision(tta="none", class_bias=(0.0,) * 7, prior_strength=0.0, mel_threshold=1.0,
                    mel_sensitivity_target=0.85, with_metadata=MetadataRule(
                        weight=1.0, class_bias=(0.0,) * 7, prior_strength=0.0, mel_threshold=0.2, temperature=1.0,
                        model=sex_model(), model_file=record))


def test_judge_uses_the_metadata_rule_only_for_rows_that_know_a_fitted_field(tmp_path):
    """male: p(mel) = 2/8 = 0.25 >= the metadata rule's 0.2 -> mel; female: ratio 1, uniform, under
    0.2 -> the first top class, akiec; no metadata: the image rule (threshold 1) -> akiec."""
    judged = judge(with_sex_rule(tmp_path), np.repeat(UNIFORM, 3, 0).astype(np.float32), np.zeros((3, 2)),
                   [parse(sex="male"), parse(sex="female"), NONE])
    assert judged.decided.tolist() == [4, 0, 0]
    assert judged.with_metadata.tolist() == [True, True, False]
    assert judged.mel_threshold.tolist() == [0.2, 0.2, 1.0]
    assert judged.corrected[0, 4] == pytest.approx(0.25)


def test_a_decision_with_a_metadata_path_loads_back_and_refuses_another_metadata_file(tmp_path):
    decision = with_sex_rule(tmp_path)
    decision.save(tmp_path / "decision.json")
    loaded = load_decision(tmp_path / "decision.json").with_metadata
    assert loaded.mel_threshold == 0.2 and loaded.weight == 1.0
    np.testing.assert_allclose(loaded.model.fits[("sex",)]["coef"], sex_model().fits[("sex",)]["coef"])
    stored = json.loads((tmp_path / "metadata.json").read_text())
    stored["fits"][0]["intercept"][0] = 1.0
    (tmp_path / "metadata.json").write_text(json.dumps(stored))
    with pytest.raises(StageError, match=r"metadata.json: not the file .*decision.json was written with"):
        load_decision(tmp_path / "decision.json")


def test_a_metadata_model_without_fits_leaves_the_image_rule_alone():
    params = EvaluateParams(batch_size=8, tta="none", prior_strengths=[0.0], mel_sensitivity_target=0.85,
                            bootstrap_samples=100, seed=0)
    val = Scored(np.arange(7), np.eye(7) * 0.9 + 0.01, np.zeros((7, 2)), np.arange(7), np.arange(7).astype(str),
                 [parse(sex="male")] * 7)
    empty = metadata.fit([parse(sex="male")] * 7, np.arange(7), (), 1.0)
    assert empty.fits == {}
    rule = image_rule()
    assert with_metadata_rule(rule, params, val, np.arange(7), empty, {}) is rule


def judgement(shown, weighted, decided, threshold=0.5, inside=True) -> Judgement:
    return Judgement(corrected=np.array([weighted]), decided=np.array([decided]), shown=np.array([shown]),
                     ood_score=np.zeros(1), in_distribution=np.array([inside]), mel_threshold=np.array([threshold]),
                     with_metadata=np.zeros(1, bool))


SHOWN = [0.10, 0.15, 0.40, 0.05, 0.20, 0.05, 0.05]   # benign keratosis first


def test_the_reason_says_most_probable_only_when_the_decision_is_the_first_class_shown():
    rule = image_rule()
    weighted_bcc = [0.10, 0.30, 0.25, 0.05, 0.15, 0.10, 0.05]
    assert reason(rule, judgement(SHOWN, weighted_bcc, 1), 0) == (
        "Basal cell carcinoma: the highest weighted score (30.0%); although benign keratosis is more probable "
        "(40.0%).")
    weighted_bkl = [0.10, 0.20, 0.35, 0.05, 0.15, 0.10, 0.05]
    assert reason(rule, judgement(SHOWN, weighted_bkl, 2), 0) == (
        "Benign keratosis: the highest weighted score (35.0%); the most probable class shown.")
    assert reason(rule, judgement(SHOWN, weighted_bkl, 4, threshold=0.12), 0) == (
        "Melanoma: its weighted score 15.0% is at or above the melanoma threshold 12.0%, set on validation to find "
        "85% of melanomas; although benign keratosis is more probable (40.0%).")
    assert reason(rule, judgement(SHOWN, weighted_bkl, 2, inside=False), 0).startswith("No diagnosis: the image is")


def test_the_weighting_says_which_classes_gain():
    assert "rarer diseases weighed up (class-prior strength -0.5" in weighting(-0.5)
    assert "commoner diseases weighed up" in weighting(0.25)
    assert "no class is weighed up" in weighting(0.0)
