"""A fresh clone gets the model from a DVC remote and predicts, without retraining (README).

The project's .dvc/config names no remote (none is public), so whoever trains adds one. This
test does what the README says, on a temporary origin repository: `dvc remote add -d` a local
folder, `dvc push`, commit; then a fresh `git clone` runs `dvc pull train evaluate` and
`python -m stages.predict` on an image; without a clone, `dvc get` fetches the model of a commit
and `dvc artifacts get` the registered one (a version is an annotated tag `<name>@v<semver>`).
The `train` and `evaluate` stages are stand-ins that copy a tiny model and decision rule made
here (the real ones train); the code and the artifact entry are the project's own.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from stages.lib.inference import PLAIN
from tests.fixtures import dvc, git, image_pixels, init_dvc_repo, jpeg_bytes, run
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/model.keras"
DECISION = "models/decision.json"
# What a user runs (README, "Getting the model"): in the clone, and without one.
PULL = ("pull", "train", "evaluate")


def registered_model() -> tuple[str, dict]:
    """The project's artifact entry for the Keras model: (name, entry)."""
    artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["artifacts"]
    return next((name, entry) for name, entry in artifacts.items() if entry["path"] == MODEL)


def origin_repo(folder: Path, built: Path, storage: Path) -> Path:
    """A committed repository with the project's code, stand-in stages, a default remote, pushed."""
    folder.mkdir()
    init_dvc_repo(folder)
    shutil.copytree(ROOT / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    name, entry = registered_model()
    copy = f"{sys.executable} -c \"import shutil, sys; shutil.copy(*sys.argv[1:])\""
    stages = {
        "train": {"cmd": f"{copy} {built / 'model.keras'} {MODEL}", "outs": [MODEL]},
        "evaluate": {"cmd": f"{copy} {built / 'decision.json'} {DECISION}", "deps": [MODEL], "outs": [DECISION]},
    }
    (folder / "models").mkdir()
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "artifacts": {name: entry}}, sort_keys=False))
    dvc(folder, "repro", "-q")
    dvc(folder, "remote", "add", "-d", "storage", str(storage))
    dvc(folder, "push", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "model, decision rule and the DVC remote")
    return folder


def test_a_fresh_clone_pulls_the_model_and_predicts_without_retraining(tmp_path):
    built, storage = tmp_path / "built", tmp_path / "storage"
    built.mkdir()
    images = np.stack([np.asarray(image_pixels(f"lesion{i}", (32, 32))) for i in range(4)])
    tiny_model(images).save(built / "model.keras")
    dataclasses.replace(PLAIN, mel_threshold=0.3, mel_sensitivity_target=0.85).save(built / "decision.json")
    origin = origin_repo(tmp_path / "origin", built, storage)
    shutil.rmtree(built)  # nothing outside the remote can supply the files now

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / MODEL).exists()
    dvc(clone, *PULL)
    for path in (MODEL, DECISION):
        assert (clone / path).read_bytes() == (origin / path).read_bytes(), path
    status = json.loads(dvc(clone, "status", "--json"))
    assert status == {}, f"the pulled files are what dvc.lock pins, nothing to re-run: {status}"

    image = tmp_path / "lesion.jpg"
    image.write_bytes(jpeg_bytes(image_pixels("a lesion", (64, 48))))
    shown = json.loads(run(clone, sys.executable, "-m", "stages.predict", "--json", str(image), timeout=120))
    assert len(shown) == 1 and shown[0]["decision"] in {c["dx"] for c in shown[0]["top"]} | {"mel", "unknown"}
    assert shown[0]["mel_threshold"] == 0.3, "the pulled decision rule is the one applied"


def test_a_model_is_fetched_without_a_clone_by_version_or_by_commit(tmp_path):
    built, storage = tmp_path / "built", tmp_path / "storage"
    built.mkdir()
    (built / "model.keras").write_bytes(b"weights" * 100)
    (built / "decision.json").write_text("{}")
    origin = origin_repo(tmp_path / "origin", built, storage)
    shutil.rmtree(origin / ".dvc" / "cache")  # only the remote holds the bytes
    name, _ = registered_model()

    by_commit = tmp_path / "by_commit.keras"
    dvc(tmp_path, "get", str(origin), MODEL, "--rev", git(origin, "rev-parse", "HEAD").strip(), "-o", str(by_commit))
    assert by_commit.read_bytes() == b"weights" * 100
    # `dvc artifacts get` takes a registered version: an annotated tag <name>@v<semver> (gto, Studio)
    git(origin, "tag", "-a", f"{name}@v1.0.0", "-m", "reference run")
    for args in ((), ("--rev", "v1.0.0")):  # the latest version, or a named one
        out = tmp_path / f"registered{len(args)}.keras"
        dvc(tmp_path, "artifacts", "get", str(origin), name, *args, "-o", str(out))
        assert out.read_bytes() == b"weights" * 100
