"""experiments/seeds.py: adding test probabilities to seeds trained for validation only; saving them."""
from __future__ import annotations

import os

import numpy as np
import pytest

from experiments.seeds import add_test, save_probabilities
from stages.lib.inference import VIEWS, predict_proba
from stages.lib.shards import read_shards
from tests.tiny_model import tiny_model


def test_add_test_keeps_val_and_adds_the_saved_models_test_probabilities(tmp_path, tiny_shards):
    images, labels, _ = read_shards(tiny_shards, "test")
    model = tiny_model(images)
    out = tmp_path / "runs"
    out.mkdir()
    model.save(out / "seed1.keras")
    val = {"val_labels": np.array([0, 3, 5]), "val_flips": np.full((3, 7), 1 / 7, np.float32)}
    np.savez(out / "seed1.npz", **val)

    add_test(out, [1], tiny_shards)

    saved = np.load(out / "seed1.npz")
    assert set(saved.files) == {*val, "test_labels", *(f"test_{view}" for view in VIEWS)}
    for key, value in val.items():
        np.testing.assert_array_equal(saved[key], value)
    np.testing.assert_array_equal(saved["test_labels"], labels)
    for view in VIEWS:
        np.testing.assert_allclose(saved[f"test_{view}"], predict_proba(model, images, tta=view), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["seed1.keras", "seed1.npz"], "no temporary file left"


def test_probabilities_are_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    npz = tmp_path / "seed1.npz"
    save_probabilities(npz, {"val_none": np.ones((2, 7))})

    def disk_full(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_probabilities(npz, {"val_none": np.zeros((2, 7))})
    assert sorted(p.name for p in tmp_path.glob("seed*.npz")) == ["seed1.npz"]  # what score_seeds reads
    assert [p.name for p in tmp_path.iterdir()] == ["seed1.npz"]                 # no temporary file left
    with np.load(npz) as saved:
        assert saved["val_none"].tolist() == np.ones((2, 7)).tolist()
