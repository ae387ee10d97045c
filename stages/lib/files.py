"""Files between stages: atomic writes, and the readers of JSON and CSV files earlier stages wrote.

An output file or folder is built beside its path under a temporary name and renamed onto it
once complete, so no output is ever half-written, whatever ends the process (SIGKILL included).
Run directly (`python -m stages.<name>`), a failed or killed run leaves the previous output in
place (a kill in the instant between the two renames that publish a folder leaves none). Under
`dvc repro` there is nothing to keep: DVC deletes a stage's outputs before it runs it, so a
failed stage leaves its outputs absent. A run deletes the temporary folders that killed runs
left beside its output, never those of a run still alive. A missing or broken input is a
StageError naming the file and the stage that makes it. Faults and their tests: docs/faults.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.lib.cli import StageError

log = logging.getLogger("stages.lib.files")

# The columns of our CSVs that hold codes, read as strings (an image_id is not a number).
STRING_COLUMNS = {"image_id": str, "lesion_id": str, "lesion_group": str, "dx": str}


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[tuple[int, str]]:
    """(fd, name) of a new file beside `path`, renamed onto `path` if the block succeeds, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, run by another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_dead_runs_folders(path: Path) -> None:
    """Delete every `.<name>.run<pid>.<anything>.tmp` beside `path` whose process is dead: what a
    killed run left (its half-built folder, or the previous output it had moved aside)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.run(\d+)\..+\.tmp$")
    for entry in path.parent.iterdir():
        found = pattern.match(entry.name)
        if found and not _alive(int(found.group(1))):
            _remove(entry)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    The folder is `.<name>.run<pid>.<random>.tmp`. Once the block succeeds, the previous `path` is
    renamed aside (`.<name>.run<pid>.old.tmp`), the new folder renamed onto `path`, and the previous
    one deleted. On any error (or Ctrl-C) the temporary folder is deleted and `path` is left as it
    was. Folders of killed runs are deleted by the next run, those of live runs never.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_runs_folders(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.run{os.getpid()}.", suffix=".tmp", dir=path.parent))
    previous = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes folders owner-only; outputs are ordinary folders
        if os.path.lexists(path):
            previous = path.parent / f".{path.name}.run{os.getpid()}.old.tmp"
            os.rename(path, previous)
        os.rename(tmp, path)
    except BaseException:
        if previous is not None and not os.path.lexists(path):
            os.rename(previous, path)  # the new folder did not go in: the previous one goes back
            previous = None
        _remove(tmp)
        raise
    if previous is not None:
        _remove(previous)


def _remedy(made_by: str | None) -> str:
    return f"run: dvc repro {made_by}" if made_by else "run the stage that makes it: dvc repro"


def read_json(path: Path, made_by: str | None = None) -> Any:
    """A JSON file an earlier stage wrote (`made_by`, named in the error when it is missing).

    A missing, unreadable or malformed file is a StageError naming the file and the fix.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found ({_remedy(made_by)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not valid JSON ({err}; {_remedy(made_by)})") from None


def read_table(path: Path, required: tuple[str, ...] = ()):
    """Read a CSV written by an earlier stage; a missing file or column is a clear error."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=STRING_COLUMNS)
    except FileNotFoundError:
        raise StageError(f"{path}: not found ({_remedy(None)})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def write_table(path: Path, table) -> None:
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))


_KERAS_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold (reproducible-builds usage)


def _numbered_shared_objects(node, numbers: dict) -> None:
    """Replace each `shared_object_id` in a Keras config (the object's address in the saving process)
    by its rank of first appearance: objects shared stay shared, and the numbers are the same each save."""
    if isinstance(node, dict):
        if "shared_object_id" in node:
            node["shared_object_id"] = numbers.setdefault(node["shared_object_id"], len(numbers))
        for value in node.values():
            _numbered_shared_objects(value, numbers)
    elif isinstance(node, list):
        for value in node:
            _numbered_shared_objects(value, numbers)


def _deterministic_keras_zip(data: bytes) -> bytes:
    """The .keras file `data` with nothing that depends on when, where or by which process it was saved.

    Keras writes the save time in metadata.json (`date_saved`, kept as a key since Keras's file
    editor reads it: set to _KERAS_ZIP_TIME), object addresses in config.json (numbered instead),
    and the time and mode 600 in each zip entry. Every entry gets _KERAS_ZIP_TIME and mode 644, in
    name order (Keras lists assets in the order the filesystem gives), its compression unchanged
    (the HDF5 weights inside hold no times: h5py does not track them unless asked).
    """
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for entry in sorted(source.infolist(), key=lambda e: e.filename):
            content = source.read(entry)
            if entry.filename == "metadata.json":
                metadata = json.loads(content)
                metadata["date_saved"] = "{:04d}-{:02d}-{:02d}@{:02d}:{:02d}:{:02d}".format(*_KERAS_ZIP_TIME)
                content = json.dumps(metadata).encode()
            elif entry.filename == "config.json":
                config = json.loads(content)
                _numbered_shared_objects(config, {})
                content = json.dumps(config).encode()
            info = zipfile.ZipInfo(entry.filename, date_time=_KERAS_ZIP_TIME)
            info.compress_type = entry.compress_type
            info.create_system = 3  # Unix, whatever system saved it: the mode below is a Unix mode
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r-- (Keras writes no folder entries)
            target.writestr(info, content)
    return out.getvalue()


def atomic_save_model(model, path: Path) -> None:
    """`model.save(path)` (a Keras model, a .keras file), atomically like atomic_write_bytes, and
    deterministic: the same model (weights, optimizer state, config) gives the same bytes. (Keras
    writes the weights in memory unless free memory is under twice their size; its other way,
    through a temporary file, lays the HDF5 file out otherwise: fixed too, but other bytes.)"""
    with replacing(path, suffix=".keras") as (fd, tmp):  # Keras wants the .keras suffix
        os.close(fd)
        model.save(tmp)
        data = _deterministic_keras_zip(Path(tmp).read_bytes())
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
