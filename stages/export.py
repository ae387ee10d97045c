"""Stage `export`: the trained Keras model as TensorFlow Lite files, checked against it on test.

Reads models/model.keras, models/decision.json and data/augmented; writes models/model_float16.tflite
(float16 weights, float32 compute), models/model_int8.tflite (int8 weights per channel and int8
activations, calibrated on the seeded sample of `representative_images` real training images,
shards.sample_images; op types in `int8_float_ops`, layers in `int8_float_layers` stay float32) and
metrics/export.json: per model, its balanced accuracy on test, its top-1 agreement with the Keras
model (all through evaluate's decision rule, models/decision.json), its size in bytes and, per
.tflite file, its latency (median ms per image, batch of one, one CPU thread). Invariant: both
files keep the Keras model's interface (float32 RGB pixels 0..255 in, 7 float32 probabilities
out), so one scoring path (inference.predict_proba, inference.corrected) serves all three.
Why depthwise and the first pointwise convolutions stay float32 by default: frozen ImageNet
BatchNorm amplifies their int8 rounding (docs/experiments.md; chosen on validation with
experiments/int8_fidelity.py).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.lib.cli import StageError, run_stage
from stages.lib.files import atomic_write_bytes, atomic_write_json
from stages.lib.inference import Decision, corrected, load_decision, predict_proba
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.progress import Progress
from stages.lib.shards import read_index, read_shards, sample_images

log = logging.getLogger("stages.export")


@dataclass(frozen=True)
class ExportParams:
    representative_images: int   # real training images (each once) that calibrate the int8 ranges
    seed: int                    # which training images those are
    batch_size: int              # images per inference call when checking on test
    int8_float_ops: list[str] = dataclasses.field(default_factory=list)  # TFLite op types kept float32
    int8_float_layers: list[str] = dataclasses.field(default_factory=list)  # Keras layers whose ops stay float32
    latency_runs: int = 50       # timed single-image runs per file (median reported)

    def __post_init__(self) -> None:
        in_range("representative_images", self.representative_images, 1)
        in_range("seed", self.seed, 0)
        in_range("batch_size", self.batch_size, 1)
        in_range("latency_runs", self.latency_runs, 1)
        unknown = [op for op in self.int8_float_ops if op not in INT8_FLOAT_OPS]
        if unknown:
            raise ValueError(f"int8_float_ops: unknown op {unknown[0]!r} (known: {', '.join(INT8_FLOAT_OPS)})")


# TFLite op types of this model that may be kept in float32 inside the int8 file.
INT8_FLOAT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX", "ADD", "MUL")


def converter(model, image_size: int):
    """A TFLite converter for the model in inference mode (Dropout inactive).

    No trackable object is passed: with the model as one, TF 2.21 keeps every weight as a resource
    variable (READ_VARIABLE ops, BatchNorm not folded, int8 calibration fails); without it the
    weights are frozen into constants. The traced function `forward` holds the model, so its
    variables stay alive while the converter runs.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")])
    def forward(image):
        return model(image, training=False)

    return tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()])


def to_float16(model, image_size: int) -> bytes:
    """Weights stored as float16 (half the size), computed in float32 on CPUs."""
    import tensorflow as tf

    conv = converter(model, image_size)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def one_at_a_time(images: np.ndarray):
    """A TFLite representative/debug dataset: each image as a float32 batch of one."""
    def batches() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[None].astype(np.float32)]
    return batches


def int8_converter(model, image_size: int, calibration: np.ndarray):
    import tensorflow as tf

    conv = converter(model, image_size)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = one_at_a_time(calibration)
    return conv


