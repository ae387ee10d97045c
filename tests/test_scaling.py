"""Scaling and sharing as docs/scaling.md describes them, run for real at toy size (no TensorFlow).

Each test builds a git + DVC repo in a temporary folder whose one stage, `square`, stands in for
train: it reads the param `x` and writes an output folder (out/value.txt) and a metric y = x * x.
That is enough to check, in seconds, what the project relies on to grow past one machine:
- a DVC remote (here a local folder) carries outputs to another cache and back, byte for byte;
- `dvc exp run --queue` + `dvc queue start -j 2` runs a parameter sweep with two workers;
- `dvc exp push` shares an experiment through a git remote, and `dvc exp pull` brings it back.
It also checks that the doc's `train.distribution` table lists exactly the values train accepts.
"""
from __future__ import annotations

import csv
import io
import re
import shutil
import time
import typing
from pathlib import Path

import pytest

from stages.train import TrainParams
from tests.fixtures import dvc, git, init_dvc_repo, run

ROOT = Path(__file__).resolve().parents[1]


SQUARE_PY = """\
import json, pathlib, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/value.txt").write_text(f"{x * x}\\n")
pathlib.Path("metrics.json").write_text(json.dumps({"y": x * x}))
"""
DVC_YAML = """\
stages:
  square:
    cmd: python square.py
    deps: [square.py]
    params: [x]
    outs: [out]
    metrics:
      - metrics.json:
          cache: false
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A committed git + DVC repo with the `square` stage reproduced at x = 1."""
    repo = tmp_path / "project"
    repo.mkdir()
    init_dvc_repo(repo)
    (repo / "square.py").write_text(SQUARE_PY)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("x: 1\n")
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "square stage")
    return repo


def experiments(repo: Path) -> dict[str, dict[str, str]]:
    """`dvc exp show` as {experiment name: row} (columns include State, x and y)."""
    rows = csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv", "--no-pager")))
    return {row["Experiment"]: row for row in rows if row["Experiment"]}


def test_local_remote_round_trip_restores_identical_bytes(project, tmp_path):
    storage = tmp_path / "storage"
    dvc(project, "remote", "add", "-d", "storage", str(storage))
    dvc(project, "push")
    original = (project / "out" / "value.txt").read_bytes()
    assert any(p.is_file() for p in storage.rglob("*")), "dvc push wrote nothing to the remote"

    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "out")
    dvc(project, "pull")
    assert (project / "out" / "value.txt").read_bytes() == original == b"1\n"


def test_queued_sweep_runs_with_two_workers_and_records_each_metric(project):
    for x in (2, 3):
        dvc(project, "exp", "run", "--queue", "-S", f"x={x}", "-n", f"x{x}")
    dvc(project, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 120  # two dvc queue workers start in ~10 s each on 2 idle cores; CI is busier
    # Both must be listed and finished: a queued experiment can be missing from `exp show` while a worker takes it.
    while not (set(rows := experiments(project)) >= {"x2", "x3"}
               and all(row["State"] in ("Success", "Failed") for row in rows.values())):
        assert time.monotonic() < deadline, f"queue still busy: {dvc(project, 'queue', 'status')}"
        time.sleep(1)
    dvc(project, "queue", "stop")  # idle workers would linger ~10 s more on their own

    found = experiments(project)
    assert {name: (row["State"], row["x"], row["y"]) for name, row in found.items()} == {
        "x2": ("Success", "2", "4"),
        "x3": ("Success", "3", "9"),
    }
    assert (project / "params.yaml").read_text() == "x: 1\n", "the workspace is left as it was"


def test_exp_push_shares_experiment_and_its_outputs(project, tmp_path):
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    run(tmp_path, "git", "init", "-q", "--bare", str(origin))
    git(project, "remote", "add", "origin", str(origin))
    dvc(project, "remote", "add", "-d", "storage", str(storage))
    git(project, "commit", "-qam", "DVC remote")
    git(project, "push", "-q", "origin", "HEAD")
    dvc(project, "exp", "run", "-q", "-S", "x=4", "-n", "x4")

    dvc(project, "exp", "push", "origin", "x4")
    refs = run(tmp_path, "git", "ls-remote", str(origin))
    assert any(ref.startswith("refs/exps/") and ref.endswith("/x4")
               for ref in (line.split("\t")[1] for line in refs.splitlines()))

    clone = tmp_path / "colleague"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    dvc(clone, "exp", "pull", "origin", "x4")  # git refs, and the outputs from the DVC remote
    assert experiments(clone)["x4"]["y"] == "16"
    dvc(clone, "exp", "apply", "x4")
    dvc(clone, "checkout")
    assert (clone / "out" / "value.txt").read_text() == "16\n"


def test_the_documented_strategies_are_exactly_those_train_accepts():
    """docs/scaling.md's `train.distribution` table: every value train accepts, and no retired one."""
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = doc.split("## Training on more devices: `train.distribution`", 1)[1].split("**Batch size", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    accepted = typing.get_args(typing.get_type_hints(TrainParams)["distribution"])
    assert documented == list(accepted) == ["default", "mirrored"]
