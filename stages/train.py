"""Stage `train`: fine-tune MobileNet V1 (ImageNet) on the augmented training shards.

Why it looks the way it does:
- The model takes RGB pixels in [0, 255] at augment's image size and does its own scaling
  (`Rescaling` to [-1, 1], as MobileNet was trained), so train, evaluate and predict cannot drift.
- The checkpoint is chosen on the validation split by balanced accuracy (mean per-class recall,
  the ISIC 2018 ranking metric), not by accuracy, which `nv` (two thirds of the images) dominates.
  The test split is never read here.
- ImageNet weights come through Keras's own download cache (`~/.keras/models/`, or
  `$KERAS_HOME/models/`), exactly as on a user's machine. The α=1.0 file trained at 224 px serves
  every input size: convolution weights do not depend on it.
- Seeded end to end with op determinism: same params, same CPU, same metrics.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.common import (
    CLASSES,
    PARAMS_FILE,
    ParamError,
    StageError,
    load_params,
    read_index,
    read_shards,
    run_stage,
)

log = logging.getLogger("stages.train")

WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
IMAGENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TrainParams:
    seed: int
    weights: Literal["imagenet", "none"]
    alpha: float
    trainable_from: str
    freeze_batchnorm: bool
    dropout: float
    optimizer: Literal["adam", "sgd"]
    learning_rate: float
    reduce_lr_factor: float
    reduce_lr_patience: int
    min_learning_rate: float
    epochs: int
    batch_size: int
    class_weight: Literal["balanced", "none"]
    random_flip: bool
    distribution: Literal["default", "mirrored", "multi_worker"]

    def __post_init__(self) -> None:
        if self.weights == "imagenet" and self.alpha not in IMAGENET_ALPHAS:
            raise ValueError(f"alpha must be one of {IMAGENET_ALPHAS} with ImageNet weights, got {self.alpha}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.min_learning_rate <= 0:
            raise ValueError("learning_rate and min_learning_rate must be > 0")
        if not 0 < self.reduce_lr_factor < 1:
            raise ValueError(f"reduce_lr_factor must be in (0, 1), got {self.reduce_lr_factor}")
        if self.reduce_lr_patience < 0:
            raise ValueError(f"reduce_lr_patience must be >= 0, got {self.reduce_lr_patience}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def imagenet_weights_path(alpha: float) -> str:
    """Path of the ImageNet weights file in Keras's cache, downloading it the way Keras does."""
    import keras

    alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}[alpha]
    name = f"mobilenet_{alpha_text}_224_tf_no_top.h5"
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))  # as Keras decides it
    try:
        return keras.utils.get_file(name, WEIGHTS_URL + name, cache_dir=str(keras_home), cache_subdir="models")
    except Exception as err:  # any network or file error: the fix is the same
        cache = keras_home / "models" / name
        raise StageError(
            f"ImageNet weights for MobileNet V1 are not available ({err}). Place the file {name} "
            f"(from {WEIGHTS_URL + name}) at {cache}, or set train.weights: none to train from scratch"
        ) from None


