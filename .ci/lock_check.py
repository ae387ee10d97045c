"""Is the committed dvc.lock up to date with the code, params and committed outputs? No data needed.

    python .ci/lock_check.py [--output FILE]   # Markdown; exit status 1: dvc.lock is stale, 2: check failed

From `dvc status --json`. Without a DVC remote (a fresh clone, a pull request's CI) data and models
are absent ("deleted", "not in cache"): missing data, not a stale lock, so ignored. Stale means: a
present dependency that differs from dvc.lock (code edited, a git-tracked input changed); a params
key that differs (`train.epochs` edited, `dvc repro` not run), named key by key even where a stage
declares a whole section; a changed command, or a stage dvc.lock lacks; a git-tracked output
(`cache: false`) whose committed bytes differ. `dvc repro` (with a remote: `dvc repro --pull
--allow-missing`) brings dvc.lock up to date. Docs: docs/pull_requests.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

MISSING = {"deleted", "not in cache"}  # absent data: expected without a remote


def changed_keys(old, new, prefix: str) -> list[str]:
    """Dotted keys under `prefix` whose values differ: `train` -> [`train.epochs`] (leaves only)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix] if old != new else []
    return [key for name in dict.fromkeys([*old, *new])
            for key in changed_keys(old.get(name), new.get(name), f"{prefix}.{name}")]


def param_reasons(changes: dict[str, str], locked: dict, current: dict) -> list[str]:
    """`param KEY modified|new|deleted`, key by key: a whole declared section (`- train`) is
    expanded to the keys in it that differ between dvc.lock (`locked`) and the params file."""
    reasons = []
    for key, change in changes.items():
        keys = changed_keys(locked.get(key), current.get(key), key) if change == "modified" else []
        reasons += [f"param `{name}` {change}" for name in keys or [key]]
    return reasons


def stale_stages(status: dict, yaml_stages: list[str], lock_stages: dict[str, dict],
                 params_files: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """Stage -> why its dvc.lock entry is out of date, from `dvc status --json`; missing data ignored.

    `lock_stages`: dvc.lock's stages; `params_files`: path -> the params file as loaded now."""
    params_files = params_files or {}
    stale: dict[str, list[str]] = {name: ["not in dvc.lock (never run)"] for name in yaml_stages
                                   if name not in lock_stages}
    for stage, entries in status.items():
        name = stage.split(":")[-1]  # "dvc.yaml:train" in some DVC versions
        reasons = []
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed", ...
                reasons.append(entry)
                continue
            for kind, changes in entry.items():
                noun = kind.removeprefix("changed ").rstrip("s")  # dep / out
                if not isinstance(changes, dict):
                    reasons.append(f"{kind}: {changes}")
                    continue
                for path, state in changes.items():
                    if isinstance(state, dict):  # a params file: {key: modified | new | deleted}
                        locked = (lock_stages.get(name) or {}).get("params", {}).get(path, {})
                        reasons += param_reasons(state, locked, params_files.get(path, {}))
                    elif state not in MISSING:
                        reasons.append(f"{noun} `{path}` {state}")
        if reasons:
            stale.setdefault(name, []).extend(reasons)
    return stale


def markdown(stale: dict[str, list[str]]) -> str:
    if not stale:
        return ("`dvc.lock` matches the code, params and committed outputs "
                "(data and models not checked where they are absent).")
    lines = ["**`dvc.lock` is out of date**: these stages changed since it was written, so the metrics and "
             "plots in this branch do not come from its code and params. Run `dvc repro` (it re-runs these "
             "stages and those after them) and commit `dvc.lock` and `metrics/`.", ""]
    lines += [f"- `{stage}`: " + "; ".join(reasons) for stage, reasons in stale.items()]
    return "\n".join(lines)


def check(root: Path = Path(".")) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                          text=True)
    if done.returncode != 0:  # exit status 2: the check itself failed (1 means a stale dvc.lock)
        print(f"dvc status failed ({done.returncode}):\n{done.stderr.strip()}", file=sys.stderr)
        sys.exit(2)
    status = json.loads(done.stdout or "{}")
    yaml_stages = list((yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {}))
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.exists() else {}
    lock_stages = (lock or {}).get("stages", {})
    files = {path for stage in lock_stages.values() for path in stage.get("params", {})}
    params_files = {path: yaml.safe_load((root / path).read_text(encoding="utf-8")) or {}
                    for path in files if (root / path).is_file()}
    return stale_stages(status, yaml_stages, lock_stages, params_files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    stale = check()
    text = markdown(stale) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
