"""Stage export: seeded calibration sample, both .tflite files written and checked on test,
the int8 file integer inside with float input and output, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages import export
from stages.classes import CLASSES
from stages.errors import ParamError, StageError
from stages.params import load_params
from stages.shards import read_shards
from tests.conftest import make_shards
from tests.fixtures import write_params
from tests.tiny_model import tiny_model

EXPORT = {"representative_images": 20, "seed": 3, "batch_size": 16}  # 16: the last test batch is short


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One run of the stage on tiny shards and a tiny model (conversion takes seconds)."""
    folder = tmp_path_factory.mktemp("export")
    shards = make_shards(folder / "augmented")
    tiny_model(read_shards(shards, "train")[0]).save(folder / "model.keras")
    params = write_params(folder / "params.yaml", export=EXPORT)
    export.main(params, shards, folder / "model.keras", folder / "models", folder / "metrics" / "export.json")
    return folder


def test_representative_sample_is_seeded_distinct_and_capped():
    images = np.arange(50)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    sample = export.representative_sample(images, 10, seed=7)
    np.testing.assert_array_equal(sample, export.representative_sample(images, 10, seed=7))
    assert len({int(i[0, 0, 0]) for i in sample}) == 10
    assert not np.array_equal(sample, export.representative_sample(images, 10, seed=8))
    assert len(export.representative_sample(images, 500, seed=7)) == 50


def test_both_files_are_written_smaller_and_checked_on_test(exported):
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    keras_size = (exported / "model.keras").stat().st_size
    assert metrics["test_images"] == 4 * len(CLASSES) and metrics["representative_images"] == 20
    assert (metrics["keras"]["agreement"], metrics["keras"]["size_bytes"]) == (1.0, keras_size)
    for name in ("float16", "int8"):
        path = exported / "models" / f"model_{name}.tflite"
        assert set(metrics[name]) == set(metrics["keras"]) == {"balanced_accuracy", "agreement", "size_bytes"}
        assert metrics[name]["size_bytes"] == path.stat().st_size < keras_size
        assert 0 <= metrics[name]["agreement"] <= 1 and 0 <= metrics[name]["balanced_accuracy"] <= 1
    assert metrics["int8"]["size_bytes"] < metrics["float16"]["size_bytes"]
    assert not list(exported.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_float16_agrees_wherever_the_keras_model_is_decisive(exported):
    """An untrained tiny net amplifies float16 rounding (probabilities move by ~0.03), so near-ties
    may flip; a clear top class must not. The metric must match a count made here."""
    import keras

    images, _, _ = read_shards(exported / "augmented", "test")
    reference = keras.saving.load_model(exported / "model.keras").predict(images.astype(np.float32), verbose=0)
    proba = export.tflite_predict((exported / "models" / "model_float16.tflite").read_bytes(), images, 16)
    agree = proba.argmax(axis=1) == reference.argmax(axis=1)
    top_two = np.sort(reference, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > 0.05
    assert decisive.sum() >= len(images) // 2 and agree[decisive].all()
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    assert metrics["float16"]["agreement"] == pytest.approx(agree.mean()) and agree.mean() >= 0.8


def test_int8_file_is_integer_inside_with_the_keras_models_interface(exported):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(exported / "models" / "model_int8.tflite"))
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert (source["dtype"], tuple(source["shape_signature"])) == (np.float32, (-1, 32, 32, 3))
    assert (target["dtype"], tuple(target["shape_signature"])) == (np.float32, (-1, len(CLASSES)))
    floats = [t["name"] for t in interpreter.get_tensor_details() if t["dtype"] == np.float32]
    assert sorted(floats) == sorted([source["name"], target["name"]]), "only the edges are float"
    images = read_shards(exported / "augmented", "test")[0][:5]
    proba = export.tflite_predict((exported / "models" / "model_int8.tflite").read_bytes(), images, batch_size=2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=0.02)


def test_params_are_checked_before_any_work(tmp_path):
    with pytest.raises(ParamError, match="unknown key export.colour"):
        load_params("export", export.ExportParams, write_params(tmp_path / "p.yaml", export={"colour": 1}))
    with pytest.raises(ParamError, match="representative_images must be >= 1"):
        load_params("export", export.ExportParams,
                    write_params(tmp_path / "p.yaml", export={"representative_images": 0}))


def test_missing_model_and_size_mismatch_are_clear_errors(exported, tmp_path):
    params = write_params(tmp_path / "params.yaml", export=EXPORT)
    with pytest.raises(StageError, match="nope.keras: not found.*dvc repro"):
        export.main(params, exported / "augmented", tmp_path / "nope.keras", tmp_path, tmp_path / "m.json")
    bigger = make_shards(tmp_path / "augmented", size=48, per_class={"train": 1, "test": 1})
    with pytest.raises(StageError, match="48x48"):
        export.main(params, bigger, exported / "model.keras", tmp_path, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
