"""Score saved class probabilities of several seeds with evaluate's own rule: mean and sd over seeds.

    python -m experiments.score_seeds runs/seeds [--params params.yaml]
        [--against experiments/results/160px_10ep_zoom_0.1.amd.json]

Input: a folder of `seed<N>.npz` files (`val_labels`, `val_<tta>` for every test-time view, and
the same for test where it was scored; `save_probabilities` writes them whole; sweep_jax scores
its own runs with `score_run`) beside `seed<N>.json`. For each, the decision rule is chosen on
validation exactly as `evaluate` does it (`evaluate.choose_decision`) and every split is scored
with it. Prints one row per seed and the mean ± sd, and writes `summary.json`; with `--against`,
another configuration's summary: the paired difference per seed they share. DVC experiments
are summarised by experiments/sweep_summary.py, with the same `mean_sd` and `paired_differences`.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from stages.evaluate import EvaluateParams, choose_decision, classification_metrics, operating_point, real_train_labels
from stages.lib.files import atomic_write_bytes, atomic_write_json
from stages.lib.inference import corrected, decide
from stages.lib.params import load_params

FIGURES = ("balanced_accuracy", "mel_sensitivity", "macro_f1", "macro_auc")


def mean_sd(values) -> dict:
    """{"mean", "sd", "n"} of one figure over seeds (sd None for a single run)."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def paired_differences(runs: dict, baseline: dict) -> dict:
    """Per figure, this configuration's value minus the baseline's for each seed both ran, and their mean ± sd.

    `runs` and `baseline` map a seed to {figure: value}; a figure is compared where every shared
    seed has it on both sides. The same seed draws the same data order and augmentation, so the
    paired difference is less noisy than the difference of two means (on one CPU; another CPU's
    numerics make it a different run).
    """
    seeds = sorted(set(runs) & set(baseline), key=str)
    if not seeds:
        raise SystemExit(f"no seed in common: {sorted(runs, key=str)} against {sorted(baseline, key=str)}")
    paired = {}
    for name in runs[seeds[0]]:
        if all(name in runs[seed] and name in baseline[seed] for seed in seeds):
            per_seed = {seed: runs[seed][name] - baseline[seed][name] for seed in seeds}
            paired[name] = {"per_seed": per_seed} | mean_sd(list(per_seed.values()))
    return paired


def paired_figures(rows: dict) -> dict:
    """score_run's rows as paired_differences takes them: {seed: {"<split>_<key>": value}}."""
    return {seed: {f"{split}_{key}": row[split][key] for split in ("val", "test") if split in row
                   for key in ("balanced_accuracy", "balanced_accuracy_plain")} for seed, row in rows.items()}


def save_probabilities(npz: Path, probabilities: dict) -> None:
    """Whole or not at all: score_seeds reads every seed*.npz, so a run stopped mid-write must leave none."""
    buffer = io.BytesIO()
    np.savez(buffer, **probabilities)
    atomic_write_bytes(npz, buffer.getvalue())


def score_run(npz: Path, params: EvaluateParams, train_labels: np.ndarray) -> dict:
    data = np.load(npz)
    splits = [split for split in ("val", "test") if f"{split}_labels" in data]  # sweeps keep val alone
    proba = {split: data[f"{split}_{params.tta}"] for split in splits}
    labels = {split: data[f"{split}_labels"] for split in splits}
    decision = choose_decision(params, labels["val"], proba["val"], train_labels)
    row = {"prior_strength": decision.prior_strength, "mel_threshold": decision.mel_threshold}
    for split in splits:
        adjusted = corrected(proba[split], decision.class_bias)
        metrics, _ = classification_metrics(labels[split], adjusted)
        row[split] = {name: metrics[name] for name in FIGURES}
        row[split]["operating_point"] = operating_point(labels[split], decide(adjusted, decision.mel_threshold))
        plain, _ = classification_metrics(labels[split], data[f"{split}_none"])
        row[split]["balanced_accuracy_plain"] = plain["balanced_accuracy"]  # no flips, no correction
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--against", type=Path, help="summary JSON of another configuration's seeds")
    args = parser.parse_args()
    params = load_params("evaluate", EvaluateParams, args.params)
    train_labels = real_train_labels(args.data)
    rows = {}
    for npz in sorted(args.runs.glob("seed*.npz")):
        rows[npz.stem] = score_run(npz, params, train_labels)
        record = json.loads(npz.with_suffix(".json").read_text())
        rows[npz.stem]["train_minutes"] = record.get("train_minutes")
    summary = {"runs": rows}
    splits = [split for split in ("val", "test") if all(split in r for r in rows.values())]
    for split in splits:
        for key in ("balanced_accuracy", "balanced_accuracy_plain", "mel_sensitivity"):
            summary[f"{split}_{key}"] = mean_sd([r[split][key] for r in rows.values()])
        summary[f"{split}_operating_point_mel_sensitivity"] = mean_sd(
            [r[split]["operating_point"]["mel_sensitivity"] for r in rows.values()])
    if args.against:
        baseline = json.loads(args.against.read_text())["runs"]
        summary["paired_against"] = {"baseline": str(args.against)} | paired_differences(
            paired_figures(rows), paired_figures(baseline))
    atomic_write_json(args.runs / "summary.json", summary)
    for name, r in rows.items():
        print(f"{name}: strength {r['prior_strength']}", *(
            f"{split} {r[split]['balanced_accuracy']:.4f} (plain {r[split]['balanced_accuracy_plain']:.4f}) "
            f"mel@op {r[split]['operating_point']['mel_sensitivity']:.3f}" for split in splits))
    for key, value in summary.items():
        if key not in ("runs", "paired_against"):
            print(key, value)
    for key, value in summary.get("paired_against", {}).items():
        print("paired", key, value)


if __name__ == "__main__":
    main()
