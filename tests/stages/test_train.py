"""Stage train: model shape and scaling, freezing, class weights, selection on validation,
weights from Keras's cache, seeded runs, params errors, Ctrl-C, and resuming after a kill."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import train
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASSES
from stages.lib.files import atomic_save_model
from stages.lib.params import from_dict, load_params
from tests.conftest import TINY_TRAIN, make_shards, train_params
from tests.fixtures import DVC, ENV, git, init_dvc_repo, write_params

PARAMS = train_params()
ROOT = Path(__file__).resolve().parents[2]
PREVIOUS_MODEL = b"the previous run's model"


def test_model_takes_pixels_and_returns_class_probabilities():
    model = train.build_model(32, PARAMS)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, len(CLASSES))
    proba = model.predict(np.full((2, 32, 32, 3), 255.0, np.float32), verbose=0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    names = [layer.name for layer in model.layers]
    assert "conv_pw_13_relu" in names, "MobileNet's layers are in the model itself (flat), for Grad-CAM"
    assert names.index("scale_to_mobilenet") < names.index("conv1")


@pytest.fixture
def imagenet_stand_in(monkeypatch):
    """`weights: imagenet` with random weights: CI has no weights file; freezing does not care."""
    monkeypatch.setattr(train, "imagenet_weights_path", lambda alpha: None)
    return {**TINY_TRAIN, "weights": "imagenet"}


def test_layers_before_trainable_from_are_frozen(imagenet_stand_in):
    model = train.build_model(32, train_params(**{**imagenet_stand_in, "trainable_from": "conv_dw_12"}))
    names = [layer.name for layer in model.layers]
    first = names.index("conv_dw_12")
    assert not any(layer.trainable for layer in model.layers[:first] if layer.weights)
    assert all(layer.trainable for layer in model.layers[first:])


def test_unknown_trainable_from_names_the_key(imagenet_stand_in):
    with pytest.raises(ParamError, match="train.trainable_from.*conv_dw_99"):
        train.build_model(32, train_params(**{**imagenet_stand_in, "trainable_from": "conv_dw_99"}))


def test_image_size_below_mobilenet_minimum_is_refused():
    with pytest.raises(ParamError, match="image_size must be >= 32"):
        train.build_model(16, PARAMS)


def test_balanced_class_weights_give_each_class_equal_total_weight():
    labels = np.array([5] * 60 + [4] * 20 + [0] * 10 + [1, 2, 3, 6] * 5)
    weights = train.class_weights(labels, "balanced")
    totals = [weights[k] * np.sum(labels == k) for k in range(len(CLASSES))]
    np.testing.assert_allclose(totals, totals[0])
    assert train.class_weights(labels, "none") is None


def test_validation_loss_floors_probabilities_where_keras_does():
    """Image 1 (class 0) gets p = 0.5, image 2 (class 1) gets p = 0: its log is taken at Keras's
    epsilon 1e-7, as the training loss on the same plot, so the loss is (ln 2 + 7 ln 10) / 2."""
    class Model:
        def predict(self, images, batch_size, verbose):
            return np.array([[0.5, 0.5, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], np.float32)

    scores = train.validation_scores(Model(), np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), 8)
    assert scores["val_loss"] == pytest.approx((np.log(2) + 7 * np.log(10)) / 2, rel=1e-6)
    assert (scores["val_accuracy"], scores["val_balanced_accuracy"]) == (0.5, 0.5)


def test_epochs_are_scored_on_validation_and_the_last_epochs_weights_averaged():
    """Epoch 1 predicts `nv` everywhere (accuracy 0.8, balanced 0.5); epoch 2 finds both melanomas
    (accuracy 0.6, balanced 0.75). Every epoch is scored; the saved weights are the mean of the
    last `average_last_epochs` epochs (here 2 and 3), whatever their validation scores."""
    import keras

    val_labels = np.array([5] * 8 + [4] * 2)
    features = np.eye(10, dtype=np.float32)  # one-hot per validation image: weights decide each answer
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(len(CLASSES), use_bias=False,
                                                                     activation="softmax")])

    def weights_predicting(classes):
        w = np.zeros((10, len(CLASSES)), np.float32)
        w[np.arange(10), classes] = 10.0
        return [w]

    all_nv = weights_predicting([5] * 10)
    finds_mel = weights_predicting([5, 5, 5, 5, 4, 4, 4, 4, 4, 4])
    params = train_params(epochs=3, average_last_epochs=2, batch_size=4)
    callback = train.epoch_callback(features, val_labels, params)
    callback.set_model(model)
    logs_seen = []
    for epoch, weights in enumerate([all_nv, finds_mel, all_nv]):
        model.set_weights(weights)
        logs = {}
        callback.on_epoch_end(epoch, logs)
        logs_seen.append(logs)
    callback.on_train_end()
    assert logs_seen[0]["val_accuracy"] == pytest.approx(0.8)
    assert logs_seen[0]["val_balanced_accuracy"] == pytest.approx(0.5)
    assert logs_seen[1]["val_balanced_accuracy"] == pytest.approx(0.75)
    np.testing.assert_allclose(model.get_weights()[0], (finds_mel[0] + all_nv[0]) / 2)


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    params = train_params(epochs=5, warmup_epochs=1, learning_rate=0.01,
                                  min_learning_rate=0.0001)
    schedule = train.learning_rate_schedule(params, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in range(0, 51)]
    assert rates[0] == pytest.approx(0.001)          # learning_rate / 10
    assert rates[10] == pytest.approx(0.01)          # peak after one epoch
    assert all(a <= b + 1e-9 for a, b in zip(rates[:10], rates[1:11])), "rises during the warm-up"
    assert all(a >= b - 1e-9 for a, b in zip(rates[10:], rates[11:])), "then only decays"
    assert rates[50] == pytest.approx(0.0001, rel=1e-3)


def test_training_from_scratch_with_frozen_layers_is_refused(tmp_path):
    """weights: none with frozen layers or frozen BatchNorm would train only the head."""
    for change in ({"trainable_from": "conv_dw_11"}, {"freeze_batchnorm": True}):
        path = write_params(tmp_path / "params.yaml", train={**TINY_TRAIN, "weights": "none", **change})
        with pytest.raises(ParamError, match="weights: none trains from scratch, which needs trainable_from: all"):
            load_params("train", train.TrainParams, path)


def test_training_from_scratch_trains_every_layer_and_batchnorm(tiny_shards, tmp_path):
    """The accepted from-scratch setting really learns everywhere: convolutions and BatchNorm change."""
    import keras

    model = train.build_model(32, PARAMS)
    trainable = {w.path for w in model.trainable_weights}
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    assert all(w.path in trainable for layer in convs + norms for w in layer.trainable_weights)
    assert all(layer.trainable for layer in norms)


def test_imagenet_weights_come_from_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / "mobilenet_1_0_224_tf_no_top.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")  # Keras finds it in its cache and does not download
    assert Path(train.imagenet_weights_path(1.0)) == cached


def test_missing_imagenet_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no route to host")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(StageError) as err:
        train.imagenet_weights_path(0.25)
    message = str(err.value)
    assert "mobilenet_2_5_224_tf_no_top.h5" in message
    assert str(tmp_path / "models") in message
    assert "train.weights: none" in message


@pytest.mark.parametrize("change, message", [
    ({"epochz": 3}, "unknown key train.epochz"),
    ({"epochs": "two"}, "train.epochs must be int"),
    ({"weights": "imagenet", "alpha": 0.3}, "alpha must be one of"),
    ({"optimizer": "rmsprop"}, "train.optimizer must be one of"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"augmentation": {**TINY_TRAIN["augmentation"], "rotation_degrees": 270}}, "rotation_degrees must be in"),
    ({"augmentation": {**TINY_TRAIN["augmentation"], "white_balance": 1.0}}, "white_balance must be in"),
    ({"augmentation": {**TINY_TRAIN["augmentation"], "hue": 0.1}}, "unknown key train.augmentation.hue"),
    ({"distribution": "multi_worker"}, "train.distribution must be one of"),  # retired: fails with Keras 3
], ids=["unknown-key", "wrong-type", "alpha", "optimizer", "dropout", "rotation", "white-balance", "augmentation-key",
        "multi-worker"])
def test_bad_params_are_refused_naming_the_key(tmp_path, change, message):
    path = write_params(tmp_path / "params.yaml", train={**TINY_TRAIN, **change})
    with pytest.raises(ParamError, match=message):
        load_params("train", train.TrainParams, path)
    model = tmp_path / "models" / "model.keras"
    model.parent.mkdir()
    model.write_bytes(PREVIOUS_MODEL)
    with pytest.raises(ParamError, match=message):  # the stage: before it reads the (missing) shards
        train.main(path, tmp_path / "missing", model, tmp_path / "live")
    assert model.read_bytes() == PREVIOUS_MODEL


def test_training_is_seeded_and_writes_model_and_curves(tiny_shards, tmp_path, caplog):
    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN)
    runs = []
    for run in ("a", "b"):
        with caplog.at_level(logging.INFO):
            train.main(params, tiny_shards, tmp_path / run / "model.keras", tmp_path / run / "live")
        runs.append(json.loads((tmp_path / run / "live" / "metrics.json").read_text()))
    assert "devices: CPU:0 (train.distribution: default)" in caplog.text
    assert runs[0] == runs[1]
    assert (tmp_path / "a" / "model.keras").read_bytes() == (tmp_path / "b" / "model.keras").read_bytes()
    assert runs[0]["averaged_epochs"] == [1, 1]
    assert runs[0]["eval"]["balanced_accuracy"] == runs[0]["val_balanced_accuracy"], "the saved model's own score"
    steps = (tmp_path / "a" / "live" / "plots" / "metrics" / "eval" / "balanced_accuracy.tsv").read_text().split()
    assert steps[2] == "1", "epochs are counted from 1 in the curves"
    assert (tmp_path / "a" / "model.keras").exists()
    assert (tmp_path / "a" / "live" / "plots" / "metrics" / "eval" / "balanced_accuracy.tsv").exists()
    assert not list((tmp_path / "a").glob(".model*")), "no temporary model left behind"
    assert (tmp_path / "a" / "model.keras").stat().st_mode & 0o777 == 0o644, "an ordinary file, like every output"


def test_mirrored_strategy_trains_on_two_logical_cpus(tiny_shards, tmp_path):
    """`distribution: mirrored` on two logical CPU devices (a fresh process: devices are fixed at start)."""
    import subprocess
    import sys

    params = write_params(tmp_path / "params.yaml", train={**TINY_TRAIN, "distribution": "mirrored"})
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from stages import train\n"
        f"train.main({str(params)!r}, {str(tiny_shards)!r}, {str(tmp_path / 'model.keras')!r}, "
        f"{str(tmp_path / 'live')!r})\n"
        "print('replicas', tf.distribute.MirroredStrategy().num_replicas_in_sync)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replicas 2" in done.stdout
    assert "devices: CPU:0, CPU:1 (train.distribution: mirrored)" in done.stderr
    assert (tmp_path / "model.keras").exists()


# --------------------------------------------------------------------------------------------
# Faults (issue 4): shards the model cannot take, an interrupted save, Ctrl-C during training.
# --------------------------------------------------------------------------------------------
def previous_model(folder: Path) -> Path:
    model = folder / "models" / "model.keras"
    model.parent.mkdir(parents=True)
    model.write_bytes(PREVIOUS_MODEL)
    return model


def test_shards_smaller_than_mobilenet_takes_are_refused_before_training(tmp_path):
    model = previous_model(tmp_path)
    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN)
    shards = make_shards(tmp_path / "augmented", size=16, per_class={"train": 2, "val": 1})
    with pytest.raises(ParamError, match=r"^augment.image_size must be >= 32 for MobileNet, got 16$"):
        train.main(params, shards, model, tmp_path / "live")
    assert model.read_bytes() == PREVIOUS_MODEL
    assert not (tmp_path / "live").exists(), "refused before training started"


def test_interrupted_save_keeps_the_previous_model(tmp_path):
    model_path = previous_model(tmp_path)

    class SaveInterrupted:
        def save(self, path):
            Path(path).write_bytes(b"half a model")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save_model(SaveInterrupted(), model_path)
    assert model_path.read_bytes() == PREVIOUS_MODEL
    assert [p.name for p in model_path.parent.iterdir()] == ["model.keras"], "no temporary model left"


def test_ctrl_c_during_training_leaves_no_model_and_a_rerun_works(tmp_path):
    """`python -m stages.train` as dvc runs it, interrupted during epoch 2 (Ctrl-C sends SIGINT).
    DVC itself deletes the stage's outputs before it runs the command (they stay in its cache); run
    directly, the stage keeps the previous model. Either way no half model is left, and the
    checkpoint holds epoch 1, not the epoch cut short."""
    make_shards(tmp_path / "data" / "augmented")
    write_params(tmp_path / "params.yaml", train={**TINY_TRAIN, "epochs": 1000})
    model = previous_model(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.train"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    watchdog = threading.Timer(300, process.kill)  # a hung run fails the test instead of blocking it
    watchdog.start()
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("Epoch 2/1000"):  # Keras prints it once epoch 1's callbacks ran
                process.send_signal(signal.SIGINT)
                break
        output = "".join(seen) + process.communicate(timeout=120)[0]
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    assert process.returncode == 130, output[-3000:]
    assert "Epoch 2/1000" in output
    assert ("Ctrl-C: stopping after this batch; the model will not be saved, the next run resumes after epoch 1 "
            "(models/train_checkpoint) (again to stop now)") in output
    assert "\ninterrupted: " in output, output[-3000:]  # run_stage's one line (stages/lib/cli.py)
    assert "Traceback" not in output
    assert model.read_bytes() == PREVIOUS_MODEL
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.keras", "train_checkpoint"], "no temporary model"
    assert json.loads((model.parent / "train_checkpoint" / "state.json").read_text())["epochs_done"] == 1

    params = write_params(tmp_path / "params.yaml", train=TINY_TRAIN)  # the re-run, 1 epoch: starts over
    train.main(params, tmp_path / "data" / "augmented", model, tmp_path / "metrics" / "train")
    assert zipfile.is_zipfile(model) and model.read_bytes() != PREVIOUS_MODEL
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.keras", "train_checkpoint"]
    assert [p.name for p in (model.parent / "train_checkpoint").iterdir()] == ["README.txt"]


def test_ctrl_c_says_where_the_next_run_starts(tmp_path):
    average, stopped = train.WeightAverage(), threading.Event()
    fresh = train.checkpoint_callback(tmp_path / "ck", "stamp", average, tmp_path / "live", stopped, 0)
    assert fresh.resume_note() == "no epoch finished: the next run starts over"
    resumed = train.checkpoint_callback(tmp_path / "ck", "stamp", average, tmp_path / "live", stopped, 3)
    assert resumed.resume_note() == f"the next run resumes after epoch 3 ({tmp_path / 'ck'})"


# --------------------------------------------------------------------------------------------
# Resume: a train killed after an epoch goes on from there under `dvc repro`, to the same model
# --------------------------------------------------------------------------------------------
RESUMABLE = {**TINY_TRAIN, "epochs": 2, "average_last_epochs": 2}  # killed after epoch 1, which is averaged


def train_repo(folder: Path) -> Path:
    """A git + DVC repo of the project's code with dvc.yaml's train stage alone, tiny shards, RESUMABLE."""
    shutil.copytree(ROOT / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False), encoding="utf-8")
    make_shards(folder / "data" / "augmented")
    write_params(folder / "params.yaml", train=RESUMABLE)
    init_dvc_repo(folder)
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "code, shards, params")  # DVCLive needs a commit
    return folder


def start_repro(repo: Path) -> subprocess.Popen:
    """`dvc repro train` in its own process group (a kill takes DVC and the stage's python with it)."""
    return subprocess.Popen([DVC, "repro", "train"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**ENV, "PYTHONPATH": str(repo)}, start_new_session=True)


def output_of(process: subprocess.Popen, kill_at: str | None = None) -> str:
    """The process's output until it exits, or until a line starts with `kill_at`: then SIGKILL (no cleanup runs)."""
    watchdog = threading.Timer(300, os.killpg, (process.pid, signal.SIGKILL))  # a hung run fails the test
    watchdog.start()
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if kill_at and line.startswith(kill_at):
                os.killpg(process.pid, signal.SIGKILL)
                break
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return "".join(seen)


@pytest.fixture(scope="module")
def repro_runs(tmp_path_factory) -> dict[str, Path]:
    """Two repos: `whole` reproduced without a stop, `killed` SIGKILLed once epoch 1's checkpoint was
    written (Keras prints `Epoch 2/2` after epoch 1's callbacks). Both run at once."""
    whole, killed = (train_repo(tmp_path_factory.mktemp(name)) for name in ("whole", "killed"))
    processes = {"whole": start_repro(whole), "killed": start_repro(killed)}
    output = output_of(processes["killed"], kill_at="Epoch 2/2")
    assert processes["killed"].returncode == -signal.SIGKILL, output[-3000:]
    output = output_of(processes["whole"])
    assert processes["whole"].returncode == 0, output[-3000:]
    return {"whole": whole, "killed": killed}


def test_a_train_killed_after_epoch_1_resumes_under_dvc_repro_to_the_same_model(repro_runs, tmp_path):
    """The next `dvc repro` deletes the model and the curves (not the checkpoint: persist), goes on at
    epoch 2, and ends with the lock, model and curves of the run that never stopped, bit for bit."""
    whole, killed = repro_runs["whole"], tmp_path / "killed"
    shutil.copytree(repro_runs["killed"], killed, symlinks=True)
    assert json.loads((killed / "models/train_checkpoint/state.json").read_text())["epochs_done"] == 1
    assert not (killed / "models" / "model.keras").exists()
    process = start_repro(killed)
    output = output_of(process)
    assert process.returncode == 0, output[-3000:]
    assert "resuming after epoch 1/2 (models/train_checkpoint)" in output
    assert "Epoch 1/2" not in output and "Epoch 2/2" in output
    assert (killed / "dvc.lock").read_text() == (whole / "dvc.lock").read_text()
    curves = sorted(p.relative_to(whole).as_posix() for p in (whole / "metrics" / "train").rglob("*") if p.is_file())
    assert len(curves) == 6, curves  # metrics.json, and 5 TSVs
    for path in ["models/model.keras", *curves]:
        assert (killed / path).read_bytes() == (whole / path).read_bytes(), path
    for repo in (whole, killed):
        assert [p.name for p in (repo / "models" / "train_checkpoint").iterdir()] == ["README.txt"]


def test_a_changed_param_discards_the_checkpoint(repro_runs, tmp_path, monkeypatch, caplog):
    """The killed run's checkpoint with one param changed (epochs 2 -> 1): training starts at epoch 1."""
    import keras

    class Started(Exception):
        pass

    def fit(self, *args, initial_epoch=0, **kwargs):  # where fit starts is the point: no need to train
        raise Started(initial_epoch)

    changed = tmp_path / "changed"
    shutil.copytree(repro_runs["killed"], changed, symlinks=True)
    write_params(changed / "params.yaml", train={**RESUMABLE, "epochs": 1, "average_last_epochs": 1})
    monkeypatch.setattr(keras.Model, "fit", fit)
    monkeypatch.chdir(changed)
    with caplog.at_level(logging.INFO), pytest.raises(Started) as started:
        train.main()
    assert started.value.args == (0,)
    assert "models/train_checkpoint: made with other params, data or code: training starts over" in caplog.text


def train_recording_batchnorm(params: dict, data_dir: Path, tmp_path: Path, monkeypatch) -> dict:
    """Run the stage's own training (build, compile, fit, weight averaging, save) on tiny shards.

    Every BatchNormalization layer starts from real moving statistics, as ImageNet's would be (not
    Keras's 0 and 1): those of other images, set by one training-mode call with momentum 0 (as in
    tests/tiny_model.py). Returns, per layer, the statistics before `fit`, after it, and in the
    saved model, and whether each convolution kernel changed.
    """
    import keras

    built = {}

    def build_and_record(image_size, train_params):
        model = build_model(image_size, train_params)
        others = np.random.default_rng(0).uniform(0, 255, (32, image_size, image_size, 3)).astype(np.float32)
        flags = [(layer.momentum, layer.trainable) for layer in norms_of(model)]
        for layer in norms_of(model):
            layer.momentum, layer.trainable = 0.0, True  # a frozen norm would ignore training=True
        model(others, training=True)
        for layer, (momentum, trainable) in zip(norms_of(model), flags):
            layer.momentum, layer.trainable = momentum, trainable
        built["model"], built["before"] = model, statistics(model)
        built["kernels"] = [layer.kernel.numpy().copy() for layer in convs_of(model)]
        return model

    build_model = train.build_model
    monkeypatch.setattr(train, "build_model", build_and_record)
    model_path = tmp_path / "model.keras"
    train.train(from_dict(train.TrainParams, params, "train"), data_dir, model_path, tmp_path / "live")
    saved = keras.saving.load_model(model_path)
    return {"before": built["before"], "after": statistics(built["model"]), "saved": statistics(saved),
            "kernels_changed": [not np.array_equal(k, layer.kernel.numpy())
                                for k, layer in zip(built["kernels"], convs_of(built["model"]))]}


def norms_of(model) -> list:
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def convs_of(model) -> list:
    import keras

    return [layer for layer in model.layers if type(layer) is keras.layers.Conv2D]


def statistics(model) -> dict[str, np.ndarray]:
    return {f"{layer.name}/{name}": getattr(layer, name).numpy().copy()
            for layer in norms_of(model) for name in ("moving_mean", "moving_variance")}


def test_freeze_batchnorm_keeps_moving_statistics_through_fit(imagenet_stand_in, tiny_shards, tmp_path, monkeypatch):
    """Behaviour, not flags: with freeze_batchnorm the moving mean and variance of every
    BatchNormalization layer are the same after `fit` (and in the saved model) as before it,
    while the convolutions do learn (trainable_from: all)."""
    params = {**imagenet_stand_in, "freeze_batchnorm": True, "trainable_from": "all"}
    run = train_recording_batchnorm(params, tiny_shards, tmp_path, monkeypatch)
    assert len(run["before"]) == 2 * 27  # MobileNet V1: 27 BatchNormalization layers
    for key, before in run["before"].items():
        np.testing.assert_array_equal(run["after"][key], before, err_msg=key)
        np.testing.assert_array_equal(run["saved"][key], before, err_msg=key)
    assert all(run["kernels_changed"]), "the convolutions still train"


def test_unfrozen_batchnorm_moving_statistics_do_change_in_fit(imagenet_stand_in, tiny_shards, tmp_path, monkeypatch):
    """The control for the test above: the same run with freeze_batchnorm false moves every statistic."""
    params = {**imagenet_stand_in, "freeze_batchnorm": False, "trainable_from": "all"}
    run = train_recording_batchnorm(params, tiny_shards, tmp_path, monkeypatch)
    moved = [key for key, before in run["before"].items() if not np.allclose(run["after"][key], before)]
    assert len(moved) == len(run["before"])

# --------------------------------------------------------------------------------------------
# On-line augmentation: the same random transform for every image of every class
# --------------------------------------------------------------------------------------------
NO_AUGMENTATION = {**dict.fromkeys(["rotation_degrees", "shift_fraction", "zoom_fraction", "brightness", "contrast"],
                                   0), "photo_aspect": 1.0}


def epochs_of(dataset, epochs: int = 2) -> list[np.ndarray]:
    """The images of each pass over `dataset`, one array per epoch."""
    return [np.concatenate([images.numpy() for images, _ in dataset]) for _ in range(epochs)]


def random_images(n: int = 24, side: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_flips_alone_give_exact_flipped_copies_of_the_images():
    images = random_images()
    augmentation = train_params(augmentation={"flip": True, **NO_AUGMENTATION}).augmentation
    dataset = train.training_dataset(images, np.arange(len(images)), 8, seed=3, augmentation=augmentation)
    seen = {flip: 0 for flip in [(1, 1), (1, -1), (-1, 1), (-1, -1)]}
    for batch, labels in dataset:
        for image, label in zip(batch.numpy(), labels.numpy()):
            source = images[label].astype(np.float32)
            flips = [flip for flip in seen if np.array_equal(image, source[::flip[0], ::flip[1]])]
            assert flips, "not a flip of its source"
            seen[flips[0]] += 1
    assert all(seen.values()), f"every flip occurs: {seen}"


def test_without_augmentation_the_batches_are_the_images_themselves():
    images = random_images()
    augmentation = train_params(augmentation={"flip": False, **NO_AUGMENTATION}).augmentation
    for batch, labels in train.training_dataset(images, np.arange(len(images)), 8, seed=3, augmentation=augmentation):
        np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()].astype(np.float32))


