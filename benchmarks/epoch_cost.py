"""Cost of a training epoch by trainable depth and input size, and what a frozen-feature cache would save.

    python -m benchmarks.epoch_cost [--sizes 128 160 192] [--depths conv_dw_11 conv_dw_6 all] [--out FILE]
        [--batch-sizes 16 32 64] [--batchnorm frozen trained] [--policy mixed_bfloat16]

For each (depth, size, batch size, BatchNorm mode) it times `train_on_batch` after warm-up and the
forward pass of the frozen layers alone; an epoch is the steps that 11,542 training rows take.
`cache_speedup` = step / (step - frozen forward): the most a cache of the frozen layers' outputs
could save (with BatchNorm frozen and no dropout in them they are a fixed function of the input;
on-line augmentation changes that input every epoch, so less). `--policy mixed_bfloat16` times
bfloat16 compute (the pipeline itself trains in float32).
Invariant: only timing; nothing of the project's data/, models/ or metrics/ is written.
Why: the recipe must fit 45 minutes on 2 CPU cores, so its cost is measured, not guessed.
Run it alone (other work inflates every figure). Results: docs/experiments.md ("Cost of an epoch").
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from stages import train
from stages.lib.files import atomic_write_json
from stages.lib.params import load_params

TRAIN_ROWS = 11_542  # training rows per epoch (the mirror, augment defaults)


def timed(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: graph tracing, allocation
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def measure(params: train.TrainParams, size: int, repeats: int) -> dict:
    import keras

    model = train.build_model(size, params)
    model.compile(optimizer=train.make_optimizer(params), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (params.batch_size, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 7, params.batch_size)
    step = timed(lambda: model.train_on_batch(x, y), repeats)
    def learns(layer) -> bool:
        return bool(layer.weights) and not isinstance(layer, keras.layers.BatchNormalization)

    frozen = [layer for layer in model.layers if learns(layer) and not layer.trainable]
    frozen_forward = 0.0
    if frozen:
        first_trainable = next(i for i, layer in enumerate(model.layers) if learns(layer) and layer.trainable)
        # The flat model re-applies MobileNet's layers, so each has two graph nodes; ours is the last.
        last_frozen = model.layers[first_trainable - 1]._inbound_nodes[-1].output_tensors[0]
        body = keras.Model(model.inputs, last_frozen)
        frozen_forward = timed(lambda: body.predict_on_batch(x), repeats)
    steps_per_epoch = -(-TRAIN_ROWS // params.batch_size)
    return {"trainable_from": params.trainable_from, "image_size": size, "batch_size": params.batch_size,
            "freeze_batchnorm": params.freeze_batchnorm, "policy": keras.config.dtype_policy().name,
            "step_s": round(step, 4), "image_ms": round(1000 * step / params.batch_size, 2),
            "epoch_min": round(step * steps_per_epoch / 60, 2), "frozen_forward_s": round(frozen_forward, 4),
            "cache_speedup": round(step / max(step - frozen_forward, 1e-9), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192])
    parser.add_argument("--depths", nargs="+", default=["conv_dw_11", "conv_dw_6", "all"])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/epoch_cost.json"))
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: params.yaml's train.batch_size")
    parser.add_argument("--batchnorm", nargs="+", choices=["frozen", "trained"],
                        help="default: params.yaml's train.freeze_batchnorm")
    args = parser.parse_args()
    import keras

    keras.config.set_dtype_policy(args.policy)
    base = load_params("train", train.TrainParams, args.params)
    batch_sizes = args.batch_sizes or [base.batch_size]
    frozen_modes = [mode == "frozen" for mode in args.batchnorm] if args.batchnorm else [base.freeze_batchnorm]
    rows = []
    for depth, size, batch_size, frozen in itertools.product(args.depths, args.sizes, batch_sizes, frozen_modes):
        params = dataclasses.replace(base, trainable_from=depth, batch_size=batch_size, freeze_batchnorm=frozen)
        rows.append(measure(params, size, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(args.out, {"train_rows": TRAIN_ROWS, "rows": rows})


if __name__ == "__main__":
    main()
