"""Which int8 export setting follows the Keras model closely enough, measured on validation.

    python -m experiments.int8_fidelity [--model models/model.keras] [--data data/augmented]
        [--decision models/decision.json] [--candidate SPEC ...] [--debug-images 100] [--json out.json]

Each SPEC is one candidate: params.yaml's export section changed by comma-separated key=value
(`images=N` calibration images, `views=flips` each also flipped 3 ways, `float=OP+OP` op types and
`layers=L+L` Keras layers kept float32, `none` for none, `worst=K` also the K tensors worst in the
quantisation debugger on training images, `mode=int8|int16|dynamic|float16`); "" is the committed
setting. Per candidate: agreement with the Keras model on val through evaluate's decision rule
(export.compare), also uncorrected and at the melanoma operating point, balanced accuracy, size,
latency (median ms per image, batch of one, one CPU thread). Conversions are the export stage's;
nothing in data/ or models/ is written, and test is never read (the stage reads it once).
Why: to choose the export section on evidence; results: docs/experiments.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from stages import export
from stages.lib.files import atomic_write_text
from stages.lib.inference import Decision, corrected, decide, flips, load_decision, predict_proba
from stages.lib.params import PARAMS_FILE, load_params
from stages.lib.shards import read_images, read_shards, sample_rows

MODES = ("int8", "int16", "dynamic", "float16")
"""int8: int8 weights and activations (the stage's file); int16: int16 activations, int8 weights;
dynamic: int8 weights, float activations, no calibration; float16: the stage's float16 file."""


@dataclass(frozen=True)
class Candidate:
    """One export setting: the committed export section with some keys changed."""

    images: int                  # real training images that calibrate
    float_ops: tuple[str, ...]   # TFLite op types kept float32
    float_layers: tuple[str, ...] = ()  # Keras layers whose ops stay float32
    views: str = "none"          # "flips": each calibration image also in its 3 flips
    worst: int = 0               # also keep the K tensors with the largest debugger error float32
    mode: str = "int8"

    @property
    def calibrated(self) -> bool:
        return self.mode in ("int8", "int16")

    def settings(self) -> dict:
        """The candidate as plain JSON (only `mode` for a file made without calibration)."""
        if not self.calibrated:
            return {"mode": self.mode}
        return {**dataclasses.asdict(self), "float_ops": list(self.float_ops), "float_layers": list(self.float_layers)}

    @property
    def name(self) -> str:
        if not self.calibrated:
            return self.mode
        floats = "+".join(self.float_ops + self.float_layers) or "none"
        return (f"{self.mode}, {self.images} images{' x4 flips' if self.views == 'flips' else ''}, float {floats}"
                f"{f' + {self.worst} worst' if self.worst else ''}")


def parse_candidate(spec: str, base: export.ExportParams) -> Candidate:
    """`spec` (comma-separated key=value, see the module docstring) applied to the committed `base`."""
    candidate = Candidate(images=base.representative_images, float_ops=tuple(base.int8_float_ops),
                          float_layers=tuple(base.int8_float_layers))
    changes: dict = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        if key == "images" and value.isdigit() and int(value) >= 1:
            changes["images"] = int(value)
        elif key == "worst" and value.isdigit():
            changes["worst"] = int(value)
        elif key == "views" and value in ("none", "flips"):
            changes["views"] = value
        elif key == "mode" and value in MODES:
            changes["mode"] = value
        elif key == "float" and (value == "none" or all(op in export.INT8_FLOAT_OPS for op in value.split("+"))):
            changes["float_ops"] = () if value == "none" else tuple(value.split("+"))
        elif key == "layers" and value:
            changes["float_layers"] = () if value == "none" else tuple(value.split("+"))
        else:
            raise ValueError(f"candidate {spec!r}: bad item {item!r} (images=N, views=none|flips, worst=K, "
                             f"layers=none or L+L, mode={'|'.join(MODES)}, "
                             f"float=none or OP+OP of {', '.join(export.INT8_FLOAT_OPS)})")
    candidate = dataclasses.replace(candidate, **changes)
    if candidate.mode == "int16" and (candidate.float_ops or candidate.float_layers or candidate.worst):
        raise ValueError(f"candidate {spec!r}: mode=int16 keeps every op quantised (give float=none, layers=none, "
                         "no worst=)")
    return candidate


def calibration_images(real: np.ndarray, candidate: Candidate, seed: int) -> np.ndarray:
    """The stage's seeded sample of real training images, with their flips for `views=flips`."""
    sample = real[sample_rows(len(real), candidate.images, seed)]
    return np.concatenate(flips(sample)) if candidate.views == "flips" else sample


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


def to_int16_activations(model, image_size: int, calibration: np.ndarray) -> bytes:
    """Int16 activations and int8 weights (TFLite's 16x8 scheme), float32 input and output."""
    import tensorflow as tf

    conv = export.int8_converter(model, image_size, calibration)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return conv.convert()


def convert(model, image_size: int, candidate: Candidate, calibration: np.ndarray,
            worst_tensors: tuple[str, ...] = ()) -> bytes:
    """The candidate's .tflite file; `worst_tensors`: the debugger's ranking, worst first."""
    if candidate.mode == "float16":
        return export.to_float16(model, image_size)
    if candidate.mode == "dynamic":
        return to_dynamic_range(model, image_size)
    if candidate.mode == "int16":
        return to_int16_activations(model, image_size, calibration)
    if not candidate.worst:
        return export.to_int8(model, image_size, calibration, candidate.float_ops, candidate.float_layers)
    # export.to_int8's file, with the debugger's `worst` worst tensors also kept float32
    debugger = export.int8_debugger(model, image_size, calibration, candidate.float_ops)
    tensors = worst_tensors[:candidate.worst] + export.layer_tensors(debugger.calibrated_model, candidate.float_layers)
    debugger.options = export.float_options(candidate.float_ops, tensors)
    return debugger.get_nondebug_quantized_model()


def figures(labels: np.ndarray, raw_reference: np.ndarray, raw: np.ndarray, decision: Decision) -> dict:
    """export.compare's agreement and balanced accuracy through `decision` (raw: flips-averaged
    probabilities before the prior correction), plus the agreement without the correction and at
    the melanoma operating point, and how far probabilities move."""
    reference, proba = (corrected(p, decision.class_bias) for p in (raw_reference, raw))
    return {
        **{k: v for k, v in export.compare(labels, reference, proba, 0).items() if k != "size_bytes"},
        "agreement_uncorrected": float(np.mean(raw.argmax(axis=1) == raw_reference.argmax(axis=1))),
        "agreement_operating_point": float(np.mean(decide(proba, decision.mel_threshold)
                                                   == decide(reference, decision.mel_threshold))),
        "max_abs_prob_error": float(np.abs(raw - raw_reference).max()),
        "mean_abs_prob_error": float(np.abs(raw - raw_reference).mean()),
    }


DEFAULT_CANDIDATES = ["", "float=DEPTHWISE_CONV_2D+SOFTMAX", "float=DEPTHWISE_CONV_2D+MEAN+FULLY_CONNECTED+SOFTMAX",
                      "images=2000", "views=flips,images=500"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--decision", type=Path, default=Path("models/decision.json"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="its export section is the baseline")
    parser.add_argument("--candidate", nargs="*", default=DEFAULT_CANDIDATES,
                        help='specs such as "float=DEPTHWISE_CONV_2D+SOFTMAX,images=2000" ("": committed)')
    parser.add_argument("--debug-images", type=int, default=100,
                        help="real training images (not the calibration sample's seed) ranking tensors for worst=K")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="threads for Keras and TFLite while scoring")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N val images (0: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    base = load_params("export", export.ExportParams, args.params)
    candidates = [parse_candidate(spec, base) for spec in args.candidate]  # a bad spec fails before any work

    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    except RuntimeError:  # TensorFlow already ran something in this process (a test): its threads stay
        pass
    decision = load_decision(args.decision)
    model = keras.saving.load_model(args.model)
    size = int(model.input_shape[1])
    real, _, _ = read_images(args.data, "train")
    val_images, val_labels, _ = read_shards(args.data, "val")
    if args.limit:
        val_images, val_labels = val_images[:args.limit], val_labels[:args.limit]
    print(f"model {args.model} ({size} px); {len(real):,} real training images; val {len(val_images):,} "
          f"images; rule: {decision.tta}, prior strength {decision.prior_strength}", flush=True)
    started = time.perf_counter()
    reference = predict_proba(model, val_images, decision.tta, base.batch_size)
    print(f"Keras reference on val: {time.perf_counter() - started:.0f} s", flush=True)
    record: dict = {"val_images": int(len(val_images)), "real_training_images": int(len(real)),
                    "decision": {"tta": decision.tta, "prior_strength": decision.prior_strength,
                                 "mel_threshold": decision.mel_threshold},
                    "baseline": dataclasses.asdict(base), "candidates": {}}
    worst: tuple[str, ...] = ()
    if any(c.worst for c in candidates):
        probe = real[sample_rows(len(real), args.debug_images, base.seed + 1)]
        table = int8_layer_errors(model, size, real[sample_rows(len(real), base.representative_images, base.seed)],
                                  probe)
        worst = tuple(table["tensor_name"])
        record["debugger_worst"] = table.head(15)[["op_name", "tensor_name", "rmse/scale"]].to_dict(orient="records")
    for candidate in candidates:
        started = time.perf_counter()
        calibration = calibration_images(real, candidate, base.seed) if candidate.calibrated else real[:0]
        data = convert(model, size, candidate, calibration, worst)
        seconds = time.perf_counter() - started
        proba = predict_proba(export.TFLiteModel(data, num_threads=args.threads), val_images, decision.tta,
                              base.batch_size)
        row = {**candidate.settings(), **figures(val_labels, reference, proba, decision),
               "size_bytes": len(data),
               "latency_ms": round(export.latency_ms(data, val_images[0], args.latency_runs), 3),
               "convert_s": round(seconds, 1)}
        record["candidates"][candidate.name] = row
        print(f"{candidate.name:60s} agreement {row['agreement']:.4f} (uncorrected {row['agreement_uncorrected']:.4f},"
              f" operating point {row['agreement_operating_point']:.4f})  bal.acc {row['balanced_accuracy']:.4f}  "
              f"{row['size_bytes'] / 1e6:5.2f} MB  {row['latency_ms']:6.2f} ms  (converted in {seconds:.0f} s)",
              flush=True)
        if args.json:  # after every candidate: a long run keeps what it measured
            atomic_write_text(args.json, json.dumps(record, indent=2, default=float) + "\n")
    return record


if __name__ == "__main__":
    main()
