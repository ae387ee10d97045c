"""Prediction for people: the trained model and its rule loaded once, then images in, answers out.

`load(model_path, decision_path)` gives an inference.Predictor, or a UsageError of one line naming
the file, the problem and what to run (`dvc repro <stage>`, or `dvc pull` where a DVC remote is
configured). `decode` turns a JPEG or PNG file, or its bytes in memory, into model input as
training did (`images.open_rgb`, then `resize_square`) with its warnings; `describe_batches`
answers paths batch by batch (memory bounded by one batch), `describe_bytes` one upload. Each
item may carry patient metadata (a metadata.Metadata, or the error string of a bad CSV row).
Each answer is {"image", "warnings"} plus Predictor.describe's keys, or {"image", "error"}: a bad
image or a bad metadata row never stops the others. The commands `predict` and `serve` are front ends to this module.
TensorFlow is imported only inside `load`, its import-time logs kept off stderr.
Cases and tests: docs/faults.md ("predict and serve").
"""
from __future__ import annotations

import configparser
import itertools
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.cli import StageError
from stages.lib.dataset import CLASSES
from stages.lib.images import ImageError, open_rgb, resize_square
from stages.lib.inference import Predictor, feature_model, load_decision
from stages.lib.metadata import NONE, Metadata
from stages.lib.text import display_name, one_line, printable

DEFAULT_MODEL = Path("models/model.keras")
BATCH_SIZE = 32  # images decoded and predicted together: memory is bounded by one batch
FORMATS = ("JPEG", "PNG")  # Pillow's names of the only formats accepted (what the help promises)
SMALL_FRACTION = 0.5  # an image side below this fraction of the model's input side gets a warning
NOTICE = ("Research tool, not a medical device: its output must not be used for diagnosis "
          "or to decide on treatment. See a dermatologist about any lesion that worries you. "
          "Probabilities are calibrated to HAM10000's mix of diseases, not to how common each is where you are.")


class UsageError(Exception):
    """A problem with how a command was called (no model, a broken decision file): exit status 2."""


def dvc_remote_configured(start: Path | None = None) -> bool:
    """Whether the DVC project around `start` (default: the working folder) names a remote in
    .dvc/config or .dvc/config.local (a `remote "name"` section or core.remote)."""
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / ".dvc").is_dir():
            config = configparser.ConfigParser(strict=False, interpolation=None)
            try:
                config.read([candidate / ".dvc" / "config", candidate / ".dvc" / "config.local"], encoding="utf-8")
            except (configparser.Error, UnicodeDecodeError):
                return False
            return any(section.strip("'\" ").startswith("remote ") for section in config.sections()) or (
                config.has_option("core", "remote"))
    return False


def how_to_get(path: Path, stage: str, broken: bool = False) -> str:
    """What to run to get `path` back: `dvc pull` where a DVC remote is configured, else `dvc repro`."""
    repro = f"re-create it with `dvc repro {stage}`"
    if dvc_remote_configured():
        return f"fetch it with `dvc pull{' --force' if broken else ''} {printable(str(path))}`, or {repro}"
    return repro


def input_size(model) -> int:
    """The square side the model was trained at, read from its input shape (None, s, s, 3)."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[1] is None or shape[3] != 3:
        raise UsageError(f"model input shape {shape} is not (None, size, size, 3)")
    return int(shape[1])


def import_keras():
    """Keras, imported with file descriptor 2 sent to /dev/null meanwhile: TensorFlow 2.21 logs
    there at import whatever TF_CPP_MIN_LOG_LEVEL says, and stderr must hold only our own lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        import keras

        return keras
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return keras


def load_model(path: Path):
    """The trained Keras model, checked to map (size, size, 3) images to the 7 classes through
    the layers Predictor reads, or a one-line UsageError that says what to run."""
    path, shown = Path(path), printable(str(path))
    if path.is_dir():
        raise UsageError(f"model {shown} is a directory, not a model file")
    if not path.is_file():
        raise UsageError(f"model not found: {shown} ({how_to_get(path, 'train')})")
    fix = how_to_get(path, "train", broken=True)
    if not zipfile.is_zipfile(path):
        raise UsageError(f"model {shown} is not a Keras model file (a .keras file is a zip archive) ({fix})")
    keras = import_keras()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the error below says it all, on one line
            model = keras.saving.load_model(path)
    except Exception as err:  # a corrupt or foreign file: any loader error means the same to the user
        raise UsageError(f"cannot load model {shown}: {one_line(err)} ({fix})") from None
    outputs = tuple(getattr(model, "output_shape", ()) or ())
    if outputs[-1:] != (len(CLASSES),):
        raise UsageError(f"model {shown} gives outputs {outputs}, not the {len(CLASSES)} classes ({fix})")
    input_size(model)
    try:
        feature_model(model)  # the out-of-distribution check reads the pooled features
    except StageError as err:
        raise UsageError(f"model {shown}: {one_line(err)} ({fix})") from None
    return model


