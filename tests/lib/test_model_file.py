"""files.atomic_save_model writes deterministic .keras files: the same model gives the same bytes,
whenever and however Keras writes them, and the file loads back to the same predictions."""
from __future__ import annotations

import io
import json
import time
import zipfile

import h5py
import numpy as np
import pytest

from stages.lib import files
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


def test_save_times_modes_and_entry_order_are_normalised():
    weights = b"\x89HDF\r\n\x1a\n stand-in weights"
    saved_monday = zip_of([
        ("metadata.json", (2026, 3, 2, 9, 15, 0), 0o100600,
         b'{"keras_version": "3.15.1", "date_saved": "2026-03-02@09:15:01"}'),
        ("config.json", (2026, 3, 2, 9, 15, 0), 0o100600, b'{"class_name": "Functional"}'),
        ("model.weights.h5", (2026, 3, 2, 9, 15, 2), 0o100600, weights),
    ])
    saved_later_elsewhere = zip_of([
        ("model.weights.h5", (2027, 1, 5, 23, 59, 58), 0o100664, weights),
        ("config.json", (2027, 1, 5, 23, 59, 58), 0o100664, b'{"class_name": "Functional"}'),
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
        assert zf.read("model.weights.h5") == weights
        assert zf.read("config.json") == b'{"class_name": "Functional"}'


@pytest.fixture(scope="module")
def trained_model():
    """The tiny model compiled and trained one step, so the file also holds optimizer state."""
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    model = tiny_model(images)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.train_on_batch(images, np.arange(8) % 7)
    return model, images


def test_one_model_saved_twice_apart_gives_the_same_bytes(trained_model, tmp_path, monkeypatch):
    """Saves 2.1 s apart (zip entry times count in 2 s steps, date_saved in 1 s), each both ways
    Keras writes: weights in memory, and (short of memory) through a temporary file."""
    from keras.src.saving import saving_lib

    model, _ = trained_model
    ways = {"in_memory": saving_lib.is_memory_sufficient, "low_memory": lambda m: False}
    for save in ("first", "second"):
        if save == "second":
            time.sleep(2.1)
        for way, memory_check in ways.items():
            monkeypatch.setattr(saving_lib, "is_memory_sufficient", memory_check)
            files.atomic_save_model(model, tmp_path / f"{save}_{way}.keras")
    for way in ways:
        assert (tmp_path / f"first_{way}.keras").read_bytes() == (tmp_path / f"second_{way}.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "first_in_memory.keras") as zf:
        with h5py.File(io.BytesIO(zf.read("model.weights.h5"))) as h5:
            assert "optimizer" in h5, "the optimizer's state is in the file too"
    assert len(list(tmp_path.iterdir())) == 4, "no temporary file is left"


def test_the_saved_file_loads_and_predicts_exactly_as_the_model(trained_model, tmp_path):
    import keras

    model, images = trained_model
    files.atomic_save_model(model, tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    for saved, restored in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(restored, saved)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert (tmp_path / "model.keras").stat().st_mode & 0o777 == 0o644
