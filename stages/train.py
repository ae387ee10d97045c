"""Stage `train`: fine-tune MobileNet V1 (ImageNet weights) on augment's training shards.

Reads data/augmented (train and val) and params.yaml's `train`; writes models/model.keras
(atomically) and metrics/train/ (DVCLive: per-epoch curves; metrics.json holds the saved model's
validation scores under `eval`). The test split is never read. The model takes RGB pixels 0..255
at augment's image size and scales them itself, so train, evaluate and predict cannot drift. Every
training example (an image, as often as augment's plan lists it) gets one random transform per
epoch (`augmentation`), drawn anew from `seed` each epoch. No epoch is picked: the learning rate
warms up, then decays on a cosine, and the saved weights are the mean of the last
`average_last_epochs` epochs. ImageNet weights: Keras's cache (~/.keras/models/, $KERAS_HOME/models/).
A stopped run resumes after its last finished epoch from models/train_checkpoint/ (docs/faults.md).
Invariant: seeded end to end with op determinism: same params and CPU, same weights, resumed or not.
Why: one epoch's validation score is too noisy to choose on (docs/experiments.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.lib import checkpoint
from stages.lib.calibration import nll
from stages.lib.cli import ParamError, StageError, run_stage
from stages.lib.dataset import CLASSES
from stages.lib.files import atomic_save_model
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.shards import read_index, read_shards

log = logging.getLogger("stages.train")

WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
IMAGENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)
KERAS_EPSILON = 1e-7  # keras.config.epsilon(): Keras's training loss floors probabilities here, so val_loss compares
CHECKPOINT_NAME = "train_checkpoint"  # beside the model: models/train_checkpoint/ (dvc.yaml: persist)


# --------------------------------------------------------------------------------------------
# On-line augmentation: formulas (plain arithmetic: experiments/sweep_jax.py applies them to
# keras.ops tensors, train to TensorFlow tensors, tests to numpy arrays)
# --------------------------------------------------------------------------------------------
def contrast_then_brightness(pixels, mean, contrast, brightness):
    """Contrast about the image's mean grey level `mean` (keeps its colour balance), then brightness.

    Plain arithmetic, so it applies alike to numpy arrays and to tensors (no clipping: the caller
    clips to [0, 255] in its own library).
    """
    return ((pixels - mean) * contrast + mean) * brightness


def affine_about_centre(cos, sin, flip_x, flip_y, centre_x, centre_y, shift_x, shift_y, aspect=1.0):
    """(a0, a1, a2, b0, b1, b2): output pixel (x, y) samples the source at (a0 x + a1 y + a2, b0 x + b1 y + b2).

    A = R(angle) diag(flip_x, flip_y) / zoom about the centre, then the shift; `cos` and `sin` are
    the angle's, already divided by the zoom, and flips are +-1. `aspect` is the width / height of
    the photo the image was resized from: the rotation is S R S^-1, with S = diag(1, aspect) the
    resize up to scale, i.e. the photo's turn seen in the resized image (1: a plain turn of the
    image: a turn near 90 degrees then swaps which axis augment's square resize squashed).
    """
    a0, a1, b0, b1 = cos * flip_x, -sin * flip_y / aspect, sin * aspect * flip_x, cos * flip_y
    return (a0, a1, centre_x - a0 * centre_x - a1 * centre_y - shift_x,
            b0, b1, centre_y - b0 * centre_x - b1 * centre_y - shift_y)


@dataclass(frozen=True)
class Augmentation:
    """`train.augmentation`: one random transform per training image per epoch, for every class.

    Geometry is one affine resampling with mirrored margins (dermoscopy has no "up"); colour is
    a per-channel gain (another white balance: dermatoscopes and cameras differ), then contrast
    about the image's mean grey level, then brightness (`affine_about_centre`,
    `contrast_then_brightness`). Each range is what the transforms can do (__post_init__).
    """

    flip: bool                    # random horizontal and vertical flips
    rotation_degrees: float       # uniform in +-this
    shift_fraction: float         # of the side, uniform in +-this on each axis
    zoom_fraction: float          # scale uniform in 1 +- this (> 1 magnifies)
    brightness: float             # multiplier uniform in 1 +- this
    contrast: float               # multiplier of each pixel's distance to the image's mean, 1 +- this
    photo_aspect: float           # width / height of the photos augment squashed to a square: turn those
    white_balance: float = 0.0    # each channel's multiplier uniform in 1 +- this, drawn apart (0: none)

    def __post_init__(self) -> None:
        in_range("rotation_degrees", self.rotation_degrees, 0, 180)  # +-180 covers every angle
        in_range("shift_fraction", self.shift_fraction, 0, 0.5)       # of the side: the centre stays in view
        in_range("zoom_fraction", self.zoom_fraction, 0, 0.5, hi_open=True)  # scale 1 +- this stays > 0.5
        in_range("brightness", self.brightness, 0, 0.9)               # multipliers stay > 0
        in_range("contrast", self.contrast, 0, 0.9)
        in_range("photo_aspect", self.photo_aspect, 0.25, 4)
        in_range("white_balance", self.white_balance, 0, 0.9)  # multipliers stay > 0

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotation_degrees or self.shift_fraction or self.zoom_fraction
                    or self.brightness or self.contrast or self.white_balance)


@dataclass(frozen=True)
class TrainParams:
    seed: int
    weights: Literal["imagenet", "none"]
    alpha: float
    trainable_from: str
    freeze_batchnorm: bool
    dropout: float
    optimizer: Literal["adam", "sgd"]
    learning_rate: float          # peak, reached after the warm-up
    warmup_epochs: int            # linear warm-up from learning_rate / 10
    min_learning_rate: float      # end of the cosine decay
    epochs: int
    average_last_epochs: int      # the saved weights are the mean over the last this many epochs
    batch_size: int
    class_weight: Literal["balanced", "none"]
    augmentation: Augmentation
    distribution: Literal["default", "mirrored"]

    def __post_init__(self) -> None:
        if self.weights == "imagenet" and self.alpha not in IMAGENET_ALPHAS:
            raise ValueError(f"alpha must be one of {IMAGENET_ALPHAS} with ImageNet weights, got {self.alpha}")
        in_range("seed", self.seed, 0)
        in_range("alpha", self.alpha, 0, lo_open=True)
        in_range("dropout", self.dropout, 0, 1, hi_open=True)
        in_range("learning_rate", self.learning_rate, 0, lo_open=True)
        in_range("min_learning_rate", self.min_learning_rate, 0, self.learning_rate, lo_open=True)  # <= peak
        in_range("epochs", self.epochs, 1)
        in_range("batch_size", self.batch_size, 1)
        in_range("warmup_epochs", self.warmup_epochs, 0, self.epochs, hi_open=True)  # [0, epochs)
        in_range("average_last_epochs", self.average_last_epochs, 1, self.epochs - self.warmup_epochs)
        if self.weights == "none" and (self.trainable_from != "all" or self.freeze_batchnorm):
            # Frozen random layers are a fixed random projection, and frozen BatchNorm keeps its
            # initial (0, 1) statistics: only the head would learn. Refuse rather than train that.
            raise ValueError("weights: none trains from scratch, which needs trainable_from: all and "
                             "freeze_batchnorm: false (got trainable_from: "
                             f"{self.trainable_from}, freeze_batchnorm: {str(self.freeze_batchnorm).lower()})")


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
            f"(from {WEIGHTS_URL + name}) at {cache}, or train from scratch with train.weights: none, "
            f"train.trainable_from: all and train.freeze_batchnorm: false (much weaker on HAM10000)"
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
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_mobilenet")(inputs)
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
    distribution, and validation scores swing from epoch to epoch. Frozen, the convolutions adapt
    while the normalisation stays stable.
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


def learning_rate_schedule(params: TrainParams, steps_per_epoch: int):
    """Linear warm-up from learning_rate / 10 to learning_rate, then cosine decay to min_learning_rate.

    A schedule fixed in advance, unlike ReduceLROnPlateau, does not react to validation noise.
    """
    import keras

    warmup = params.warmup_epochs * steps_per_epoch
    decay = max(1, (params.epochs - params.warmup_epochs) * steps_per_epoch)
    floor = params.min_learning_rate / params.learning_rate
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, decay, alpha=floor)
    return keras.optimizers.schedules.CosineDecay(params.learning_rate / 10, decay, alpha=floor,
                                                  warmup_target=params.learning_rate, warmup_steps=warmup)


def make_optimizer(params: TrainParams, steps_per_epoch: int = 1):
    import keras

    schedule = learning_rate_schedule(params, steps_per_epoch)
    # Named: Keras numbers unnamed ones per process (adam, adam_1...), and the name is in the model file.
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, name="sgd")
    return keras.optimizers.Adam(schedule, name="adam")


def make_strategy(name: str):
    """The tf.distribute strategy: one device (default) or all local GPUs (mirrored; docs/scaling.md)."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def strategy_devices(strategy, name: str) -> list[str]:
    """The devices `strategy` trains on: each replica's (mirrored), else TensorFlow's first GPU or the CPU."""
    import tensorflow as tf

    if name == "mirrored":
        devices = list(strategy.extended.worker_devices)
    else:
        devices = [(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name]
    return [device.rsplit("device:", 1)[-1] for device in devices]


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


def affine_transforms(seed, batch: int, side: int, augmentation: Augmentation):
    """One random flip/rotation/shift/zoom per image, as ImageProjectiveTransformV3 rows.

    Row (a0, a1, a2, b0, b1, b2, 0, 0) maps output pixel (x, y) to input point
    (a0 x + a1 y + a2, b0 x + b1 y + b2): about the centre, A = R(angle) diag(fx, fy) / zoom,
    then the shift. `seed` is a stateless seed (shape [2]); the draws depend on nothing else.
    """
    import tensorflow as tf

    angle_seed, zoom_seed, shift_x_seed, shift_y_seed, flip_x_seed, flip_y_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 6))

    def uniform(draw_seed, width):
        return tf.random.stateless_uniform([batch], draw_seed, -width, width)

    def sign(draw_seed):
        if not augmentation.flip:
            return tf.ones([batch])
        return tf.where(tf.random.stateless_uniform([batch], draw_seed) < 0.5, -1.0, 1.0)

    angle = uniform(angle_seed, augmentation.rotation_degrees * np.pi / 180)
    zoom = 1 + uniform(zoom_seed, augmentation.zoom_fraction)
    shift_x = uniform(shift_x_seed, augmentation.shift_fraction) * side
    shift_y = uniform(shift_y_seed, augmentation.shift_fraction) * side
    fx, fy = sign(flip_x_seed), sign(flip_y_seed)
    c = (side - 1) / 2
    a0, a1, a2, b0, b1, b2 = affine_about_centre(tf.cos(angle) / zoom, tf.sin(angle) / zoom, fx, fy,
                                                 c, c, shift_x, shift_y, augmentation.photo_aspect)
    zeros = tf.zeros([batch])
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_batch(images, seed, augmentation: Augmentation):
    """A batch of float32 pixels in [0, 255], each image transformed at random (Augmentation)."""
    import tensorflow as tf

    batch, side = tf.shape(images)[0], images.shape[1]
    geometry, colour = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=affine_transforms(geometry, batch, side, augmentation),
        output_shape=tf.shape(images)[1:3], fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    brightness_seed, contrast_seed = tf.unstack(tf.random.experimental.stateless_split(colour, 2))

    def factor(draw_seed, width):
        return 1 + tf.random.stateless_uniform([batch, 1, 1, 1], draw_seed, -width, width)

    brightness = factor(brightness_seed, augmentation.brightness)
    contrast = factor(contrast_seed, augmentation.contrast)
    if augmentation.white_balance:  # folded in, not split: with no gain the other draws stay as they were
        gain_seed = tf.random.experimental.stateless_fold_in(colour, 1)
        images = images * (1 + tf.random.stateless_uniform([batch, 1, 1, 3], gain_seed, -augmentation.white_balance,
                                                            augmentation.white_balance))
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value(contrast_then_brightness(images, mean, contrast, brightness), 0.0, 255.0)