def load(model_path: Path = DEFAULT_MODEL, decision_path: Path | None = None) -> Predictor:
    """The model and the decision rule evaluate stored for it (default: decision.json beside the
    model, read by inference.load_decision), ready to answer; a one-line UsageError otherwise."""
    model = load_model(model_path)
    path = Path(decision_path or Path(model_path).parent / "decision.json")
    if path.is_dir():
        raise UsageError(f"decision file {printable(str(path))} is a directory, not a JSON file")
    try:
        decision = load_decision(path)
    except (StageError, OSError) as err:
        hint = f"; or fetch it: dvc pull --force {printable(str(path))}" if dvc_remote_configured() else ""
        raise UsageError(one_line(err) + hint) from None
    return Predictor(model, decision, BATCH_SIZE)


@dataclass(frozen=True)
class Decoded:
    """One image as the model takes it, with what is said about it."""

    pixels: np.ndarray    # (size, size, 3) uint8: the whole image resized, as in training
    width: int            # the upright image's own size
    height: int
    warnings: list[str]


def decode(source: Path | bytes, size: int, name: str = "image") -> Decoded:
    """A JPEG or PNG file, or such a file's bytes (called `name` in errors), as model input at
    `size`: decoded once; ImageError for anything that is not a usable image."""
    img = open_rgb(source, formats=FORMATS, name=name)
    said = []
    if min(img.width, img.height) < SMALL_FRACTION * size:  # enlarging invents no detail
        said.append(f"{img.width}x{img.height} pixels is far below the model's input size ({size}x{size}): "
                    "the image is enlarged, and the result is less reliable")
    return Decoded(resize_square(img, size), img.width, img.height, said)


@dataclass(frozen=True)
class Refused:
    """An input that holds no image to predict (an empty folder), with the reason."""

    name: str
    reason: str


Given = Metadata | str | None  # what is known of an item's patient: a Metadata, a bad row's error, or nothing


def describe(predictor: Predictor, items: list[tuple[str, Path | bytes | Refused]], given: list[Given] | None = None
             ) -> list[tuple[dict[str, Any], Decoded | None]]:
    """(answer, decoded image or None) for each (name, source), in order, predicted together, each
    with its `given` metadata (None: none; a string: that item's error, its image left unread)."""
    given = list(given) if given is not None else [None] * len(items)
    answers: list[tuple[dict[str, Any], Decoded | None]] = []
    for (name, source), known in zip(items, given, strict=True):
        answer: dict[str, Any] = {"image": display_name(name)}
        image = None
        if isinstance(source, Refused):
            answer["error"] = source.reason
        elif isinstance(known, str):
            answer["error"] = known
        else:
            try:
                image = decode(source, predictor.image_size, name)
            except ImageError as err:
                answer["error"] = err.reason
        answers.append((answer, image))
    decoded = [(answer, image, known) for (answer, image), known in zip(answers, given) if image is not None]
    if decoded:
        pixels = np.stack([image.pixels for _, image, _ in decoded])
        rows = [known or NONE for _, _, known in decoded]
        shown = predictor.describe(pixels, rows) if any(row.known for row in rows) else predictor.describe(pixels)
        for (answer, image, _), said in zip(decoded, shown):
            answer.update(said, warnings=image.warnings)
    return answers


def describe_batches(predictor: Predictor, paths: Iterable[str | Path | Refused], batch_size: int = BATCH_SIZE,
                     metadata: Callable[[str], Given] | None = None) -> Iterator[list[dict[str, Any]]]:
    """The answers for `paths` (read lazily), one list per batch as soon as it is predicted;
    `metadata(path)` says what is known of each path's patient (default: nothing)."""
    paths = iter(paths)
    while chunk := list(itertools.islice(paths, batch_size)):
        items = [(p.name, p) if isinstance(p, Refused) else (str(p), Path(p)) for p in chunk]
        given = [None if metadata is None or isinstance(p, Refused) else metadata(str(p)) for p in chunk]
        yield [answer for answer, _ in describe(predictor, items, given)]


def describe_bytes(predictor: Predictor, data: bytes, name: str, given: Given = None
                   ) -> tuple[dict[str, Any], Decoded | None]:
    """The answer for an image file's bytes, decoded once in memory (nothing is written), with the
    patient metadata `given`, and the decoded image (None when it was refused) for whatever else
    is drawn from it."""
    [(answer, image)] = describe(predictor, [(name, data)], [given])
    return answer, image