def layer_tensors(model_bytes: bytes, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the tensors in a .tflite file that come from the Keras `layers`: a fused name
    such as "m/conv_pw_1_relu_1/Relu6;m/conv_pw_1_bn_1/...;m/conv_pw_1_1/convolution" holds each
    layer it fuses as a path part, the layer's name with an optional "_N" call suffix."""
    import re

    import tensorflow as tf

    names = [t["name"] for t in tf.lite.Interpreter(model_content=model_bytes).get_tensor_details()]
    found = []
    for layer in layers:
        part = re.compile(rf"(^|[/;]){re.escape(layer)}(_\d+)?(/|;|$)")
        matched = [name for name in names if part.search(name)]
        if not matched:
            raise StageError(f"int8_float_layers: no TFLite tensor comes from layer {layer!r} (a Keras layer name "
                             f"of the model, e.g. conv_pw_1)")
        found += matched
    return tuple(dict.fromkeys(found))


def float_options(float_ops: tuple[str, ...], tensors: tuple[str, ...] = ()):
    """The quantisation debugger's selective quantisation: ops of the types `float_ops` (TFLite op
    names, e.g. "SOFTMAX") and those writing the `tensors` stay float32, the rest int8."""
    import tensorflow as tf

    return tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops), denylisted_nodes=list(tensors),
                                                         fully_quantize=False)


def int8_debugger(model, image_size: int, calibration: np.ndarray, float_ops: tuple[str, ...]):
    """TFLite's quantisation debugger on the int8 conversion, calibrated on `calibration`, with
    `float_options(float_ops)`; setting its `options` re-quantises without re-calibrating, and
    get_nondebug_quantized_model() gives the file (quantize/dequantize ops around the float ops)."""
    import tensorflow as tf

    conv = int8_converter(model, image_size, calibration)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    return tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=one_at_a_time(calibration[:1]),
                                                     debug_options=float_options(float_ops))


def to_int8(model, image_size: int, calibration: np.ndarray, float_ops: tuple[str, ...] = (),
            float_layers: tuple[str, ...] = ()) -> bytes:
    """Int8 weights and activations (per-channel weights), ranges from `calibration`; float32
    input and output. Every op is int8 unless its type is in `float_ops` (TFLite op names, e.g.
    "SOFTMAX") or it comes from a Keras layer in `float_layers` (e.g. "conv_pw_1"): those stay
    float32 (`int8_debugger`)."""
    import tensorflow as tf

    if not float_ops and not float_layers:
        conv = int8_converter(model, image_size, calibration)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # a float op fails loudly
        return conv.convert()
    debugger = int8_debugger(model, image_size, calibration, float_ops)
    if float_layers:  # names are read from the calibrated model
        debugger.options = float_options(float_ops, layer_tensors(debugger.calibrated_model, float_layers))
    return debugger.get_nondebug_quantized_model()


class TFLiteModel:
    """A .tflite file as a callable batch -> probabilities, for inference.predict_proba.

    It runs on `tf.lite.Interpreter`, which TF 2.21 still ships (with a deprecation warning that
    points to the separate ai-edge-litert package, not a dependency here).
    """

    def __init__(self, model_bytes: bytes, num_threads: int | None = None, progress: Progress | None = None):
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_content=model_bytes, num_threads=num_threads)
        self.source = self.interpreter.get_input_details()[0]["index"]
        self.target = self.interpreter.get_output_details()[0]["index"]
        self.shape = None
        self.progress = progress

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self.shape:  # every batch but a shorter last one reuses the allocation
            self.interpreter.resize_tensor_input(self.source, batch.shape)
            self.interpreter.allocate_tensors()
            self.shape = batch.shape
        self.interpreter.set_tensor(self.source, batch)
        self.interpreter.invoke()
        if self.progress is not None:
            self.progress.update(len(batch))
        return self.interpreter.get_tensor(self.target).copy()


