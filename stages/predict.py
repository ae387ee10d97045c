"""Command `predict`: the most probable classes and the decision for each JPEG or PNG image file.

    python -m stages.predict [--model models/model.keras] [--decision models/decision.json] [--json] IMAGE...

Input: image files, the model and the decision rule evaluate stored beside it; output: a table,
or with --json one JSON list, on stdout; nothing is written. Each file goes through
`images.open_rgb` (JPEG and PNG only) and `resize_square` at the model's input size, as in
training, then the stored rule (stages/lib/inference.py). Invariant: a bad file (missing, a
folder, another format, truncated, too large) gets its own error, an odd name is escaped (table:
control characters; both: bytes that are not UTF-8), and the other images' results are always
printed. `stages.serve` answers through this same code (one result per upload).
Exit status: 0 all images predicted, 1 some image failed, 2 usage error (bad arguments, model or
decision file: one line on stderr saying what to run). Cases and tests: docs/faults.md.
"""
from __future__ import annotations

import configparser
import json
import os
import sys
import unicodedata
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib import inference
from stages.lib.cli import StageError, command_parser
from stages.lib.dataset import CLASS_NAMES, CLASSES
from stages.lib.images import ImageError, open_rgb, resize_square
from stages.lib.inference import PLAIN, Decision, Predictor

DEFAULT_MODEL = Path("models/model.keras")
BATCH_SIZE = 32  # images decoded and predicted together (one predict_on_batch call): bounded memory
FORMATS = ("JPEG", "PNG")  # Pillow's names of the only formats accepted (what the help promises)
SMALL_FRACTION = 0.5  # an image side below this fraction of the model's input side gets a warning
MAX_MESSAGE = 300  # characters of a loader's own error kept in the one-line usage error
UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")  # Unicode categories escaped in the table
NOTICE = ("Research tool, not a medical device: its output must not be used for diagnosis "
          "or to decide on treatment. See a dermatologist about any lesion that worries you. "
          "Probabilities are calibrated to HAM10000's mix of diseases, not to how common each is where you are.")
EXIT_STATUS = ("exit status: 0 all images predicted; 1 some image failed (the others' results are still "
               "printed); 2 usage error (bad arguments, model or decision file)")


class UsageError(Exception):
    """A problem with how the command was called (e.g. no model): exit status 2."""


def display_name(name: str) -> str:
    """`name` as valid Unicode text: bytes of a file name that are not UTF-8 (Python keeps them as
    lone surrogates) become `\\xNN`, so JSON and terminals can carry it."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escape it as is
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` safe on a terminal: display_name's escaping, then control and format characters
    (ESC, CR, a bidi override...) as `\\x1b`, `\\r`, `\\u202e`, so a name cannot move the cursor or
    restyle the output."""
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in UNPRINTABLE else ch
                   for ch in display_name(text))


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """A loader's message on one printable line, cut to `limit` characters."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


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


def size_warnings(width: int, height: int, size: int) -> list[str]:
    """A warning when a side is under SMALL_FRACTION of the model's input side: enlarging it
    invents no detail, and the model was trained on 600x450 images."""
    if min(width, height) >= SMALL_FRACTION * size:
        return []
    return [f"{width}x{height} pixels is far below the model's input size ({size}x{size}): "
            "the image is enlarged, and the result is less reliable"]


def read_image(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """One file as model input (`open_rgb` restricted to FORMATS, then `resize_square`, the same
    preprocessing as training) and its warnings; ImageError for a file that is not usable."""
    img = open_rgb(path, formats=FORMATS)
    return resize_square(img, size), size_warnings(img.width, img.height, size)


def predict_files(model, paths: Sequence[str], decision: Decision | None = None,
                  batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One result per path, in order: {"image", "warnings"} and Predictor.describe's keys ("top",
    "probabilities", "decision", "in_distribution", ...), or {"image", "error"}.

    "image" is the path as display_name gives it. Without a `decision` (tests, raw use) the
    model's plain probabilities are ranked ("top", "probabilities") and no `decision` is given.
    """
    input_size(model)  # a model that does not take square RGB images is a usage error
    return describe_files(Predictor(model, decision or PLAIN, batch_size), paths, batch_size,
                          keys=None if decision is not None else ("top", "probabilities"))


