"""The small shared modules: the one range check, the one JSON reader, the one CPU count, the copy
ids and shard format."""
from __future__ import annotations

import os

import pytest

from stages.lib.cli import StageError
from stages.lib.files import read_json
from stages.lib.params import in_range
from stages.lib.progress import usable_cpus


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
