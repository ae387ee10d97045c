"""Why the int8 TFLite model disagrees with the Keras model, and what fixes it, measured on test.

    python -m experiments.int8_fidelity [--model models/model.keras] [--data data/augmented]
        [--calibration 200 1000 2000] [--debug-images 100] [--float-ops ...] [--json out.json]

Prints one row per variant (float16; int8 calibrated on 200 of all training images, '+aug' copies
included; int8 on N real images; the same with op types or the worst tensors kept float32;
dynamic range): top-1 agreement with the Keras model on the test split (both through
stages/lib/inference.py's predict_proba, no test-time flips), balanced accuracy, size and latency
(median ms per image, batch of one, one CPU thread). Before the float variants, TFLite's
quantisation debugger ranks the tensors by RMS error in quantisation steps (`int8_layer_errors`).
The conversions are the export stage's own (stages/export.py); nothing in data/ or models/ is
written. Why: to choose `export.int8_float_ops` on evidence; results: docs/experiments.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from stages import export  # noqa: E402
from stages.lib.files import atomic_write_text  # noqa: E402
from stages.lib.inference import predict_proba  # noqa: E402
from stages.lib.shards import read_shards  # noqa: E402


def int8_layer_errors(model, image_size: int, calibration: np.ndarray, images: np.ndarray):
    """TFLite's quantisation debugger on `images`: per quantised tensor, the error of its int8
    value against the float value computed from the same int8 inputs, as a table with
    `rmse/scale` (RMS error in quantisation steps: ~0.29 is pure rounding, more is lost precision),
    sorted worst first."""
    import io

    import pandas as pd
    import tensorflow as tf

    conv = export.int8_converter(model, image_size, calibration)
    debugger = tf.lite.experimental.QuantizationDebugger(converter=conv,
                                                         debug_dataset=export.one_at_a_time(images))
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    table = pd.read_csv(buffer)
    table["rmse/scale"] = np.sqrt(table["mean_squared_error"]) / table["scale"]
    return table.sort_values("rmse/scale", ascending=False).reset_index(drop=True)


def to_dynamic_range(model, image_size: int) -> bytes:
    """Int8 weights, float32 activations (quantised on the fly): no calibration."""
    import tensorflow as tf

    conv = export.converter(model, image_size)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return conv.convert()


def figures(reference: np.ndarray, labels: np.ndarray, proba: np.ndarray, model_bytes: bytes, image: np.ndarray,
            runs: int) -> dict:
    """export.compare's figures (balanced accuracy, agreement, size), latency, and how far probabilities move."""
    ranked = np.sort(reference, axis=1)
    margin = ranked[:, -1] - ranked[:, -2]
    disagree = proba.argmax(axis=1) != reference.argmax(axis=1)
    return {
        **export.compare(labels, reference, proba, len(model_bytes)),
        "latency_ms": export.latency_ms(model_bytes, image, runs),
        "max_abs_prob_error": float(np.abs(proba - reference).max()),
        "mean_abs_prob_error": float(np.abs(proba - reference).mean()),
        "disagreements_with_keras_margin_over_0.1": int(np.sum(disagree & (margin > 0.1))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--calibration", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--debug-images", type=int, default=100)
    parser.add_argument("--float-ops", nargs="*", default=["SOFTMAX", "FULLY_CONNECTED,SOFTMAX", "CONV_2D_FIRST"],
                        help="comma-separated TFLite op types per variant; CONV_2D_FIRST = the first convolution")
    parser.add_argument("--float-worst", type=int, nargs="*", default=[3, 6],
                        help="variants keeping the K tensors with the largest debugger error float")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads for the Keras reference")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="variant names to skip (float16, before, dynamic)")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    model = keras.saving.load_model(args.model)
    size = int(model.input_shape[1])
    train_images, _, train_ids = read_shards(args.data, "train")
    test_images, test_labels, _ = read_shards(args.data, "test")
    real = export.real_images(train_images, train_ids)
    print(f"model {args.model} ({size} px); train {len(train_images):,} images ({len(real):,} real); "
          f"test {len(test_images):,}")
    started = time.perf_counter()
    reference = predict_proba(model, test_images, tta="none")
    print(f"Keras reference on test: {time.perf_counter() - started:.0f} s")
    image = test_images[0]
    rows: dict[str, dict] = {}

    def score(name: str, model_bytes: bytes, seconds: float) -> None:
        proba = predict_proba(export.TFLiteModel(model_bytes, num_threads=args.threads), test_images, tta="none")
        rows[name] = {**figures(reference, test_labels, proba, model_bytes, image, args.latency_runs),
                      "convert_s": round(seconds, 1)}
        r = rows[name]
        print(f"{name:44s} agreement {r['agreement']:.4f}  bal.acc {r['balanced_accuracy']:.4f}  "
              f"{r['size_bytes'] / 1e6:5.2f} MB  {r['latency_ms']:6.2f} ms/image  "
              f"max|dp| {r['max_abs_prob_error']:.3f}  (converted in {seconds:.0f} s)", flush=True)

    def timed(convert):
        started = time.perf_counter()
        data = convert()
        return data, time.perf_counter() - started

    if "float16" not in args.skip:
        score("float16", *timed(lambda: export.to_float16(model, size)))
    if "before" not in args.skip:
        calibration = export.representative_sample(train_images, 200, args.seed)
        score("int8 before (200 of all, '+aug' included)", *timed(lambda: export.to_int8(model, size, calibration)))
    for count in args.calibration:
        calibration = export.representative_sample(real, count, args.seed)
        score(f"int8 real {count}", *timed(lambda calibration=calibration: export.to_int8(model, size, calibration)))

    largest = export.representative_sample(real, max(args.calibration), args.seed)
    if args.debug_images:
        started = time.perf_counter()
        table = int8_layer_errors(model, size, largest, test_images[:args.debug_images])
        print(f"\nquantisation debugger ({args.debug_images} test images, {time.perf_counter() - started:.0f} s): "
              "worst tensors by RMS error in quantisation steps (rounding alone: 0.29)")
        view = table[["op_name", "tensor_name", "rmse/scale", "max_abs_error", "scale"]].head(15).copy()
        view["tensor_name"] = view["tensor_name"].str.split(";").str[0].str.slice(-60)
        print(view.to_string(index=False, float_format="%.4g"))
        rows["debugger"] = table.head(30).to_dict(orient="records")
        first_conv = table[table["op_name"] == "CONV_2D"]["tensor_name"]
    for ops in args.float_ops:
        names = tuple(op for op in ops.split(",") if op != "CONV_2D_FIRST")
        nodes = ()
        if "CONV_2D_FIRST" in ops:
            interpreter_names = sorted(first_conv, key=lambda n: ("conv1" not in n, n))
            nodes = (interpreter_names[0],)
        label = "+".join(names + (("first conv",) if nodes else ()))
        score(f"int8 real {max(args.calibration)} + float {label}",
              *timed(lambda names=names, nodes=nodes: export.to_int8(model, size, largest, names, nodes)))
    for k in args.float_worst if args.debug_images else []:
        nodes = tuple(table["tensor_name"].head(k))
        score(f"int8 real {max(args.calibration)} + float {k} worst layers",
              *timed(lambda nodes=nodes: export.to_int8(model, size, largest, (), nodes)))
    if "dynamic" not in args.skip:
        score("dynamic range (int8 weights, float activations)", *timed(lambda: to_dynamic_range(model, size)))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
