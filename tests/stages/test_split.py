"""Stage split: whole lesion groups, every class in every split, close class mix, seeded."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from stages import split
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASSES, LABELS, SPLITS
from stages.lib.params import load_params
from tests.fixtures import make_metadata, write_params

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
# Unbalanced like HAM10000: many nv lesions, few df and vasc ones; 1-4 images per lesion.
LESIONS = {"akiec": 30, "bcc": 40, "bkl": 60, "df": 12, "mel": 60, "nv": 300, "vasc": 12}


# Classes that get a lesion group of three merged lesions of MERGED_IMAGES images each.
MERGED_CLASSES = ("akiec", "bcc", "bkl", "mel", "nv")
MERGED_IMAGES = 5  # more than any other lesion has (make_metadata draws 1-4 above)


def clean_table(lesions_per_class=LESIONS, seed: int = 0) -> pd.DataFrame:
    """images.csv as dedupe writes it, with several merged lesion groups: HAM_0000000+HAM_0000001, and
    in each of MERGED_CLASSES three lesions of 5 images in one group. Assigned by lesion_id instead of
    lesion_group, those three would be their class's three largest, which go to train, val and test
    (each to the split furthest below its target, ties to the earlier one): apart, whatever the seed."""
    table = make_metadata(lesions_per_class, images_per_lesion=(1, 4), seed=seed)
    group = table["lesion_id"].replace({"HAM_0000001": "HAM_0000000+HAM_0000001",
                                        "HAM_0000000": "HAM_0000000+HAM_0000001"})
    table = table.assign(lesion_group=group)
    merged = []
    for k, dx in enumerate(MERGED_CLASSES):
        template = table[table["dx"] == dx].iloc[0].to_dict()
        lesions = [f"HAM_9{k:02d}{j:04d}" for j in range(3)]
        merged += [{**template, "lesion_id": lesion, "image_id": f"ISIC_9{k:02d}{j:02d}{i:02d}",
                    "lesion_group": "+".join(lesions)}
                   for j, lesion in enumerate(lesions) for i in range(MERGED_IMAGES)]
    table = pd.concat([table, pd.DataFrame(merged)], ignore_index=True)
    return table.assign(label=table["dx"].map(LABELS))


def write_clean(folder: Path, table: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "images.csv", index=False)
    (folder / "report.json").write_text(json.dumps({"images": len(table)}), encoding="utf-8")
    return folder


def run(tmp_path: Path, table: pd.DataFrame, **params) -> dict[str, pd.DataFrame]:
    split.main(write_clean(tmp_path / "clean", table), tmp_path / "split", tmp_path / "metrics" / "data.json",
               write_params(tmp_path / "params.yaml", split=params))
    return {name: pd.read_csv(tmp_path / "split" / f"{name}.csv", dtype=str) for name in SPLITS}


# --------------------------------------------------------------------------------------------
# The pure assignment.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_no_lesion_group_is_in_two_splits(seed):
    table = clean_table()
    merged = table.loc[table["lesion_group"] != table["lesion_id"], "lesion_group"]
    assert merged.nunique() == 1 + len(MERGED_CLASSES), "the fixture merges several groups"
    splits = split.split_lesions(table, FRACTIONS, seed=seed)
    assert splits.groupby(table["lesion_group"]).nunique().max() == 1
    for group in merged.unique():
        assert splits[table["lesion_group"] == group].nunique() == 1, group


def test_every_class_is_in_every_split_with_close_proportions():
    table = clean_table()
    splits = split.split_lesions(table, FRACTIONS, seed=1)
    counts = pd.crosstab(table["dx"], splits)
    assert (counts > 0).all().all()
    share = counts / counts.sum()
    overall = table["dx"].value_counts(normalize=True)
    assert (share.sub(overall, axis=0).abs() < 0.03).all().all()
    groups = splits.groupby(table["lesion_group"]).first()
    for name, fraction in FRACTIONS.items():
        assert abs((splits == name).mean() - fraction) < 0.03          # images
        assert abs((groups == name).mean() - fraction) < 0.03          # lesion groups


def test_same_seed_same_split_whatever_the_row_order():
    table = clean_table()
    first = split.split_lesions(table, FRACTIONS, seed=7)
    again = split.split_lesions(table.sample(frac=1, random_state=3), FRACTIONS, seed=7)
    assert first.equals(again.sort_index())


def test_another_seed_gives_another_split():
    table = clean_table()
    one, two = (split.split_lesions(table, FRACTIONS, seed) for seed in (1, 2))
    assert not one.equals(two)


def test_too_few_lesion_groups_is_an_error_with_the_numbers():
    table = clean_table({**LESIONS, "df": 2})
    images = (table["dx"] == "df").sum()
    message = rf"class df has 2 lesion group\(s\) \({images} images\); at least 3 are needed"
    with pytest.raises(StageError, match=message):
        split.split_lesions(table, FRACTIONS, seed=1)


def test_lesion_group_with_two_classes_is_an_error():
    table = clean_table()
    table.loc[0, "dx"] = "vasc"
    with pytest.raises(StageError, match=r"lesion group HAM_0000000\+HAM_0000001 holds images of two"):
        split.split_lesions(table, FRACTIONS, seed=1)


# --------------------------------------------------------------------------------------------
# Params.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"train": 0.8}, r"split: train \+ val \+ test must sum to 1, got 0.8 \+ 0.15 \+ 0.15 = 1.1"),
    ({"val": 0.0, "test": 0.3}, r"split: val must be > 0, got 0.0"),
    ({"train": 1.2, "val": -0.1, "test": -0.1}, r"split: val must be > 0, got -0.1"),
], ids=["sum", "zero", "negative"])
def test_bad_fractions_are_a_param_error_naming_the_keys(tmp_path, values, message):
    with pytest.raises(ParamError, match=message):
        load_params("split", split.SplitParams, write_params(tmp_path / "params.yaml", split=values))


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------
def test_stage_writes_splits_classes_and_metrics(tmp_path):
    table = clean_table()
    tables = run(tmp_path, table)
    assert sorted(pd.concat(tables.values())["image_id"]) == sorted(table["image_id"])
    for frame in tables.values():
        assert list(frame.columns) == list(split.OUTPUT_COLUMNS)
        assert frame["image_id"].is_monotonic_increasing
    classes = json.loads((tmp_path / "split" / "classes.json").read_text(encoding="utf-8"))
    assert [(c["label"], c["dx"]) for c in classes] == list(enumerate(CLASSES))
    metrics = json.loads((tmp_path / "metrics" / "data.json").read_text(encoding="utf-8"))
    assert metrics["images"] == len(table)  # dedupe's report, carried over
    assert [metrics["splits"][name]["images"] for name in SPLITS] == [len(tables[name]) for name in SPLITS]
    assert list(metrics["splits"]["val"]["images_per_class"]) == list(CLASSES)
    assert metrics["splits"]["max_class_share_deviation_pp"] < 3


def test_stage_output_is_byte_identical_for_the_same_seed(tmp_path):
    table = clean_table()
    run(tmp_path / "a", table, seed=5)
    run(tmp_path / "b", table.sample(frac=1, random_state=1), seed=5)
    for name in SPLITS:
        first, second = (tmp_path / run_name / "split" / f"{name}.csv" for run_name in ("a", "b"))
        assert first.read_bytes() == second.read_bytes()


def test_stage_refuses_an_unknown_dx(tmp_path):
    table = clean_table()
    table.loc[0, "dx"] = "xyz"
    with pytest.raises(StageError, match=r"images.csv: unknown dx 'xyz'"):
        run(tmp_path, table)


# --------------------------------------------------------------------------------------------
# Faults: a failed run leaves the previous complete output as it was (issue 4).
# --------------------------------------------------------------------------------------------
def outputs(tmp_path: Path) -> dict[str, bytes]:
    """Every file of the stage's outputs (data/split and metrics/data.json), by path."""
    files = [*(tmp_path / "split").rglob("*"), tmp_path / "metrics" / "data.json"]
    return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in files if p.is_file()}


