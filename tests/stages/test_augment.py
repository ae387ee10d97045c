"""Tests of stages/augment.py on tiny splits made here: 40x30 JPEGs (4:3 like HAM10000) to 32x32."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import augment
from stages.augment import AugmentParams
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import LABELS
from stages.lib.images import load_image
from stages.lib.shards import read_images, read_index, read_shards, write_shards
from tests.fixtures import declare_size

PARAMS = {
    "seed": 7,
    "image_size": 32,
    "target_per_class": 5,
    "max_copies_per_image": 3,
    "shard_images": 4,
}
# train: nv is above the target (kept as is), mel grows to the target 5, df is capped at 3 x 1.
SPLIT_CLASSES = {"train": {"nv": 6, "mel": 3, "df": 1}, "val": {"nv": 2, "mel": 1},
                 "test": {"df": 1, "nv": 2}}


def smooth_image(rng: np.random.Generator) -> Image.Image:
    """A 40x30 picture with structure at several scales, so every resize and mix-up shows."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    coarse = coarse.resize((40, 30), Image.BICUBIC)
    fine = rng.integers(-20, 21, (30, 40, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + fine, 0, 255).astype(np.uint8))


class Project:
    """Split CSVs and images in tmp_path, in a CSV order that is neither by class nor by id."""

    def __init__(self, root: Path) -> None:
        self.root, self.images, self.split_dir = root, root / "images", root / "split"
        self.images.mkdir()
        self.split_dir.mkdir()
        rng = np.random.default_rng(0)
        number = 1000
        self.tables = {}
        for split, counts in SPLIT_CLASSES.items():
            rows = []
            for dx, count in counts.items():
                for _ in range(count):
                    number -= 1
                    image_id = f"ISIC_{number:07d}"
                    smooth_image(rng).save(self.images / f"{image_id}.jpg", quality=95)
                    rows.append({"image_id": image_id, "lesion_id": f"HAM_{number}",
                                 "lesion_group": f"HAM_{number}", "dx": dx, "label": LABELS[dx]})
            table = pd.DataFrame(rows).sample(frac=1, random_state=1).reset_index(drop=True)
            table.to_csv(self.split_dir / f"{split}.csv", index=False)
            self.tables[split] = table

    def run(self, out: str = "out", workers: int = 1, **params) -> Path:
        params_path = self.root / f"params-{out}.yaml"
        params_path.write_text(yaml.safe_dump({"augment": {**PARAMS, **params}}))
        augment.main(self.split_dir, self.images, self.root / out, params_path, workers=workers)
        return self.root / out

    def label_of(self, image_id: str) -> int:
        table = pd.concat(self.tables.values())
        return int(table.set_index("image_id").loc[image_id, "label"])

    def source(self, image_id: str) -> np.ndarray:
        return load_image(self.images / f"{image_id}.jpg", PARAMS["image_size"])


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def test_shards_round_trip_through_read_images_and_read_shards(project):
    out = project.run()
    index = read_index(out)
    assert index["image_size"] == 32 and index["seed"] == 7
    # 10 real train images, 4 a shard; 14 examples in the plan
    assert index["splits"]["train"]["shards"] == ["train-000.npz", "train-001.npz", "train-002.npz"]
    assert index["splits"]["train"]["plan"] == "train-plan.npy"
    for split in ("train", "val", "test"):
        images, labels, ids = read_images(out, split)
        entry = index["splits"][split]
        assert images.shape == (entry["images"], 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and ids.dtype.kind == "U"
        assert len(labels) == len(ids) == entry["images"] == sum(entry["class_counts"].values())
        assert len(set(ids)) == len(ids) == len(np.unique(images, axis=0)), "each image stored once"
        for name in entry["shards"]:
            with np.load(out / name) as shard:
                assert len(shard["images"]) == len(shard["labels"]) <= PARAMS["shard_images"]


@pytest.mark.parametrize("real, target, cap, added", [
    (6, 5, 3, 0),   # at or above the target: majority class untouched
    (5, 5, 3, 0),
    (3, 5, 3, 2),   # up to the target
    (1, 5, 3, 2),   # capped at 3 x 1
    (2, 10, 1, 0),  # max_copies_per_image 1 turns oversampling off
    (0, 5, 3, 0),   # nothing to repeat
])
def test_oversampling_rule(real, target, cap, added):
    params = AugmentParams(**{**PARAMS, "target_per_class": target, "max_copies_per_image": cap})
    assert augment.repeats_to_add(real, params) == added


def test_storage_plan_stores_each_image_where_its_own_example_is_read():
    """Jobs a (1 repeat), b (none), c (2 repeats): examples a0 a1 b0 c0 c1 c2 (0-5), read in the
    order 4 2 0 5 3 1. The images' own examples a0, b0, c0 are read 3rd, 2nd and 5th: b, a, c are
    stored in rows 0, 1, 2, and the plan is the row of each example read: c b a c c a."""
    jobs = [augment.Job(name, Path(f"{name}.jpg"), 0, repeats) for name, repeats in (("a", 1), ("b", 0), ("c", 2))]
    rows, plan = augment.storage_plan(jobs, np.array([4, 2, 0, 5, 3, 1]))
    assert rows.tolist() == [1, 0, 2]
    assert plan.tolist() == [2, 0, 1, 2, 2, 1]


def test_minority_classes_reach_the_target_within_the_repeat_cap(project):
    out = project.run()
    train = read_index(out)["splits"]["train"]
    none = dict.fromkeys(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 0)
    assert train["class_counts"] == {**none, "df": 1, "mel": 3, "nv": 6}, "the real images"
    _, labels, _ = read_shards(out, "train")
    assert np.bincount(labels, minlength=7).tolist() == list({**none, "df": 3, "mel": 5, "nv": 6}.values())


def test_val_and_test_are_only_resized_in_csv_order(project):
    out = project.run()
    for split in ("val", "test"):
        images, labels, ids = read_shards(out, split)
        table = project.tables[split]
        assert ids.tolist() == table["image_id"].tolist()
        assert labels.tolist() == table["label"].tolist()
        for image, image_id in zip(images, ids):
            np.testing.assert_array_equal(image, project.source(image_id))
        assert "plan" not in read_index(out)["splits"][split] and not (out / f"{split}-plan.npy").exists()


def test_train_reads_each_image_once_plus_its_repeats_with_its_pixels_and_label(project):
    out = project.run()
    images, labels, ids = read_shards(out, "train")
    assert len(ids) == 14 and read_index(out)["splits"]["train"]["images"] == 10  # mel 3 -> 5, df 1 -> 3
    assert set(ids) == set(project.tables["train"]["image_id"]), "every real image, no other id"
    for image, label, image_id in zip(images, labels, ids):
        assert label == project.label_of(image_id)
        np.testing.assert_array_equal(image, project.source(image_id))
    reads = pd.Series(ids).value_counts()
    df = project.tables["train"].query("dx == 'df'")["image_id"].item()
    assert reads[df] == 3 and sorted(reads[reads.index != df]) == [1] * 7 + [2, 2]  # mel: 2 of 3 repeated


def test_sources_are_used_about_equally(project):
    _, _, ids = read_shards(project.run(target_per_class=8, max_copies_per_image=10), "train")
    mel = set(project.tables["train"].query("dx == 'mel'")["image_id"])
    reads = pd.Series([i for i in ids if i in mel]).value_counts()
    assert sorted(reads) == [2, 3, 3]  # each read once, plus 5 repeats over 3 images


def test_train_is_shuffled_once_and_stored_in_that_order(project):
    out = project.run()
    stored = read_images(out, "train")[2].tolist()
    _, _, ids = read_shards(out, "train")
    assert stored != project.tables["train"]["image_id"].tolist() and stored != sorted(stored)
    assert ids.tolist() != stored and len(set(ids.tolist()[:len(stored)])) < len(stored), "repeats are mixed in"


def test_same_inputs_give_identical_bytes_at_any_time_with_any_worker_count(project, monkeypatch):
    first = project.run("first", workers=1)
    later = time.time() + 3 * 3600  # zip entries carry a date: a later run must not differ
    monkeypatch.setattr(time, "time", lambda: later)
    second = project.run("second", workers=2)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_another_seed_changes_which_images_repeat_and_the_order_not_the_pixels(project):
    runs = [read_shards(project.run(f"seed{seed}", seed=seed), "train") for seed in (7, 8)]
    for images, _, ids in runs:
        for image, image_id in zip(images, ids):
            np.testing.assert_array_equal(image, project.source(image_id))
    repeated = [sorted(pd.Series(ids).value_counts().loc[lambda n: n > 1].index) for _, _, ids in runs]
    assert repeated[0] != repeated[1]  # seeds 7 and 8 repeat other mel images (df has one: always it)
    assert runs[0][2].tolist() != runs[1][2].tolist()


# --------------------------------------------------------------------------------------------
# The shard contract (stages/lib/shards.py): a plan reads stored images, checked on reading.
# --------------------------------------------------------------------------------------------
def write_split(folder: Path, images: np.ndarray, plan: np.ndarray | None, shard_images: int = 2) -> None:
    labels = np.arange(len(images)) % 7
    ids = np.array([f"ISIC_{k:07d}" for k in range(len(images))])
    shards, plan_file = write_shards(folder, "train", images, labels, ids, shard_images, plan)
    entry = {"images": len(images), "shards": shards, **({"plan": plan_file} if plan_file else {})}
    (folder / "index.json").write_text(json.dumps({"image_size": images.shape[1], "seed": 0,
                                                   "splits": {"train": entry}}))


def test_read_shards_reads_the_stored_images_in_plan_order(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    write_split(tmp_path, images, np.array([2, 0, 2, 1, 2]))
    read, labels, ids = read_shards(tmp_path, "train")
    np.testing.assert_array_equal(read, images[[2, 0, 2, 1, 2]])
    assert labels.tolist() == [2, 0, 2, 1, 2] and ids.tolist() == [f"ISIC_{k:07d}" for k in (2, 0, 2, 1, 2)]
    np.testing.assert_array_equal(read_images(tmp_path, "train")[0], images)
    write_split(tmp_path, images, None)
    np.testing.assert_array_equal(read_shards(tmp_path, "train")[0], images)  # no plan: stored order


@pytest.mark.parametrize("plan, problem", [
    (np.array([0, 3]), "not a list of rows of the 3 stored train images"),
    (np.array([-1, 0]), "not a list of rows of the 3 stored train images"),
    (np.array([[0, 1]]), "not a list of rows of the 3 stored train images"),
    (np.array([0.0, 1.0]), "not a list of rows of the 3 stored train images"),
    (b"not a plan", "unreadable plan"),
], ids=["past-the-end", "negative", "2-d", "float", "garbage"])
def test_a_damaged_plan_is_an_error_naming_it(tmp_path, plan, problem):
    write_split(tmp_path, np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1]))
    with open(tmp_path / "train-plan.npy", "wb") as f:
        f.write(plan) if isinstance(plan, bytes) else np.save(f, plan)
    with pytest.raises(StageError, match=rf"train-plan.npy: {problem}.*dvc repro augment"):
        read_shards(tmp_path, "train")


