"""Stage export: seeded calibration sample, both .tflite files written and checked on test,
the int8 file integer inside with float input and output, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages import export
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASSES
from stages.lib.inference import Decision, predict_proba
from stages.lib.params import load_params
from stages.lib.shards import read_images, read_shards, sample_images, sample_rows
from tests.conftest import make_shards
from tests.fixtures import write_params
from tests.tiny_model import tiny_model

EXPORT = {"representative_images": 500, "seed": 3, "batch_size": 16,  # 16: the last test batch is short
          "latency_runs": 3}


def repeat_training_images(shards: Path) -> int:
    """Give train a plan, as augment writes one, that reads every image and repeats every third
    once more; returns the number of examples train would read."""
    index = json.loads((shards / "index.json").read_text())
    stored = index["splits"]["train"]["images"]
    plan = np.concatenate([np.arange(stored), np.arange(0, stored, 3)])
    np.save(shards / "train-plan.npy", plan)
    index["splits"]["train"]["plan"] = "train-plan.npy"
    (shards / "index.json").write_text(json.dumps(index))
    return len(plan)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One run of the stage on tiny shards and a tiny model (conversion takes seconds)."""
    folder = tmp_path_factory.mktemp("export")
    shards = make_shards(folder / "augmented")
    repeat_training_images(shards)
    tiny_model(read_shards(shards, "train")[0]).save(folder / "model.keras")
    params = write_params(folder / "params.yaml", export=EXPORT)
    Decision("flips", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85).save(folder / "decision.json")
    export.main(params, shards, folder / "model.keras", folder / "models", folder / "metrics" / "export.json",
                folder / "decision.json")
    return folder


def test_the_calibration_sample_is_seeded_distinct_capped_and_in_stored_order():
    rows = sample_rows(50, 10, seed=7)
    # the draws export and evaluate made before they shared the one function
    assert rows.tolist() == [2, 10, 15, 26, 29, 35, 38, 39, 44, 46]
    assert rows.tolist() == sample_rows(50, 10, seed=7).tolist() != sample_rows(50, 10, seed=8).tolist()
    assert len(set(rows.tolist())) == 10 and rows.tolist() == sorted(rows.tolist())
    assert sample_rows(50, 500, seed=7).tolist() == list(range(50)), "all of them when there are fewer"


