"""Running a stage: one command-line shape for every stage, and one way to report its errors.

`run_stage(main)` builds the command line from main()'s keyword parameters, with the defaults
dvc.yaml uses: `params_path` -> --params FILE, `<what>_dir` -> --<what>-dir DIR, `<what>_path` ->
--<what>-path FILE, `workers` -> --workers N (default: the usable CPUs). `command_parser` is the
same start for commands that are not stages (predict, serve).
A StageError (ParamError for params.yaml) ends the run with one line, `error: <message>`, and
exit 1; Ctrl-C exits 130. Either way no file is half-written (stages/lib/files.py), and an output
the run did not replace is the previous one when the stage runs directly, absent under `dvc
repro` (which deletes a stage's outputs before it runs it).
Invariant: `python -m stages.<name> --help` prints usage and exits 0 before anything is read,
written or imported beyond the stage's module (TensorFlow is imported inside the functions).
Why: every stage is run, tested and scripted the same way. Endings and messages: docs/faults.md.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

# What a failed or interrupted run leaves: true run directly and under `dvc repro` (see files.py).
OUTPUTS_LEFT = ("no file is half-written; an output this run did not replace is the previous one (run directly) "
                "or absent (dvc repro deletes outputs before a run)")
EXIT_STATUS = f"exit status: 0 done; 1 an error the message explains; 130 interrupted. After 1 or 130: {OUTPUTS_LEFT}"
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


class StageError(Exception):
    """An error the user can fix: the message names the file or key and the problem."""


class ParamError(StageError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range."""


def module_name(main: Callable[..., Any]) -> str:
    """`stages.<name>` of main's module, also when it runs as __main__ (python -m stages.<name>)."""
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    return spec.name if spec is not None else main.__module__


def option_name(parameter: str) -> str:
    return "--params" if parameter == "params_path" else "--" + parameter.replace("_", "-")


def _value_type(hint: Any) -> Any:
    """The type that parses an option's text: X for X and for X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def command_parser(main: Callable[..., Any], description: str | None = None,
                   exit_status: str = EXIT_STATUS) -> argparse.ArgumentParser:
    """The parser every command starts from, stage or not (predict, serve): named `python -m
    stages.<name>`, described by its module docstring's first paragraph unless `description` is
    given, its exit statuses as the epilog, and no abbreviated options (`--data` must not pass for
    `--data-dir`)."""
    if description is None:
        module = sys.modules.get(main.__module__)
        description = inspect.cleandoc(getattr(module, "__doc__", None) or "").split("\n\n")[0] or None
    return argparse.ArgumentParser(prog=f"python -m {module_name(main)}", description=description,
                                   epilog=exit_status, allow_abbrev=False)


def stage_parser(main: Callable[..., Any]) -> argparse.ArgumentParser:
    """An argparse parser with one option per keyword parameter of main(), defaults included."""
    parser = command_parser(main)
    hints = typing.get_type_hints(main)
    for name, parameter in inspect.signature(main).parameters.items():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            raise TypeError(f"{module_name(main)}.main: parameter {name} cannot be an option")
        if parameter.default is parameter.empty:
            raise TypeError(f"{module_name(main)}.main: parameter {name} needs a default")
        value_type = _value_type(hints.get(name, str))
        shown = "the usable CPUs" if name == "workers" and parameter.default is None else "%(default)s"
        metavar = {"params_path": "FILE", "workers": "N"}.get(name) or (
            "DIR" if name.endswith("_dir") else "FILE" if name.endswith("_path") else None)
        parser.add_argument(option_name(name), dest=name, type=value_type, default=parameter.default,
                            metavar=metavar, help=f"default: {shown}")
    return parser


def run_stage(main: Callable[..., None], argv: Sequence[str] | None = None) -> None:
    """Parse the command line into main()'s parameters and run it.

    Usage errors exit 2 (argparse); user errors print one clear line and exit 1, not a traceback.
    """
    args = stage_parser(main).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")
    try:
        main(**vars(args))
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # disk full, permissions...
        print(f"error: {err} ({OUTPUTS_LEFT})", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {OUTPUTS_LEFT}", file=sys.stderr)
        sys.exit(130)