def build_model(image_size: int, params: TrainParams):
    """MobileNet V1 body + small head, as one flat Keras model (so Grad-CAM can reach its layers).

    Keras builds MobileNet with the requested weights; its layers (a plain chain) are then re-applied
    after our input scaling, which keeps the weights and gives a model without nested sub-models.
    """
    import keras

    if image_size < 32:
        raise ParamError(f"augment.image_size must be >= 32 for MobileNet, got {image_size}")
    weights = imagenet_weights_path(params.alpha) if params.weights == "imagenet" else None
    body = keras.applications.MobileNet(
        input_shape=(image_size, image_size, 3), alpha=params.alpha, include_top=False, weights=weights
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    if params.random_flip:
        x = keras.layers.RandomFlip("horizontal_and_vertical", seed=params.seed, name="random_flip")(x)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_mobilenet")(x)
    for layer in body.layers[1:]:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(params.dropout, seed=params.seed, name="dropout")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_v1_ham10000")
    freeze_before(model, params.trainable_from)
    if params.freeze_batchnorm:
        freeze_batchnorm(model)
    return model


def freeze_batchnorm(model) -> None:
    """Keep every BatchNormalization layer in inference mode with its ImageNet statistics.

    Unfrozen, their moving statistics chase each small batch of a very different, class-weighted
    distribution; validation scores then swing from epoch to epoch (seen on HAM10000: 0.62, 0.52,
    0.50). Frozen, the convolutions adapt while the normalisation stays stable.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def freeze_before(model, trainable_from: str) -> None:
    """Freeze the MobileNet layers before `trainable_from` ("all": train every layer)."""
    names = [layer.name for layer in model.layers]
    if trainable_from == "all":
        return
    if trainable_from not in names:
        options = sorted({n.rsplit("_", 1)[0] if n.startswith("conv_") else n for n in names if n.startswith("conv")})
        raise ParamError(f"train.trainable_from: no layer named {trainable_from!r} (e.g. conv_dw_12, conv_pw_13, all); "
                         f"layers: {', '.join(options[:8])} ...")
    first = names.index(trainable_from)
    for layer in model.layers[:first]:
        layer.trainable = False


def make_optimizer(params: TrainParams):
    import keras

    if params.optimizer == "sgd":
        return keras.optimizers.SGD(params.learning_rate, momentum=0.9)
    return keras.optimizers.Adam(params.learning_rate)


def make_strategy(name: str):
    """The tf.distribute strategy: one device, all local GPUs, or several machines (TF_CONFIG)."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ParamError("train.distribution: multi_worker needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------
def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """'balanced': n / (k * n_c), so every class carries the same total weight in the loss."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=len(CLASSES))
    present = counts > 0
    weights = np.zeros(len(CLASSES))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return {k: float(w) for k, w in enumerate(weights)}


def training_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """Shuffled batches of float32 pixels: indices are shuffled (not images), batches gathered."""
    import tensorflow as tf

    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

    def gather(idx):
        return tf.cast(tf.gather(images_t, idx), tf.float32), tf.gather(labels_t, idx)

    return (
        tf.data.Dataset.range(len(images))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (the ISIC 2018 ranking metric)."""
    recalls = [np.mean(predicted[labels == k] == k) for k in np.unique(labels)]
    return float(np.mean(recalls))


def validation_callback(val_images: np.ndarray, val_labels: np.ndarray, batch_size: int):
    """A callback that scores each epoch on validation and keeps the best weights in memory.

    It adds val_balanced_accuracy, val_accuracy and val_loss to the epoch's logs (so that
    ReduceLROnPlateau and DVCLive, listed after it, see them) and restores the best weights at the
    end of training.
    """
    import keras

    class SelectOnValidation(keras.callbacks.Callback):
        best_score, best_epoch, best_weights = -1.0, -1, None

        def on_epoch_end(self, epoch, logs=None):
            proba = self.model.predict(val_images, batch_size=batch_size, verbose=0)
            predicted = proba.argmax(axis=1)
            score = balanced_accuracy(val_labels, predicted)
            logs["val_balanced_accuracy"] = score
            logs["val_accuracy"] = float(np.mean(predicted == val_labels))
            logs["val_loss"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(proba)), val_labels], 1e-7, 1))))
            if score > self.best_score:
                self.best_score, self.best_epoch = score, epoch
                self.best_weights = self.model.get_weights()
            log.info("epoch %d: val balanced accuracy %.4f (best %.4f at epoch %d)",
                     epoch + 1, score, self.best_score, self.best_epoch + 1)

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return SelectOnValidation()


@contextlib.contextmanager
def stop_on_ctrl_c(model):
    """Turn Ctrl-C during fit into a stop at the end of the current batch.

    A KeyboardInterrupt raised while TensorFlow's kernels run can abort the process
    ("munmap_chunk(): invalid pointer"); a flag that Keras checks between batches cannot.
    A second Ctrl-C interrupts at once.
    """
    stopped = threading.Event()

    def on_ctrl_c(signum, frame):
        if stopped.is_set():
            raise KeyboardInterrupt
        stopped.set()
        model.stop_training = True
        log.warning("Ctrl-C: stopping after this batch; the model will not be saved (again to stop now)")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def save_model(model, path: Path) -> None:
    """Save atomically: an interrupted save never leaves a half-written model at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def train(params: TrainParams, data_dir: Path, model_path: Path, live_dir: Path) -> dict:
    """Train, select the epoch on validation, save the model; returns the selection summary."""
    import keras
    import tensorflow as tf
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    image_size = read_index(data_dir)["image_size"]
    train_images, train_labels, _ = read_shards(data_dir, "train")
    val_images, val_labels, _ = read_shards(data_dir, "val")
    log.info("train: %d images, val: %d images, %d px", len(train_images), len(val_images), image_size)

    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(params.distribution)
    with strategy.scope():
        model = build_model(image_size, params)
        model.compile(optimizer=make_optimizer(params), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])

    selector = validation_callback(val_images, val_labels, params.batch_size)
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor="val_balanced_accuracy", mode="max", factor=params.reduce_lr_factor,
        patience=params.reduce_lr_patience, min_lr=params.min_learning_rate, verbose=1)
    with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live, stop_on_ctrl_c(model) as stopped:
        model.fit(
            training_dataset(train_images, train_labels, params.batch_size, params.seed),
            epochs=params.epochs,
            class_weight=class_weights(train_labels, params.class_weight),
            callbacks=[selector, reduce_lr, DVCLiveCallback(live=live)],
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=2,
        )
        summary = {"best_epoch": selector.best_epoch + 1, "best_val_balanced_accuracy": selector.best_score}
        live.summary.update(summary)
    if stopped.is_set():
        raise KeyboardInterrupt  # after fit, outside TensorFlow; the model is not saved
    save_model(model, model_path)
    log.info("saved %s (epoch %d of %d, val balanced accuracy %.4f)", model_path,
             summary["best_epoch"], params.epochs, summary["best_val_balanced_accuracy"])
    return summary


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         model_path: Path = Path("models/model.keras"), live_dir: Path = Path("metrics/train")) -> None:
    params = load_params("train", TrainParams, params_path)
    train(params, Path(data_dir), Path(model_path), Path(live_dir))


if __name__ == "__main__":
    run_stage(main)
