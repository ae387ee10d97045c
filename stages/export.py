"""Stage `export`: the trained Keras model as TensorFlow Lite files, checked against it on test.

Writes models/model_float16.tflite (weights stored as float16, computed in float32) and
models/model_int8.tflite (full-integer: weights and activations int8, calibrated on a seeded
sample of the training split), and metrics/export.json: for each model its balanced accuracy on
the test split, its top-1 agreement with the Keras model there, and its file size in bytes.

Why it is done this way (TensorFlow 2.21, Keras 3):
- Conversion starts from a tf.function that calls the model with training=False at a fixed input
  signature. `model.export(..., format="tf_saved_model")` does not work here: its serving graph
  keeps RandomFlip's random ops, which TFLite's builtin ops cannot run.
- Both files keep the Keras model's interface: float32 RGB pixels 0..255 at the trained size in,
  7 float32 probabilities out. In the int8 file every op is int8 (TFLITE_BUILTINS_INT8 only: an
  op that cannot be quantised fails the conversion instead of silently staying float); only its
  input and output are quantised/dequantised at the edges. So one scoring path serves all three.
- The files are run with `tf.lite.Interpreter`, which TF 2.21 still ships (with a deprecation
  warning pointing to the separate ai-edge-litert package, which is not a dependency here).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.cli import run_stage
from stages.errors import StageError
from stages.files import atomic_write_bytes, atomic_write_json
from stages.params import PARAMS_FILE, in_range, load_params
from stages.progress import track
from stages.shards import read_index, read_shards

log = logging.getLogger("stages.export")


@dataclass(frozen=True)
class ExportParams:
    representative_images: int   # training images that calibrate the int8 ranges
    seed: int                    # which training images those are
    batch_size: int              # images per inference call when checking on test

    def __post_init__(self) -> None:
        in_range("representative_images", self.representative_images, 1)
        in_range("seed", self.seed, 0)
        in_range("batch_size", self.batch_size, 1)


def representative_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` distinct training images drawn with `seed` (all of them when there are fewer)."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(images), size=min(count, len(images)), replace=False)
    return images[np.sort(picked)]


def converter(model, image_size: int):
    """A TFLite converter for the model in inference mode (RandomFlip and Dropout inactive)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")])
    def serve(image):
        return model(image, training=False)

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)


def to_float16(model, image_size: int) -> bytes:
    """Weights stored as float16 (half the size), computed in float32 on CPUs."""
    import tensorflow as tf

    conv = converter(model, image_size)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def to_int8(model, image_size: int, calibration: np.ndarray) -> bytes:
    """Full-integer int8, activation ranges from `calibration`; float32 input and output."""
    import tensorflow as tf

    def batches() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[None].astype(np.float32)]

    conv = converter(model, image_size)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = batches
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


def tflite_predict(model_bytes: bytes, images: np.ndarray, batch_size: int, what: str = "tflite") -> np.ndarray:
    """Probabilities from a .tflite model, `batch_size` images per call (progress: stages/progress.py)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model_bytes)
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    parts, shape = [], None
    for start in track(range(0, len(images), batch_size), -(-len(images) // batch_size), what, "batches", log):
        batch = images[start:start + batch_size].astype(np.float32)
        if batch.shape != shape:  # every batch but a shorter last one reuses the allocation
            interpreter.resize_tensor_input(source, batch.shape)
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(source, batch)
        interpreter.invoke()
        parts.append(interpreter.get_tensor(target).copy())
    return np.concatenate(parts)


def compare(labels: np.ndarray, reference: np.ndarray, proba: np.ndarray, size_bytes: int) -> dict:
    """One model's figures on test: balanced accuracy, top-1 agreement with the Keras model, size."""
    from sklearn.metrics import balanced_accuracy_score

    predicted = proba.argmax(axis=1)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "agreement": float(np.mean(predicted == reference.argmax(axis=1))),
        "size_bytes": int(size_bytes),
    }


def export(model, model_size: int, train_images: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
           params: ExportParams) -> tuple[dict[str, bytes], dict]:
    """Convert to both formats and score everything on test: ({format: file bytes}, metrics).

    The Keras model is scored by the same rule (its agreement with itself is 1 by definition), so
    the three rows of `dvc metrics show` line up.
    """
    image_size = int(model.input_shape[1])
    calibration = representative_sample(train_images, params.representative_images, params.seed)
    reference = model.predict(test_images.astype(np.float32), batch_size=params.batch_size, verbose=0)
    metrics = {
        "test_images": int(len(test_labels)),
        "representative_images": int(len(calibration)),
        "keras": compare(test_labels, reference, reference, model_size),
    }
    files = {"float16": to_float16(model, image_size), "int8": to_int8(model, image_size, calibration)}
    for name in files:
        proba = tflite_predict(files[name], test_images, params.batch_size, f"{name} on test")
        metrics[name] = compare(test_labels, reference, proba, len(files[name]))
        log.info("%s: %d bytes, agreement with Keras %.4f, balanced accuracy %.4f (Keras %.4f)", name,
                 len(files[name]), metrics[name]["agreement"], metrics[name]["balanced_accuracy"],
                 metrics["keras"]["balanced_accuracy"])
    return files, metrics


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         model_path: Path = Path("models/model.keras"), out_dir: Path = Path("models"),
         metrics_path: Path = Path("metrics/export.json")) -> None:
    import keras

    params = load_params("export", ExportParams, params_path)
    model_path, data_dir = Path(model_path), Path(data_dir)
    if not model_path.is_file():
        raise StageError(f"{model_path}: not found (run: dvc repro train, or dvc pull)")
    model = keras.saving.load_model(model_path)
    size = read_index(data_dir)["image_size"]
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise StageError(f"{model_path} takes {model.input_shape[1:]}, but {data_dir} holds {size}x{size} images "
                         f"(re-run: dvc repro train)")
    train_images, _, _ = read_shards(data_dir, "train")
    test_images, test_labels, _ = read_shards(data_dir, "test")
    files, metrics = export(model, model_path.stat().st_size, train_images, test_images, test_labels, params)
    for name, data in files.items():
        atomic_write_bytes(Path(out_dir) / f"model_{name}.tflite", data)
    atomic_write_json(Path(metrics_path), metrics)


if __name__ == "__main__":
    run_stage(main)
