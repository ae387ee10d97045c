"""Every stage has the same shape: `--help` works without running anything, options come from
main()'s parameters (`--params`, `--<x>-dir`, `--<x>-path`), loggers are named `stages.<name>`."""
from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.cli import StageError, run_stage, stage_parser

ROOT = Path(__file__).resolve().parents[2]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
STAGES = sorted(DVC_STAGES)
COMMANDS = [*STAGES, "predict"]
HEAVY = ("tensorflow", "keras", "sklearn", "dvclive")  # none of these may load just to print usage


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints_usage_exits_0_and_writes_nothing(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", f"stages.{name}", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m stages.{name}"), result.stdout
    assert list(tmp_path.iterdir()) == [], "--help wrote files"
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), f"--help imported {sorted(imported & set(HEAVY))}"


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_takes_its_params_file_and_paths_as_options(name):
    module = importlib.import_module(f"stages.{name}")
    parser = stage_parser(module.main)
    options = {o for action in parser._actions for o in action.option_strings} - {"-h", "--help"}
    assert ("--params" in options) == ("params" in DVC_STAGES[name]), "--params where the stage reads params.yaml"
    paths = options - {"--params", "--workers"}
    assert paths and all(o.endswith(("-dir", "-path")) for o in paths), sorted(paths)


@pytest.mark.parametrize("name", STAGES)
def test_stage_loggers_are_named_after_the_stage(name):
    module = importlib.import_module(f"stages.{name}")
    assert module.log.name == f"stages.{name}"


def sample_main(params_path: Path = Path("params.yaml"), data_dir: Path = Path("data/x"),
                metrics_path: Path = Path("m.json"), workers: int | None = None) -> None:
    """Sample stage: the parser is built from this signature."""
    sample_main.called = dict(params_path=params_path, data_dir=data_dir, metrics_path=metrics_path,
                              workers=workers)


def test_options_are_main_parameters_with_their_defaults():
    run_stage(sample_main, [])
    assert sample_main.called == {"params_path": Path("params.yaml"), "data_dir": Path("data/x"),
                                  "metrics_path": Path("m.json"), "workers": None}
    run_stage(sample_main, ["--params", "p.yaml", "--data-dir", "d", "--metrics-path", "out.json", "--workers", "3"])
    assert sample_main.called == {"params_path": Path("p.yaml"), "data_dir": Path("d"),
                                  "metrics_path": Path("out.json"), "workers": 3}


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_stage(sample_main, ["--data", "d"])
    assert exit_.value.code == 2 and "unrecognized arguments: --data d" in capsys.readouterr().err


def test_a_stage_error_is_one_line_and_exit_1(capsys):
    def main() -> None:
        raise StageError("data/x: not found (run: dvc repro x)")
    with pytest.raises(SystemExit) as exit_:
        run_stage(main, [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: data/x: not found (run: dvc repro x)\n"


WHAT_IS_LEFT = ("no file is half-written; an output this run did not replace is the previous one (run directly) "
                "or absent (dvc repro deletes outputs before a run)")


@pytest.mark.parametrize("error, status, line", [
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     f"error: [Errno {errno.ENOSPC}] No space left on device ({WHAT_IS_LEFT})"),
    (KeyboardInterrupt(), 130, f"interrupted: {WHAT_IS_LEFT}"),
], ids=["disk-full", "ctrl-c"])
def test_a_failed_or_interrupted_run_says_what_its_outputs_are(capsys, error, status, line):
    """Not "left as they were": under dvc repro they were deleted before the run."""
    def main() -> None:
        raise error
    with pytest.raises(SystemExit) as exit_:
        run_stage(main, [])
    assert exit_.value.code == status
    assert capsys.readouterr().err == line + "\n"


def test_help_says_what_each_exit_status_leaves(capsys):
    with pytest.raises(SystemExit):
        run_stage(sample_main, ["--help"])
    epilog = " ".join(capsys.readouterr().out.split())
    assert f"exit status: 0 done; 1 an error the message explains; 130 interrupted. After 1 or 130: {WHAT_IS_LEFT}" \
        in epilog
