"""Seed sweeps as DVC experiments, end to end, and experiments/sweep_summary on them.

A temporary git + DVC repo stands in for the project (tests.fixtures.init_sweep_repo: `train`
reads train.seed and train.dropout, `evaluate` writes metrics shaped like the project's, `report`
fails unless test was scored, as the real one does). Two configurations are queued as the README
says (`dvc exp run --queue evaluate -S 'train.seed=1,2' ... -S evaluate.score_test=false`) and
run; the summary's means, sds and paired differences are checked against the metrics files in
the experiments' own commits.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import sweep_summary
from tests.fixtures import dvc, git, init_sweep_repo

ROOT = Path(__file__).resolve().parents[2]
VAL_BA, TEST_BA = "metrics/val.json:balanced_accuracy", "metrics/test.json:balanced_accuracy"
VAL_MEL = "metrics/val.json:operating_point.mel_sensitivity"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The repo after the committed run (seed 42) and two queued sweeps, each of seeds 1 and 2."""
    repo = init_sweep_repo(tmp_path_factory.mktemp("sweep"))
    for extra in ((), ("-S", "train.dropout=0.2")):
        dvc(repo, "exp", "run", "--queue", "evaluate", "-S", "train.seed=1,2", *extra,
            "-S", "evaluate.score_test=false")
    dvc(repo, "exp", "run", "--run-all")
    return repo


def committed_runs(repo) -> dict[tuple[float, int], dict]:
    """(dropout, seed) -> {"val": ..., "test": ...} as each experiment's commit (and HEAD) holds them."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split() + ["HEAD"]
    runs = {}
    for ref in refs:
        params = git(repo, "show", f"{ref}:params.yaml")
        seed, dropout = (float(line.split(":")[1]) for line in params.splitlines()[1:3])
        runs[dropout, int(seed)] = {split: json.loads(git(repo, "show", f"{ref}:metrics/{split}.json"))
                                    for split in ("val", "test")}
    return runs


def summary_of(repo, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(repo)
    status = sweep_summary.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_a_queued_sweep_summarises_per_configuration_against_the_committed_one(swept, monkeypatch, capsys):
    runs = committed_runs(swept)
    assert sorted(runs) == [(0.2, 1), (0.2, 2), (0.3, 1), (0.3, 2), (0.3, 42)], "every queued run finished"
    assert all(runs[d, s]["test"] == {"scored": False} for d, s in runs if s != 42), "the sweep never read test"

    status, out, _ = summary_of(swept, monkeypatch, capsys, "--json")
    assert status == 0
    summary = json.loads(out)
    assert summary["baseline"] == git(swept, "rev-parse", "--abbrev-ref", "HEAD").strip()
    base, candidate = summary["configurations"]
    assert (base["label"], base["seeds"]) == ("baseline", [1, 2, 42])
    assert (candidate["label"], candidate["seeds"]) == ("train.dropout=0.2", [1, 2])
    assert candidate["differs"] == {"train.dropout": 0.2}
    for config, dropout in ((base, 0.3), (candidate, 0.2)):
        val = [runs[d, s]["val"]["balanced_accuracy"] for d, s in runs if d == dropout]
        assert config["figures"][VAL_BA] == pytest.approx(
            {"mean": np.mean(val), "sd": np.std(val, ddof=1), "n": len(val)})
        mel = [runs[d, s]["val"]["operating_point"]["mel_sensitivity"] for d, s in runs if d == dropout]
        assert config["figures"][VAL_MEL]["mean"] == pytest.approx(np.mean(mel))
    assert base["figures"][TEST_BA] == {"mean": runs[0.3, 42]["test"]["balanced_accuracy"], "sd": None, "n": 1}
    assert TEST_BA not in candidate["figures"]

    paired = candidate["paired"][VAL_BA]
    expected = [runs[0.2, s]["val"]["balanced_accuracy"] - runs[0.3, s]["val"]["balanced_accuracy"] for s in (1, 2)]
    assert paired["per_seed"] == pytest.approx(dict(zip(("1", "2"), expected)))
    assert paired["mean"] == pytest.approx(np.mean(expected)) and paired["n"] == 2
    assert TEST_BA not in candidate["paired"], "test is paired only where both sides scored it"


def test_the_baseline_can_be_any_experiment_and_the_summary_reads_as_text(swept, monkeypatch, capsys):
    name = json.loads(summary_of(swept, monkeypatch, capsys, "--json")[1])["configurations"][1]["runs"]["1"]
    status, out, _ = summary_of(swept, monkeypatch, capsys, "--baseline", name, "--metric", VAL_BA)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"baseline (seeds 1, 2): {name}'s configuration"
    assert lines[2] == "train.dropout=0.3 (seeds 1, 2, 42)"
    assert "paired: +0.0100 ± 0.0000 (n=2)" in lines[3], out

    status, _, err = summary_of(swept, monkeypatch, capsys, "--baseline", "no-such-exp")
    assert status == 2 and "--baseline no-such-exp: no finished run" in err


def test_queued_running_and_failed_experiments_are_not_runs():
    def entry(rev, seed, name=None):
        return {"rev": rev, "name": name, "error": None, "data": {
            "params": {"params.yaml": {"data": {"train": {"seed": seed}}}},
            "metrics": {"metrics/val.json": {"data": {"balanced_accuracy": 0.7}}}}}

    shown = [{**entry("workspace", 42), "experiments": None},
             {**entry("a" * 40, 42, "main"), "experiments": [
                 {"name": "done", "executor": None, "revs": [entry("b" * 40, 1)]},
                 {"name": "queued", "executor": {"state": "queued"}, "revs": [entry("c" * 40, 2)]},
                 {"name": "failed", "executor": {"state": "failed"}, "revs": [entry("d" * 40, 3)]},
                 {"name": "broken", "executor": None, "revs": [{**entry("e" * 40, 4), "error": {"msg": "x"}}]}]}]
    assert [(r["name"], r["commit"]) for r in sweep_summary.runs_of(shown)] == [("main", True), ("done", False)]
    with pytest.raises(sweep_summary.StageError, match="no finished run"):
        sweep_summary.summarise([], ["train.seed"], [VAL_BA])


def test_help_answers_without_running_anything():
    done = subprocess.run([sys.executable, "-m", "experiments.sweep_summary", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and "--baseline" in done.stdout and "--metric" in done.stdout