@pytest.mark.parametrize("key, value", [
    ("seed", -1), ("image_size", 16), ("image_size", 1024), ("image_size", "big"),
    ("target_per_class", 0), ("max_copies_per_image", 0), ("shard_images", 0), ("colour_jitter", 0.1),
    ("copies", "repeat"), ("rotation_degrees", 180),  # retired keys (synthetic copies) are unknown now
])
def test_bad_params_are_refused_naming_the_key(project, key, value):
    with pytest.raises(ParamError, match=key):
        project.run(**{key: value})
    assert not (project.root / "out").exists()


def test_missing_image_is_an_error_naming_the_file(project):
    missing = project.images / f"{project.tables['val']['image_id'][0]}.jpg"
    missing.unlink()
    with pytest.raises(StageError, match=missing.name):
        project.run()
    assert not (project.root / "out").exists()


def test_undecodable_image_is_an_error_naming_the_file(project):
    broken = project.images / f"{project.tables['train']['image_id'][0]}.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(StageError, match=broken.name):
        project.run(workers=2)
    assert not (project.root / "out").exists()


def test_label_that_disagrees_with_dx_is_an_error(project):
    table = project.tables["test"].copy()
    table.loc[0, "label"] = (table.loc[0, "label"] + 1) % 7
    table.to_csv(project.split_dir / "test.csv", index=False)
    with pytest.raises(StageError, match="test.csv"):
        project.run()


