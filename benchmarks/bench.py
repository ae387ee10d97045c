"""Speed and scale on this machine: the input pipeline, the data stages, inference.

    python -m benchmarks.bench [--mirror FOLDER_OR_URL] [--train-images 768] [--predict-images 256] ...

Prints one table and writes the same figures to benchmarks/results.json (a few minutes; run it
alone). It never touches the project's data/, models/ or metrics/: `dvc repro augment` runs in a
temporary copy of the tracked files, fed by a HAM10000 mirror (a folder or URL holding the
release's files), and the training and inference figures use that copy's shards and images.
Input pipeline efficiency = images/s of `stages.train.training_dataset` feeding the real model in
`model.fit`, over images/s of the model fed one batch already in memory; "before" is a naive
pipeline that decodes the JPEGs every epoch. Images/s = batch size / median step time.
Invariant: pipelines are timed in short alternating rounds in one process, each fit's first batch
excluded, so a busier moment of a shared machine hits all of them alike.
Why: the goals (efficiency >= 0.95, data stages < 60 s, no-op repro < 3 s) are measured, not
assumed. Results and goals: docs/scaling.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stages import train  # noqa: E402
from stages.evaluate import EvaluateParams  # noqa: E402
from stages.lib.files import atomic_write_json, read_table  # noqa: E402
from stages.lib.images import image_file, load_image  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.progress import usable_cpus  # noqa: E402
from stages.lib.shards import read_index, read_shards  # noqa: E402

VENV_BIN = Path(sys.executable).parent
DVC = VENV_BIN / "dvc"
MIRROR_ENV = "HAM10000_MIRROR"  # as stage download reads it; here a base URL or a folder to serve
MIRROR_BESIDE_REPO = ROOT.parent / "shared" / "ham10000-mirror"  # the usual place, if it is there
OFFICIAL_SIZE = (600, 450)  # HAM10000's own images; the mirror holds them at 200x150
GOALS = {"pipeline_efficiency": 0.95, "data_stages_s": 60.0, "noop_repro_s": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=768,
                        help="timed training images per pipeline (after warm-up) (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="alternating rounds the training images are spread over (default %(default)s)")
    parser.add_argument("--warmup-batches", type=int, default=1,
                        help="untimed batches at the start of each fit call (default %(default)s)")
    parser.add_argument("--predict-images", type=int, default=256,
                        help="images for batch prediction, timed 3 times (default %(default)s)")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed single-image predictions (median reported) (default %(default)s)")
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or None,
                        help=f"the HAM10000 mirror: a folder (served on loopback) or an http(s) base URL "
                             f"(default: ${MIRROR_ENV}, else ../shared/ham10000-mirror beside the repository)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks") / "results.json",
                        help="JSON file written with the figures, relative to the repository (default %(default)s)")
    args = parser.parse_args(argv)
    if args.mirror is None:
        if not MIRROR_BESIDE_REPO.is_dir():
            parser.error(f"no mirror: pass --mirror or set {MIRROR_ENV} "
                         f"(nothing at ../shared/ham10000-mirror beside the repository)")
        args.mirror = str(MIRROR_BESIDE_REPO)
    return args


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """What the figures depend on: CPU, cores this process may use, RAM, library versions."""
    import keras
    import tensorflow as tf

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    dvc_version = subprocess.run([str(DVC), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": model,
        "cores": usable_cpus(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "dvc": dvc_version,
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }


# --------------------------------------------------------------------------------------------
# Data stages: `dvc repro augment` from scratch in a copy of the repo, then a no-op re-run.
# --------------------------------------------------------------------------------------------
def copy_tracked_files(dest: Path) -> None:
    """The working-tree version of every tracked file: what a fresh clone (plus local edits) has."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would drown the table
        pass


