"""benchmarks/epoch_cost.py: one row per (depth, size, batch size, BatchNorm mode), epochs costed per batch size."""
from __future__ import annotations

import json
import math
import sys

import pytest

from benchmarks import epoch_cost
from tests.conftest import TINY_TRAIN
from tests.fixtures import write_params


def test_rows_cover_every_batch_size_and_batchnorm_mode_and_cost_the_epoch_at_that_batch(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN)  # weights none: nothing to download
    out = tmp_path / "cost.json"
    monkeypatch.setattr(sys, "argv", ["epoch_cost", "--sizes", "32", "--depths", "all", "--batch-sizes", "2", "4",
                                      "--batchnorm", "trained", "--repeats", "1", "--params", str(params),
                                      "--out", str(out)])
    epoch_cost.main()
    result = json.loads(out.read_text())
    assert result["train_rows"] == epoch_cost.TRAIN_ROWS
    assert [(row["batch_size"], row["freeze_batchnorm"]) for row in result["rows"]] == [(2, False), (4, False)]
    for row in result["rows"]:
        steps = math.ceil(epoch_cost.TRAIN_ROWS / row["batch_size"])
        assert row["epoch_min"] == pytest.approx(row["step_s"] * steps / 60, abs=0.01 + 1e-4 * steps / 60)
        assert row["image_ms"] == pytest.approx(1000 * row["step_s"] / row["batch_size"], abs=0.06)
