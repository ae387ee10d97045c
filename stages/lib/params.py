"""Typed params: each stage describes its section of params.yaml as a dataclass.

Values are checked before any long work starts, and errors name the key
(`train.epochs must be int, got 'two'`). Ranges are checked in each dataclass's __post_init__
with `in_range`, whose ValueError `from_dict` turns into `<section>: <key> must be ...`.
Two checks hold for every key, so no range check has to repeat them: a float must be finite
(NaN passes every comparison, so it would pass every range), and params.yaml may not name a
key twice in one mapping (YAML would silently keep the last). Faults: docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from stages.lib.cli import ParamError

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


def in_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
             lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ValueError `<name> must be ..., got <value>` unless lo <= value <= hi.

    A bound of None is no bound; `lo_open` / `hi_open` exclude the bound itself (lo < value,
    value < hi). The message states the range as `>= 1`, `> 0`, `<= 180` or `in [0, 1)`.
    A value that is not a finite real number (a bool, a string, NaN, an infinity) is refused
    as `<name> must be a finite number, got <value>`: NaN would pass every comparison.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if not (too_low or too_high):
        return
    if lo is not None and hi is not None:
        bounds = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f"{'>' if lo_open else '>='} {lo}"
    else:
        bounds = f"{'<' if hi_open else '<='} {hi}"
    raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _check(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, float) and not math.isfinite(value):  # every float, at any depth
        raise ParamError(f"{key} must be a finite number, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, key)
            except ParamError as err:
                errors.append(str(err))
        raise ParamError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ParamError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key} must be a mapping, got {value!r}")
        return {k: _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ParamError(f"{key} must be a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ParamError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: Any, section: str) -> T:
    """Build dataclass `cls` from a params mapping; unknown and missing keys are errors."""
    if not isinstance(data, dict):
        raise ParamError(f"{section} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamError(f"unknown key {section}.{unknown[0]} (known keys: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _check(data[name], hints[name], f"{section}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamError(f"missing key {section}.{name}")
    try:
        return cls(**values)
    except ParamError:
        raise
    except ValueError as err:  # a __post_init__ check
        raise ParamError(f"{section}: {err}") from None


def _duplicate_key(node: yaml.Node, where: str = "") -> str | None:
    """The first key named twice in one mapping of the YAML tree, as `section.key (lines 3 and 9)`."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = f"{where}.{key}" if where else str(key)
            if key is not None and key in lines:
                return f"{name} (lines {lines[key]} and {key_node.start_mark.line + 1})"
            if key is not None:
                lines[key] = key_node.start_mark.line + 1
            if found := _duplicate_key(value_node, name):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := _duplicate_key(item, f"{where}[{i}]"):
                return found
    return None


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a mapping; a missing file, bad YAML or a key named twice is a ParamError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            duplicate = _duplicate_key(node) if node is not None else None
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise ParamError(f"{path}: file not found (run from the project's root)") from None
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML: {err}") from None
    if duplicate:
        raise ParamError(f"{path}: duplicate key {duplicate}; each key may appear once")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def load_params(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Read one section of params.yaml as a checked dataclass."""
    data = read_params(path)
    if section not in data:
        raise ParamError(f"{path}: missing section '{section}'")
    return from_dict(cls, data[section], section)