# --------------------------------------------------------------------------------------------
# Faults (issue 4): odd colour modes, damaged files, params; a failed direct run keeps the old output
# (under dvc repro there is none: DVC deletes a stage's outputs before it runs it).
# --------------------------------------------------------------------------------------------
def test_greyscale_and_cmyk_jpegs_become_rgb_on_the_one_loading_path(project):
    grey_id, cmyk_id = project.tables["train"]["image_id"][:2]
    original = {i: project.source(i).astype(int) for i in (grey_id, cmyk_id)}
    for image_id, mode in ((grey_id, "L"), (cmyk_id, "CMYK")):
        path = project.images / f"{image_id}.jpg"
        Image.open(path).convert(mode).save(path, quality=95)
        assert Image.open(path).mode == mode
    grey, cmyk = (load_image(project.images / f"{i}.jpg", 32) for i in (grey_id, cmyk_id))  # predict's path
    assert grey.shape == cmyk.shape == (32, 32, 3) and grey.dtype == cmyk.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(cmyk - original[cmyk_id]).mean() < 15  # the same picture, not inverted colours

    images, _, ids = read_shards(project.run(), "train")  # and the stage takes them as they are
    for image_id, expected in ((grey_id, grey), (cmyk_id, cmyk)):
        np.testing.assert_array_equal(images[ids.tolist().index(image_id)], expected)


