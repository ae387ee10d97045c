"""Stage report: Grad-CAM, subgroups, the model card (calibration, "unknown"), and the stage end to end."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import evaluate, report, train
from stages.lib import gradcam
from stages.lib.cli import ParamError
from stages.lib.dataset import CLASS_NAMES, CLASSES
from stages.lib.inference import Judgement, decide
from stages.lib.metadata import NONE
from stages.lib.params import load_params
from tests.conftest import TINY_TRAIN, make_shards, train_params
from tests.fixtures import write_params

TINY_REPORT = {"seed": 3, "gradcam_per_class": 1, "age_bands": [30, 60], "min_group_size": 5}
SOURCE = {"files": {"HAM10000_metadata.csv": {"bytes": 563_000, "sha256": "ab" * 32},
                    "HAM10000_images_part_1.zip": {"bytes": 1_400_000_000, "sha256": "cd" * 32}}}


def evidence_model():
    """A hand-built model whose Grad-CAM is known: class 0 is the image's brightness, class 1 its opposite."""
    import keras

    inputs = keras.Input((8, 8, 3))
    features = keras.layers.ReLU(name=gradcam.GRADCAM_LAYER)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    outputs = dense(pooled)
    dense.set_weights([np.array([[0.1, -0.1]] * 3, np.float32), np.zeros(2, np.float32)])
    return keras.Model(inputs, outputs)


def test_gradcam_finds_the_evidence_for_the_class_asked():
    image = np.zeros((1, 8, 8, 3), np.float32)
    image[0, :2, :2] = 200.0  # a bright corner: evidence for class 0, against class 1
    image[0, 6:, 6:] = 100.0
    model = evidence_model()
    heat = gradcam.gradcam(model, image, np.array([0]))[0]
    np.testing.assert_allclose(heat[:2, :2], 1.0, atol=1e-5)
    np.testing.assert_allclose(heat[6:, 6:], 0.5, atol=1e-5)
    np.testing.assert_allclose(heat[3:5, 3:5], 0.0, atol=1e-5)
    assert not gradcam.gradcam(model, image, np.array([1])).any(), "only positive evidence is kept"


def test_gradcam_on_mobilenet_has_the_input_size_and_unit_range(tmp_path):
    import keras

    train.build_model(32, train_params()).save(tmp_path / "model.keras")
    model = keras.saving.load_model(tmp_path / "model.keras")  # as the stage gets it
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    heat = gradcam.gradcam(model, images, np.array([0, 4, 6]))
    assert heat.shape == (3, 32, 32)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert all(np.isclose(h.max(), 1.0) or not h.any() for h in heat), "each map is scaled to its own peak"


def hand_made_predictions() -> pd.DataFrame:
    """Per class: 3 right and 2 wrong (called nv, or mel for nv), ids sorted by class."""
    rows = []
    for dx in CLASSES:
        wrong_as = "mel" if dx == "nv" else "nv"
        for k, predicted in enumerate([dx] * 3 + [wrong_as] * 2):
            rows.append((f"ISIC_{dx}_{k}", dx, predicted, 0.5 + 0.1 * k))
    return pd.DataFrame(rows, columns=list(report.PREDICTION_COLUMNS))


def test_gradcam_sample_takes_up_to_n_right_and_n_wrong_per_class_reproducibly():
    predictions = hand_made_predictions()
    sample = gradcam.gradcam_sample(predictions, per_class=2, seed=1)
    assert len(sample) == len(CLASSES) * 4
    for dx in CLASSES:
        of_class = sample[sample["actual"] == dx]
        assert (of_class["predicted"] == dx).sum() == 2 and (of_class["predicted"] != dx).sum() == 2
    assert gradcam.gradcam_sample(predictions.sample(frac=1, random_state=0), 2, 1).equals(sample)
    assert len(gradcam.gradcam_sample(predictions, per_class=9, seed=1)) == len(predictions)
    changed = predictions.assign(predicted=np.where(predictions["actual"] == "akiec", "bcc", predictions["predicted"]))
    others = gradcam.gradcam_sample(changed, 2, 1)
    assert others[others["actual"] != "akiec"].reset_index(drop=True).equals(
        sample[sample["actual"] != "akiec"].reset_index(drop=True)), "one class's change leaves the others alone"