def assert_no_temporary_output(tmp_path: Path) -> None:
    assert not [p.name for p in tmp_path.rglob(".*") if ".tmp" in p.name], "temporary output left behind"


@pytest.mark.parametrize("values, message", [
    ({"shuffle": True}, r"unknown key split.shuffle \(known keys: seed, train, val, test\)"),
    ({"seed": "42"}, r"split.seed must be int, got '42'"),
    ({"train": 0.6}, r"split: train \+ val \+ test must sum to 1, got 0.6 \+ 0.15 \+ 0.15 = 0.9"),
], ids=["unknown-key", "wrong-type", "sum"])
def test_bad_params_stop_the_stage_before_it_reads_data(tmp_path, values, message):
    run(tmp_path, clean_table())
    previous = outputs(tmp_path)
    params = write_params(tmp_path / "params.yaml", split=values)
    with pytest.raises(ParamError, match=message):  # not "images.csv: not found": params come first
        split.main(tmp_path / "missing", tmp_path / "split", tmp_path / "metrics" / "data.json", params)
    assert outputs(tmp_path) == previous


def test_too_few_lesion_groups_stops_the_stage_and_keeps_the_previous_split(tmp_path):
    run(tmp_path, clean_table())
    previous = outputs(tmp_path)
    table = clean_table({**LESIONS, "vasc": 2})
    images = (table["dx"] == "vasc").sum()
    with pytest.raises(StageError, match=rf"class vasc has 2 lesion group\(s\) \({images} images\); "
                                         r"at least 3 are needed to put it in every split"):
        run(tmp_path, table)
    assert outputs(tmp_path) == previous
    assert_no_temporary_output(tmp_path)


def test_disk_full_while_writing_keeps_the_previous_split(tmp_path, monkeypatch):
    run(tmp_path, clean_table())
    previous = outputs(tmp_path)
    real_write, calls = split.write_table, []

    def write_until_disk_full(path, table):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, table)

    monkeypatch.setattr(split, "write_table", write_until_disk_full)
    with pytest.raises(OSError) as full:
        run(tmp_path, clean_table(), seed=99)
    assert full.value.errno == errno.ENOSPC and "No space left on device" in str(full.value)
    assert calls[0].parent.name.startswith(".split.") and calls[0].name == "train.csv"
    assert outputs(tmp_path) == previous, "neither data/split nor metrics/data.json changed"
    assert_no_temporary_output(tmp_path)

    monkeypatch.setattr(split, "write_table", real_write)
    run(tmp_path, clean_table(), seed=99)  # space freed: the next run completes
    assert outputs(tmp_path) != previous
    assert_no_temporary_output(tmp_path)