def latency_ms(model_bytes: bytes, image: np.ndarray, runs: int = 50) -> float:
    """Median milliseconds per image on one CPU thread, batch of one, after 5 warm-up runs."""
    import time

    run = TFLiteModel(model_bytes, num_threads=1)
    batch = image[None].astype(np.float32)
    for _ in range(5):
        run(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def tflite_predict(model_bytes: bytes, images: np.ndarray, batch_size: int, what: str = "tflite",
                   tta: str = "none") -> np.ndarray:
    """Probabilities from a .tflite model through inference.predict_proba (with `tta`),
    `batch_size` images per call (progress: stages/lib/progress.py)."""
    views = 4 if tta == "flips" else 1
    with Progress(len(images) * views, what, "images", log) as progress:
        return predict_proba(TFLiteModel(model_bytes, progress=progress), images, tta=tta, batch_size=batch_size)


def compare(labels: np.ndarray, reference: np.ndarray, proba: np.ndarray, size_bytes: int) -> dict:
    """One model's figures on test: balanced accuracy, top-1 agreement with the Keras model, size."""
    from sklearn.metrics import balanced_accuracy_score

    predicted = proba.argmax(axis=1)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "agreement": float(np.mean(predicted == reference.argmax(axis=1))),
        "size_bytes": int(size_bytes),
    }


def export(model, model_size: int, calibration: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
           params: ExportParams, decision: Decision) -> tuple[dict[str, bytes], dict]:
    """Convert to both formats (int8 calibrated on `calibration`) and score everything on test:
    ({format: file bytes}, metrics).

    Every model goes through the stored decision rule (inference.predict_proba with its test-time
    flips, then inference.corrected): the files are compared as users get their answers, and the
    Keras row's balanced accuracy is evaluate's test figure (its agreement with itself is 1 by
    definition), so the three rows of `dvc metrics show` line up; each .tflite file also
    gets its latency (median ms per image, batch of one, one CPU thread).
    """
    image_size = int(model.input_shape[1])
    unknown = sorted(set(params.int8_float_layers) - {layer.name for layer in model.layers})
    if unknown:
        raise StageError(f"export.int8_float_layers: the model has no layer {unknown[0]!r} (Keras layer names, "
                         f"e.g. conv_pw_1)")
    reference = corrected(predict_proba(model, test_images, decision.tta, params.batch_size), decision.class_bias)
    metrics = {
        "representative_images": int(len(calibration)),
        "int8_float_ops": list(params.int8_float_ops),
        "int8_float_layers": list(params.int8_float_layers),
        "keras": compare(test_labels, reference, reference, model_size),
    }
    files = {"float16": to_float16(model, image_size),
             "int8": to_int8(model, image_size, calibration, tuple(params.int8_float_ops),
                             float_layers=tuple(params.int8_float_layers))}
    for name in files:
        proba = corrected(tflite_predict(files[name], test_images, params.batch_size, f"{name} on test", decision.tta),
                          decision.class_bias)
        metrics[name] = {**compare(test_labels, reference, proba, len(files[name])),
                         "latency_ms": round(latency_ms(files[name], test_images[0], params.latency_runs), 3)}
        log.info("%s: %d bytes, %.2f ms/image (1 thread), agreement with Keras %.4f, balanced accuracy %.4f "
                 "(Keras %.4f)", name, len(files[name]), metrics[name]["latency_ms"], metrics[name]["agreement"],
                 metrics[name]["balanced_accuracy"], metrics["keras"]["balanced_accuracy"])
    return files, metrics


def main(params_path: Path = PARAMS_FILE, data_dir: Path = Path("data/augmented"),
         model_path: Path = Path("models/model.keras"), out_dir: Path = Path("models"),
         metrics_path: Path = Path("metrics/export.json"), decision_path: Path = Path("models/decision.json")) -> None:
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
    decision = load_decision(Path(decision_path))
    calibration, _ = sample_images(data_dir, "train", params.representative_images, params.seed)
    test_images, test_labels, _ = read_shards(data_dir, "test")
    files, metrics = export(model, model_path.stat().st_size, calibration, test_images, test_labels, params, decision)
    for name, data in files.items():
        atomic_write_bytes(Path(out_dir) / f"model_{name}.tflite", data)
    atomic_write_json(Path(metrics_path), metrics)


if __name__ == "__main__":
    run_stage(main)
