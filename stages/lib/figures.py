"""Metric figures: reading one from a nested metrics mapping, and writing one as text.

`lookup(metrics, "a.b")` is `metrics["a"]["b"]`, None where any part is missing (DVC names nested
metrics with dots). `fmt(x)` is how the model card and the pull-request comment show a figure.
Used by stages/lib/model_card.py, stages/evaluate.py and .ci/pr_comment.py (which loads this file
by its path, so it imports nothing from the project).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

NONE = "–"  # shown for a missing figure (None, NaN)


def lookup(metrics: Any, key: str | tuple[str, ...]) -> Any:
    """`metrics["a"]["b"]` for key "a.b"; for a tuple of keys, the list of their figures; None
    where any part of any key is missing."""
    if isinstance(key, tuple):
        found = [lookup(metrics, one) for one in key]
        return None if None in found else found
    value = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def fmt(x: Any, digits: int = 3, thousands: bool = True) -> str:
    """A figure as text: a dash for none (None or NaN), booleans as true/false, whole numbers with
    thousands separators (`1,234`; `1234` with thousands=False), other numbers with `digits`
    decimals, a list as `[a, b]` of its figures, anything else as str()."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NONE
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x)).lower()
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if thousands else str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}f}"
    if isinstance(x, list):
        return "[" + ", ".join(fmt(v, digits, thousands) for v in x) + "]"
    return str(x)
