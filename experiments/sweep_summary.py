"""Summarise seed sweeps run as DVC experiments: mean ± sd per configuration, paired differences.

    dvc exp run --queue evaluate -S 'train.seed=1,2,3' [-S train.KEY=VALUE] -S evaluate.score_test=false
    dvc queue start
    python -m experiments.sweep_summary [--baseline EXP_OR_REV] [--metric FILE:KEY ...] [--json]

Input: `dvc exp show --json` of the repository in the working folder (HEAD's experiments and
HEAD itself; queued, running and failed ones are skipped) and its dvc.yaml. A configuration is a
run's values of the params keys dvc.yaml declares, less train.seed and evaluate.score_test (which
split is read changes no figure); its runs are its seeds. Output: per configuration, each figure's
mean ± sd over seeds and, against the baseline configuration (HEAD's, or --baseline's), the
paired difference over the seeds both ran. Why: one run moves by about 0.02 with the seed alone,
so configurations are compared on seeds; measurements: docs/experiments.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from experiments.score_seeds import mean_sd, paired_differences
from stages.lib.cli import StageError, command_parser

SEED_KEY = "train.seed"
NOT_CONFIGURATION = (SEED_KEY, "evaluate.score_test")
FIGURES = ("metrics/val.json:balanced_accuracy", "metrics/val.json:operating_point.mel_sensitivity",
           "metrics/test.json:balanced_accuracy", "metrics/test.json:operating_point.mel_sensitivity")


def declared_params(dvc_yaml: Path) -> list[str]:
    """The params.yaml keys the stages of `dvc_yaml` declare, in order, each once."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as err:
        raise StageError(f"{dvc_yaml}: cannot read it ({err}); run from the repository's root") from None
    keys = [key for stage in stages.values() for key in stage.get("params", []) if isinstance(key, str)]
    return list(dict.fromkeys(keys))


def lookup(data, key: str):
    """`data`'s value at the dotted `key` (None where absent)."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def runs_of(exp_show: list[dict]) -> list[dict]:
    """Every finished run in `dvc exp show --json`: {"name", "rev", "params", "metrics"}.

    Baseline commits count as runs (the committed run is a seed of its configuration); the
    workspace does not, nor do experiments queued, running or failed, nor any without data.
    """
    found = []

    def add(entry: dict, name: str | None, commit: bool = False) -> None:
        data = entry.get("data")
        if not data or entry.get("error") or entry.get("rev") == "workspace":
            return
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        metrics = {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()}
        found.append({"name": name or entry.get("name") or entry["rev"][:7], "rev": entry["rev"], "commit": commit,
                      "params": params, "metrics": metrics})

    for baseline in exp_show:
        add(baseline, baseline.get("name"), commit=True)
        for experiment in baseline.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state", "success")
            if state == "success":
                for rev in experiment.get("revs") or []:
                    add(rev, experiment.get("name"))
    return found


def figure(run: dict, name: str) -> float | None:
    """The figure `FILE:KEY` of a run (None where the file or key is absent, or not a number)."""
    path, _, key = name.partition(":")
    value = lookup(run["metrics"].get(path), key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def figures_of(run: dict, figures: list[str]) -> dict[str, float]:
    """{figure: value} of the `figures` the run has."""
    return {name: value for name in figures if (value := figure(run, name)) is not None}


def configuration(run: dict, keys: list[str]) -> tuple[tuple[str, str], ...]:
    """The run's values of `keys` (those that define a configuration), comparable and hashable."""
    return tuple((key, json.dumps(lookup(run["params"], key), sort_keys=True)) for key in keys)


