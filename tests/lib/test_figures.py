"""stages/lib/figures.py: the one nested-key lookup and the one figure format (model card, PR comment, evaluate)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stages.lib.figures import fmt, lookup

METRICS = {"balanced_accuracy": 0.74, "operating_point": {"mel_sensitivity": 0.888, "threshold": None},
           "calibration": {"ece": 0.023}, "per_class": {"mel": {"recall": 0.5}}}


@pytest.mark.parametrize("key, value", [
    ("balanced_accuracy", 0.74),
    ("operating_point.mel_sensitivity", 0.888),
    ("per_class.mel.recall", 0.5),
    ("per_class.mel", {"recall": 0.5}),
    ("operating_point.missing", None),
    ("missing.mel_sensitivity", None),
    ("balanced_accuracy.low", None),  # a figure is not a mapping: nothing below it
    ("operating_point.threshold", None),
    (("balanced_accuracy", "calibration.ece"), [0.74, 0.023]),
    (("balanced_accuracy", "calibration.missing"), None),  # a pair with a part missing is no pair
], ids=["top", "nested", "deeper", "a-mapping", "missing-leaf", "missing-section", "below-a-figure", "null",
        "pair", "half-pair"])
def test_lookup_walks_dotted_keys_and_gives_none_where_any_part_is_missing(key, value):
    assert lookup(METRICS, key) == value


@pytest.mark.parametrize("x, card, comment", [
    (None, "–", "–"),
    (math.nan, "–", "–"),
    (np.float64("nan"), "–", "–"),
    (True, "true", "true"),
    (np.bool_(False), "false", "false"),
    (1234567, "1,234,567", "1234567"),
    (np.int64(-12345), "-12,345", "-12345"),
    (0, "0", "0"),
    (0.74, "0.740", "0.7400"),
    (2 / 3, "0.667", "0.6667"),
    (np.float32(0.125), "0.125", "0.1250"),
    (-0.00004, "-0.000", "-0.0000"),
    ([0.5, 1], "[0.500, 1]", "[0.5000, 1]"),
    ("0.684 – 0.807", "0.684 – 0.807", "0.684 – 0.807"),
], ids=["none", "nan", "numpy-nan", "true", "numpy-false", "int", "numpy-int", "zero", "float", "two-thirds",
        "float32", "tiny-negative", "list", "text"])
def test_fmt_as_the_card_and_the_comment_show_figures(x, card, comment):
    """The card: defaults (3 decimals, thousands separators); the PR comment: 4 decimals, none."""
    assert fmt(x) == card
    assert fmt(x, digits=4, thousands=False) == comment
