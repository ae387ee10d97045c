"""The pull-request comment (.ci/pr_comment.py) in a throwaway DVC repo, and the workflow running it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "pr_comment.py"
WORKFLOW = ROOT / ".github" / "workflows" / "pr.yml"
DVC_YAML = """\
stages:
  score:
    cmd: python score.py
    params:
      - train.lr
    metrics:
      - metrics.json:
          cache: false
    plots:
      - curve.csv:
          cache: false
          x: step
"""


def load_script():
    spec = importlib.util.spec_from_file_location("pr_comment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def commit_results(repo: Path, lr: float, accuracy: float, message: str) -> None:
    """One commit as `dvc repro` would leave it: params and the metrics and plot they gave."""
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    (repo / "metrics.json").write_text(f'{{"accuracy": {accuracy}}}\n')
    (repo / "curve.csv").write_text(f"step,loss\n0,1.0\n1,{1 - accuracy}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    (repo / "dvc.yaml").write_text(DVC_YAML)
    commit_results(repo, lr=0.01, accuracy=0.5, message="base")
    commit_results(repo, lr=0.02, accuracy=0.75, message="branch")
    return repo


def test_comment_has_metric_and_param_diffs_as_tables_and_the_plots(two_commits, tmp_path):
    out, plots = tmp_path / "comment.md", tmp_path / "dvc_plots"
    subprocess.run([sys.executable, str(SCRIPT), "HEAD~1", "--plots-dir", str(plots), "--output", str(out),
                    "--plots-url", "https://ci.example/run/1"], cwd=two_commits, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    text = out.read_text()
    base = subprocess.run(["git", "rev-parse", "--short=8", "HEAD~1"], cwd=two_commits, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert text.startswith("<!-- dvc-pr-report -->\n")
    metrics = text.split("### Metrics")[1].split("###")[0]
    assert f"| Path         | Metric   | {base}" in metrics and "| workspace   | Change   |" in metrics
    assert "| metrics.json | accuracy | 0.5" in metrics and "0.75" in metrics and "0.25" in metrics
    params = text.split("### Params")[1].split("###")[0]
    assert "| Param    |" in params and "| params.yaml | train.lr | 0.01" in params and "0.02" in params
    plots_part = text.split("### Plots")[1]
    assert "- curve.csv" in plots_part and "(https://ci.example/run/1)" in plots_part
    assert (plots / "index.html").exists()


def test_header_only_tables_mean_no_change():
    script = load_script()
    empty = "| Path   | Metric   | HEAD   | workspace   | Change   |\n|--------|----------|\n\n"
    assert script.table_or(empty, "No metric changed.") == "No metric changed."
    assert script.table_or(empty + "| m.json | acc | 1 | 2 | 1 |\n", "none").endswith("| 1 |")


def test_workflow_reproduces_and_comments_on_pull_requests():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as True
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    text = WORKFLOW.read_text()
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    assert any(str(s.get("with", {}).get("python-version")) == "3.11" for s in steps)
    for command in ("pip install -r requirements.txt", "dvc pull", "dvc repro", ".ci/pr_comment.py",
                    "gh pr comment"):
        assert command in text