def describe_files(predictor: Predictor, paths: Sequence[str], batch_size: int = BATCH_SIZE,
                   keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """predict_files with a Predictor made once (`serve` answers every upload with its own);
    `keys`: which of Predictor.describe's keys each result keeps (None: all)."""
    size = predictor.image_size
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = [(str(p), {"image": display_name(str(p))}) for p in paths[start:start + batch_size]]
        decoded, pixels = [], []
        for path, result in chunk:
            try:
                image, result_warnings = read_image(Path(path), size)
            except ImageError as err:
                result["error"] = str(err).removeprefix(f"{path}: ")
                continue
            pixels.append(image)
            decoded.append((result, result_warnings))
        if pixels:
            for (result, result_warnings), shown in zip(decoded, predictor.describe(np.stack(pixels))):
                result.update(shown if keys is None else {k: shown[k] for k in keys})
                result["warnings"] = result_warnings
        results.extend(result for _, result in chunk)
    return results


def decision_text(result: dict[str, Any]) -> str:
    """The table's decision cell: the class, and the melanoma score (p(mel) before calibration)
    against the operating point's threshold."""
    said = result.get("decision", "")
    if "mel_probability" in result and "mel_threshold" in result and result.get("in_distribution", True):
        p, threshold = result["mel_probability"], result["mel_threshold"]
        said += f" (mel score {p:.1%} {'>=' if p >= threshold else '<'} threshold {threshold:.1%})"
    return said


def all_warnings(result: dict[str, Any]) -> list[str]:
    """The result's warnings, the out-of-distribution one first."""
    found = list(result.get("warnings", []))
    if result.get("in_distribution") is False:
        found.insert(0, f"not a lesion this model can judge: out-of-distribution score {result['ood_score']:,.1f} "
                        "(unlike the dermoscopy images it was trained on); its classes mean nothing here")
    return found


def format_table(results: list[dict[str, Any]]) -> str:
    """A table for people: per image its classes, decision and warnings, then the notice.

    Every name and message goes through `printable`: a file name cannot restyle the terminal.
    """
    names = [printable(r["image"]) for r in results]
    width = max([len("image")] + [len(n) for n in names])
    name_width = max(len(n) for n in CLASS_NAMES.values())
    lines = [f"{'image':<{width}}  #  {'dx':<5}  {'name':<{name_width}}  probability  decision"]
    for name, result in zip(names, results):
        if "error" in result:
            lines.append(f"{name:<{width}}  error: {printable(result['error'])}")
            continue
        for rank, cls in enumerate(result["top"], 1):
            image = name if rank == 1 else ""
            said = decision_text(result) if rank == 1 else ""
            lines.append(f"{image:<{width}}  {rank}  {cls['dx']:<5}  {cls['name']:<{name_width}}  "
                         f"{cls['probability']:>11.1%}  {said}".rstrip())
        lines += [f"{'':<{width}}  warning: {printable(text)}" for text in all_warnings(result)]
    failed = sum("error" in r for r in results)
    lines += ["", f"{len(results)} image(s), {failed} failed.", NOTICE]
    return "\n".join(lines) + "\n"


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
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"model {printable(str(path))} is a directory, not a model file")
    if not path.is_file():
        raise UsageError(f"model not found: {printable(str(path))} ({how_to_get(path, 'train')})")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"model {printable(str(path))} is not a Keras model file (a .keras file is a zip archive) "
                         f"({how_to_get(path, 'train', broken=True)})")
    keras = import_keras()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the error below says it all, on one line
            model = keras.saving.load_model(path)
    except Exception as err:  # a corrupt or foreign file: any loader error means the same to the user
        raise UsageError(f"cannot load model {printable(str(path))}: {one_line(err)} "
                         f"({how_to_get(path, 'train', broken=True)})") from None
    outputs = tuple(getattr(model, "output_shape", ()) or ())
    if outputs[-1:] != (len(CLASSES),):
        raise UsageError(f"model {printable(str(path))} gives outputs {outputs}, not the {len(CLASSES)} "
                         f"classes ({how_to_get(path, 'train', broken=True)})")
    input_size(model)
    try:
        inference.feature_model(model)  # the out-of-distribution check reads the pooled features
    except StageError as err:
        raise UsageError(f"model {printable(str(path))}: {one_line(err)} ({how_to_get(path, 'train', broken=True)})"
                         ) from None
    return model


def load_decision(path: Path) -> Decision:
    """The decision rule stored by evaluate, or a one-line UsageError that says what to run."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"decision file {printable(str(path))} is a directory, not a JSON file")
    try:
        return inference.load_decision(path)
    except (StageError, OSError) as err:
        hint = f"; or fetch it: dvc pull --force {printable(str(path))}" if dvc_remote_configured() else ""
        raise UsageError(one_line(err) + hint) from None


def parse_args(argv: Sequence[str] | None):
    parser = command_parser(
        main, exit_status=EXIT_STATUS,
        description="Print the 3 most probable HAM10000 classes (dx code, name, probability) and the decision "
                    f"for each {' or '.join(FORMATS)} image. " + NOTICE)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help=f"{' or '.join(FORMATS)} files (other formats are refused), any size or mode; "
                             f"a side under {SMALL_FRACTION * 100:.0f}%% of the model's input side gets a warning")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"Keras model (default: {DEFAULT_MODEL})")
    parser.add_argument("--decision", type=Path, default=None,
                        help="decision rule chosen on validation by evaluate (default: decision.json beside the model)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list on stdout (the notice goes to stderr)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the terminal
    for stream in (sys.stdout, sys.stderr):  # an unencodable character is escaped, never fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
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
