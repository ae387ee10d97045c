"""Train one configuration with several seeds and keep each run's probabilities on val (and test).

    python -m experiments.seeds --seeds 1 2 --out runs/seeds [--set train.epochs=12 ...] [--test]
    python -m experiments.seeds --seeds 1 2 --out runs/seeds --add-test
    (nested keys as dvc exp run -S takes them: --set train.augmentation.rotation_degrees=0)

Why: one validation balanced accuracy has a standard error of about 0.03 and moves by several points
from seed to seed, so configurations are compared on the mean over seeds (docs/experiments.md).
Each seed's model is trained by `stages.train.train` exactly as the pipeline does (same data in
data/augmented, the `train` section of params.yaml with the overrides given), then its class
probabilities on val (and, with `--test`, on test), with and without test-time flips, are written
to `<out>/seed<N>.npz` beside its model, training curves and wall time (`<out>/seed<N>.json`).
Scoring is left to `experiments/score_seeds.py`, so that the decision rule can be changed without
retraining. `--test` is for the committed configuration only: a sweep never computes test.
`--add-test` adds test to seeds trained without it, once their configuration is committed.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import time
from pathlib import Path

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from stages import train  # noqa: E402
from stages.lib.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from stages.lib.inference import VIEWS, predict_proba  # noqa: E402
from stages.lib.params import from_dict, load_params  # noqa: E402
from stages.lib.shards import read_shards  # noqa: E402


def parse_override(text: str) -> tuple[list[str], object]:
    """`train.a.b=value` -> (["a", "b"], value), as `dvc exp run -S` takes it."""
    key, _, value = text.partition("=")
    if not key.startswith("train.") or not value:
        raise argparse.ArgumentTypeError(f"expected train.<key>=<value>, got {text!r}")
    return key.removeprefix("train.").split("."), yaml.safe_load(value)


def train_params(params_path: Path, overrides: list[tuple[list[str], object]], seed: int) -> train.TrainParams:
    """params.yaml's `train` section with the overrides and the seed, checked like the stage's own."""
    section = dataclasses.asdict(load_params("train", train.TrainParams, params_path))
    for path, value in [*overrides, (["seed"], seed)]:
        parent = section
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    return from_dict(train.TrainParams, section, "train")


def split_probabilities(model_path: Path, data_dir: Path, splits) -> dict[str, np.ndarray]:
    """Labels and class probabilities of the saved model on each split, under every test-time view."""
    import keras

    model = keras.saving.load_model(model_path)
    probabilities = {}
    for split in splits:
        images, labels, _ = read_shards(data_dir, split)
        probabilities[f"{split}_labels"] = labels
        for tta in VIEWS:  # every `evaluate.tta` setting, so score_seeds can apply any
            probabilities[f"{split}_{tta}"] = predict_proba(model, images, tta=tta)
    return probabilities


def save_probabilities(npz: Path, probabilities: dict) -> None:
    """Whole or not at all: score_seeds reads every seed*.npz, so a run stopped mid-write must leave none."""
    buffer = io.BytesIO()
    np.savez(buffer, **probabilities)
    atomic_write_bytes(npz, buffer.getvalue())


def add_test(out: Path, seeds: list[int], data_dir: Path) -> None:
    """Add test probabilities to seeds already trained (validation only) from their saved models.

    For the configuration chosen on validation after the sweep: test is read once it is committed.
    """
    for seed in seeds:
        npz = out / f"seed{seed}.npz"
        with np.load(npz) as saved:
            probabilities = dict(saved)
        probabilities.update(split_probabilities(out / f"seed{seed}.keras", data_dir, ("test",)))
        save_probabilities(npz, probabilities)
        logging.info("seed %d: test probabilities added to %s", seed, npz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="train.KEY=VALUE")
    parser.add_argument("--test", action="store_true",
                        help="also keep test probabilities (the committed configuration only)")
    parser.add_argument("--add-test", action="store_true",
                        help="train nothing: add test probabilities to the seeds already in --out, from their "
                             "saved models (once their configuration is committed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.add_test and (args.set or args.test):
        parser.error("--add-test trains nothing: it takes no --set and no --test")
    if args.add_test:
        add_test(args.out, args.seeds, args.data)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        params = train_params(args.params, args.set, seed)
        model_path = args.out / f"seed{seed}.keras"
        started = time.perf_counter()
        summary = train.train(params, args.data, model_path, args.out / f"seed{seed}_live")
        minutes = (time.perf_counter() - started) / 60
        probabilities = split_probabilities(model_path, args.data, ("val", "test") if args.test else ("val",))
        save_probabilities(args.out / f"seed{seed}.npz", probabilities)
        record = {"seed": seed, "params": dataclasses.asdict(params), "train_minutes": round(minutes, 2), **summary}
        atomic_write_json(args.out / f"seed{seed}.json", record)
        logging.info("seed %d: %.1f min, val balanced accuracy %.4f", seed, minutes, summary["val_balanced_accuracy"])


if __name__ == "__main__":
    main()