def serve(folder: Path) -> ThreadingHTTPServer:
    """A static HTTP server on a free loopback port (port 0: the kernel picks; no race)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def timed_repro(repo: Path, env: dict, target: str) -> tuple[float, dict[str, float]]:
    """Run `dvc repro <target>`; total wall seconds, and seconds per stage that ran.

    A stage's time runs from DVC's "Running stage" line to the next one (or the end), so DVC's
    own work between commands (caching outputs, checking the next stage's deps) counts too.
    """
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    lines = []
    with subprocess.Popen([str(DVC), "repro", target], cwd=repo, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter()))
    ended = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {target} failed:\n{''.join(lines[-40:])}")
    ends = [t for _, t in marks[1:]] + [ended]
    return ended - started, {name: end - start for (name, start), end in zip(marks, ends)}


def bench_data_stages(repo: Path, mirror: str) -> dict:
    """Download, dedupe, split and augment from scratch on the mirror, then a no-op repro.

    `mirror` is a base URL used as it is, or a folder served on loopback.
    """
    server = None if mirror.startswith(("http://", "https://")) else serve(Path(mirror))
    url = mirror if server is None else f"http://127.0.0.1:{server.server_address[1]}/"
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           MIRROR_ENV: url, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    try:
        total, stages = timed_repro(repo, env, "augment")
        noop, ran = timed_repro(repo, env, "augment")
    finally:
        if server is not None:
            server.shutdown()
    if ran:
        raise RuntimeError(f"the second `dvc repro augment` re-ran {sorted(ran)}: not a no-op")
    return {"stages_s": stages, "total_s": total, "noop_repro_s": noop}


# --------------------------------------------------------------------------------------------
# Training input pipeline: the real one, one batch in memory, and the naive "before".
# --------------------------------------------------------------------------------------------
def model_params(repo: Path) -> tuple[train.TrainParams, str]:
    """train's params from params.yaml; ImageNet weights only if already cached (same speed)."""
    params = load_params("train", train.TrainParams, repo / "params.yaml")
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    cached = (keras_home / "models" / "mobilenet_1_0_224_tf_no_top.h5").is_file()
    weights = "imagenet" if cached and params.alpha == 1.0 else "none"
    return dataclasses.replace(params, weights=weights), weights


def compiled_model(params: train.TrainParams, image_size: int):
    """The model exactly as stage train builds and compiles it (seeded, op determinism on)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    model = train.build_model(image_size, params)
    model.compile(optimizer=train.make_optimizer(params), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def naive_dataset(paths: list[str], labels: np.ndarray, size: int, batch_size: int, seed: int):
    """The "before": every JPEG read, decoded and resized on every epoch, in a parallel map."""
    import tensorflow as tf

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, (size, size)), label

    return (
        tf.data.Dataset.from_tensor_slices((paths, labels))
        .shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def official_size_copies(paths: list[str], folder: Path, count: int) -> list[str]:
    """The first `count` images upscaled to the official release's 600x450, as JPEG quality 90.

    The mirror's JPEGs are 200x150; decoding costs about in proportion to pixels, so these stand
    in for the real files (smooth upscales decode a little faster: a lower bound on the cost).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths[:count]:
        copy = folder / Path(path).name
        with Image.open(path) as img:
            img.convert("RGB").resize(OFFICIAL_SIZE, Image.BILINEAR).save(copy, quality=90)
        copies.append(str(copy))
    return copies


def batch_clock():
    """A callback noting the time each training batch ends (reading the loss waits for the step)."""
    import keras

    class BatchClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.ends.append(time.perf_counter())

    return BatchClock()


def fit_step_seconds(model, dataset, steps: int, warmup: int, class_weight) -> list[float]:
    """Wall seconds of each of `steps` fit steps after `warmup` untimed ones (one fit call)."""
    clock = batch_clock()
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, class_weight=class_weight,
              callbacks=[clock], shuffle=False, verbose=0)  # datasets shuffle themselves
    return list(np.diff(clock.ends[warmup - 1:]))


def pipeline_alone(dataset, batches: int) -> float:
    """Images/s a pipeline delivers with no model attached: its headroom on this machine."""
    it = iter(dataset)
    next(it)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(it)[0])
    return images / (time.perf_counter() - started)


