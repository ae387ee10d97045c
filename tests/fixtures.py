"""Tiny synthetic HAM10000-like data for tests: metadata, JPEGs, the release zips, params.yaml.

Everything is seeded, so a test sees the same bytes on every run. Images are small smooth random
patterns (8x6 random colours blended over the image): different per image, and like photos in
that re-encoding them changes pixels only a little.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from stages.lib.dataset import CLASSES

METADATA_FILE = "HAM10000_metadata.csv"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
RELEASE_ZIPS = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
FIRST_IMAGE = 24306   # ISIC_0024306 is the first image id of HAM10000
DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "scalp")


def make_metadata(lesions_per_class: int | Mapping[str, int] = 2,
                  images_per_lesion: int | tuple[int, int] = 2, seed: int = 0) -> pd.DataFrame:
    """Metadata in the official column layout. `images_per_lesion` may be a (low, high) range
    drawn per lesion; `lesions_per_class` may differ per dx code."""
    rng = np.random.default_rng(seed)
    counts = (lesions_per_class if isinstance(lesions_per_class, Mapping)
              else dict.fromkeys(CLASSES, lesions_per_class))
    low, high = images_per_lesion if isinstance(images_per_lesion, tuple) else (images_per_lesion,) * 2
    rows, lesions = [], 0
    for dx in CLASSES:
        for _ in range(counts.get(dx, 0)):
            lesion, lesions = f"HAM_{lesions:07d}", lesions + 1
            age, sex = float(rng.integers(1, 18) * 5), str(rng.choice(["male", "female"]))
            site, dx_type = str(rng.choice(LOCALIZATIONS)), str(rng.choice(DX_TYPES))
            for _ in range(int(rng.integers(low, high + 1))):
                rows.append((lesion, f"ISIC_{FIRST_IMAGE + len(rows):07d}", dx, dx_type, age, sex, site))
    return pd.DataFrame(rows, columns=list(METADATA_COLUMNS))


def image_pixels(image_id: str, size: tuple[int, int] = (24, 18), seed: int = 0) -> Image.Image:
    """A smooth random RGB pattern, the same for the same (image_id, size, seed)."""
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    colours = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # 8x6 random colours
    return Image.fromarray(colours).resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_images(folder: Path, image_ids, size: tuple[int, int] = (24, 18), seed: int = 0) -> list[Path]:
    """One JPEG `<image_id>.jpg` per id in `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id in image_ids:
        path = folder / f"{image_id}.jpg"
        path.write_bytes(jpeg_bytes(image_pixels(image_id, size, seed)))
        paths.append(path)
    return paths


def write_metadata(path: Path, table: pd.DataFrame) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def write_raw(folder: Path, table: pd.DataFrame, size: tuple[int, int] = (24, 18), seed: int = 0) -> Path:
    """The layout the download stage produces: `images/*.jpg` + the metadata CSV."""
    folder = Path(folder)
    write_images(folder / "images", table["image_id"], size, seed)
    write_metadata(folder / METADATA_FILE, table)
    return folder


def write_release(folder: Path, table: pd.DataFrame, size: tuple[int, int] = (24, 18), seed: int = 0) -> Path:
    """The official release: two flat zips of JPEGs (stored, first half / second half of the
    image ids) and the metadata CSV, as in the Dataverse dataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = sorted(table["image_id"])
    half = (len(image_ids) + 1) // 2
    for name, part in zip(RELEASE_ZIPS, (image_ids[:half], image_ids[half:])):
        with zipfile.ZipFile(folder / name, "w", compression=zipfile.ZIP_STORED) as archive:
            for image_id in part:
                archive.writestr(f"{image_id}.jpg", jpeg_bytes(image_pixels(image_id, size, seed)))
    write_metadata(folder / METADATA_FILE, table)
    return folder


def write_params(path: Path, **sections: Mapping) -> Path:
    """params.yaml as in the repo, with the given keys of each section replaced."""
    params = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    for section, values in sections.items():
        params[section] = {**params[section], **values}
    path = Path(path)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def declare_size(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A decompression bomb: the JPEG's frame header (SOF0) claims width x height pixels."""
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[frame + 5:frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


# Temporary git + DVC repositories, run with this venv's DVC and Python.
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
# Queue workers are started as `dvc ...` and the stage as `python ...`: both must be the venv's.
ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def run(cwd: Path, *cmd: str, timeout: float = 60) -> str:
    """Run a command; on failure, fail the test with its output (not just an exit code)."""
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, DVC, *args)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=t", "-c", "user.email=t@t", *args)


def init_dvc_repo(repo: Path) -> Path:
    """`repo` as a new git + DVC repository. The identity is set in the repo's own config: DVC makes
    experiment commits itself, and a CI machine may have no global git identity."""
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "t")
    git(repo, "config", "user.email", "t@t")
    dvc(repo, "init", "-q")
    return repo


# A seed-sweep stand-in for the project's pipeline (no TensorFlow): `data` writes random bytes (so
# a clone that re-ran it instead of pulling it shows a new hash), `train` reads train.seed and
# train.dropout, `evaluate` writes metrics/val.json and metrics/test.json shaped like the project's
# ({"scored": false} for test when evaluate.score_test is false), and `report` fails unless test
# was scored, as the real one does. Val balanced accuracy = 0.6 + dropout / 10 + seed / 1000.
SWEEP_STAND_IN = """\
import json, os, pathlib, sys, yaml
params = yaml.safe_load(open("params.yaml"))
if sys.argv[1] == "data":
    pathlib.Path("data.txt").write_text(os.urandom(8).hex())
elif sys.argv[1] == "train":
    pathlib.Path("model.txt").write_text(f"{params['train']['seed']} {params['train']['dropout']}\\n")
elif sys.argv[1] == "evaluate":
    seed, dropout = map(float, pathlib.Path("model.txt").read_text().split())
    op = {"mel_threshold": 0.2, "mel_sensitivity": 0.85 + seed / 10000}
    val = {"balanced_accuracy": 0.6 + dropout / 10 + seed / 1000, "operating_point": op}
    test = ({"balanced_accuracy": val["balanced_accuracy"] - 0.02, "operating_point": op}
            if params["evaluate"]["score_test"] else {"scored": False})
    pathlib.Path("metrics").mkdir(exist_ok=True)
    pathlib.Path("metrics/val.json").write_text(json.dumps(val))
    pathlib.Path("metrics/test.json").write_text(json.dumps(test))
else:
    sys.exit(None if "balanced_accuracy" in json.load(open("metrics/test.json")) else "test was not scored")
"""
SWEEP_DVC_YAML = """\
stages:
  data:
    cmd: python stand_in.py data
    deps: [stand_in.py]
    outs: [data.txt]
  train:
    cmd: python stand_in.py train
    deps: [stand_in.py, data.txt]
    params: [train.seed, train.dropout]
    outs: [model.txt]
  evaluate:
    cmd: python stand_in.py evaluate
    deps: [stand_in.py, model.txt]
    params: [evaluate.score_test]
    metrics:
      - metrics/val.json: {cache: false}
      - metrics/test.json: {cache: false}
  report:
    cmd: python stand_in.py report
    deps: [metrics/test.json]
"""
SWEEP_PARAMS = "train:\n  seed: 42\n  dropout: 0.3\nevaluate:\n  batch_size: 64\n  score_test: true\n"


def init_sweep_repo(repo: Path) -> Path:
    """`repo` as a git + DVC repo of the sweep stand-in, reproduced (seed 42, dropout 0.3) and committed."""
    init_dvc_repo(repo)
    (repo / "stand_in.py").write_text(SWEEP_STAND_IN)
    (repo / "dvc.yaml").write_text(SWEEP_DVC_YAML)
    (repo / "params.yaml").write_text(SWEEP_PARAMS)
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "committed run")
    return repo


def scene_marks(node, marktype: str, role: str | None = None) -> list[dict]:
    """Every mark group of `marktype` (and `role`, if given) in a vega scenegraph, depth first."""
    if isinstance(node, list):
        return [mark for value in node for mark in scene_marks(value, marktype, role)]
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("marktype") == marktype and role in (None, node.get("role")) else []
    return found + [mark for value in node.values() for mark in scene_marks(value, marktype, role)]


def help_in_fresh_python(module: str, watched: tuple[str, ...]) -> tuple[str, list[str]]:
    """`stages.<module>.main(["--help"])` in a new interpreter, which must exit 0: (what it printed,
    before the last line, and which of the `watched` modules it had imported by then)."""
    code = (f"import sys\nfrom stages import {module}\ntry:\n    {module}.main(['--help'])\n"
            "except SystemExit as done:\n    assert done.code == 0\n"
            f"print(','.join(sorted(m for m in {watched!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *printed, imported = done.stdout.splitlines()
    return "\n".join(printed), [name for name in imported.split(",") if name]
