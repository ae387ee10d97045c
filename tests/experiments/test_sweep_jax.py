"""experiments/sweep_jax.py: the on-line augmentation it trains with (train's own, in keras.ops), its
configs, val-only scoring."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from experiments import score_seeds, sweep_jax
from experiments.score_seeds import score_run
from experiments.sweep_jax import Config, online_augment_layer
from stages import train
from stages.evaluate import EvaluateParams
from stages.lib.dataset import CLASSES
from stages.train import Augmentation
from tests.fixtures import write_params

FLIPS_ONLY = Augmentation(flip=True, rotation_degrees=0, shift_fraction=0, zoom_fraction=0, brightness=0, contrast=0,
                          photo_aspect=1.0)
COMMITTED = Augmentation(flip=True, rotation_degrees=180, shift_fraction=0.05, zoom_fraction=0.1,
                         brightness=0.1, contrast=0.1, photo_aspect=1.0)


def as_numpy(x) -> np.ndarray:
    from keras import ops

    return ops.convert_to_numpy(x)


def test_flips_alone_give_exact_flips_and_all_four_occur():
    images = np.random.default_rng(0).integers(0, 256, (64, 12, 12, 3)).astype(np.uint8)
    out = as_numpy(online_augment_layer(FLIPS_ONLY, seed=1)(images, training=True))
    seen = set()
    for image, result in zip(images.astype(np.float32), out):
        flips = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
        matches = [k for k, f in enumerate(flips) if np.abs(result - f).max() < 1e-3]
        assert matches, "an output is not a flip of its input"
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_inference_is_identity():
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    out = as_numpy(online_augment_layer(COMMITTED, seed=1)(images))
    np.testing.assert_array_equal(out, images.astype(np.float32))


def test_plain_images_stay_plain_and_in_range():
    """Mirrored margins: a flat image stays flat (no black corners); colour stays in [0, 255]."""
    flat = np.full((16, 24, 24, 3), 200, np.uint8)
    out = as_numpy(online_augment_layer(COMMITTED, seed=3)(flat, training=True))
    assert np.ptp(out, axis=(1, 2, 3)).max() < 1e-2
    assert out.min() >= 200 * 0.9 - 1e-3 and out.max() <= 255
    assert np.ptp(out[:, 0, 0, 0]) > 1  # brightness differs between images


def test_white_balance_gains_each_channel_apart():
    plain = np.full((32, 8, 8, 3), 100, np.uint8)
    gains_only = Augmentation(flip=False, rotation_degrees=0, shift_fraction=0, zoom_fraction=0, brightness=0,
                              contrast=0, photo_aspect=1.0, white_balance=0.2)
    gains = as_numpy(online_augment_layer(gains_only, seed=2)(plain, training=True))[:, 0, 0, :] / 100
    assert 0.8 - 1e-6 <= gains.min() and gains.max() <= 1.2 + 1e-6
    assert np.abs(gains[:, 0] - gains[:, 2]).max() > 0.1


class FixedDraws:
    """A stand-in for both random sources: the k-th draw is the same array whichever asks for it.

    Both paths draw in one order (angle, zoom, shift x, shift y, flip x, flip y, brightness,
    contrast, channel gains); each draw is minval + u * (maxval - minval), u fixed by its rank.
    """

    def __init__(self) -> None:
        self.rng = np.random.default_rng(5)

    def draw(self, shape, minval, maxval):
        import tensorflow as tf

        unit = self.rng.random([int(n) for n in shape])
        return tf.constant(minval + unit * ((1.0 if maxval is None else maxval) - minval), tf.float32)

    def stateless_uniform(self, shape, seed, minval=0, maxval=None, dtype=None):  # tf.random's signature
        return self.draw(shape, minval, maxval)

    def keras_uniform(self, shape, minval=0.0, maxval=1.0, dtype=None, seed=None):  # keras.random's
        return self.draw(shape, minval, maxval)


@pytest.mark.parametrize("photo_aspect, white_balance", [(1.0, 0.0), (4 / 3, 0.1)])
def test_the_same_draws_give_trains_own_transform(monkeypatch, photo_aspect, white_balance):
    """The sweep's layer and train.augment_batch turn the same draws into the same images: the same
    ranges (one train.Augmentation), and train's own formulas (imported from stages.train, not copied)."""
    import keras
    import tensorflow as tf

    assert sweep_jax.affine_about_centre is train.affine_about_centre
    assert sweep_jax.contrast_then_brightness is train.contrast_then_brightness
    augmentation = Augmentation(flip=True, rotation_degrees=180, shift_fraction=0.1, zoom_fraction=0.2, brightness=0.3,
                                contrast=0.3, photo_aspect=photo_aspect, white_balance=white_balance)
    images = np.random.default_rng(4).integers(0, 256, (16, 24, 24, 3)).astype(np.uint8)

    draws = FixedDraws()
    monkeypatch.setattr(tf.random, "stateless_uniform", draws.stateless_uniform)
    expected = train.augment_batch(tf.constant(images, tf.float32), tf.constant([1, 2], tf.int64),
                                   augmentation).numpy()
    monkeypatch.undo()
    draws = FixedDraws()
    monkeypatch.setattr(keras.random, "uniform", draws.keras_uniform)
    got = as_numpy(online_augment_layer(augmentation, seed=1)(images, training=True))
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.abs(expected - images).mean() > 10  # the transform did move and recolour the pixels


