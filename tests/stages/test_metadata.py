"""Stage metadata: fits one regression per set of the configured fields on train.csv's rows,
never reads dx_type, answers from images alone with `fields: []`, and names the file or key
of a bad input."""
from __future__ import annotations

import json

import pytest

from stages import metadata as stage
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASSES
from stages.lib.metadata import MetadataModel
from tests.fixtures import write_params

HEADER = "image_id,lesion_id,lesion_group,dx,label,age,sex,localization,dx_type"


def train_csv(folder, rows=None):
    """Two rows per class; age says the class (20 + 10 k), dx_type says it too (and must not count)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or [f"ISIC_{k}{n},L{k}{n},L{k}{n},{dx},{k},{20 + 10 * k},{('female', 'male')[n]},back,type{k}"
                    for k, dx in enumerate(CLASSES) for n in range(2)]
    (folder / "train.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return folder


def test_fits_every_set_of_the_configured_fields(tmp_path):
    params = write_params(tmp_path / "params.yaml", metadata={"fields": ["age", "sex"], "regularization": 1.0})
    stage.main(params, train_csv(tmp_path / "split"), tmp_path / "metadata.json")
    model, record = MetadataModel.read(tmp_path / "metadata.json")
    assert model.fields == ("age", "sex") and set(model.fits) == {("age",), ("sex",), ("age", "sex")}
    assert record["file"] == "metadata.json" and len(record["sha256"]) == 64
    assert model.fits[("age", "sex")]["coef"].shape == (7, 18 + 2)  # age bands, sex: no site, no dx_type


def test_no_fields_fits_nothing_and_leaves_the_images_alone(tmp_path):
    params = write_params(tmp_path / "params.yaml", metadata={"fields": []})
    stage.main(params, train_csv(tmp_path / "split"), tmp_path / "metadata.json")
    assert json.loads((tmp_path / "metadata.json").read_text())["fits"] == []


@pytest.mark.parametrize("values, message", [
    ({"fields": ["age", "dx_type"]}, r"fields: 'dx_type' is not one of age, sex, localization"),
    ({"fields": ["age", "age"]}, r"names a field twice"),
    ({"regularization": 0}, r"regularization must be > 0, got 0"),
])
def test_bad_params_name_the_key(tmp_path, values, message):
    with pytest.raises(ParamError, match=message):
        stage.main(write_params(tmp_path / "params.yaml", metadata=values), tmp_path, tmp_path / "m.json")


def test_a_bad_value_in_train_csv_names_the_file(tmp_path):
    rows = ["ISIC_1,L1,L1,mel,4,-5,male,back,histo"]
    with pytest.raises(StageError, match=r"train.csv: age -5: not a number of years from 0 to 120"):
        stage.main(write_params(tmp_path / "params.yaml"), train_csv(tmp_path / "split", rows), tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
