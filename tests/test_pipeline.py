"""End to end: `dvc repro` of the whole pipeline in a temporary git repo, from a tiny fake release
served over HTTP on loopback (HAM10000_MIRROR), then a no-op repro, an experiment with -S, and
a params change that must re-run only the model stages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_TRAIN
from tests.fixtures import make_metadata, write_params, write_release
from tests.http_fixtures import FileServer

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
TINY = {
    "augment": {"image_size": 32, "target_per_class": 12, "shard_images": 64},
    "train": TINY_TRAIN,
    "evaluate": {"batch_size": 16},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], stdout_only: bool = False) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def git(repo: Path, env: dict[str, str], *args: str) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo, env)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh clone-like copy of the project: its code, dvc.yaml and tiny params, git + dvc."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo / "params.yaml", **TINY)
    return repo


def test_dvc_repro_end_to_end(repo: Path, tmp_path: Path):
    release = write_release(tmp_path / "release", make_metadata(lesions_per_class=5, images_per_lesion=(1, 2)))
    env = {**os.environ, "PYTHONPATH": str(repo), "KERAS_HOME": str(tmp_path / "keras"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git(repo, env, "init", "-q")
    run([DVC, "init", "-q"], repo, env)
    run([DVC, "config", "core.analytics", "false"], repo, env)
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "project")

    with FileServer(release) as server:
        env["HAM10000_MIRROR"] = server.url
        run([DVC, "repro"], repo, env)

        for split in ("train", "val", "test"):
            assert (repo / "data" / "split" / f"{split}.csv").exists()
        data = json.loads((repo / "metrics" / "data.json").read_text())
        assert data["images"] == len(make_metadata(lesions_per_class=5, images_per_lesion=(1, 2)))
        test = json.loads((repo / "metrics" / "test.json").read_text())
        assert 0 <= test["balanced_accuracy"] <= 1 and set(test["per_class"]) >= {"mel", "nv"}
        assert (repo / "models" / "model.keras").exists()

        again = run([DVC, "repro"], repo, env)
        assert "Data and pipelines are up to date" in again, again

        git(repo, env, "add", "-A")
        git(repo, env, "commit", "-qm", "reference run")

        # An experiment from the committed state; the data stages must not run again.
        exp = run([DVC, "exp", "run", "-S", "train.epochs=2"], repo, env)
        assert "Running stage 'train'" in exp and "Running stage 'download'" not in exp, exp
        shown = run([DVC, "exp", "show", "--json"], repo, env, stdout_only=True)
        assert "balanced_accuracy" in json.dumps(json.loads(shown))

        # Changing a train param invalidates train and what follows it, nothing upstream.
        write_params(repo / "params.yaml", **{**TINY, "train": {**TINY_TRAIN, "dropout": 0.2}})
        status = json.loads(run([DVC, "status", "--json"], repo, env, stdout_only=True))
        assert "train" in status
        assert not {"download", "dedupe", "split", "augment"} & set(status), status