@pytest.mark.parametrize("damage, why", [
    (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    (lambda path: path.write_bytes(path.read_bytes()[:200]), "corrupt or truncated image"),
    (declare_size, "decompression bomb"),
], ids=["empty", "truncated", "bomb-header"])
def test_damaged_image_stops_the_stage_naming_file_and_why(project, damage, why):
    out = project.run()
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = project.images / f"{project.tables['val']['image_id'][1]}.jpg"
    damage(broken)
    with pytest.raises(StageError, match=rf"{broken}: {re.escape(why)}.*out of sync \(re-run: dvc repro\)"):
        project.run(seed=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert not list(project.root.glob(".out.*")), "temporary output left behind"


def test_target_below_the_class_size_keeps_every_real_image_and_says_so(project, caplog):
    caplog.set_level(logging.INFO, logger="stages.augment")
    counts = np.bincount(read_shards(project.run(target_per_class=2), "train")[1], minlength=7)
    assert (counts[LABELS["nv"]], counts[LABELS["mel"]], counts[LABELS["df"]]) == (6, 3, 2)  # never fewer than real
    assert "train nv: 6 real images, at or above target_per_class 2: not augmented" in caplog.messages
    assert "train mel: 3 real images, at or above target_per_class 2: not augmented" in caplog.messages


def test_image_size_the_model_cannot_take_is_refused_before_any_image_is_read(project):
    out = project.run()
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    for image in project.images.iterdir():
        image.unlink()  # were any image read, the error would be "not found"
    with pytest.raises(ParamError, match=r"^augment: image_size must be in \[32, 512\], got 16$"):
        project.run(image_size=16)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
