"""benchmarks/eval_views.py: its test-time views and the same weights at another input size."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks.eval_views import dihedral, parse_view, resized_model
from stages.train import build_model
from tests.conftest import train_params


def test_dihedral_views_are_the_eight_distinct_symmetries_starting_with_the_flips():
    image = np.arange(3 * 3 * 1).reshape(1, 3, 3, 1)  # no symmetry of its own
    views = dihedral(image)
    assert len({v.tobytes() for v in views}) == 8
    np.testing.assert_array_equal(views[0], image)
    np.testing.assert_array_equal(views[4], image.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(views[1], image[:, :, ::-1])


@pytest.mark.parametrize("text,expected", [("flips", ("flips", None)), ("dihedral@192", ("dihedral", 192))])
def test_views_parse(text, expected):
    assert parse_view(text) == expected


def test_unknown_view_is_refused_with_the_choices():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown view 'rot90'.*none, flips or dihedral"):
        parse_view("rot90")


def test_resized_model_keeps_every_weight_and_takes_the_new_size():
    params = train_params()
    model = build_model(32, params)
    other = resized_model(model, 48, params)
    assert other.input_shape == (None, 48, 48, 3)
    for ours, theirs in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    proba = other.predict(np.zeros((2, 48, 48, 3), np.float32), verbose=0)
    assert proba.shape == (2, 7) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
