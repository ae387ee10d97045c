"""files.atomic_save_model writes deterministic .keras files: the same model gives the same bytes,
whenever, by whichever process and however Keras writes them, and the file loads back to the same
weights, optimizer state and predictions."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages import train
from stages.lib import files
from tests.conftest import train_params
from tests.tiny_model import tiny_model


def zip_of(entries: list[tuple[str, tuple, int, bytes]]) -> bytes:
    """A zip holding (name, date_time, Unix mode, content) entries in the order given."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, date_time, mode, content in entries:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.external_attr = mode << 16
            zf.writestr(info, content)
    return out.getvalue()


def config_sharing(first: int, second: int) -> bytes:
    """A config.json in Keras's form: two layers share the object saved at address `first`."""
    return json.dumps({"layers": [{"dtype": {"class_name": "DTypePolicy", "shared_object_id": first}},
                                  {"dtype": {"class_name": "DTypePolicy", "shared_object_id": first}},
                                  {"kernel_initializer": {"shared_object_id": second}}]}).encode()


def test_save_times_addresses_modes_and_entry_order_are_normalised():
    weights = b"\x89HDF\r\n\x1a\n stand-in weights"
    saved_monday = zip_of([
        ("metadata.json", (2026, 3, 2, 9, 15, 0), 0o100600,
         b'{"keras_version": "3.15.1", "date_saved": "2026-03-02@09:15:01"}'),
        ("config.json", (2026, 3, 2, 9, 15, 0), 0o100600, config_sharing(140173861819280, 140173861819999)),
        ("model.weights.h5", (2026, 3, 2, 9, 15, 2), 0o100600, weights),
    ])
    saved_later_elsewhere = zip_of([
        ("model.weights.h5", (2027, 1, 5, 23, 59, 58), 0o100664, weights),
        ("config.json", (2027, 1, 5, 23, 59, 58), 0o100664, config_sharing(140573073211984, 140573073200000)),
        ("metadata.json", (2027, 1, 5, 23, 59, 58), 0o100664,
         b'{"keras_version": "3.15.1", "date_saved": "2027-01-05@23:59:59"}'),
    ])
    normalised = files._deterministic_keras_zip(saved_monday)
    assert normalised == files._deterministic_keras_zip(saved_later_elsewhere)
    with zipfile.ZipFile(io.BytesIO(normalised)) as zf:
        entries = zf.infolist()
        assert [e.filename for e in entries] == ["config.json", "metadata.json", "model.weights.h5"]
        assert {e.date_time for e in entries} == {(1980, 1, 1, 0, 0, 0)}
        assert {e.external_attr >> 16 for e in entries} == {0o100644}
        assert json.loads(zf.read("metadata.json")) == {"keras_version": "3.15.1",
                                                         "date_saved": "1980-01-01@00:00:00"}
        assert zf.read("config.json") == config_sharing(0, 1), "numbered in order of first appearance"
        assert zf.read("model.weights.h5") == weights


IMAGES = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
ROOT = Path(__file__).resolve().parents[2]
WAYS = ("in_memory", "low_memory")


def trained_model():
    """The tiny model trained one step (seeded, op determinism and optimizer as in train), so the
    file also holds optimizer state."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    model = tiny_model(IMAGES)
    model.compile(optimizer=train.make_optimizer(train_params()), loss="sparse_categorical_crossentropy")
    model.train_on_batch(IMAGES, np.arange(len(IMAGES)) % 7)
    return model


def save_both_ways(model, folder: Path) -> None:
    """Save `model` both ways Keras writes: weights in memory, and (short of memory) through a file."""
    from keras.src.saving import saving_lib

    in_memory = saving_lib.is_memory_sufficient
    try:
        files.atomic_save_model(model, folder / "in_memory.keras")
        saving_lib.is_memory_sufficient = lambda m: False
        files.atomic_save_model(model, folder / "low_memory.keras")
    finally:
        saving_lib.is_memory_sufficient = in_memory


SAVE_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from tests.lib.test_model_file import save_both_ways, trained_model
save_both_ways(trained_model(), Path(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def model():
    return trained_model()


def test_one_model_saved_by_two_processes_gives_the_same_bytes(model, tmp_path):
    """Saved here, then 2.1 s later (zip entry times count in 2 s steps, date_saved in 1 s) by a
    new process that builds the same model (its objects at other addresses), both ways each."""
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    save_both_ways(model, tmp_path / "here")
    time.sleep(2.1)
    done = subprocess.run([sys.executable, "-c", SAVE_IN_ANOTHER_PROCESS, str(tmp_path / "there")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for way in WAYS:
        assert (tmp_path / "here" / f"{way}.keras").read_bytes() == (tmp_path / "there" / f"{way}.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "here" / "in_memory.keras") as zf:
        with h5py.File(io.BytesIO(zf.read("model.weights.h5"))) as h5:
            assert "optimizer" in h5, "the optimizer's state is in the file too"
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["in_memory.keras", "low_memory.keras"]


def test_the_saved_file_loads_and_predicts_exactly_as_the_model(model, tmp_path):
    import keras

    files.atomic_save_model(model, tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    for saved, restored in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(restored, saved)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))
    np.testing.assert_array_equal(loaded.predict(IMAGES, verbose=0), model.predict(IMAGES, verbose=0))
    assert (tmp_path / "model.keras").stat().st_mode & 0o777 == 0o644