def test_geometry_fills_margins_by_reflection_and_colour_stays_in_range():
    plain = np.broadcast_to(np.array([200, 120, 40], np.uint8), (16, 32, 32, 3)).copy()
    augmentation = train_params(augmentation={**TINY_TRAIN["augmentation"], "brightness": 0,
                                              "contrast": 0}).augmentation
    batch = next(iter(train.training_dataset(plain, np.zeros(16, int), 16, seed=3, augmentation=augmentation)))[0]
    np.testing.assert_allclose(batch.numpy(), plain.astype(np.float32), atol=1e-3)  # no black corners
    bright = train_params(augmentation={**TINY_TRAIN["augmentation"], "brightness": 0.9, "contrast": 0.9})
    batch = next(iter(train.training_dataset(random_images(), np.zeros(24, int), 24, 3, bright.augmentation)))[0]
    assert 0 <= batch.numpy().min() and batch.numpy().max() <= 255


def test_white_balance_scales_each_channel_apart_within_its_range():
    """A plain image stays plain; each channel is multiplied by its own draw in 1 +- white_balance."""
    plain = np.broadcast_to(np.array([200, 120, 40], np.uint8), (64, 8, 8, 3)).copy()
    gains_only = train_params(augmentation={"flip": False, **NO_AUGMENTATION, "white_balance": 0.2}).augmentation
    batch = next(iter(train.training_dataset(plain, np.zeros(64, int), 64, seed=3, augmentation=gains_only)))[0]
    gains = batch.numpy()[:, 0, 0, :] / plain[0, 0, 0]
    np.testing.assert_allclose(batch.numpy(), np.broadcast_to(batch.numpy()[:, :1, :1, :], batch.shape))
    assert 0.8 - 1e-6 <= gains.min() and gains.max() <= 1.2 + 1e-6
    assert gains.min() < 0.85 and gains.max() > 1.15                # the range is used
    assert np.abs(gains[:, 0] - gains[:, 2]).max() > 0.1             # red and blue move apart
    assert train_params().augmentation.white_balance == 0            # absent from params: no gain


