"""The README's `dvc exp show`, `dvc metrics show` and `dvc metrics diff` lines fit 120 columns.

`dvc exp show`: a temporary git + DVC repo has this project's params.yaml and, for each stage that
declares metrics (train, evaluate, export), a stand-in with that stage's params and metrics files;
it writes this repository's committed metrics files, every float shifted by train.seed / 1000.
After two experiments (one changes train.seed, the other train.seed and the longest params key
any stage declares: a seed sweep of a candidate, at its widest), the README's line runs with
COLUMNS=120: every line fits, no cell is cut to "…", and the columns are the experiments' names
(DVC's, adjective-noun), the params that differ and evaluate.HEADLINE's figures.
`dvc metrics show` and `dvc metrics diff main`: a repo with this dvc.yaml and its committed metrics
files on `main` shows the headline figures; on a branch with each headline figure + 0.001, the
diff lists exactly those, main's value against the workspace's.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.evaluate import HEADLINE, headline
from tests.fixtures import DVC, ENV, dvc, git, init_dvc_repo

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 120
STAND_IN = """\
import json, pathlib, sys, yaml
train = yaml.safe_load(open("params.yaml"))["train"]
shift = train["seed"] / 1000

def shifted(value):
    if isinstance(value, dict):
        return {k: shifted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shifted(v) for v in value]
    return value + shift if isinstance(value, float) else value

for path in sys.argv[1:]:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(shifted(json.load(open("committed/" + path)))))
"""


def readme_command(command: str = "dvc exp show") -> list[str]:
    """The README's one line that starts with `command` (in its fenced blocks), as words."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if line.strip().startswith(command)]
    assert len(lines) == 1, f"the README shows one `{command}` line, found {lines}"
    return shlex.split(lines[0].split(" #")[0])


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def metric_paths(stage: dict) -> list[str]:
    return [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]


def leaves(data: dict, prefix: str = ""):
    """Dotted keys of a nested mapping's leaves."""
    for key, value in data.items():
        yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


