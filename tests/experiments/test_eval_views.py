"""experiments/eval_views.py: its test-time views and the same weights at another input size."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from experiments.eval_views import VIEWS, dihedral, parse_view, resized_model, white_balanced
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
    with pytest.raises(argparse.ArgumentTypeError, match="unknown view 'rot90'.*none, flips, dihedral, warm, cool"):
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


def test_white_balance_scales_red_and_blue_clips_and_keeps_the_dtype():
    image = np.array([[[[100, 100, 100], [250, 50, 250]]]], np.uint8)
    warm = white_balanced(image, 1.1, 0.9)
    assert warm.dtype == np.uint8
    np.testing.assert_array_equal(warm, [[[[110, 100, 90], [255, 50, 225]]]])


def test_warm_and_cool_views_are_the_flips_of_the_shifted_image():
    image = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3)).astype(np.float32)
    warm, cool = VIEWS["warm"](image), VIEWS["cool"](image)
    assert len(warm) == len(cool) == 4
    np.testing.assert_allclose(warm[0][..., 0], np.clip(image[..., 0] * 1.1, 0, 255), rtol=1e-6)
    np.testing.assert_allclose(cool[0][..., 2], np.clip(image[..., 2] * 1.1, 0, 255), rtol=1e-6)
    np.testing.assert_array_equal(warm[1], warm[0][:, :, ::-1])
