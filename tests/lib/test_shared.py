"""The small shared modules: the one range check, the one JSON reader, the one CPU count, the copy
ids and shard format."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stages.lib.cli import StageError
from stages.lib.files import read_json
from stages.lib.params import in_range
from stages.lib.progress import usable_cpus
from stages.lib.shards import copy_id, is_copy, read_shards, write_shards


@pytest.mark.parametrize("args, kwargs, message", [
    (("n", 0, 1), {}, "n must be >= 1, got 0"),
    (("x", 0.0, 0), {"lo_open": True}, "x must be > 0, got 0.0"),
    (("deg", 181, None, 180), {}, "deg must be <= 180, got 181"),
    (("p", 1.0, 0, 1), {"hi_open": True}, r"p must be in \[0, 1\), got 1.0"),
    (("s", 16, 32, 512), {}, r"s must be in \[32, 512\], got 16"),
    (("t", 0, 0, 1), {"lo_open": True}, r"t must be in \(0, 1\], got 0"),
])
def test_in_range_names_the_key_the_range_and_the_value(args, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        in_range(*args, **kwargs)


@pytest.mark.parametrize("args, kwargs", [
    (("n", 1, 1), {}), (("x", 1e-9, 0), {"lo_open": True}), (("p", 0.999, 0, 1), {"hi_open": True}),
    (("s", 512, 32, 512), {}), (("any", -5), {}),
])
def test_in_range_accepts_values_within_the_bounds(args, kwargs):
    in_range(*args, **kwargs)


def test_read_json_errors_name_the_file_and_the_stage_that_makes_it(tmp_path):
    with pytest.raises(StageError, match=r"report.json: not found \(run: dvc repro dedupe\)"):
        read_json(tmp_path / "report.json", made_by="dedupe")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(StageError, match=r"bad.json: not valid JSON .*run the stage that makes it: dvc repro"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "good.json").write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(tmp_path / "good.json") == {"a": [1, 2]}


def test_usable_cpus_is_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_copy_ids_name_their_source_and_are_told_from_real_ids():
    assert copy_id("ISIC_0024306", 3) == "ISIC_0024306+aug3"
    assert is_copy(copy_id("ISIC_0024306", 0)) and not is_copy("ISIC_0024306")


def write_split(folder, images, shard_images):
    labels = np.arange(len(images)) % 7
    ids = np.array([f"ISIC_{k:07d}" for k in range(len(images))])
    names, stored = write_shards(folder, "train", images, labels, ids, shard_images)
    index = {"image_size": images.shape[1], "seed": 0, "splits": {"train": {"shards": names}}}
    (folder / "index.json").write_text(json.dumps(index))
    return labels, ids, stored


def test_shards_store_repeated_pixels_once_and_give_every_row_its_own_back(tmp_path):
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    rows = np.array([0, 1, 0, 2, 3, 1, 0, 4, 4, 2, 3])  # repeats fall in other shards than their first
    labels, ids, stored = write_split(tmp_path, distinct[rows], shard_images=3)
    assert stored == 5
    with np.load(tmp_path / "train-002.npz") as shard:  # rows 6-8: only image 4 is new there
        assert len(shard["images"]) == 1 and len(shard["labels"]) == 3
    images, read_labels, read_ids = read_shards(tmp_path, "train")
    np.testing.assert_array_equal(images, distinct[rows])
    assert read_labels.tolist() == labels.tolist() and read_ids.tolist() == ids.tolist()


def test_shards_store_both_images_of_a_hash_collision(tmp_path, monkeypatch):
    class Colliding:  # every image gets the same digest: only the pixel comparison tells them apart
        def __init__(self, *args, **kwargs):
            pass

        def digest(self):
            return b"same"

    monkeypatch.setattr("stages.lib.shards.hashlib.blake2b", Colliding)
    distinct = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    rows = np.array([0, 1, 0, 2, 1])
    _, _, stored = write_split(tmp_path, distinct[rows], shard_images=2)
    assert stored == 3
    np.testing.assert_array_equal(read_shards(tmp_path, "train")[0], distinct[rows])


def test_shards_pointing_past_their_images_are_refused(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)
    write_split(tmp_path, images, shard_images=4)
    with np.load(tmp_path / "train-000.npz") as shard:
        arrays = dict(shard)
    arrays["stored"][0] = 9
    with open(tmp_path / "train-000.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(StageError, match="point past its 4 stored images.*dvc repro augment"):
        read_shards(tmp_path, "train")