def test_white_balance_leaves_the_other_draws_as_they_were():
    """The gain's seed is folded in: a vanishing gain gives the images that no gain gives."""
    colour = {**TINY_TRAIN["augmentation"], "brightness": 0.5, "contrast": 0.5}
    none, tiny = (train_params(augmentation={**colour, "white_balance": w}).augmentation for w in (0, 1e-9))
    images = random_images()
    first = epochs_of(train.training_dataset(images, np.zeros(24, int), 8, 3, none), 1)[0]
    second = epochs_of(train.training_dataset(images, np.zeros(24, int), 8, 3, tiny), 1)[0]
    np.testing.assert_allclose(first, second, atol=1e-3)


def turns_only(photo_aspect: float = 1.0) -> train.Augmentation:
    """Random turns in +-180 degrees and nothing else, so each row's matrix is the turn alone."""
    return train.Augmentation(flip=False, **{**NO_AUGMENTATION, "rotation_degrees": 180, "photo_aspect": photo_aspect})


def test_half_turn_matrix_maps_each_pixel_to_its_opposite():
    """The affine row for a 180-degree turn, no flip, zoom or shift: (x, y) -> (side-1-x, side-1-y)."""
    import tensorflow as tf

    rows = train.affine_transforms(tf.constant([1, 2], tf.int64), 4000, 32, turns_only()).numpy()
    angles = np.arctan2(rows[:, 3], rows[:, 0])
    half_turn = rows[np.argmax(np.abs(angles))]  # the draw nearest to +-180 degrees
    np.testing.assert_allclose(half_turn[[0, 1, 3, 4]], [-1, 0, 0, -1], atol=0.01)
    np.testing.assert_allclose(half_turn[[2, 5]], [31, 31], atol=0.2)
    assert np.abs(np.degrees(angles)).max() <= 180 and np.abs(np.degrees(angles)).min() < 1  # uniform in +-180


