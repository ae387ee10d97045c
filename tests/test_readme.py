"""The README is a user's guide that stays true: its commands run, its figures are the committed ones.

Every command in a fenced bash block must exist: `python -m MODULE` answers `--help` with exit 0,
`dvc SUBCOMMAND` is a DVC command (`dvc SUBCOMMAND --help`), and each option the README passes is
one the command's `--help` lists. The results table must show what metrics/ and the seeds' record
hold, rounded as shown; the README stays short and names no path of one particular machine.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
METRICS = ROOT / "metrics"
COLUMNS = {"test": "test", "validation": "val"}  # results table column -> metrics/<split>.json
# README results row (its first cell starts with this) -> key paths of the figures it shows, in order.
# "a.b": nested key, "a.0": list item; "p | q": the first present; "FILE:path": metrics/FILE instead,
# for the test column only (report/ describes the test split).
FIGURES = {
    "balanced accuracy (95% CI)": ("balanced_accuracy", "balanced_accuracy_ci95_low", "balanced_accuracy_ci95_high"),
    "melanoma sensitivity / specificity": ("operating_point.mel_sensitivity", "operating_point.mel_specificity"),
    "melanoma specificity against nevi only": ("operating_point.mel_specificity_nv",),
    "expected calibration error": ("calibration.ece",),
    "lesions accepted / non-lesion images rejected": ("out_of_distribution.lesions_accepted",
                                                      "out_of_distribution.non_lesion_rejected"),
    "with age, sex and site: balanced accuracy (95% CI)": ("with_metadata.balanced_accuracy",
                                                           "with_metadata.balanced_accuracy_ci95_low",
                                                           "with_metadata.balanced_accuracy_ci95_high"),
    "with age, sex and site: melanoma sensitivity / specificity": ("with_metadata.operating_point.mel_sensitivity",
                                                                   "with_metadata.operating_point.mel_specificity"),
}
SEEDS_ROW = "same configuration, balanced accuracy over"  # "... over N seeds ..., mean ± sd": the records below
SEED_RECORDS = ("experiments/results/white_balance_0.1_repro_seed42.intel.json",  # seed 42 on the Intel (#57)
                "experiments/results/white_balance_0.1_vs_zoom_0.2.intel.json")  # seeds 1 and 2
SETUP_WORDS = {".", "pip"}  # the set-up lines' other commands: .ci/run runs them
NUMBER = re.compile(r"\d+\.\d+")


def readme() -> str:
    return README.read_text(encoding="utf-8")


def split_commands(line: str) -> list[str]:
    """A shell line's commands: split at &&, ||, |, ; and & outside quotes (a regex's `|` inside
    quotes is an argument), a comment (# at the start or after a space, outside quotes) dropped."""
    parts, current, quote = [], [], None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        elif ch in "|;&":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    return [part.strip() for part in [*parts, "".join(current)] if part.strip()]


def fenced_commands(text: str) -> list[str]:
    """Each command of the README's bash blocks (split_commands of each line)."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            commands += split_commands(line)
    return commands


def words(command: str) -> list[str]:
    """The command's words without leading VAR=value assignments."""
    tokens = shlex.split(command)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]
    return tokens


def help_command(command: str) -> list[str] | None:
    """The `--help` call that proves `command` exists, or None for a set-up command run by CI."""
    tokens = words(command)
    if tokens[0] in SETUP_WORDS:
        return None
    if tokens[0] in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m":
        return [sys.executable, "-m", tokens[2], "--help"]
    if tokens[0] == "dvc":
        sub = []
        for token in tokens[1:3]:
            if not re.fullmatch(r"[a-z][a-z-]*", token):
                break
            sub.append(token)
        return [sys.executable, "-m", "dvc", *sub, "--help"]
    raise AssertionError(f"README command {command!r}: no test runs it (use python -m, dvc, or a set-up line)")


def options(command: str) -> list[str]:
    return [token.split("=", 1)[0] for token in words(command) if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token)]


COMMANDS = sorted(set(fenced_commands(readme())))


def test_readme_has_commands_of_every_kind():
    kinds = {words(command)[0] for command in COMMANDS}
    assert {"python", "dvc", "."} <= kinds, kinds


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_exists(command):
    call = help_command(command)
    if call is None:
        return
    if shutil.which("nice"):
        call = ["nice", "-n", "19", *call]
    done = subprocess.run(call, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(call[-4:])}: exit {done.returncode}\n{done.stderr[-2000:]}"
    text = done.stdout + done.stderr
    python_m = words(command)[:2] == ["python", "-m"] or words(command)[:2] == ["python3", "-m"]
    for option in options(command)[1 if python_m else 0:]:  # python's own -m is not the module's
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
            f"README command {command!r}: {option} is not in its --help"