def test_config_parse():
    assert Config.parse("conv_dw_6,160,15") == Config("conv_dw_6", 160, 15)
    assert Config.parse("all,128,10").name == "all_128px_10ep"
    with pytest.raises(argparse.ArgumentTypeError, match="TRAINABLE_FROM,IMAGE_SIZE,EPOCHS"):
        Config.parse("all,128")


def test_config_with_augment_overrides_round_trips_and_names_its_data():
    config = Config.parse("all,192,8,augment.target_per_class=750")
    assert config.augment == (("target_per_class", 750),)
    assert Config.parse(config.text) == config  # how a job reaches its process
    assert config.name == "all_192px_8ep_target_per_class750"
    assert config.data_name == "data-192px_target_per_class750" != Config("all", 192, 8).data_name
    for bad in ("all,192,8,train.epochs=3", "all,192,8,augment.image_size=128", "all,192,8,augment.seed"):
        with pytest.raises(argparse.ArgumentTypeError, match="augment.KEY=VALUE"):
            Config.parse(bad)


def val_only_run(path):
    """A sweep's run file: validation labels and probabilities, no test."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 10)
    proba = rng.dirichlet(np.ones(7), size=len(labels))
    proba[np.arange(len(labels)), labels] += 1  # mostly right
    proba /= proba.sum(axis=1, keepdims=True)
    np.savez(path, val_labels=labels, val_none=proba, val_flips=proba)
    return labels, proba


def test_score_run_scores_validation_alone(tmp_path):
    labels, proba = val_only_run(tmp_path / "run.npz")
    params = EvaluateParams(batch_size=8, tta="flips", prior_strengths=[0.0], mel_sensitivity_target=0.85,
                            bootstrap_samples=100, seed=0)
    row = score_run(tmp_path / "run.npz", params, labels)
    assert set(row) == {"prior_strength", "mel_threshold", "val"}
    assert row["val"]["balanced_accuracy"] == pytest.approx(np.mean(proba.argmax(1) == labels), abs=1e-9)


def test_score_seeds_summarises_runs_without_test(tmp_path, monkeypatch, capsys):
    runs, data = tmp_path / "runs", tmp_path / "augmented"
    runs.mkdir()
    data.mkdir()
    for seed in (1, 2):
        val_only_run(runs / f"seed{seed}.npz")
        (runs / f"seed{seed}.json").write_text(json.dumps({"train_minutes": 1.0}))
    (data / "index.json").write_text(json.dumps({"splits": {"train": {"class_counts": dict.fromkeys(CLASSES, 10)}}}))
    params = write_params(tmp_path / "params.yaml", evaluate={"prior_strengths": [0.0]})
    monkeypatch.setattr(sys, "argv", ["score_seeds", str(runs), "--params", str(params), "--data", str(data)])
    score_seeds.main()
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["val_balanced_accuracy"]["n"] == 2 and not any(key.startswith("test") for key in summary)
    assert "seed2: strength 0.0 val" in capsys.readouterr().out
