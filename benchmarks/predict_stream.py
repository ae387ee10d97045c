"""Batch prediction at archive scale: images per second and peak memory of `predict --jsonl`.

    python -m benchmarks.predict_stream [--counts 1000 10000] [--model FILE] [--side 64] [--out FILE]

For each count N it writes N small JPEGs (`--side` pixels, seeded) into a temporary folder, runs
`python -m stages.predict --jsonl --output FILE FOLDER` as a child process, checks that FILE holds
N lines, and records the wall time, N per second, and the child's peak resident memory (ru_maxrss
from wait4). The marginal rate between the smallest and the largest count leaves start-up out.
Without --model: a tiny model in the project's architecture (tests/tiny_model.py, untrained)
with test-time flips and an out-of-distribution detector, as the real rule has; with --model,
that file and the decision.json beside it.
Invariant: peak memory does not grow with N (bounded by one batch): `peak_rss_ratio` is the
largest count's peak over the smallest's. Run it alone: other work inflates every figure.
Results: benchmarks/predict_stream.json (tiny model), predict_stream_mobilenet.json (real size).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.lib.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` JPEGs of side x side: a smooth colour gradient plus seeded noise, 100 per subfolder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side)
    base = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 128.0)], -1)
    for k in range(count):
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{k // 100:04d}" / f"image_{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, "JPEG", quality=90)


def tiny_model_file(folder: Path) -> Path:
    """tests/tiny_model.py's model saved to `folder`, with a decision rule as evaluate writes one:
    flips, and a detector over the model's own feature width."""
    from stages.lib.dataset import CLASSES
    from stages.lib.inference import Decision
    from stages.lib.ood import FEATURE_LAYER, OodDetector
    from tests.tiny_model import tiny_model

    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    model = tiny_model(images)
    model.save(folder / "model.keras")
    width = int(model.get_layer(FEATURE_LAYER).output.shape[-1])
    detector = OodDetector(threshold=1e9, keep=0.95, means=np.zeros((len(CLASSES), width)), precision=np.eye(width))
    Decision("flips", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85, ood=detector).save(folder / "decision.json")
    return folder / "model.keras"


def run_predict(model: Path, folder: Path, output: Path) -> tuple[float, int]:
    """(wall seconds, peak resident KiB) of one `predict --jsonl` child process."""
    log = output.with_suffix(".stderr")
    started = time.perf_counter()
    with log.open("wb") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "stages.predict", "--jsonl", "--model", str(model),
                                  "--output", str(output), str(folder)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    if child.returncode != 0:
        raise SystemExit(f"predict exited {child.returncode}: {log.read_text(errors='replace')}")
    return wall, usage.ru_maxrss  # Linux: KiB


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(counts: list[int], side: int, model: Path | None) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="predict-stream-") as scratch:
        scratch = Path(scratch)
        model = model or tiny_model_file(scratch)
        for count in counts:
            folder, output = scratch / f"images_{count}", scratch / f"answers_{count}.jsonl"
            write_images(folder, count, side)
            wall, peak = run_predict(model, folder, output)
            lines = sum(1 for _ in output.open("rb"))
            if lines != count:
                raise SystemExit(f"{output}: {lines} lines for {count} images")
            runs.append({"images": count, "wall_s": round(wall, 2), "images_per_s": round(count / wall, 1),
                         "peak_rss_mib": round(peak / 1024, 1)})
    first, last = runs[0], runs[-1]
    extra = last["wall_s"] - first["wall_s"]
    marginal = (last["images"] - first["images"]) / extra if extra > 0 else None
    return {"image_side": side, "runs": runs,
            "peak_rss_ratio": round(last["peak_rss_mib"] / first["peak_rss_mib"], 3),
            "marginal_images_per_s": None if marginal is None else round(marginal, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000], help="images per run, ascending")
    parser.add_argument("--side", type=int, default=64, help="pixels per side of each generated JPEG")
    parser.add_argument("--model", type=Path, help="a Keras model with decision.json beside it (default: tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/predict_stream.json"))
    args = parser.parse_args(argv)
    result = measure(sorted(args.counts), args.side, args.model)
    result["model"] = str(args.model) if args.model else "tests/tiny_model.py (alpha 0.25, 32 px, untrained)"
    result["machine"] = {"cpu": cpu_name(), "cpus": os.cpu_count()}
    atomic_write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