def test_both_files_are_written_smaller_and_checked_on_test(exported):
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    keras_size = (exported / "model.keras").stat().st_size
    assert "test_images" not in metrics, "image counts live in metrics/data.json"
    stored = len(read_images(exported / "augmented", "train")[0])
    assert stored < len(read_shards(exported / "augmented", "train")[0]), "train's plan repeats images"
    assert metrics["representative_images"] == stored, "calibrated on each real image once"
    assert (metrics["keras"]["agreement"], metrics["keras"]["size_bytes"]) == (1.0, keras_size)
    assert set(metrics["keras"]) == {"balanced_accuracy", "agreement", "size_bytes"}
    for name in ("float16", "int8"):
        path = exported / "models" / f"model_{name}.tflite"
        assert set(metrics[name]) == {"balanced_accuracy", "agreement", "size_bytes", "latency_ms"}
        assert metrics[name]["size_bytes"] == path.stat().st_size < keras_size
        assert 0 <= metrics[name]["agreement"] <= 1 and 0 <= metrics[name]["balanced_accuracy"] <= 1
        assert 0 < metrics[name]["latency_ms"] < 1000
    assert metrics["int8"]["size_bytes"] < metrics["float16"]["size_bytes"]
    assert not list(exported.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_float16_agrees_wherever_the_keras_model_is_decisive(exported):
    """An untrained tiny net amplifies float16 rounding (probabilities move by ~0.03), so near-ties
    may flip; a clear top class must not. The metric must match a count made here, through the
    stored decision rule (here: test-time flips)."""
    import keras

    images, _, _ = read_shards(exported / "augmented", "test")
    reference = predict_proba(keras.saving.load_model(exported / "model.keras"), images, tta="flips")
    proba = export.tflite_predict((exported / "models" / "model_float16.tflite").read_bytes(), images, 16,
                                  tta="flips")
    agree = proba.argmax(axis=1) == reference.argmax(axis=1)
    top_two = np.sort(reference, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > 0.05
    assert decisive.sum() >= len(images) // 2 and agree[decisive].all()
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    assert metrics["float16"]["agreement"] == pytest.approx(agree.mean()) and agree.mean() >= 0.8


def output_dtypes(model_bytes: bytes) -> dict[str, set]:
    """TFLite op type -> the dtypes of its outputs, over the whole file."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    kinds: dict[str, set] = {}
    for op in interpreter._get_ops_details():
        kinds.setdefault(op["op_name"], set()).update(tensors[i]["dtype"] for i in op["outputs"] if i in tensors)
    return kinds


def test_weights_are_frozen_into_the_files_with_batchnorm_folded(exported):
    """No variable reads left in either file: they would keep BatchNorm unfolded and break int8 calibration."""
    for name in ("model_float16.tflite", "model_int8.tflite"):
        ops = set(output_dtypes((exported / "models" / name).read_bytes()))
        assert not ops & {"READ_VARIABLE", "VAR_HANDLE", "RSQRT", "BATCH_MATMUL"}, (name, ops)


def test_int8_file_is_integer_inside_but_the_default_float_ops_with_the_keras_models_interface(exported):
    """The stage with the repo's params: int8_float_ops and int8_float_layers."""
    import tensorflow as tf

    data = (exported / "models" / "model_int8.tflite").read_bytes()
    interpreter = tf.lite.Interpreter(model_content=data)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert (source["dtype"], tuple(source["shape_signature"])) == (np.float32, (-1, 32, 32, 3))
    assert (target["dtype"], tuple(target["shape_signature"])) == (np.float32, (-1, len(CLASSES)))
    params = load_params("export", export.ExportParams, exported / "params.yaml")
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    assert metrics["int8_float_ops"] == params.int8_float_ops
    assert metrics["int8_float_layers"] == params.int8_float_layers
    convs = [f"conv_pw_{block}" for block in range(1, 14)] + ["conv1"]
    assert set(params.int8_float_layers) <= set(convs), "this check knows only the convolutions' layers"
    kinds = output_dtypes(data)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"):
        if op in params.int8_float_ops:
            assert kinds[op] == {np.float32}, op
        else:  # CONV_2D: the convolutions of int8_float_layers stay float
            floats = {np.float32} if op == "CONV_2D" and params.int8_float_layers else set()
            assert kinds[op] == {np.int8} | floats, op
    images = read_shards(exported / "augmented", "test")[0][:5]
    proba = export.tflite_predict(data, images, batch_size=2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=0.02)


def test_int8_without_float_ops_is_integer_everywhere_but_the_edges(tmp_path):
    import tensorflow as tf

    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    interpreter = tf.lite.Interpreter(model_content=export.to_int8(tiny_model(images), 32, images[:20]))
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert source["dtype"] == target["dtype"] == np.float32
    floats = [t["name"] for t in interpreter.get_tensor_details() if t["dtype"] == np.float32]
    assert sorted(floats) == sorted([source["name"], target["name"]]), "only the edges are float"


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


def test_calibration_draws_from_the_stored_images_not_from_what_train_reads(exported):
    """The sample is the evaluate's sample (shards.sample_images): rows of the stored images,
    each at most once, whatever train's plan repeats."""
    images, labels, _ = read_images(exported / "augmented", "train")
    sample, sample_labels = sample_images(exported / "augmented", "train", 10, seed=3)
    rows = sample_rows(len(images), 10, seed=3)
    np.testing.assert_array_equal(sample, images[rows])
    np.testing.assert_array_equal(sample_labels, labels[rows])


def test_int8_with_float_ops_keeps_those_ops_float_and_the_rest_integer(tmp_path):
    import tensorflow as tf

    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    model = tiny_model(images)
    data = export.to_int8(model, 32, images[:20], float_ops=("FULLY_CONNECTED", "SOFTMAX"))
    interpreter = tf.lite.Interpreter(model_content=data)
    kinds = output_dtypes(data)
    assert kinds["SOFTMAX"] == {np.float32} and kinds["FULLY_CONNECTED"] == {np.float32}
    assert kinds["CONV_2D"] == kinds["DEPTHWISE_CONV_2D"] == {np.int8}
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert source["dtype"] == target["dtype"] == np.float32
    proba = export.tflite_predict(data, images[:5], batch_size=2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)  # a float softmax sums to 1


def test_int8_float_layers_keep_exactly_those_layers_ops_float(tmp_path):
    """conv_pw_1 must not also catch conv_pw_10..13: a layer is a whole part of the fused name."""
    import tensorflow as tf

    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    data = export.to_int8(tiny_model(images), 32, images[:20], float_layers=("conv_pw_1", "conv_dw_2"))
    interpreter = tf.lite.Interpreter(model_content=data)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    kinds = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            name = tensors[op["outputs"][0]]["name"]
            kinds[name.split("/")[1].removesuffix("_relu_1")] = tensors[op["outputs"][0]]["dtype"]
    assert {layer for layer, dtype in kinds.items() if dtype == np.float32} == {"conv_pw_1", "conv_dw_2"}
    assert len(kinds) == 27 and sum(dtype == np.int8 for dtype in kinds.values()) == 25
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert source["dtype"] == target["dtype"] == np.float32


def test_int8_float_layers_must_be_layers_of_the_model(exported, tmp_path):
    import keras

    model = keras.saving.load_model(exported / "model.keras")
    images, labels, _ = read_shards(exported / "augmented", "train")
    params = export.ExportParams(**{**EXPORT, "int8_float_layers": ["conv_pw_1", "conv_pw_99"]})
    decision = Decision("none", (0.0,) * len(CLASSES), 0.0, 1.0, 1.0)
    with pytest.raises(StageError, match="export.int8_float_layers: the model has no layer 'conv_pw_99'"):
        export.export(model, 1, images, images[:2], labels[:2], params, decision)
    with pytest.raises(StageError, match="no TFLite tensor comes from layer 'conv_pw_99'"):
        export.layer_tensors(export.to_float16(model, 32), ("conv_pw_99",))
    assert len(export.layer_tensors(export.to_float16(model, 32), ("conv_pw_1",))) >= 1


def test_int8_float_ops_must_be_known_op_types(tmp_path):
    with pytest.raises(ParamError, match=r"int8_float_ops: unknown op 'softmax' \(known: CONV_2D, "):
        load_params("export", export.ExportParams,
                    write_params(tmp_path / "p.yaml", export={**EXPORT, "int8_float_ops": ["softmax"]}))


def test_latency_is_a_positive_median_in_milliseconds(exported):
    data = (exported / "models" / "model_float16.tflite").read_bytes()
    image = read_shards(exported / "augmented", "test")[0][0]
    assert 0 < export.latency_ms(data, image, runs=3) < 1000
