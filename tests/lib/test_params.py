"""Tests for stages/lib/params.py: NaN and infinities are refused at any depth, duplicate keys and YAML booleans
where a number is declared too; in_range is the one numeric check."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import augment, dedupe, download, evaluate, export, report, split, train
from stages.lib.cli import ParamError
from stages.lib.params import from_dict, in_range, load_params, read_params

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"download": download.DownloadParams, "dedupe": dedupe.DedupeParams, "split": split.SplitParams,
            "augment": augment.AugmentParams, "train": train.TrainParams, "evaluate": evaluate.EvaluateParams,
            "report": report.ReportParams, "export": export.ExportParams}


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Example:
    ratio: float = 1.0
    strengths: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    gains: dict[str, float] = dataclasses.field(default_factory=dict)
    optional: float | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        in_range("ratio", self.ratio, 0, 10)  # NaN passes this comparison: the type check must stop it


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("make, key", [
    (lambda x: {"ratio": x}, "s.ratio"),
    (lambda x: {"strengths": [0.0, x]}, r"s.strengths\[1\]"),
    (lambda x: {"gains": {"red": x}}, "s.gains.red"),
    (lambda x: {"optional": x}, "s.optional"),
    (lambda x: {"inner": {"rate": x}}, "s.inner.rate"),
], ids=["float", "in-list", "in-dict", "optional", "nested"])
def test_non_finite_floats_are_refused_naming_the_key(make, key, value):
    data = make(value)
    with pytest.raises(ParamError, match=rf"^{key} must be a finite number, got {value!r}$"):
        from_dict(Example, data, "s")


def test_finite_floats_and_ints_still_pass():
    params = from_dict(Example, {"ratio": 2, "strengths": [-0.5, 1e-3], "gains": {"red": 1.1}, "optional": 0.0}, "s")
    assert params.ratio == 2.0 and params.strengths == [-0.5, 0.001] and params.optional == 0.0


def number_paths(tree: object) -> list[list[str | int]]:
    """The path (keys and list indices) to every number of `tree`."""
    if isinstance(tree, dict):
        return [[k] + rest for k, v in tree.items() for rest in number_paths(v)]
    if isinstance(tree, list):
        return [[i] + rest for i, v in enumerate(tree) for rest in number_paths(v)]
    return [[]] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def dotted(section: str, path: list[str | int]) -> str:
    return section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
CASES = [(section, path) for section in SECTIONS for path in number_paths(PROJECT[section])]


@pytest.mark.parametrize("section, path", CASES, ids=[dotted(s, p) for s, p in CASES])
def test_nan_in_any_number_of_params_yaml_is_refused_naming_the_key(tmp_path, section, path):
    """The project's own params.yaml, one number at a time set to .nan: the stage's loader refuses it."""
    changed = copy.deepcopy(PROJECT)
    target = changed[section]
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = math.nan
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(changed), encoding="utf-8")
    key = dotted(section, path).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ParamError, match=rf"^{key} must be (a finite number|int), got nan$"):
        load_params(section, SECTIONS[section], params_file)


def test_the_project_params_load():
    for section, cls in SECTIONS.items():
        load_params(section, cls, ROOT / "params.yaml")


@pytest.mark.parametrize("text, message", [
    ("split:\n  seed: 1\n  train: 0.7\n  train: 0.8\n", r"duplicate key split.train \(lines 3 and 4\)"),
    ("split:\n  seed: 1\nsplit:\n  seed: 2\n", r"duplicate key split \(lines 1 and 3\)"),
    ("train:\n  augmentation:\n    zoom: 0.1\n    zoom: 0.2\n",
     r"duplicate key train.augmentation.zoom \(lines 3 and 4\)"),
], ids=["in-a-section", "section", "nested"])
def test_a_key_named_twice_is_refused_naming_the_key_and_the_file(tmp_path, text, message):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text, encoding="utf-8")
    with pytest.raises(ParamError, match=rf"^{params_file}: {message}; each key may appear once$"):
        read_params(params_file)
    with pytest.raises(ParamError, match=message):
        load_params("split", split.SplitParams, params_file)


@pytest.mark.parametrize("text, message", [
    (None, "file not found"),
    ("split: [", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping of sections, got list"),
], ids=["missing", "bad-yaml", "not-a-mapping"])
def test_an_unreadable_params_file_is_a_param_error_naming_it(tmp_path, text, message):
    params_file = tmp_path / "params.yaml"
    if text is not None:
        params_file.write_text(text, encoding="utf-8")
    with pytest.raises(ParamError, match=f"{params_file}: {message}"):
        read_params(params_file)


def test_an_empty_params_file_has_no_sections(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing yet\n", encoding="utf-8")
    assert read_params(tmp_path / "params.yaml") == {}
    with pytest.raises(ParamError, match="missing section 'split'"):
        load_params("split", split.SplitParams, tmp_path / "params.yaml")


@dataclasses.dataclass(frozen=True)
class Counted:
    count: int  # no range check: only the type check stands between a YAML boolean and this field
    share: float = 0.5


@pytest.mark.parametrize("text, key, declared", [
    ("count: true\n", "count", "int"), ("count: no\n", "count", "int"), ("count: 1\nshare: yes\n", "share", "float"),
], ids=["true-as-int", "no-as-int", "yes-as-float"])
def test_a_yaml_boolean_where_a_number_is_declared_is_refused_naming_the_key(tmp_path, text, key, declared):
    """YAML 1.1 reads `true`, `no`, `yes` as booleans, and a bool is an int in Python: `seed: true` must not run
    as seed 1."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text("s:\n" + "".join(f"  {line}\n" for line in text.splitlines()), encoding="utf-8")
    value = read_params(params_file)["s"][key]
    assert type(value) is bool  # the YAML parser really gave a boolean
    with pytest.raises(ParamError, match=rf"^s.{key} must be {declared}, got {value!r}$"):
        load_params("s", Counted, params_file)


def test_a_yaml_boolean_for_a_stage_seed_is_refused_by_the_type_check(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("split:\n  seed: true\n  train: 0.7\n  val: 0.15\n  test: 0.15\n", encoding="utf-8")
    with pytest.raises(ParamError, match=r"^split.seed must be int, got True$"):
        load_params("split", split.SplitParams, params_file)


@pytest.mark.parametrize("value", [True, False, "1", None, math.nan, math.inf, -math.inf],
                         ids=["true", "false", "str", "none", "nan", "inf", "-inf"])
def test_in_range_refuses_what_is_not_a_finite_number(value):
    """in_range is the one numeric check, also for files no typed loader checked first (the decision file)."""
    with pytest.raises(ValueError, match=rf"^x must be a finite number, got {re.escape(repr(value))}$"):
        in_range("x", value, 0, 1)


@pytest.mark.parametrize("value", [np.int64(1), np.float32(0.5), np.float64(1.0), 0, 0.25])
def test_in_range_accepts_numpy_and_python_numbers(value):
    in_range("x", value, 0, 1)


@pytest.mark.parametrize("value, ok", [(0.0, False), (1e-12, True), (1.0, True), (1.5, False)])
def test_in_range_open_low_bound_as_a_decision_file_needs_it(value, ok):
    """(0, 1]: 0 itself is out (a temperature of 0), 1 itself is in."""
    if ok:
        in_range("t", value, 0, 1, lo_open=True)
    else:
        with pytest.raises(ValueError, match=rf"^t must be in \(0, 1\], got {value!r}$"):
            in_range("t", value, 0, 1, lo_open=True)
