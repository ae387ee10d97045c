"""Command `predict`: the three most probable classes for each image file, from the trained model.

    python -m stages.predict [--model models/model.keras] [--decision models/decision.json] [--json] IMAGE...

Images go through `images.load_image` at the model's own input size, the one path from a file to
the model that augment (and so train and evaluate) used too. The model is loaded once and the
images that decode are predicted in batches; a file that fails (missing, empty, truncated, not an
image, too large) gets its own error and the others still run.

Probabilities and the answer go through the rule `evaluate` chose on validation and stored in
models/decision.json (stages/lib/inference.py): test-time flips, the class-prior correction, and the
melanoma operating point. Each result's `decision` is `mel` when p(mel) reaches the stored threshold
(chosen for a high melanoma sensitivity), else the most probable class. The probabilities reflect
the class-balanced prior the model was trained with, not how common each disease is: a 30% `mel`
does not mean 30% of such lesions are melanomas.

Exit status: 0 all images predicted, 1 some image failed, 2 usage error (bad arguments, no model).
This is not a pipeline stage: it writes nothing, and its only output is stdout (and stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.cli import StageError
from stages.lib.dataset import CLASS_NAMES, CLASSES
from stages.lib.images import ImageError, load_image
from stages.lib.inference import Decision, corrected, decide, predict_proba

DEFAULT_MODEL = Path("models/model.keras")
TOP = 3
BATCH_SIZE = 32  # images decoded and predicted together (one predict_on_batch call): bounded memory
NOTICE = ("Research tool, not a medical device: its output must not be used for diagnosis "
          "or to decide on treatment. See a dermatologist about any lesion that worries you. "
          "Probabilities reflect a class-balanced training prior, not how common each disease is.")


class UsageError(Exception):
    """A problem with how the command was called (e.g. no model): exit status 2."""


def top_k(proba: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one image, most probable first (ties: class-code order).

    Probabilities are rounded to 4 decimals: more digits would be false precision.
    """
    order = np.argsort(-np.asarray(proba), kind="stable")[:k]
    return [{"dx": CLASSES[c], "name": CLASS_NAMES[CLASSES[c]], "probability": round(float(proba[c]), 4)}
            for c in order]


def input_size(model) -> int:
    """The square side the model was trained at, read from its input shape (None, s, s, 3)."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[1] is None or shape[3] != 3:
        raise UsageError(f"model input shape {shape} is not (None, size, size, 3)")
    return int(shape[1])


def predict_files(model, paths: Sequence[str], decision: Decision | None = None,
                  batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One result per path, in order: {"image", "top", "decision"} or {"image", "error"} for a bad file.

    Without a `decision` (tests, raw use) the model's plain probabilities are ranked and no
    `decision` is given.
    """
    size = input_size(model)
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = [{"image": str(p)} for p in paths[start:start + batch_size]]
        decoded, pixels = [], []
        for result in chunk:
            try:
                pixels.append(load_image(Path(result["image"]), size))
                decoded.append(result)
            except ImageError as err:
                result["error"] = str(err).removeprefix(f"{result['image']}: ")
        if pixels:
            batch = np.stack(pixels)
            proba = predict_proba(model, batch, decision.tta if decision else "none", batch_size)
            if decision is not None:
                proba = corrected(proba, decision.class_bias)
            decided = None if decision is None else decide(proba, decision.mel_threshold)
            for n, (result, p) in enumerate(zip(decoded, proba)):
                result["top"] = top_k(p, TOP)
                if decided is not None:
                    result["decision"] = CLASSES[decided[n]]
        results.extend(chunk)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """A table for people: the image's path on its first row, then its classes, then the notice."""
    width = max([len("image")] + [len(r["image"]) for r in results])
    name_width = max(len(n) for n in CLASS_NAMES.values())
    lines = [f"{'image':<{width}}  #  {'dx':<5}  {'name':<{name_width}}  probability  decision"]
    for result in results:
        if "error" in result:
            lines.append(f"{result['image']:<{width}}  error: {result['error']}")
            continue
        for rank, cls in enumerate(result["top"], 1):
            image = result["image"] if rank == 1 else ""
            said = result.get("decision", "") if rank == 1 else ""
            lines.append(f"{image:<{width}}  {rank}  {cls['dx']:<5}  {cls['name']:<{name_width}}  "
                         f"{cls['probability']:>11.1%}  {said}".rstrip())
    failed = sum("error" in r for r in results)
    lines += ["", f"{len(results)} image(s), {failed} failed.", NOTICE]
    return "\n".join(lines) + "\n"


def load_model(path: Path):
    """The trained Keras model, or a UsageError that says how to get it."""
    if not path.is_file():
        raise UsageError(f"model not found: {path} (train it with `dvc repro`, or fetch it with `dvc pull`)")
    import keras

    try:
        return keras.saving.load_model(path)
    except Exception as err:  # a corrupt or foreign file: any loader error means the same to the user
        raise UsageError(f"cannot load model {path}: {err} (re-create it with `dvc repro` or `dvc pull`)") from None


def load_decision(path: Path) -> Decision:
    """The decision rule stored by evaluate, or a UsageError that says how to get it."""
    try:
        return Decision.load(path)
    except StageError as err:
        raise UsageError(str(err)) from None


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m stages.predict",
        description="Print the 3 most probable HAM10000 classes (dx code, name, probability) for each "
                    "JPEG or PNG image. " + NOTICE,
        epilog="Exit status: 0 all images predicted, 1 some image failed, 2 usage error.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files, any size or mode")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"Keras model (default: {DEFAULT_MODEL})")
    parser.add_argument("--decision", type=Path, default=None,
                        help="decision rule chosen on validation by evaluate (default: decision.json beside the model)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list on stdout (the notice goes to stderr)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the terminal
    try:
        model = load_model(args.model)
        decision = load_decision(args.decision or args.model.parent / "decision.json")
        results = predict_files(model, args.images, decision)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        print(NOTICE, file=sys.stderr)
    else:
        print(format_table(results), end="")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
