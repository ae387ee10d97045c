"""Batch prediction at archive scale: which files to read, and JSON lines that a killed run resumes.

`image_paths` yields the inputs lazily, in a stable order: the arguments, then each line of the
list file (one path per line, relative to the working folder; blank lines skipped). A path that
is a folder is walked recursively (sorted; hidden files and folders skipped) for names ending in
.jpg, .jpeg or .png, any case: chosen by extension, so a folder is listed without opening its
files (a misnamed file gets its own error when decoded); any other path is taken as a file.
`open_output` starts a JSON-lines file, or with `resume` reads which images it already answers
and cuts off a last line that lacks its newline (a run killed mid-write), to be written again;
`write_lines` writes each batch's answers, one JSON object per line, flushed per batch.
`metadata_source` says what is known of each image's patient: the same flags for every image, or
a CSV with HAM10000's columns whose `image_id` is matched to each file's stem (no row: nothing).
Memory: one folder's listing, one batch, and when resuming the names already answered.
Cases and tests: docs/faults.md ("predict and serve").
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from stages.lib import metadata
from stages.lib.cli import StageError
from stages.lib.prediction import Given, Refused, UsageError
from stages.lib.text import display_name, one_line, printable

SUFFIXES = (".jpg", ".jpeg", ".png")  # what a folder is searched for (any case)


def image_paths(arguments: Sequence[str], list_file: Path | None = None) -> Iterator[str | Refused]:
    """The files to predict: `arguments`, then `list_file`'s lines, folders walked. The list is
    opened here, so that a missing one is a UsageError before anything is predicted."""
    try:
        listed = None if list_file is None else open(list_file, "rb")  # closed by _paths, once read
    except OSError as err:
        raise UsageError(f"list file {printable(str(list_file))}: cannot read ({err.strerror})") from None
    return _paths(arguments, listed)


def _paths(arguments: Sequence[str], listed: IO[bytes] | None) -> Iterator[str | Refused]:
    for path in itertools.chain(arguments, _lines(listed)):
        yield from (_walk(path) if os.path.isdir(path) else [path])


def _lines(listed: IO[bytes] | None) -> Iterator[str]:
    """The paths a list file names, read as they are needed, then the file is closed."""
    if listed is None:
        return
    with listed:
        for line in listed:  # bytes: a name that is not UTF-8 is kept as the shell would pass it
            path = os.fsdecode(line.rstrip(b"\r\n"))
            if path:
                yield path


def _walk(folder: str) -> Iterator[str | Refused]:
    """The images under `folder`, sorted; a Refused for a folder that cannot be listed, or that
    holds none."""
    errors: list[OSError] = []
    found = False
    for root, folders, files in os.walk(folder, onerror=errors.append):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                found = True
                yield os.path.join(root, name)
    for err in errors:
        yield Refused(str(err.filename), f"cannot list this folder ({err.strerror})")
    if not found and not errors:
        yield Refused(folder, f"no {', '.join(SUFFIXES)} file in this folder or below it")


def open_output(path: Path, resume: bool) -> tuple[IO[str], set[str]]:
    """`path` opened to append JSON lines, and the "image" of every line it already holds (none
    unless `resume`). Without `resume` an existing file is refused, never overwritten."""
    path = Path(path)
    shown = printable(str(path))
    done: set[str] = set()
    try:
        if not resume:
            return open(path, "x", encoding="utf-8"), done
        with open(path, "a+b") as existing:
            existing.seek(0)
            kept = 0
            for number, line in enumerate(existing, 1):
                if not line.endswith(b"\n"):
                    break  # cut off mid-write: dropped here, written again
                try:
                    answer = json.loads(line)
                    done.add(answer["image"])
                except (ValueError, TypeError, KeyError):
                    raise UsageError(f"{shown}: line {number} is not one of predict's JSON lines "
                                     "(an object with an \"image\"): not resuming into it") from None
                kept += len(line)
            existing.truncate(kept)
        return open(path, "a", encoding="utf-8"), done
    except FileExistsError:
        raise UsageError(f"{shown} exists: add --resume to continue it, or choose another file") from None
    except OSError as err:
        raise UsageError(f"{shown}: cannot write ({err.strerror})") from None


def pending(paths: Iterable[str | Refused], done: set[str]) -> Iterator[str | Refused]:
    """`paths` without those whose answer is in `done` (by the name the answer shows)."""
    return (p for p in paths if display_name(p.name if isinstance(p, Refused) else str(p)) not in done)


def write_lines(batches: Iterable[list[dict[str, Any]]], out: IO[str]) -> tuple[int, int]:
    """Each batch's answers as JSON lines (ASCII), flushed when the batch is done: (written, failed)."""
    written = failed = 0
    for batch in batches:
        out.write("".join(json.dumps(answer) + "\n" for answer in batch))
        out.flush()
        written += len(batch)
        failed += sum("error" in answer for answer in batch)
    return written, failed


def metadata_source(age: str | None = None, sex: str | None = None, site: str | None = None,
                    csv: Path | None = None) -> Callable[[str], Given] | None:
    """What is known of the patient of each image path: None when nothing is given; the flags'
    Metadata for every image; or the row of `csv` whose image_id is the file's stem
    (ISIC_0024306.jpg -> ISIC_0024306), metadata.NONE where there is none, a bad row's error
    string. A bad flag, an unusable CSV or both ways at once: a one-line UsageError."""
    flags = {"--age": ("age", age), "--sex": ("sex", sex), "--site": ("localization", site)}
    given = [flag for flag, (_, value) in flags.items() if value is not None]
    if csv is not None:
        if given:
            raise UsageError(f"give the metadata as --metadata FILE.csv or as --age/--sex/--site, not both "
                             f"(got --metadata and {', '.join(given)})")
        try:
            rows = metadata.read_csv(csv)
        except StageError as err:
            raise UsageError(one_line(err)) from None
        return lambda path: rows.get(Path(path).stem, metadata.NONE)
    if not given:
        return None
    for flag in given:  # each alone, so that the error names the flag
        field, value = flags[flag]
        try:
            metadata.parse(**{field: value})
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
    known = metadata.parse(age, sex, site)
    return lambda path: known
