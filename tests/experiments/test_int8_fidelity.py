"""experiments/int8_fidelity.py: its quantisation debugger table, on the export stage's own conversion."""
from __future__ import annotations

from experiments.int8_fidelity import int8_layer_errors
from stages.lib.shards import read_shards
from tests.conftest import make_shards
from tests.tiny_model import tiny_model


def test_quantisation_debugger_ranks_layers_by_error_in_quantisation_steps(tmp_path):
    images = read_shards(make_shards(tmp_path / "augmented"), "train")[0]
    table = int8_layer_errors(tiny_model(images), 32, images[:20], images[20:25])
    assert {"op_name", "tensor_name", "rmse/scale"} <= set(table.columns)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= set(table["op_name"])
    assert table["rmse/scale"].is_monotonic_decreasing and (table["rmse/scale"] >= 0).all()