def test_contact_sheet_has_a_row_of_correct_and_a_row_of_wrong_cells():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    heat = np.zeros((16, 16))
    heat[:8] = 1.0  # hot top half: the overlay differs from the image there only
    cells = {"correct": [(image, heat, ["ISIC_1  correct", "p=0.90"])] * 3, "wrong": []}
    png = gradcam.contact_sheet("mel", cells, per_class=3)
    with Image.open(io.BytesIO(png)) as sheet:
        assert sheet.size == (3 * 2 * gradcam.PANEL_PX + 2 * gradcam.GAP_PX,
                              gradcam.TITLE_PX + 2 * (gradcam.CAPTION_PX + gradcam.PANEL_PX + gradcam.GAP_PX))
        pixels = np.asarray(sheet.convert("RGB"), dtype=int)
    top = gradcam.TITLE_PX + gradcam.CAPTION_PX
    left_half = pixels[top:top + gradcam.PANEL_PX, :gradcam.PANEL_PX]
    overlay = pixels[top:top + gradcam.PANEL_PX, gradcam.PANEL_PX:2 * gradcam.PANEL_PX]
    assert np.abs(left_half - overlay)[: gradcam.PANEL_PX // 4].mean() > 20, "the hot half is tinted"
    bottom = gradcam.TITLE_PX + 2 * (gradcam.CAPTION_PX + gradcam.PANEL_PX) + gradcam.GAP_PX
    assert (pixels[bottom - gradcam.PANEL_PX // 2:bottom, :] == 255).all(), "the empty wrong row stays blank"


def test_subgroups_by_age_band_sex_and_site_flag_small_groups():
    table = pd.DataFrame({
        "actual":       ["mel", "mel", "nv", "nv", "nv", "bcc", "mel", "nv"],
        "predicted":    ["mel", "nv",  "nv", "nv", "mel", "bcc", "mel", "nv"],
        "age":          [25.0, 29.0, 30.0, 59.0, 60.0, 85.0, np.nan, 45.0],
        "sex":          ["male", "male", "female", "male", "female", "male", None, "female"],
        "localization": ["back"] * 5 + ["face", "back", "face"],
    })
    groups = report.subgroup_metrics(table, age_edges=[30, 60], min_size=3)
    assert list(groups["age"]) == ["<30", "30-59", "60+", "unknown"]
    assert groups["age"]["<30"] == {"n": 2, "balanced_accuracy": 0.5, "accuracy": 0.5, "melanomas": 2,
                                    "mel_sensitivity": 0.5, "too_few_images": True}
    assert groups["age"]["30-59"]["n"] == 3 and not groups["age"]["30-59"]["too_few_images"]
    assert groups["age"]["30-59"]["mel_sensitivity"] is None, "no melanomas: no sensitivity"
    # 60+: nv wrong, bcc right -> balanced accuracy over the two classes present
    assert groups["age"]["60+"]["balanced_accuracy"] == 0.5
    assert groups["age"]["unknown"]["n"] == 1
    assert list(groups["sex"]) == ["male", "female", "unknown"]  # largest first; missing is unknown
    assert groups["sex"]["male"]["n"] == 4 and groups["sex"]["male"]["accuracy"] == 0.75
    assert list(groups["localization"]) == ["back", "face"]
    assert report.age_band_names([30, 45, 60, 75]) == ["<30", "30-44", "45-59", "60-74", "75+"]
    assert set(report.subgroup_metrics(table.drop(columns=["sex", "age"]), [30], 3)) == {"localization"}


CALIBRATION_TABLE = pd.DataFrame({"probabilities": ["calibrated"], "bin": [9], "confidence": [0.95],
                                  "accuracy": [0.9], "count": [10]})


@pytest.mark.parametrize("tta, views", [("flips", "(mean over the 4 flips)"),
                                        ("none", "(of the image as it is, no flips)")])
def test_the_card_says_which_views_the_probabilities_average_as_the_decision_does(tta, views):
    from stages.lib.model_card import calibration_section

    text = calibration_section(CALIBRATION_TABLE, {"decision": {"temperature": 1.5}}, {}, tta)
    assert f"where p is the model's probability {views}, T = 1.500" in text
    assert ("4 flips" in text) == (tta == "flips")


def test_every_tta_setting_has_its_wording():
    from typing import get_args

    from stages.lib.inference import TTA
    from stages.lib.model_card import VIEWS_TEXT

    assert set(VIEWS_TEXT) == set(get_args(TTA))


def test_the_quoted_params_are_read_with_the_duplicate_key_check(tmp_path):
    params = write_params(tmp_path / "params.yaml", train={"alpha": 0.5}, evaluate={"tta": "none"})
    train_facts, evaluate_facts = report.load_quoted_params(params)
    assert (train_facts.alpha, evaluate_facts.tta) == (0.5, "none")
    text = params.read_text(encoding="utf-8")
    params.write_text(text.replace("  alpha: 0.5\n", "  alpha: 0.5\n  alpha: 1.0\n", 1), encoding="utf-8")
    with pytest.raises(ParamError, match=r"duplicate key train.alpha \(lines \d+ and \d+\)"):
        report.load_quoted_params(params)
    with pytest.raises(ParamError, match=r"^evaluate.tta must be one of \['none', 'flips'\], got 'all'$"):
        report.load_quoted_params(write_params(tmp_path / "bad.yaml", evaluate={"tta": "all"}))


def test_unknown_or_badly_ordered_report_params_are_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", report={**TINY_REPORT, "age_bands": [60, 30]})
    with pytest.raises(ParamError, match="age_bands must be strictly increasing"):
        load_params("report", report.ReportParams, params)


# --------------------------------------------------------------------------------------------
# The stage end to end: tiny shards, an untrained tiny model, hand-made predictions and metrics.
# --------------------------------------------------------------------------------------------
def split_table(labels: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ids, "lesion_id": [f"HAM_{i}" for i in ids], "lesion_group": [f"HAM_{i}" for i in ids],
        "dx": [CLASSES[k] for k in labels], "label": labels,
        "age": rng.choice([np.nan, 20.0, 40.0, 70.0], len(ids)), "sex": rng.choice(["male", "female"], len(ids)),
        "localization": rng.choice(["back", "face"], len(ids)), "dx_type": rng.choice(["histo", "follow_up"], len(ids)),
    })


def write_stage_inputs(root: Path) -> dict[str, Path]:
    """Everything the stage reads, as earlier stages would have written it, in `root`."""
    import keras

    from stages.lib.shards import read_shards

    rng = np.random.default_rng(0)
    data_dir = make_shards(root / "augmented")
    split_dir, metrics_dir = root / "split", root / "metrics"
    split_dir.mkdir()
    for split in ("train", "val", "test"):
        _, labels, ids = read_shards(data_dir, split)
        split_table(labels, ids, rng).to_csv(split_dir / f"{split}.csv", index=False)
        proba = rng.dirichlet(np.ones(len(CLASSES)), len(labels))
        proba[np.arange(len(labels)) % 2 == 0, :] += np.eye(len(CLASSES))[labels[::2]]  # half right
        proba /= proba.sum(axis=1, keepdims=True)
        if split == "train":
            continue
        judged = Judgement(corrected=proba, decided=decide(proba, 0.3), shown=proba ** 2 / (proba ** 2).sum(1)[:, None],
                           ood_score=np.zeros(len(labels)), in_distribution=np.arange(len(labels)) % 10 != 0,
                           mel_threshold=np.full(len(labels), 0.3), with_metadata=np.zeros(len(labels), bool))
        params = evaluate.EvaluateParams(8, "flips", [0.0], 0.85, 100, 0, 0.95, 100, True)
        data = evaluate.Scored(labels, proba, np.zeros((len(labels), 4)), ids, ids, [NONE] * len(labels))
        headline, tables = evaluate.split_metrics(data, judged, params)
        headline["balanced_accuracy_ci95_low"], headline["balanced_accuracy_ci95_high"] = 0.25, 0.75
        if split == "val":
            headline["decision"] = {"prior_strength": -0.25, "mel_threshold": 0.3, "temperature": 1.5}
        else:
            kinds = np.array(["photo", "photo", "noise"])
            non_lesions = Judgement(proba[:3], labels[:3], proba[:3], np.zeros(3), np.array([False, True, False]),
                                    np.full(3, 0.3), np.zeros(3, bool))
            headline["out_of_distribution"], tables["non_lesions.csv"] = evaluate.non_lesion_figures(
                judged, non_lesions, kinds)
        (metrics_dir / "plots" / split).mkdir(parents=True)
        (metrics_dir / f"{split}.json").write_text(json.dumps(headline))
        for name, text in tables.items():
            (metrics_dir / "plots" / split / name).write_text(text)
    (metrics_dir / "data.json").write_text(json.dumps({
        "images": 84, "lesions": 84, "exact_duplicates": {"found": 1, "removed": 1, "across_lesions": 0},
        "near_duplicates": {"found": 0, "across_lesions": 0}, "merged_lesion_groups": 0,
        "excluded": {"no image file": {"rows": 2, "image_ids": ["ISIC_x", "ISIC_y"]}},
        "age_missing": 3, "sex_unknown": 0}))
    source_path = root / "raw" / "source.json"
    source_path.parent.mkdir()
    source_path.write_text(json.dumps(SOURCE))
    model_path = root / "model.keras"
    model = train.build_model(32, train_params())
    names = [layer.name for layer in model.layers]
    for layer in model.layers[:names.index("conv_pw_12")]:  # frozen as trainable_from: conv_pw_12 would
        layer.trainable = False
    model.save(model_path)
    keras.backend.clear_session()
    params = write_params(root / "params.yaml", train={**TINY_TRAIN, "trainable_from": "conv_pw_12"},
                          report=TINY_REPORT)
    return {"params_path": params, "model_path": model_path, "data_dir": data_dir, "split_dir": split_dir,
            "source_path": source_path, "metrics_dir": metrics_dir}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def report_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The stage run twice on the same inputs, into two folders."""
    root = tmp_path_factory.mktemp("report")
    inputs = write_stage_inputs(root)
    first, second = root / "first" / "report", root / "second" / "report"
    report.main(**inputs, report_dir=first)
    report.main(**inputs, report_dir=second)
    return first, second


def test_stage_writes_every_file_and_two_runs_are_byte_identical(report_runs):
    first, second = report_runs
    files = folder_bytes(first)
    assert {"subgroups.json", "model_card.md"} <= set(files)
    assert not {"calibration.csv", "summary.json"} & set(files), "evaluate writes calibration, in metrics/"
    sheets = sorted(name for name in files if name.startswith("gradcam/"))
    assert sheets == [f"gradcam/{dx}.png" for dx in CLASSES], "one contact sheet per class, nothing else"
    assert files == folder_bytes(second), "same inputs, same bytes"


def test_gradcam_sheets_hold_one_cell_per_sampled_image(report_runs):
    from PIL import Image

    with Image.open(report_runs[0] / "gradcam" / "mel.png") as sheet:  # gradcam_per_class 1: one column
        assert sheet.size == (max(2 * gradcam.PANEL_PX, gradcam.MIN_WIDTH_PX),
                              gradcam.TITLE_PX + 2 * (gradcam.CAPTION_PX + gradcam.PANEL_PX + gradcam.GAP_PX))


def test_subgroups_are_a_plain_file(report_runs):
    subgroups = json.loads((report_runs[0] / "subgroups.json").read_text())
    assert subgroups["test_images"] == 4 * len(CLASSES) and subgroups["min_group_size"] == 5
    assert set(subgroups["subgroups"]) == {"sex", "age", "localization"}
    assert sum(g["n"] for g in subgroups["subgroups"]["age"].values()) == subgroups["test_images"]


def test_model_card_has_the_required_sections_and_class_names(report_runs):
    card = (report_runs[0] / "model_card.md").read_text()
    for heading in ("## Model", "## Data", "## Metrics", "## Confusion matrix (test)",
                    "## Probabilities and calibration (test)", '## "Unknown": images the model cannot judge',
                    "## Subgroups (test)", "## Grad-CAM (test)", "## Intended use", "## Limitations",
                    "## How to use and reproduce"):
        assert f"\n{heading}\n" in card
    for dx in CLASSES:
        assert f"{dx} ({CLASS_NAMES[dx]})" in card
        assert f"](gradcam/{dx}.png)" in card
    metrics_table = card.split("## Metrics")[1]
    assert metrics_table.index("balanced accuracy") < metrics_table.index("| accuracy")
    assert "| balanced accuracy, 95% interval (lesion-group bootstrap) | 0.250 – 0.750 | 0.250 – 0.750 |" in card
    per_class = metrics_table.split("Test, per class:")[1]
    assert "| class | precision | recall | F1 | AUC | images |" in per_class
    assert "alpha = 0.25" in card and "every layer before `conv_pw_12`" in card and "BatchNormalization" not in card
    assert "Not a medical device" in card and "dvc repro" in card
    assert "| true \\ predicted | akiec | bcc | bkl | df | mel | nv | vasc |" in card
    assert "no image file: 2" in card


def test_model_card_says_what_the_probabilities_mean_and_when_the_answer_is_unknown(report_runs):
    card = (report_runs[0] / "model_card.md").read_text()
    shown = card.split("## Probabilities and calibration (test)")[1].split("\n## ")[0]
    assert "calibrated to HAM10000's class mix" in shown and "T = 1.500" in shown, "T from val.json's decision"
    assert "fitted on the validation split" in shown and "do not decide" in shown
    test = json.loads((report_runs[0].parent.parent / "metrics" / "test.json").read_text())
    assert f"**{test['calibration']['ece']:.3f}** calibrated, {test['calibration']['ece_uncalibrated']:.3f}" in shown
    assert "| confidence bin | mean confidence | accuracy | images |" in shown
    unknown = card.split('## "Unknown": images the model cannot judge')[1].split("\n## ")[0]
    assert "Mahalanobis" in unknown and "`evaluate.ood_keep`" in unknown
    assert "On test: 0.893 of the lesions are judged; of 3 non-lesion images" in unknown  # 25 of 28; 2 of 3
    assert "0.667 are answered `unknown`" in unknown
    assert "| photo | 2 | 0.500 |" in unknown and "| noise | 1 | 1.000 |" in unknown
    metrics_table = card.split("## Metrics")[1].split("\n## ")[0]
    assert "| melanoma threshold on the corrected p(mel) (chosen on validation) | 0.300 | – |" in metrics_table
    assert "melanoma specificity at the threshold (vs nevi only)" in metrics_table
    assert "python -m stages.serve" in card and "python -m stages.predict" in card


def test_a_test_split_evaluate_did_not_score_is_a_clear_error_and_the_report_stays(tmp_path):
    from stages.lib.cli import StageError

    inputs = write_stage_inputs(tmp_path)
    (inputs["metrics_dir"] / "test.json").write_text('{"scored": false}\n')
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "model_card.md").write_text("previous\n")
    with pytest.raises(StageError, match=r"test.json: test was not scored \(params.yaml evaluate.score_test is "
                                         r"false\).*dvc repro evaluate$"):
        report.main(**inputs, report_dir=tmp_path / "report")
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["model_card.md"]
    assert (tmp_path / "report" / "model_card.md").read_text() == "previous\n"


def test_model_card_names_the_files_the_data_came_from(report_runs):
    card = (report_runs[0] / "model_card.md").read_text()
    data = card.split("## Data")[1].split("##")[0]
    assert ("the HAM10000 release files `HAM10000_images_part_1.zip` (1,400,000,000 bytes, sha256 cdcdcdcdcdcd…), "
            "`HAM10000_metadata.csv` (563,000 bytes, sha256 abababababab…)") in data
    assert "127.0.0.1" not in card and "published HAM10000 figures are comparable only on the official" in card


def test_source_wording_of_a_folder_of_extracted_images():
    from stages.lib import model_card

    source = {"files": {"HAM10000_images_part_1": {"images": 5000, "bytes": 1_300_000_000}}}
    assert model_card.source_text(source) == ("the HAM10000 release files `HAM10000_images_part_1` "
                                              "(a folder of 5,000 extracted images)")


@pytest.mark.parametrize("text", ['{"source": "mirror", "url": "http://x/"}', '{"files": {"a.zip": "ab"}}'],
                         ids=["old-record", "bare-digest"])
def test_a_missing_or_unknown_source_record_is_a_clear_error(tmp_path, text):
    from stages.lib.cli import StageError

    with pytest.raises(StageError, match=r"source.json: not found \(.*download"):
        report.read_source(tmp_path / "source.json")
    (tmp_path / "source.json").write_text(text)
    with pytest.raises(StageError, match="source.json: must hold 'files', each file's size and sha256 .*download"):
        report.read_source(tmp_path / "source.json")


def test_card_counts_images_from_the_per_class_tables():
    """The image counts and nv's share come from evaluate's per_class.csv supports, not from metrics."""
    from stages.lib.model_card import metrics_section

    def table(nv: int, others: int) -> pd.DataFrame:
        return pd.DataFrame({"dx": list(CLASSES), "support": [others if dx != "nv" else nv for dx in CLASSES]})

    text = metrics_section({"balanced_accuracy": 0.7}, {"balanced_accuracy": 0.6},
                           {"val": table(60, 10), "test": table(30, 5)})
    assert "`nv` is 50% of the test images" in text
    assert "| images | 120 | 60 |" in text


def test_card_quotes_both_paths_image_alone_and_with_metadata():
    from stages.lib.model_card import metrics_section

    val = {"balanced_accuracy": 0.75, "with_metadata": {
        "balanced_accuracy": 0.77, "balanced_accuracy_ci95_low": 0.7, "balanced_accuracy_ci95_high": 0.82,
        "operating_point": {"mel_sensitivity": 0.86, "mel_specificity": 0.7}, "images_with_metadata": 1290}}
    test = {"balanced_accuracy": 0.74, "with_metadata": {
        "balanced_accuracy": 0.76, "balanced_accuracy_ci95_low": 0.69, "balanced_accuracy_ci95_high": 0.8,
        "operating_point": {"mel_sensitivity": 0.88, "mel_specificity": 0.71}, "images_with_metadata": 1300}}
    text = metrics_section(val, test)
    assert "| **balanced accuracy** (mean recall over classes) | 0.750 | 0.740 |" in text
    assert "| **balanced accuracy with age, sex and site** (each image's own metadata) | 0.770 | 0.760 |" in text
    assert "| balanced accuracy with metadata, 95% interval | 0.700 – 0.820 | 0.690 – 0.800 |" in text
    assert "| melanoma sensitivity at the threshold, with metadata | 0.860 | 0.880 |" in text
    assert "| images whose metadata was used | 1,290 | 1,300 |" in text
    assert "with metadata" not in metrics_section({"balanced_accuracy": 0.75}, {"balanced_accuracy": 0.74})