def test_photo_aspect_reaches_the_rows_as_the_turn_of_the_photo():
    """With photo_aspect a, each row's rotation is S R S^-1: b0 / -a1 = a^2 (1 for a turn of the square)."""
    import tensorflow as tf

    def rows(photo_aspect):
        return train.affine_transforms(tf.constant([1, 2], tf.int64), 64, 32, turns_only(photo_aspect)).numpy()

    photo, square = rows(4 / 3), rows(1.0)
    turned = np.abs(square[:, 3]) > 0.1  # draws far enough from 0 and 180 degrees for the ratio to be exact
    np.testing.assert_allclose(photo[turned, 3] / -photo[turned, 1], 16 / 9, rtol=1e-5)
    np.testing.assert_allclose(square[turned, 3] / -square[turned, 1], 1, rtol=1e-5)
    np.testing.assert_array_equal(photo[:, [0, 4]], square[:, [0, 4]])  # same draws: the cosines agree


def test_augmentation_is_seeded_and_fresh_each_epoch():
    images = np.repeat(random_images(1), 24, axis=0)  # one image: the shuffle cannot make a difference
    augmentation = train_params().augmentation

    def dataset(seed):
        return train.training_dataset(images, np.zeros(len(images), int), 8, seed, augmentation)

    first, second = epochs_of(dataset(3)), epochs_of(dataset(3))
    np.testing.assert_array_equal(first[0], second[0])  # same seed: the same transforms
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])        # a new epoch: new transforms
    assert not np.array_equal(first[0], epochs_of(dataset(4), 1)[0])


