"""What several stages share: the class mapping, typed params, atomic writes, image decoding.

Everything here is small on purpose. A stage module imports from this one and never from another
stage, so each stage can be read (and tested) on its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar, Union

import numpy as np
import yaml

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Classes. Codes are alphabetical by `dx`, as in the ISIC 2018 task 3 ground truth. Every stage,
# every file and the model's output order use this one tuple.
# --------------------------------------------------------------------------------------------
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratoses",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesion",
}
LABELS: dict[str, int] = {dx: code for code, dx in enumerate(CLASSES)}
MELANOMA = LABELS["mel"]
PARAMS_FILE = Path("params.yaml")


def class_mapping() -> list[dict[str, Any]]:
    """The mapping as written out for people and other tools (`classes.json`)."""
    return [{"label": LABELS[dx], "dx": dx, "name": CLASS_NAMES[dx]} for dx in CLASSES]


class StageError(Exception):
    """An error the user can fix: the message names the file or key and the problem."""


class ParamError(StageError):
    """A value in params.yaml is missing, unknown or of the wrong type."""


# --------------------------------------------------------------------------------------------
# Typed params: each stage describes its section as a dataclass; values are checked before any
# long work starts, and errors name the key (`train.epochs must be an int, got 'two'`).
# --------------------------------------------------------------------------------------------
T = TypeVar("T")


def _check(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, key)
            except ParamError as err:
                errors.append(str(err))
        raise ParamError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ParamError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key} must be a mapping, got {value!r}")
        return {k: _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ParamError(f"{key} must be a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ParamError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: Any, section: str) -> T:
    """Build dataclass `cls` from a params mapping; unknown and missing keys are errors."""
    if not isinstance(data, dict):
        raise ParamError(f"{section} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamError(f"unknown key {section}.{unknown[0]} (known keys: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _check(data[name], hints[name], f"{section}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamError(f"missing key {section}.{name}")
    try:
        return cls(**values)
    except ParamError:
        raise
    except ValueError as err:  # a __post_init__ check
        raise ParamError(f"{section}: {err}") from None


def load_params(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Read one section of params.yaml as a checked dataclass."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ParamError(f"{path}: file not found (run from the project's root)") from None
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML: {err}") from None
    if section not in data:
        raise ParamError(f"{path}: missing section '{section}'")
    return from_dict(cls, data[section], section)


# --------------------------------------------------------------------------------------------
# Atomic outputs: a stage's output either is the previous complete one or the new complete one,
# never a half-written mix, whatever kills the process.
# --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` in one rename.

    The previous `path` is removed only after the new one is complete. On any error (or Ctrl-C)
    the temporary folder is deleted and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes folders owner-only; outputs are ordinary folders
    old = path.parent / f".{path.name}.old.tmp"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Images: decoded and resized by one function, used by augment (training data) and predict, so
# the model always sees the same preprocessing.
# --------------------------------------------------------------------------------------------
class ImageError(StageError):
    """A file that is not a usable image; the message names the file and why."""


MAX_IMAGE_PIXELS = 50_000_000  # HAM10000 originals are 600x450; far beyond this is a bomb.


def open_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode `path` fully into an RGB PIL image, or raise ImageError saying what is wrong.

    Greyscale, CMYK, palette and RGBA images are converted to RGB (the documented rule); empty,
    truncated, non-image and oversized files are errors.
    """
    from PIL import Image

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})") from None
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageError(
                        f"{path}: {img.width}x{img.height} pixels is over the limit of "
                        f"{max_pixels:,} (possible decompression bomb)"
                    )
                img.load()  # raises on truncated data
                return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from None


def resize_square(img, size: int) -> np.ndarray:
    """Resize the whole field of view to `size` x `size` RGB uint8 (no crop: lesions can be wide)."""
    from PIL import Image

    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """File to model input: decoded, RGB, resized. The only path from a file to the model."""
    return resize_square(open_rgb(path), size)


# --------------------------------------------------------------------------------------------
# Running a stage.
# --------------------------------------------------------------------------------------------
def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(): user errors print one clear line and exit 1, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # disk full, permissions...: the outputs are still the previous ones
        print(f"error: {err} (outputs left as they were before this run)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: outputs left as they were before this run", file=sys.stderr)
        sys.exit(130)


# --------------------------------------------------------------------------------------------
# File contracts between stages.
# --------------------------------------------------------------------------------------------
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "lesion_group", "dx", "label")


def read_table(path: Path, required: tuple[str, ...] = ()):
    """Read a CSV written by an earlier stage; a missing file or column is a clear error."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "lesion_group": str, "dx": str})
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the stage that makes it: dvc repro)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def write_table(path: Path, table) -> None:
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:03d}.npz"


def write_shards(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 image_ids: np.ndarray, shard_images: int) -> list[str]:
    """Write one split as a few uncompressed .npz shards (images uint8 NHWC, labels, image_ids)."""
    names = []
    for k, start in enumerate(range(0, max(len(images), 1), shard_images)):
        name = shard_name(split, k)
        stop = start + shard_images
        with open(Path(folder) / name, "wb") as f:
            np.savez(f, images=images[start:stop], labels=labels[start:stop],
                     image_ids=np.asarray(image_ids[start:stop], dtype=str))
        names.append(name)
    return names


def read_shards(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one split written by augment: (images uint8 NHWC, labels int64, image_ids str)."""
    folder = Path(folder)
    index = read_index(folder)
    if split not in index["splits"]:
        raise StageError(f"{folder / 'index.json'}: no split '{split}'")
    parts = []
    for name in index["splits"][split]["shards"]:
        path = folder / name
        try:
            with np.load(path, allow_pickle=False) as z:
                parts.append((z["images"], z["labels"].astype(np.int64), z["image_ids"]))
        except (OSError, ValueError, KeyError) as err:
            raise StageError(f"{path}: unreadable shard ({err}); re-run: dvc repro augment") from None
    images, labels, ids = (np.concatenate(p) for p in zip(*parts))
    size = index["image_size"]
    if images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise StageError(f"{folder}: {split} images are {images.shape[1:]} {images.dtype}, "
                         f"index.json says ({size}, {size}, 3) uint8")
    return images, labels, ids


def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "index.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run: dvc repro augment)") from None
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err})") from None