def training_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                     augmentation: Augmentation | None = None):
    """Shuffled batches of float32 pixels, augmented on-line when `augmentation` is active.

    Indices are shuffled (not images) and batches gathered. Each batch is paired with a stateless
    seed from a seeded random stream that is re-drawn every epoch, so each epoch sees new
    transforms, reproducibly.
    """
    import tensorflow as tf

    images_t = tf.constant(images)
    labels_t = tf.constant(labels)
    augment = augmentation is not None and augmentation.active

    def gather(idx, batch_seed):
        batch = tf.cast(tf.gather(images_t, idx), tf.float32)
        if augment:
            batch = augment_batch(batch, batch_seed, augmentation)
        return batch, tf.gather(labels_t, idx)

    indices = (tf.data.Dataset.range(len(images))
               .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size))
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return (
        tf.data.Dataset.zip(indices, seeds)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def validation_scores(model, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, float]:
    """Balanced accuracy, accuracy and loss of `model` on validation (plain, no test-time flips)."""
    from sklearn.metrics import balanced_accuracy_score

    proba = model.predict(images, batch_size=batch_size, verbose=0)
    predicted = proba.argmax(axis=1)
    return {
        "val_balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "val_accuracy": float(np.mean(predicted == labels)),
        "val_loss": nll(labels, proba, floor=KERAS_EPSILON),
    }


class WeightAverage:
    """Running mean of the model's weights over the epochs it is given (stochastic weight averaging)."""

    def __init__(self) -> None:
        self.count, self.mean = 0, None

    def add(self, weights: list[np.ndarray]) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = [w.astype(np.float64) for w in weights]
        else:
            for m, w in zip(self.mean, weights):
                m += (w - m) / self.count

    def weights(self) -> list[np.ndarray]:
        return [m.astype(np.float32) for m in self.mean]

    def state(self) -> list[np.ndarray]:
        """The count, then the running mean (float64): what a checkpoint keeps."""
        return [np.array(self.count)] + list(self.mean or [])

    def restore(self, state: list[np.ndarray]) -> None:
        self.count, self.mean = int(state[0]), [m.astype(np.float64) for m in state[1:]] or None


def epoch_callback(val_images: np.ndarray, val_labels: np.ndarray, params: TrainParams):
    """Score each epoch on validation (for the curves) and average the last epochs' weights.

    It adds val_balanced_accuracy, val_accuracy and val_loss to the epoch's logs, so that DVCLive,
    listed after it, records them. At the end of training the averaged weights replace the last ones.
    """
    import keras

    first_averaged = params.epochs - params.average_last_epochs  # 0-based epoch index

    class ScoreAndAverage(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.average = WeightAverage()

        def on_epoch_end(self, epoch, logs=None):
            scores = validation_scores(self.model, val_images, val_labels, params.batch_size)
            logs.update(scores)
            if epoch >= first_averaged:
                self.average.add(self.model.get_weights())
            log.info("epoch %d/%d: val balanced accuracy %.4f%s", epoch + 1, params.epochs,
                     scores["val_balanced_accuracy"], " (averaged)" if epoch >= first_averaged else "")

        def on_train_end(self, logs=None):
            if self.average.count:
                self.model.set_weights(self.average.weights())

    return ScoreAndAverage()


# Keras 3.15's fit makes two iterators of the training data per epoch (one at its start, a spare one
# at its end), and each draws the next shuffle and augmentation seeds (reshuffle_each_iteration).
KERAS_ITERATORS_PER_EPOCH = 2


def skip_epochs(dataset, epochs: int) -> None:
    """Draw the shuffles and augmentation seeds that `epochs` epochs of fit drew from `dataset`, so
    that a resumed fit's next epoch sees the data the uninterrupted run's would have seen."""
    for _ in range(KERAS_ITERATORS_PER_EPOCH * epochs):
        iter(dataset)


def training_state(model, average: WeightAverage) -> dict[str, list[np.ndarray]]:
    """All that the next epochs depend on: the model's variables (with the dropout's seed state),
    the optimizer's (step count, moments) and the weight average."""
    return {"model": [v.numpy() for v in model.variables],
            "optimizer": [v.numpy() for v in model.optimizer.variables],
            "average": average.state()}


def restore_training_state(model, average: WeightAverage, arrays: dict[str, list[np.ndarray]]) -> None:
    model.optimizer.build(model.trainable_variables)
    for group, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
        for variable, value in zip(variables, arrays[group], strict=True):
            variable.assign(value)
    average.restore(arrays["average"])


def checkpoint_callback(folder: Path, stamp: str, average: WeightAverage, live_dir: Path,
                        stopped: threading.Event, epochs_done: int):
    """Save the training state to `folder` at the end of each finished epoch (not one Ctrl-C cut
    short). List it after DVCLive's callback, so the copy of `live_dir` holds the epoch's curves."""
    import keras

    class SaveCheckpoint(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs_done = epochs_done

        def on_epoch_end(self, epoch, logs=None):
            if not stopped.is_set():
                checkpoint.save(folder, stamp, epoch + 1, training_state(self.model, average), live_dir)
                self.epochs_done = epoch + 1

        def resume_note(self) -> str:
            if self.epochs_done:
                return f"the next run resumes after epoch {self.epochs_done} ({folder})"
            return "no epoch finished: the next run starts over"

    return SaveCheckpoint()


@contextlib.contextmanager
def stop_on_ctrl_c(model, stopped: threading.Event, resume_note):
    """Turn Ctrl-C during fit into a stop at the end of the current batch, and set `stopped`.

    A KeyboardInterrupt raised while TensorFlow's kernels run can abort the process
    ("munmap_chunk(): invalid pointer"); a flag that Keras checks between batches cannot.
    A second Ctrl-C interrupts at once. `resume_note()` says where the next run starts.
    """
    def on_ctrl_c(signum, frame):
        if stopped.is_set():
            raise KeyboardInterrupt
        stopped.set()
        model.stop_training = True
        log.warning("Ctrl-C: stopping after this batch; the model will not be saved, %s (again to stop now)",
                    resume_note())

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train(params: TrainParams, data_dir: Path, model_path: Path, live_dir: Path) -> dict:
    """Train (resuming from the checkpoint beside the model if it holds this run's state), average
    the last epochs' weights, save the model; returns its validation summary."""
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
    steps_per_epoch = -(-len(train_images) // params.batch_size)
    strategy = make_strategy(params.distribution)
    log.info("devices: %s (train.distribution: %s)", ", ".join(strategy_devices(strategy, params.distribution)),
             params.distribution)
    with strategy.scope():
        model = build_model(image_size, params)
        model.compile(optimizer=make_optimizer(params, steps_per_epoch), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    dataset = training_dataset(train_images, train_labels, params.batch_size, params.seed, params.augmentation)
    scorer = epoch_callback(val_images, val_labels, params)

    checkpoint_dir = model_path.parent / CHECKPOINT_NAME
    stamp = checkpoint.fingerprint(dataclasses.asdict(params), [train_images, train_labels, val_images, val_labels])
    saved = checkpoint.load(checkpoint_dir, stamp)
    if saved:
        with strategy.scope():
            restore_training_state(model, scorer.average, saved.arrays)
        skip_epochs(dataset, saved.epochs_done)
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(saved.live_dir, live_dir)  # the curves up to there; DVCLive goes on from them
        log.info("resuming after epoch %d/%d (%s)", saved.epochs_done, params.epochs, checkpoint_dir)
    epochs_done = saved.epochs_done if saved else 0
    stopped = threading.Event()
    saver = checkpoint_callback(checkpoint_dir, stamp, scorer.average, live_dir, stopped, epochs_done)

    with (Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=saved is not None) as live,
          stop_on_ctrl_c(model, stopped, saver.resume_note)):
        if not saved:
            live.step = 1  # epochs are counted from 1 in the curves, as in the logs (resumed: DVCLive's next)
        model.fit(
            dataset,
            epochs=params.epochs,
            initial_epoch=epochs_done,
            class_weight=class_weights(train_labels, params.class_weight),
            callbacks=[scorer, DVCLiveCallback(live=live), saver],
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=1 if sys.stdout.isatty() else 2,  # a progress bar with ETA in a terminal, a line per epoch in logs
        )
        if stopped.is_set():
            raise KeyboardInterrupt  # after fit, outside TensorFlow; the model is not saved
        # The saved model's own validation figures (the average of the last epochs), not the last epoch's.
        final = validation_scores(model, val_images, val_labels, params.batch_size)
        summary = {"averaged_epochs": [params.epochs - params.average_last_epochs + 1, params.epochs],
                   "val_balanced_accuracy": final["val_balanced_accuracy"]}
        live.summary.update(summary)
        live.summary["eval"] = {name.removeprefix("val_"): value for name, value in final.items()}
    atomic_save_model(model, model_path)
    checkpoint.finish(checkpoint_dir)
    log.info("saved %s (weights averaged over epochs %d-%d, val balanced accuracy %.4f)", model_path,
             *summary["averaged_epochs"], summary["val_balanced_accuracy"])
    return summary


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         model_path: Path = Path("models/model.keras"), live_dir: Path = Path("metrics/train")) -> None:
    params = load_params("train", TrainParams, params_path)
    train(params, Path(data_dir), Path(model_path), Path(live_dir))


if __name__ == "__main__":
    run_stage(main)