def summarise(runs: list[dict], keys: list[str], figures: list[str], baseline: str | None = None) -> dict:
    """{"baseline": label, "configurations": [{"label", "differs", "seeds", "runs", "figures", "paired"}]}.

    `differs` lists the keys whose value differs from the baseline configuration's (label: those
    key=value pairs, "baseline" for none); a seed run twice keeps the run listed first (the newest).
    """
    keys = [key for key in keys if key not in NOT_CONFIGURATION]
    if not runs:
        raise StageError("no finished run: queue a sweep (dvc exp run --queue -S ...) and run it (dvc queue start)")
    if baseline is None:
        chosen = next((r for r in runs if r["commit"]), runs[0])
    else:
        chosen = next((r for r in runs if baseline in (r["name"], r["rev"]) or r["rev"].startswith(baseline)), None)
        if chosen is None:
            raise StageError(f"--baseline {baseline}: no finished run has that name or revision "
                             f"(runs: {', '.join(r['name'] for r in runs)})")
    reference = dict(configuration(chosen, keys))
    groups: dict[tuple, dict] = {}  # configuration -> {seed: run}
    for run in runs:
        groups.setdefault(configuration(run, keys), {}).setdefault(lookup(run["params"], SEED_KEY), run)
    base = {seed: figures_of(run, figures) for seed, run in groups[configuration(chosen, keys)].items()}
    summary = []
    for config, seeds in groups.items():
        values = {seed: figures_of(run, figures) for seed, run in seeds.items()}
        differs = {key: json.loads(value) for key, value in config if reference[key] != value}
        entry = {"label": ", ".join(f"{key}={value}" for key, value in differs.items()) or "baseline",
                 "differs": differs, "seeds": sorted(seeds, key=lambda s: (s is None, s or 0)),
                 "runs": {str(seed): run["name"] for seed, run in seeds.items()},
                 "figures": {f: mean_sd(got) for f in figures if (got := [v[f] for v in values.values() if f in v])}}
        if differs and set(values) & set(base):
            entry["paired"] = paired_differences(values, base)
        summary.append(entry)
    summary.sort(key=lambda e: (e["label"] != "baseline", e["label"]))
    return {"baseline": chosen["name"], "configurations": summary}


def format_summary(summary: dict) -> str:
    """The summary for people: per configuration its seeds, then one line per figure."""
    def fmt(stat: dict, sign: str = "") -> str:
        sd = "" if stat["sd"] is None else f" ± {stat['sd']:.4f}"
        return f"{stat['mean']:{sign}.4f}{sd} (n={stat['n']})"

    width = max((len(f) for c in summary["configurations"] for f in c["figures"]), default=0)
    lines = []
    for config in summary["configurations"]:
        seeds = ", ".join(str(s) for s in config["seeds"])
        lines.append(f"{config['label']} (seeds {seeds})" + (f": {summary['baseline']}'s configuration"
                                                             if config["label"] == "baseline" else ""))
        for name, stat in config["figures"].items():
            paired = config.get("paired", {}).get(name)
            lines.append(f"  {name:<{width}}  {fmt(stat)}" + (f"   paired: {fmt(paired, '+')}" if paired else ""))
    return "\n".join(lines) + "\n"


def exp_show() -> list[dict]:
    """`dvc exp show --json` of the repository in the working folder."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"dvc exp show --json failed: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(main, exit_status="exit status: 0 summary printed; 2 nothing to summarise "
                                              "(no finished run, unknown --baseline, dvc exp show failed)")
    parser.add_argument("--baseline", metavar="EXP_OR_REV",
                        help="the configuration to compare against: an experiment's name or a revision "
                             "(default: HEAD's)")
    parser.add_argument("--metric", action="append", metavar="FILE:KEY",
                        help=f"a figure to summarise (repeatable; default: {', '.join(FIGURES)})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    figures = args.metric or list(FIGURES)
    bad = [f for f in figures if ":" not in f]
    if bad:
        parser.error(f"--metric {bad[0]}: expected FILE:KEY, e.g. {FIGURES[0]}")
    try:
        summary = summarise(runs_of(exp_show()), declared_params(Path("dvc.yaml")), figures, args.baseline)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), end="\n" if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