def longest_declared_key() -> tuple[str, float]:
    """The longest params key a stage of dvc.yaml declares (sub-sections expanded), and a new value."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    declared = [k for s in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].values()
                for k in s.get("params", [])]
    keys = [leaf for leaf in leaves(params) if any(leaf == k or leaf.startswith(f"{k}.") for k in declared)]
    key = max(keys, key=len)
    value = params
    for part in key.split("."):
        value = value[part]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: pick another new value"
    return key, value / 2


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> tuple[str, dict]:
    """(the README command's output at 120 columns, the experiments' names and params)."""
    repo = tmp_path_factory.mktemp("exp_show")
    init_dvc_repo(repo)
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    stages, upstream = {}, ["stand_in.py"]
    for name, stage in real.items():
        paths = metric_paths(stage)
        if paths:  # each after the previous one, as evaluate and export follow train
            stages[name] = {"cmd": f"python stand_in.py {' '.join(paths)}", "deps": list(upstream),
                            "params": stage["params"], "metrics": [{p: {"cache": False}} for p in paths]}
            upstream += paths
            for path in paths:
                (repo / "committed" / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / path, repo / "committed" / path)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (repo / "stand_in.py").write_text(STAND_IN)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "committed run")
    key, value = longest_declared_key()
    dvc(repo, "exp", "run", "-q", "-S", "train.seed=1")
    dvc(repo, "exp", "run", "-q", "-S", "train.seed=2", "-S", f"{key}={value}")
    runs = {entry["name"]: entry["revs"][0]["data"]["params"]["params.yaml"]["data"]
            for entry in json.loads(dvc(repo, "exp", "show", "--json"))[1]["experiments"]}
    return at_width(repo, readme_command()), runs


def at_width(repo: Path, words: list[str]) -> str:
    """What the DVC command `words` prints in `repo` at COLUMNS=WIDTH."""
    done = subprocess.run([DVC, *words[1:]], cwd=repo, env={**ENV, "COLUMNS": str(WIDTH)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_fits(out: str) -> None:
    """Something shown, every line within WIDTH columns, no cell cut to "…"."""
    assert out.strip(), "nothing shown"
    for line in out.splitlines():
        assert len(line) <= WIDTH, f"{len(line)} columns: {line!r}"
    assert "…" not in out, out


def test_every_line_fits_and_no_cell_is_cut(shown):
    assert_fits(shown[0])


def test_the_columns_are_names_changed_params_and_the_headline(shown):
    out, runs = shown
    key, _ = longest_declared_key()
    columns = [(split, name) for split, names in HEADLINE.items() for name in names]
    headline_columns = [f"{split}.{name}" for split, name in columns]
    committed = {split: json.loads((ROOT / "metrics" / "headline" / f"{split}.json").read_text())[split]
                 for split in HEADLINE}
    header = next(line for line in out.splitlines() if "Experiment" in line).split()
    assert header[:1 + len(columns)] == ["Experiment", *headline_columns], out
    params_shown = header[1 + len(columns):]
    assert sorted(params_shown) == sorted(["train.seed", key]), f"the params that differ, only: {params_shown}"
    assert len(runs) == 2
    for name, params in runs.items():
        row = next((line for line in out.splitlines() if f"[{name}]" in line), None)
        assert row is not None, f"experiment {name} not shown:\n{out}"
        cells = row.split("]")[1].split()
        shift = params["train"]["seed"] / 1000  # the stand-in's
        expected = [committed[split][figure] + shift for split, figure in columns]
        assert [float(c) for c in cells[:len(columns)]] == pytest.approx(expected, abs=1e-5), row
        for column, cell in zip(params_shown, cells[len(columns):]):
            value = params
            for part in column.split("."):
                value = value[part]
            assert float(cell) == pytest.approx(value), (column, row)


def test_the_command_keeps_every_params_key_and_drops_every_other_metric():
    """Without running DVC: each params.yaml key stays a candidate column (--only-changed then
    shows those that differ), each headline figure is kept, and no other metric survives."""
    words = readme_command()
    drop, keep = re.compile(option(words, "--drop")), re.compile(option(words, "--keep"))
    assert "--only-changed" in words and "--no-pager" in words

    params = list(leaves(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))))
    assert not [key for key in params if drop.match(key)], "params.yaml keys the command would drop"
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    counted: dict[str, int] = {}
    names = {}
    for path in (p for stage in real.values() for p in metric_paths(stage)):
        names[path] = list(leaves(json.loads((ROOT / path).read_text(encoding="utf-8"))))
        for name in names[path]:
            counted[name] = counted.get(name, 0) + 1
    for path, found in names.items():
        for name in found:  # the column name DVC gives it: path-prefixed where two files share it
            column = name if counted[name] == 1 else f"{path}:{name}"
            is_headline = path.startswith("metrics/headline/")
            assert bool(keep.match(column)) == is_headline, column
            assert is_headline or drop.match(column), f"{column} would be shown"
    assert drop.match("Created") and drop.match("stages/train.py") and not drop.match("Experiment")


@pytest.fixture(scope="module")
def metrics_shown(tmp_path_factory) -> tuple[str, str]:
    """(the README's `dvc metrics show` line at 120 columns on `main`, its `dvc metrics diff main` line
    on a branch whose workspace has every headline figure + 0.001), in a repo holding this one's
    dvc.yaml and committed metrics files."""
    repo = init_dvc_repo(tmp_path_factory.mktemp("metrics_show"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].values():
        for path in metric_paths(stage):
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / path, repo / path)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "committed metrics")
    git(repo, "branch", "-M", "main")
    shown = at_width(repo, readme_command("dvc metrics show"))
    git(repo, "checkout", "-qb", "candidate")
    for split in HEADLINE:
        path = repo / "metrics" / "headline" / f"{split}.json"
        figures = json.loads(path.read_text())[split]
        path.write_text(json.dumps({split: {name: value + 0.001 for name, value in figures.items()}}))
    return shown, at_width(repo, readme_command("dvc metrics diff"))


def committed_headline() -> dict[str, float]:
    """{"split.name": value} of the committed metrics/headline files."""
    return {f"{split}.{name}": value for split in HEADLINE
            for name, value in json.loads((ROOT / "metrics" / "headline" / f"{split}.json").read_text())[split].items()}


def test_the_readme_metrics_show_fits_and_shows_the_headline(metrics_shown):
    out = metrics_shown[0]
    assert_fits(out)
    header, *rows = out.splitlines()
    columns = header.split()[1:]
    committed = committed_headline()
    assert header.split()[0] == "Path" and sorted(columns) == sorted(committed), out
    assert sorted(row.split()[0] for row in rows) == sorted(f"metrics/headline/{split}.json" for split in HEADLINE)
    for row in rows:
        path, *cells = row.split()
        split = Path(path).stem
        for column, cell in zip(columns, cells, strict=True):
            if column.startswith(f"{split}."):
                assert float(cell) == pytest.approx(committed[column], abs=5e-6), (column, row)
            else:
                assert cell == "-", (column, row)


def test_the_readme_metrics_diff_from_a_branch_fits_and_lists_each_changed_figure(metrics_shown):
    out = metrics_shown[1]
    assert_fits(out)
    header, *rows = out.splitlines()
    assert header.split() == ["Path", "Metric", "main", "workspace", "Change"], out
    committed = committed_headline()
    found = {row.split()[1]: row.split()[2:] for row in rows}
    assert set(found) == set(committed), "every changed figure, and only those"
    for name, (before, after, change) in ((name, map(float, cells)) for name, cells in found.items()):
        assert before == pytest.approx(committed[name], abs=5e-6)
        assert after == pytest.approx(committed[name] + 0.001, abs=5e-6)
        assert change == pytest.approx(0.001, abs=5e-6)


def test_headline_takes_the_figures_named_in_headline_from_a_splits_metrics():
    val = {"balanced_accuracy": 0.74, "accuracy": 0.6, "operating_point": {"mel_sensitivity": 0.86}}
    test = {**val, "operating_point": {"mel_sensitivity": 0.91, "mel_specificity": 0.6}}
    assert headline("val", val) == {"val": {"bacc": 0.74}}
    assert headline("test", test) == {"test": {"bacc": 0.74, "mel_sens": 0.91}}
    assert headline("test", {"scored": False}) == {"test": {}}, "a sweep that skips test shows none"


def test_the_committed_headline_is_the_committed_metrics():
    for split in HEADLINE:
        metrics = json.loads((ROOT / "metrics" / f"{split}.json").read_text(encoding="utf-8"))
        committed = json.loads((ROOT / "metrics" / "headline" / f"{split}.json").read_text(encoding="utf-8"))
        assert committed == headline(split, metrics)
