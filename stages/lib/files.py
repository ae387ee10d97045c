"""Files between stages: atomic writes, and the readers of JSON and CSV files earlier stages wrote.

A stage's output either is the previous complete one or the new complete one, never a
half-written mix, whatever kills the process. A missing or broken input is a StageError naming
the file and the stage that makes it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.lib.cli import StageError

# The columns of our CSVs that hold codes, read as strings (an image_id is not a number).
STRING_COLUMNS = {"image_id": str, "lesion_id": str, "lesion_group": str, "dx": str}


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