def test_setup_command_is_what_ci_runs():
    setup = re.search(r"^```bash\n(.*?)^```", readme(), flags=re.M | re.S).group(1).splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert len(setup) == 2 and setup[1].split("  #")[0].strip() == ci.strip()
    assert setup[0].split("  #")[0].strip().endswith("&& dvc repro")


def test_readme_is_short_and_names_no_local_folder():
    """Absolute machine paths are caught for every tracked file by tests/test_lint.py."""
    text = readme()
    assert len(text.splitlines()) <= MAX_LINES
    assert "../shared" not in text, "README names a folder beside this checkout; say what it must hold"


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme()):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# --- the results table ------------------------------------------------------------------------

def results_table() -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and {first cell: cells} of the table whose header links the model card."""
    lines = readme().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and "model_card.md" in line.split("|")[1])
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not set("".join(cells)) <= set("-: "):  # not the separator row
            table.append(cells)
    return table[0], {cells[0]: cells for cells in table[1:]}


def lookup(data: object, path: str) -> object:
    for key in path.split("."):
        if isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        elif isinstance(data, dict) and key in data:
            data = data[key]
        else:
            raise KeyError(path)
    return data


def figure(split: str, key: str) -> float | None:
    """metrics/<split>.json's figure at `key` (dotted), or None where that split has none."""
    try:
        return float(lookup(json.loads((METRICS / f"{split}.json").read_text(encoding="utf-8")), key))
    except KeyError:
        return None


def row(rows: dict[str, list[str]], label: str) -> list[str]:
    found = [cells for first, cells in rows.items() if re.sub(r"[*_`]", "", first).startswith(label)]
    assert len(found) == 1, f"README results table: {len(found)} rows start with {label!r}: {list(rows)}"
    return found[0]


def shown(cell: str) -> list[str]:
    return NUMBER.findall(cell)


@pytest.mark.parametrize("label", list(FIGURES))
def test_results_match_committed_metrics(label):
    header, rows = results_table()
    cells = row(rows, label)
    for column, split in COLUMNS.items():
        cell = cells[header.index(column)]
        values = [figure(split, key) for key in FIGURES[label]]
        if all(value is None for value in values):
            assert not shown(cell), f"README {label!r}, {column}: shows {cell!r}, metrics/ has no such figure"
            continue
        assert None not in values, f"{label!r}, {column}: metrics/{split}.json lacks one of {FIGURES[label]}"
        expected = [f"{value:.{len(number.split('.')[1])}f}" for value, number in zip(values, shown(cell))]
        assert shown(cell) == expected and len(expected) == len(values), \
            f"README {label!r}, {column}: shows {cell!r}, metrics/ hold {values}"


def seed_runs() -> list[dict]:
    """Every run in SEED_RECORDS: one per record, or each of its `runs`."""
    runs = []
    for name in SEED_RECORDS:
        record = json.loads((ROOT / name).read_text(encoding="utf-8"))
        runs += list(record["runs"].values()) if "runs" in record else [record]
    return runs


def test_seed_row_matches_the_record():
    header, rows = results_table()
    cells = row(rows, SEEDS_ROW)
    runs = seed_runs()
    assert f"{len(runs)} seeds" in cells[0], f"README seed row {cells[0]!r}: the records hold {len(runs)} runs"
    for column, split in COLUMNS.items():
        values = [run[split]["balanced_accuracy"] for run in runs]
        expected = [f"{statistics.mean(values):.3f}", f"{statistics.stdev(values):.3f}"]
        assert shown(cells[header.index(column)]) == expected, \
            f"README seed row, {column}: shows {cells[header.index(column)]!r}, the records give {expected}"


def test_table_parser_can_fail(monkeypatch, tmp_path):
    """A README whose figure differs from metrics/ is caught."""
    text = readme()
    value = f"{figure('test', FIGURES['balanced accuracy (95% CI)'][0]):.3f}"
    bad = tmp_path / "README.md"
    bad.write_text(text.replace(value, "0.001", 1), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "README", bad)
    with pytest.raises(AssertionError):
        test_results_match_committed_metrics("balanced accuracy (95% CI)")


def test_a_figure_a_split_lacks_is_none(monkeypatch, tmp_path):
    """A row may show "—" only for a split whose metrics file has no such figure."""
    (tmp_path / "test.json").write_text(json.dumps({"out_of_distribution": {"lesions_accepted": 0.9}}),
                                        encoding="utf-8")
    (tmp_path / "val.json").write_text(json.dumps({}), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "METRICS", tmp_path)
    key = FIGURES["lesions accepted / non-lesion images rejected"][0]
    assert (figure("test", key), figure("val", key)) == (0.9, None)
