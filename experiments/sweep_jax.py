"""Sweep depth, input size and epochs over several seeds on one GPU, with Keras 3 on JAX.

    KERAS_BACKEND=jax python -m experiments.sweep_jax --out runs/sweep --seeds 1 2 3 \
        --config all,128,15 --config all,192,8,augment.target_per_class=750 [--workers 6] [--deadline-min 8]

A config is TRAINABLE_FROM,IMAGE_SIZE,EPOCHS[,augment.KEY=VALUE...]; `--set train.KEY=VALUE` applies
to every run. Data, model, schedule, class weights, weight averaging and scoring are the pipeline's
own (stages.augment.main, stages.train, experiments/score_seeds.py); only the on-line augmentation
is re-written, in keras.ops (`online_augment_layer`: train's ranges and formulas, other random
draws; tests/experiments/test_sweep_jax.py pins that equal draws give train's images). Only
validation is read. Runs go seed by seed, several processes sharing the GPU; none starts that
would end after the deadline. Writes <out>/runs/<config>_seed<N>.{json,npz} and <out>/summary.json.
Why: a 2-core CPU trains one configuration in ~35 min and the lent GPU machine has JAX but no
TensorFlow; compare configurations within one sweep, not with CPU runs (docs/experiments.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from experiments.score_seeds import mean_sd, save_probabilities, score_run
from stages import augment, train
from stages.evaluate import EvaluateParams, real_train_labels
from stages.lib.files import atomic_write_json
from stages.lib.inference import VIEWS, predict_proba
from stages.lib.params import from_dict, load_params
from stages.lib.shards import read_shards
from stages.train import affine_about_centre, contrast_then_brightness

log = logging.getLogger("sweep")


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


@dataclasses.dataclass(frozen=True)
class Config:
    """TRAINABLE_FROM,IMAGE_SIZE,EPOCHS[,augment.KEY=VALUE...]: the augment overrides change the data."""
    trainable_from: str
    image_size: int
    epochs: int
    augment: tuple[tuple[str, object], ...] = ()  # e.g. (("target_per_class", 750),)

    @classmethod
    def parse(cls, text: str) -> Config:
        try:
            depth, size, epochs, *extra = text.split(",")
            config = cls(depth, int(size), int(epochs))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TRAINABLE_FROM,IMAGE_SIZE,EPOCHS[,augment.KEY=VALUE...], got {text!r}") from None
        augment_overrides = []
        for item in extra:
            key, _, value = item.partition("=")
            if not key.startswith("augment.") or key == "augment.image_size" or not value:
                raise argparse.ArgumentTypeError(f"expected augment.KEY=VALUE (not image_size), got {item!r}")
            augment_overrides.append((key.removeprefix("augment."), yaml.safe_load(value)))
        return dataclasses.replace(config, augment=tuple(augment_overrides))

    @property
    def text(self) -> str:
        """The form `parse` reads (how a job is handed to its process)."""
        return ",".join([self.trainable_from, str(self.image_size), str(self.epochs),
                         *(f"augment.{key}={value}" for key, value in self.augment)])

    @property
    def overrides(self) -> str:
        """The augment overrides as a file-name part: `_target_per_class750`, or empty."""
        return "".join(f"_{key}{value}" for key, value in self.augment)

    @property
    def data_name(self) -> str:
        """The folder of the rendered data: one per input size and augment overrides."""
        return f"data-{self.image_size}px{self.overrides}"

    @property
    def name(self) -> str:
        return f"{self.trainable_from}_{self.image_size}px_{self.epochs}ep{self.overrides}"


def online_augment_layer(augmentation: train.Augmentation, seed: int):
    """`train.augment_batch` as a Keras layer (any backend): active in training only."""
    import keras
    from keras import ops

    class OnlineAugment(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(name="online_augment")
            self.seed_generator = keras.random.SeedGenerator(seed)

        def uniform(self, shape, width):
            return keras.random.uniform(shape, -width, width, seed=self.seed_generator)

        def sign(self, batch):
            if not augmentation.flip:
                return ops.ones((batch,))
            return ops.where(keras.random.uniform((batch,), seed=self.seed_generator) < 0.5, -1.0, 1.0)

        def call(self, images, training=False):
            images = ops.cast(images, "float32")  # uint8 batches from the shards
            if not training or not augmentation.active:
                return images
            batch, side = ops.shape(images)[0], images.shape[1]
            angle = self.uniform((batch,), augmentation.rotation_degrees * np.pi / 180)
            zoom = 1 + self.uniform((batch,), augmentation.zoom_fraction)
            shift_x = self.uniform((batch,), augmentation.shift_fraction) * side
            shift_y = self.uniform((batch,), augmentation.shift_fraction) * side
            fx, fy = self.sign(batch), self.sign(batch)
            c = (side - 1) / 2
            zeros = ops.zeros((batch,))
            rows = ops.stack([*affine_about_centre(ops.cos(angle) / zoom, ops.sin(angle) / zoom, fx, fy,
                                                   c, c, shift_x, shift_y, augmentation.photo_aspect),
                              zeros, zeros], axis=1)
            images = ops.image.affine_transform(images, rows, interpolation="bilinear", fill_mode="reflect")
            brightness = 1 + self.uniform((batch, 1, 1, 1), augmentation.brightness)
            contrast = 1 + self.uniform((batch, 1, 1, 1), augmentation.contrast)
            if augmentation.white_balance:
                images = images * (1 + self.uniform((batch, 1, 1, 3), augmentation.white_balance))
            mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
            return ops.clip(contrast_then_brightness(images, mean, contrast, brightness), 0.0, 255.0)

    return OnlineAugment()


def render_data(config: Config, params_path: Path, split_dir: Path, images_dir: Path, out_dir: Path) -> Path:
    """data/augmented for `config` (its size and augment overrides), made by the augment stage itself."""
    data_dir = out_dir / config.data_name
    if (data_dir / "index.json").exists():
        return data_dir
    params = yaml.safe_load(params_path.read_text())
    params["augment"].update({"image_size": config.image_size, **dict(config.augment)})
    sized = out_dir / f"params-{config.data_name}.yaml"
    sized.write_text(yaml.safe_dump(params, sort_keys=False))
    augment.main(split_dir=split_dir, images_dir=images_dir, out_dir=data_dir, params_path=sized)
    return data_dir


def train_run(config: Config, seed: int, data_dir: Path, params_path: Path,
              overrides: list[tuple[list[str], object]], runs_dir: Path) -> None:
    """Train one (config, seed) as `stages.train.train` does, with OnlineAugment; keep val probabilities."""
    import keras

    params = train_params(params_path, [*overrides, (["trainable_from"], config.trainable_from),
                                        (["epochs"], config.epochs)], seed)
    train_images, train_labels, _ = read_shards(data_dir, "train")
    val_images, val_labels, _ = read_shards(data_dir, "val")
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    model = train.build_model(config.image_size, params)
    trainer = keras.Sequential([keras.Input(train_images.shape[1:]),
                                online_augment_layer(params.augmentation, seed), model])
    trainer.compile(optimizer=train.make_optimizer(params, math.ceil(len(train_images) / params.batch_size)),
                    loss="sparse_categorical_crossentropy")
    epoch_times: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_times.append(time.perf_counter()))
    history = trainer.fit(train_images, train_labels, batch_size=params.batch_size, epochs=params.epochs,
                          class_weight=train.class_weights(train_labels, params.class_weight), shuffle=True,
                          callbacks=[train.epoch_callback(val_images, val_labels, params), timer], verbose=0)
    minutes = (time.perf_counter() - started) / 60
    save_probabilities(runs_dir / f"{config.name}_seed{seed}.npz", {
        "val_labels": val_labels, **{f"val_{tta}": predict_proba(model, val_images, tta=tta) for tta in VIEWS}})
    record = {"config": dataclasses.asdict(config), "seed": seed, "params": dataclasses.asdict(params),
              "train_minutes": round(minutes, 2),
              "epoch_seconds": np.diff([started, *epoch_times]).round(1).tolist(),
              "val_balanced_accuracy_per_epoch": [round(v, 4) for v in history.history["val_balanced_accuracy"]],
              "backend": keras.backend.backend(), "device": device_name()}
    atomic_write_json(runs_dir / f"{config.name}_seed{seed}.json", record)


def device_name() -> str:
    try:
        import jax

        return str(jax.devices()[0].device_kind)
    except ImportError:
        return "unknown"


def run_queue(jobs: list[tuple[Config, int]], workers: int, deadline: float, command: list[str],
              runs_dir: Path) -> list[dict]:
    """Run the jobs in order, `workers` processes at a time; none starts that would miss the deadline."""
    pending, running, done = list(jobs), {}, []
    rates: list[float] = []  # seconds per (pixel x epoch) of the finished runs: a cost guess for the next
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / workers:.2f}"}
    while pending or running:
        while pending and len(running) < workers:
            config, seed = pending[0]
            guess = max(rates, default=0.0) * config.image_size ** 2 * config.epochs
            if time.time() + guess > deadline:
                log.info("skipped %s seed %d: expected %.0f s, %.0f s left", config.name, seed, guess,
                         deadline - time.time())
                pending.pop(0)
                done.append({"config": config.name, "seed": seed, "status": "skipped (deadline)"})
                continue
            pending.pop(0)
            log_file = open(runs_dir / f"{config.name}_seed{seed}.log", "w")
            argv = [*command, "--job", config.text, str(seed)]
            running[(config, seed)] = (subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                                       time.time(), log_file)
            log.info("started %s seed %d", config.name, seed)
        time.sleep(2)
        for (config, seed), (proc, started, log_file) in list(running.items()):
            late = time.time() > deadline + 30
            if proc.poll() is None and not late:
                continue
            if late:
                proc.kill()
                proc.wait()
            log_file.close()
            seconds = time.time() - started
            status = "ok" if proc.returncode == 0 else ("killed (deadline)" if late else f"failed ({proc.returncode})")
            if status == "ok":
                rates.append(seconds / (config.image_size ** 2 * config.epochs))
            done.append({"config": config.name, "seed": seed, "status": status, "seconds": round(seconds)})
            log.info("%s seed %d: %s after %.0f s", config.name, seed, status, seconds)
            del running[(config, seed)]
    return done


def summarise(configs: list[Config], data_dirs: dict[str, Path], runs_dir: Path, params_path: Path) -> dict:
    """Per config: each seed's scores (evaluate's rule, chosen on val) and the mean ± sd over seeds."""
    evaluate_params = load_params("evaluate", EvaluateParams, params_path)
    summary = {}
    for config in configs:
        rows = {}
        train_labels = real_train_labels(data_dirs[config.data_name])  # the same for every seed
        for npz in sorted(runs_dir.glob(f"{config.name}_seed*.npz")):
            record = json.loads(npz.with_suffix(".json").read_text())
            row = score_run(npz, evaluate_params, train_labels)
            rows[record["seed"]] = {"val": row["val"], "prior_strength": row["prior_strength"],
                                    "train_minutes": record["train_minutes"]}
        if not rows:
            continue
        entry = {"seeds": sorted(rows), "runs": rows}
        for key in ("balanced_accuracy", "balanced_accuracy_plain", "mel_sensitivity", "macro_auc"):
            entry[f"val_{key}"] = mean_sd([r["val"][key] for r in rows.values()])
        entry["train_minutes_mean"] = round(float(np.mean([r["train_minutes"] for r in rows.values()])), 2)
        summary[config.name] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Config.parse, action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=6, help="runs at a time on the GPU")
    parser.add_argument("--deadline-min", type=float, default=8.0, help="no run starts that would end later")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--split-dir", type=Path, default=Path("data/split"))
    parser.add_argument("--images-dir", type=Path, default=Path("data/raw/images"))
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="train.KEY=VALUE")
    parser.add_argument("--job", nargs=2, metavar=("CONFIG", "SEED"), help=argparse.SUPPRESS)  # one run, internal
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    runs_dir = args.out / "runs"

    if args.job:
        config = Config.parse(args.job[0])
        train_run(config, int(args.job[1]), args.out / config.data_name, args.params, args.set, runs_dir)
        return

    if not args.config:
        parser.error("give at least one --config")
    deadline = time.time() + args.deadline_min * 60
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_dirs = {config.data_name: render_data(config, args.params, args.split_dir, args.images_dir, args.out)
                 for config in args.config}
    command = [sys.executable, __file__, "--out", str(args.out), "--params", str(args.params),
               *[f"--set=train.{'.'.join(path)}={json.dumps(value)}" for path, value in args.set]]
    # seed by seed: if the deadline stops the queue, every config still has its first seeds
    jobs = [(config, seed) for seed in args.seeds for config in args.config]
    done = run_queue(jobs, args.workers, deadline, command, runs_dir)
    summary = {"jobs": done, "configs": summarise(args.config, data_dirs, runs_dir, args.params)}
    atomic_write_json(args.out / "summary.json", summary)
    for name, entry in summary["configs"].items():
        ba, plain = entry["val_balanced_accuracy"], entry["val_balanced_accuracy_plain"]
        log.info("%-24s seeds %s: val BA (flips + prior) %.4f ± %s, plain %.4f, %.1f min/run", name, entry["seeds"],
                 ba["mean"], ba["sd"], plain["mean"], entry["train_minutes_mean"])


if __name__ == "__main__":
    main()
