"""Train's checkpoint: the state after the last finished epoch, so that a stopped train resumes there.

The folder (models/train_checkpoint/, `persist: true` in dvc.yaml: `dvc repro` leaves it where it
deletes the stage's other outputs) is replaced whole at the end of each epoch (files.atomic_dir:
a kill leaves the previous epoch's). It holds state.npz (named lists of arrays: the model's and
the optimizer's variables, the weight average), state.json (the epochs done, the fingerprint)
and live/ (DVCLive's folder as it was then). A run uses it only if the fingerprint is its own:
the params, the training data and the code of stages/; any change starts over. A finished run
leaves README.txt alone in it. Faults and the tests that prove them: docs/faults.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.lib.files import atomic_dir

log = logging.getLogger("stages.lib.checkpoint")

CODE_DIR = Path(__file__).resolve().parents[1]  # stages/
README = ("train's checkpoint (docs/faults.md): while train runs, the state after its last finished epoch,\n"
          "from which a stopped run resumes; a finished run leaves only this file.\n")


@dataclass(frozen=True)
class Checkpoint:
    epochs_done: int
    arrays: dict[str, list[np.ndarray]]
    live_dir: Path  # DVCLive's folder after `epochs_done` epochs, inside the checkpoint


def fingerprint(params: dict, data: Iterable[np.ndarray]) -> str:
    """sha256 of `params` (as JSON), of each data array (dtype, shape, bytes) and of stages/*.py."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for array in data:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    for path in sorted(CODE_DIR.rglob("*.py")):
        digest.update(path.relative_to(CODE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the folder is swapped in: a power loss leaves a whole one


def save(folder: Path, fingerprint: str, epochs_done: int, arrays: dict[str, list[np.ndarray]],
         live_dir: Path) -> None:
    """Replace `folder` with the state after `epochs_done` epochs and a copy of `live_dir`."""
    with atomic_dir(folder) as tmp:
        named = {f"{group}_{i}": a for group, values in arrays.items() for i, a in enumerate(values)}
        _write(tmp / "state.npz", lambda f: np.savez(f, **named))
        state = {"epochs_done": epochs_done, "fingerprint": fingerprint,
                 "arrays": {group: len(values) for group, values in arrays.items()}}
        _write(tmp / "state.json", lambda f: f.write(json.dumps(state, indent=2).encode()))
        shutil.copytree(live_dir, tmp / "live")


def load(folder: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint in `folder` if it was made with `fingerprint`, else None (saying why)."""
    folder = Path(folder)
    if not (folder / "state.json").exists():
        return None
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if state["fingerprint"] != fingerprint:
            log.info("%s: made with other params, data or code: training starts over", folder)
            return None
        with np.load(folder / "state.npz") as npz:
            arrays = {group: [npz[f"{group}_{i}"] for i in range(n)] for group, n in state["arrays"].items()}
        if not (folder / "live").is_dir():
            raise FileNotFoundError(folder / "live")
        return Checkpoint(int(state["epochs_done"]), arrays, folder / "live")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        log.warning("%s: unreadable checkpoint (%s): training starts over", folder, err)
        return None


def finish(folder: Path) -> None:
    """Leave README.txt alone in `folder`: the run finished, nothing to resume."""
    with atomic_dir(folder) as tmp:
        (tmp / "README.txt").write_text(README, encoding="utf-8")
