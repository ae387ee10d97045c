"""Scaling and sharing as docs/scaling.md describes them, run for real at toy size (no TensorFlow).

The tests build git + DVC repos in a temporary folder; in most, one stage, `square`, stands in for
train: it reads the param `x` and writes an output folder (out/value.txt) and a metric y = x * x.
That is enough to check, in seconds, what the project relies on to grow past one machine:
- a DVC remote (here a local folder) carries outputs to another cache and back, byte for byte;
- `dvc exp run --queue` + `dvc queue start -j 2` runs a parameter sweep with two workers;
- a seed sweep split over two machines (docs/slurm/sweep.sbatch run with bash as two array tasks,
  on the sweep stand-in of tests.fixtures) goes through `dvc exp push` to a bare git repository
  and a DVC remote, and a third clone's `dvc exp pull` gathers it: summary, outputs and all.
It also checks that the doc's `train.distribution` table lists exactly the values train accepts.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from stages.train import TrainParams
from tests.fixtures import ENV, dvc, git, init_dvc_repo, init_sweep_repo, run

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docs" / "slurm" / "sweep.sbatch"


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


def exp_seeds(git_dir: Path) -> dict[str, int]:
    """{experiment ref: its train.seed} of every experiment in a git repository (bare or not)."""
    refs = run(git_dir, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return {ref: yaml.safe_load(run(git_dir, "git", "show", f"{ref}:params.yaml"))["train"]["seed"] for ref in refs}


def test_a_sweep_split_over_two_machines_is_gathered_in_a_third(tmp_path):
    """docs/slurm/sweep.sbatch as array tasks 0 and 1 of 2 (seeds 1 3 and 2 4 of a candidate),
    each in its own clone; then a third clone runs `dvc exp pull origin` and the sweep summary."""
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    run(tmp_path, "git", "init", "-q", "--bare", str(origin))
    (tmp_path / "author").mkdir()
    author = init_sweep_repo(tmp_path / "author")
    dvc(author, "remote", "add", "-d", "storage", str(storage))
    git(author, "remote", "add", "origin", str(origin))
    git(author, "commit", "-qam", "DVC remote")
    dvc(author, "push", "-q")  # the data the workers pull instead of re-running the data stage
    git(author, "push", "-q", "origin", "HEAD")
    data_md5 = yaml.safe_load((author / "dvc.lock").read_text())["stages"]["data"]["outs"][0]["md5"]

    home, scratch = tmp_path / "home", tmp_path / "scratch"
    home.mkdir()
    scratch.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")  # DVC commits each experiment
    env = {**ENV, "HOME": str(home), "TMPDIR": str(scratch), "REPO": str(origin), "SEEDS": "1 2 3 4",
           "SET": "train.dropout=0.2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_COUNT": "2"}
    on_origin = {}  # after each task: the seeds origin holds
    for task in (0, 1):
        done = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"task {task}:\n{done.stdout}\n{done.stderr}"
        on_origin[task] = sorted(exp_seeds(origin).values())
    assert on_origin == {0: [1, 3], 1: [1, 2, 3, 4]}, "each task pushes its share of the seeds"
    assert not list(scratch.glob("ham10000-sweep-*")), "each task removes its clone"

    gather = tmp_path / "gather"
    run(tmp_path, "git", "clone", "-q", str(origin), str(gather))
    dvc(gather, "exp", "pull", "origin")
    runs = exp_seeds(gather)
    assert sorted((ref.rsplit("/", 1)[1], seed) for ref, seed in runs.items()) == [
        ("77-seed1", 1), ("77-seed2", 2), ("77-seed3", 3), ("77-seed4", 4)], "one experiment per seed, named"
    for ref in runs:
        lock = yaml.safe_load(run(gather, "git", "show", f"{ref}:dvc.lock"))
        assert lock["stages"]["data"]["outs"][0]["md5"] == data_md5, f"{ref}: the data stage ran again"
    dvc(gather, "exp", "apply", "77-seed4")
    dvc(gather, "checkout")  # the model pulled from the DVC remote, as task 1 pushed it
    assert (gather / "model.txt").read_text() == "4 0.2\n"

    done = subprocess.run([sys.executable, "-m", "experiments.sweep_summary", "--json"], cwd=gather,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    base, candidate = json.loads(done.stdout)["configurations"]
    assert (base["label"], base["seeds"]) == ("baseline", [42])
    assert (candidate["label"], candidate["seeds"]) == ("train.dropout=0.2", [1, 2, 3, 4])
    # the stand-in's val balanced accuracy 0.6 + 0.2 / 10 + seed / 1000: 0.621 ... 0.624
    assert candidate["figures"]["metrics/val.json:balanced_accuracy"] == pytest.approx(
        {"mean": 0.6225, "sd": (5 / 3) ** 0.5 / 1000, "n": 4})
    assert "metrics/test.json:balanced_accuracy" not in candidate["figures"], "the sweep left test unread"


def test_the_documented_strategies_are_exactly_those_train_accepts():
    """docs/scaling.md's `train.distribution` table: every value train accepts, and no retired one."""
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = doc.split("## Training on more devices: `train.distribution`", 1)[1].split("**Batch size", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    accepted = typing.get_args(typing.get_type_hints(TrainParams)["distribution"])
    assert documented == list(accepted) == ["default", "mirrored"]