@pytest.mark.parametrize("key,value,message", [
    ("rotation_degrees", 181, "rotation_degrees must be in [0, 180], got 181"),
    ("zoom_fraction", 0.5, "zoom_fraction must be in [0, 0.5), got 0.5"),
    ("brightness", -0.1, "brightness must be in [0, 0.9], got -0.1"),
])
def test_transform_ranges_name_the_setting(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(train_params().augmentation, **{key: value})


def test_colour_change_keeps_the_mean_under_contrast_and_scales_it_by_brightness():
    pixels = np.array([50.0, 100.0, 150.0])
    assert train.contrast_then_brightness(pixels, 100.0, 2.0, 1.0).tolist() == [0.0, 100.0, 200.0]
    assert train.contrast_then_brightness(pixels, 100.0, 1.0, 0.5).tolist() == [25.0, 50.0, 75.0]


def test_affine_about_centre_turns_the_photo_inside_the_square():
    """With the photo's aspect, a turn keeps distances measured on the photo (not on the square)."""
    square_to_photo = np.diag([1, 3 / 4])  # a 4:3 photo squashed to a square: y was stretched by 4/3
    offsets = np.random.default_rng(0).normal(size=(2, 50))

    def photo_lengths(aspect):
        a0, a1, _, b0, b1, _ = train.affine_about_centre(np.cos(0.7), np.sin(0.7), 1, 1, 0, 0, 0, 0, aspect)
        return np.linalg.norm(square_to_photo @ np.array([[a0, a1], [b0, b1]]) @ offsets, axis=0)

    before = np.linalg.norm(square_to_photo @ offsets, axis=0)
    np.testing.assert_allclose(photo_lengths(4 / 3), before)
    assert not np.allclose(photo_lengths(1.0), before, rtol=0.01)


def test_affine_about_centre_turns_about_the_centre_then_shifts():
    angle, zoom, centre = np.pi / 2, 2.0, 10.0
    a0, a1, a2, b0, b1, b2 = train.affine_about_centre(np.cos(angle) / zoom, np.sin(angle) / zoom, -1, 1,
                                                       centre, centre, 3.0, 0.0)

    def source(x, y):
        return a0 * x + a1 * y + a2, b0 * x + b1 * y + b2
    np.testing.assert_allclose(source(centre, centre), (centre - 3, centre), atol=1e-12)  # centre: shifted only
    # one pixel right of the centre: flipped (-1), turned a quarter, halved by the zoom
    np.testing.assert_allclose(source(centre + 1, centre), (centre - 3, centre - 0.5), atol=1e-12)
