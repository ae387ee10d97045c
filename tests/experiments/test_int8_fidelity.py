"""experiments/int8_fidelity.py: candidate specs, calibration views, its conversions, and a run
that scores candidates on val without ever reading test."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import int8_fidelity
from experiments.int8_fidelity import Candidate, calibration_images, int8_layer_errors, parse_candidate
from stages import export
from stages.lib import shards
from stages.lib.dataset import CLASSES
from stages.lib.inference import Decision
from stages.lib.params import load_params
from stages.lib.shards import read_shards, sample_rows
from tests.conftest import make_shards
from tests.fixtures import write_params
from tests.tiny_model import tiny_model

BASE = export.ExportParams(representative_images=1000, seed=42, batch_size=64, int8_float_ops=["DEPTHWISE_CONV_2D"])


def test_quantisation_debugger_ranks_layers_by_error_in_quantisation_steps(tmp_path):
    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    table = int8_layer_errors(tiny_model(images), 32, images[:20], images[20:25])
    assert {"op_name", "tensor_name", "rmse/scale"} <= set(table.columns)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= set(table["op_name"])
    assert table["rmse/scale"].is_monotonic_decreasing and (table["rmse/scale"] >= 0).all()


def test_a_candidate_changes_only_the_keys_it_names():
    assert parse_candidate("", BASE) == Candidate(images=1000, float_ops=("DEPTHWISE_CONV_2D",))
    candidate = parse_candidate("images=2000, float=CONV_2D+SOFTMAX,views=flips,worst=3", BASE)
    assert candidate == Candidate(images=2000, float_ops=("CONV_2D", "SOFTMAX"), views="flips", worst=3)
    assert parse_candidate("float=none", BASE).float_ops == ()
    assert parse_candidate("layers=conv_pw_1+conv_pw_2", BASE).float_layers == ("conv_pw_1", "conv_pw_2")
    assert parse_candidate("layers=conv_pw_1", BASE).name == "int8, 1000 images, float DEPTHWISE_CONV_2D+conv_pw_1"
    assert parse_candidate("mode=dynamic", BASE).name == "dynamic"
    assert parse_candidate("", BASE).name == "int8, 1000 images, float DEPTHWISE_CONV_2D"


@pytest.mark.parametrize("spec, problem", [("images=0", "bad item 'images=0'"), ("float=softmax", "bad item"),
                                           ("colour=1", "bad item 'colour=1'"), ("mode=int4", "bad item"),
                                           ("mode=int16", "mode=int16 keeps every op quantised"),
                                           ("layers=", "bad item 'layers='")])
def test_a_bad_candidate_is_a_clear_error(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_candidate(spec, BASE)


def test_flipped_calibration_holds_the_same_sample_in_its_four_views():
    images = np.random.default_rng(0).integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    plain = calibration_images(images, Candidate(images=5, float_ops=()), seed=1)
    flipped = calibration_images(images, Candidate(images=5, float_ops=(), views="flips"), seed=1)
    np.testing.assert_array_equal(plain, images[sample_rows(len(images), 5, 1)])
    assert len(flipped) == 20
    np.testing.assert_array_equal(flipped[:5], plain)
    np.testing.assert_array_equal(flipped[5:10], plain[:, :, ::-1])


def test_int16_activations_keep_float_edges_and_int16_inside(tmp_path):
    import tensorflow as tf

    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    data = int8_fidelity.convert(tiny_model(images), 32, Candidate(images=20, float_ops=(), mode="int16"),
                                 images[:20])
    interpreter = tf.lite.Interpreter(model_content=data)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert source["dtype"] == target["dtype"] == np.float32
    dtypes = {t["dtype"] for t in interpreter.get_tensor_details()}
    assert np.int16 in dtypes and np.int8 in dtypes, dtypes


def test_candidates_are_scored_on_val_and_test_is_never_read(tmp_path, monkeypatch):
    folder = make_shards(tmp_path / "augmented")
    model = tiny_model(read_shards(folder, "train")[0])
    model.save(tmp_path / "model.keras")
    Decision("flips", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85).save(tmp_path / "decision.json")
    params = write_params(tmp_path / "params.yaml", export={"representative_images": 20, "seed": 1})
    read = shards.read_shards

    def no_test(folder, split):
        assert split != "test", "the tool read test"
        return read(folder, split)

    monkeypatch.setattr(int8_fidelity, "read_shards", no_test)
    record = int8_fidelity.main(["--model", str(tmp_path / "model.keras"), "--data", str(folder), "--decision",
                                 str(tmp_path / "decision.json"), "--params", str(params), "--latency-runs", "2",
                                 "--candidate", "", "mode=float16", "--json", str(tmp_path / "out.json")])
    assert record == json.loads((tmp_path / "out.json").read_text())
    assert record["val_images"] == 4 * len(CLASSES) and record["decision"]["tta"] == "flips"
    rows = record["candidates"]
    assert list(rows) == [parse_candidate("", load_params("export", export.ExportParams, params)).name, "float16"]
    for row in rows.values():
        assert 0 <= row["agreement"] <= 1 and 0 <= row["agreement_operating_point"] <= 1 and row["size_bytes"] > 0
    assert rows["float16"]["agreement"] >= 0.8  # an untrained tiny net: near-ties may flip
