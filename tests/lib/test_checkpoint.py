"""stages/lib/checkpoint.py: train's checkpoint folder is saved whole, read back exactly, used only
with its own fingerprint, and a broken one starts training over with a warning.

That train resumes from it to the same model, after a SIGKILL: tests/stages/test_train.py.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from stages.lib import checkpoint

ARRAYS = {"model": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], np.uint32)],
          "optimizer": [np.array(3, np.int64)],
          "average": [np.array(0)]}  # a count of 0: no mean yet
PARAMS = {"seed": 1, "epochs": 3, "augmentation": {"flip": True, "zoom_fraction": 0.1}}
DATA = [np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 5])]


@pytest.fixture
def live(tmp_path):
    folder = tmp_path / "live"
    (folder / "plots" / "metrics").mkdir(parents=True)
    (folder / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n1\t2.5\n")
    (folder / "metrics.json").write_text('{"loss": 2.5, "step": 1}')
    return folder


def test_a_saved_checkpoint_loads_back_exactly(tmp_path, live):
    folder = tmp_path / "models" / "train_checkpoint"
    checkpoint.save(folder, "stamp", 1, ARRAYS, live)
    saved = checkpoint.load(folder, "stamp")
    assert saved.epochs_done == 1
    assert saved.arrays.keys() == ARRAYS.keys()
    for group, arrays in ARRAYS.items():
        assert len(saved.arrays[group]) == len(arrays)
        for got, expected in zip(saved.arrays[group], arrays):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    assert (saved.live_dir / "plots" / "metrics" / "loss.tsv").read_text() == "step\tloss\n1\t2.5\n"
    assert (saved.live_dir / "metrics.json").read_text() == '{"loss": 2.5, "step": 1}'


def test_a_checkpoint_of_another_run_is_not_used(tmp_path, live, caplog):
    folder = tmp_path / "train_checkpoint"
    checkpoint.save(folder, "stamp", 2, ARRAYS, live)
    with caplog.at_level(logging.INFO):
        assert checkpoint.load(folder, "other stamp") is None
    assert f"{folder}: made with other params, data or code: training starts over" in caplog.text


def test_the_fingerprint_changes_with_params_data_and_code(tmp_path, monkeypatch):
    same = checkpoint.fingerprint({"epochs": 3, "augmentation": {"zoom_fraction": 0.1, "flip": True}, "seed": 1}, DATA)
    assert checkpoint.fingerprint(PARAMS, DATA) == same, "key order does not matter"
    assert checkpoint.fingerprint({**PARAMS, "epochs": 4}, DATA) != same
    assert checkpoint.fingerprint({**PARAMS, "augmentation": {"flip": True, "zoom_fraction": 0.2}}, DATA) != same
    one_pixel = [DATA[0].copy(), DATA[1]]
    one_pixel[0][1, 3, 3, 2] = 1
    assert checkpoint.fingerprint(PARAMS, one_pixel) != same
    assert checkpoint.fingerprint(PARAMS, [DATA[0].reshape(2, 3, 4, 4), DATA[1]]) != same, "same bytes, other shape"
    assert checkpoint.fingerprint(PARAMS, [DATA[0], DATA[1].astype(np.int32)]) != same, "same values, other type"
    code = tmp_path / "stages"
    (code / "lib").mkdir(parents=True)
    (code / "lib" / "shards.py").write_text("SIDE = 32\n")
    monkeypatch.setattr(checkpoint, "CODE_DIR", code)
    before = checkpoint.fingerprint(PARAMS, DATA)
    (code / "lib" / "shards.py").write_text("SIDE = 33\n")
    assert checkpoint.fingerprint(PARAMS, DATA) != before


@pytest.mark.parametrize("damage", ["state.json", "state.npz", "live"])
def test_a_broken_checkpoint_starts_training_over_with_a_warning(tmp_path, live, caplog, damage):
    folder = tmp_path / "train_checkpoint"
    checkpoint.save(folder, "stamp", 1, ARRAYS, live)
    if damage == "state.json":
        (folder / "state.json").write_text('{"epochs_done": 1, "fingerp')
    elif damage == "state.npz":
        (folder / "state.npz").write_bytes((folder / "state.npz").read_bytes()[:100])
    else:
        for path in sorted((folder / "live").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (folder / "live").rmdir()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load(folder, "stamp") is None
    assert f"{folder}: unreadable checkpoint (" in caplog.text
    assert "training starts over" in caplog.text


def test_no_checkpoint_and_a_finished_one_are_nothing_to_resume(tmp_path, live, caplog):
    folder = tmp_path / "train_checkpoint"
    with caplog.at_level(logging.INFO):
        assert checkpoint.load(folder, "stamp") is None  # no folder
        checkpoint.save(folder, "stamp", 3, ARRAYS, live)
        checkpoint.finish(folder)
        assert checkpoint.load(folder, "stamp") is None
    assert caplog.text == "", "nothing to say: there was nothing to resume"
    assert [p.name for p in folder.iterdir()] == ["README.txt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, live):
    folder = tmp_path / "train_checkpoint"
    checkpoint.save(folder, "stamp", 1, ARRAYS, live)
    with pytest.raises(FileNotFoundError):
        checkpoint.save(folder, "stamp", 2, ARRAYS, tmp_path / "no live folder")
    assert json.loads((folder / "state.json").read_text())["epochs_done"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folder left"