def bench_input_pipeline(repo: Path, args: argparse.Namespace) -> dict:
    """Images/s of fit on: train's pipeline, one in-memory batch, and the naive JPEG pipelines."""
    import tensorflow as tf

    data = repo / "data" / "augmented"
    image_size = read_index(data)["image_size"]
    params, weights = model_params(repo)
    images, labels, _ = read_shards(data, "train")
    split = read_table(repo / "data" / "split" / "train.csv", required=("image_id", "label"))
    paths = [str(image_file(repo / "data" / "raw" / "images", i)) for i in split["image_id"]]
    split_labels = split["label"].to_numpy()
    batch = params.batch_size
    steps = max(1, math.ceil(args.train_images / (batch * args.rounds)))
    large = official_size_copies(paths, repo / "official-size", (steps + args.warmup_batches) * batch)
    class_weight = train.class_weights(labels, params.class_weight)

    model = compiled_model(params, image_size)
    first = (tf.cast(images[:batch], tf.float32), tf.constant(labels[:batch]))
    datasets = {  # repeat(): a run may outlast one pass; it adds nothing per batch
        "train_pipeline": train.training_dataset(images, labels, batch, params.seed, params.augmentation).repeat(),
        "in_memory": tf.data.Dataset.from_tensors(first).repeat(),
        "naive_jpeg": naive_dataset(paths, split_labels, image_size, batch, params.seed).repeat(),
        "naive_jpeg_600x450": naive_dataset(large, split_labels[:len(large)], image_size, batch,
                                            params.seed).repeat(),
    }
    step_seconds: dict[str, list[float]] = {name: [] for name in datasets}
    for _ in range(args.rounds):
        for name, dataset in datasets.items():
            step_seconds[name] += fit_step_seconds(model, dataset, steps, args.warmup_batches,
                                                   class_weight)
    timed_images = steps * batch * args.rounds
    rate = {name: batch / statistics.median(s) for name, s in step_seconds.items()}
    alone_batches = max(10, steps * args.rounds)
    return {
        "weights": weights,
        "image_size": image_size,
        "alpha": params.alpha,
        "batch_size": batch,
        "trainable_from": params.trainable_from,
        "timed_images_each": timed_images,
        "images_per_s": rate,
        "step_seconds": step_seconds,
        "efficiency": rate["train_pipeline"] / rate["in_memory"],
        "before_efficiency": rate["naive_jpeg"] / rate["in_memory"],
        "before_efficiency_600x450": rate["naive_jpeg_600x450"] / rate["in_memory"],
        "pipeline_alone_images_per_s": {name: pipeline_alone(datasets[name], alone_batches)
                                        for name in ("train_pipeline", "naive_jpeg", "naive_jpeg_600x450")},
    }


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def bench_inference(repo: Path, args: argparse.Namespace) -> dict:
    """Batch prediction as evaluate does it, and one image from file to probabilities."""
    data = repo / "data" / "augmented"
    image_size = read_index(data)["image_size"]
    params, _ = model_params(repo)
    model = compiled_model(params, image_size)
    eval_batch = load_params("evaluate", EvaluateParams, repo / "params.yaml").batch_size

    images, _, ids = read_shards(data, "val")
    n = max(eval_batch, args.predict_images // eval_batch * eval_batch)
    pixels = np.resize(images, (n, *images.shape[1:])).astype(np.float32)  # cycles val if short
    predict_ms = median_ms(lambda: model.predict(pixels, batch_size=eval_batch, verbose=0),
                           runs=3, warmup=1)
    batch_rate = n / (predict_ms / 1000)

    path = image_file(repo / "data" / "raw" / "images", ids[0])
    calls = {  # one compiled step; predict's per-call set-up; Keras's eager layer-by-layer call
        "predict_on_batch": model.predict_on_batch,
        "predict": lambda x: model.predict(x, verbose=0),
        "eager_call": lambda x: model(x, training=False).numpy(),
    }
    one_image = {name: median_ms(lambda call=call: call(load_image(path, image_size)[None].astype(np.float32)),
                                 args.latency_runs)
                 for name, call in calls.items()}
    return {
        "batch_size": eval_batch,
        "images": n,
        "batch_images_per_s": batch_rate,
        "one_image_ms": one_image,
        "load_image_ms": median_ms(lambda: load_image(path, image_size), args.latency_runs),
        "one_image_runs": args.latency_runs,
    }


def median_ms(work, runs: int, warmup: int = 3) -> float:
    """Median wall milliseconds of `work()` over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def goal_row(what: str, value: float, text: str, goal: float, higher_is_better: bool,
             unit: str = "") -> list[str]:
    met = value >= goal if higher_is_better else value < goal
    sign = ">=" if higher_is_better else "<"
    return [what, text, f"{sign} {goal:g}{unit}", "yes" if met else "NO"]


def table_rows(pipe: dict, stages: dict, infer: dict) -> list[list[str]]:
    """Measure, figure, goal, met: the one table, in the order the issue asks."""
    rate, alone = pipe["images_per_s"], pipe["pipeline_alone_images_per_s"]
    one, runs = infer["one_image_ms"], infer["one_image_runs"]
    rows = [
        ["fit on train's pipeline (training_dataset)", f"{rate['train_pipeline']:.1f} images/s", "", ""],
        ["fit on one batch already in memory", f"{rate['in_memory']:.1f} images/s", "", ""],
        goal_row("input pipeline efficiency (after)", pipe["efficiency"], f"{pipe['efficiency']:.3f}",
                 GOALS["pipeline_efficiency"], True),
        ["fit on naive JPEG decode + resize per epoch", f"{rate['naive_jpeg']:.1f} images/s", "", ""],
        ["input pipeline efficiency (before: naive)", f"{pipe['before_efficiency']:.3f}", "", ""],
        ["fit on naive pipeline, JPEGs at official 600x450", f"{rate['naive_jpeg_600x450']:.1f} images/s", "", ""],
        ["input pipeline efficiency (before, 600x450)", f"{pipe['before_efficiency_600x450']:.3f}", "", ""],
        ["train's pipeline alone, no model", f"{alone['train_pipeline']:.0f} images/s", "", ""],
        ["naive JPEG pipeline alone, no model", f"{alone['naive_jpeg']:.0f} images/s", "", ""],
        ["naive pipeline at 600x450 alone, no model", f"{alone['naive_jpeg_600x450']:.0f} images/s", "", ""],
    ]
    rows += [[f"stage {name} (in dvc repro augment)", f"{s:.1f} s", "", ""]
             for name, s in stages["stages_s"].items()]
    rows += [
        goal_row("data stages from scratch: dvc repro augment", stages["total_s"],
                 f"{stages['total_s']:.1f} s", GOALS["data_stages_s"], False, " s"),
        goal_row("no-op dvc repro augment right after", stages["noop_repro_s"],
                 f"{stages['noop_repro_s']:.2f} s", GOALS["noop_repro_s"], False, " s"),
        [f"batch prediction (model.predict, batch {infer['batch_size']})",
         f"{infer['batch_images_per_s']:.1f} images/s", "", ""],
        [f"one image file -> probabilities: load_image + predict_on_batch (median of {runs})",
         f"{one['predict_on_batch']:.1f} ms", "", ""],
        ["  same with model.predict(x) instead", f"{one['predict']:.1f} ms", "", ""],
        ["  same with an eager call model(x) instead", f"{one['eager_call']:.1f} ms", "", ""],
        ["  of which load_image (decode + resize)", f"{infer['load_image_ms']:.1f} ms", "", ""],
    ]
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    header = ["measure", "result", "goal", "met"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines)


def machine_line(m: dict, pipe: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['gpus']} GPU(s); "
            f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, DVC {m['dvc']}; "
            f"{m['date_utc']} UTC.\nModel: MobileNet V1 alpha {pipe['alpha']} at {pipe['image_size']} px, "
            f"trainable from {pipe['trainable_from']}, batch {pipe['batch_size']}, weights "
            f"{pipe['weights']}; {pipe['timed_images_each']} timed training images per pipeline.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="ham10000-bench-") as tmp:
        repo = Path(tmp)
        copy_tracked_files(repo)
        stages = bench_data_stages(repo, args.mirror)
        pipe = bench_input_pipeline(repo, args)
        infer = bench_inference(repo, args)
    rows = table_rows(pipe, stages, infer)
    print(machine_line(machine, pipe))
    print(markdown_table(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("mirror", "output")}  # no machine paths
    report = {"machine": machine, "settings": settings, "input_pipeline": pipe,
              "data_stages": stages, "inference": infer, "goals": GOALS, "table": rows}
    output = ROOT / args.output
    atomic_write_json(output, report)  # makes the folder too
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
