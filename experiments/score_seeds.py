"""Score the runs of experiments/seeds.py with evaluate's own rule: mean and sd over seeds.

    python -m experiments.score_seeds runs/seeds [--params params.yaml]
        [--against experiments/results/160px_10ep_zoom_0.1.amd.json]

For each `seed<N>.npz`, the decision rule is chosen on validation exactly as `evaluate` does it
(`evaluate.choose_decision`: flips as set in params, prior strength, melanoma threshold) and both
splits are scored with it. Prints one row per seed and the mean ± sd, and writes `summary.json`.
With `--against`, another configuration's summary: the paired difference per seed they share.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np  # noqa: E402

from stages.evaluate import EvaluateParams, choose_decision, classification_metrics, operating_point, real_train_labels  # noqa: E402
from stages.lib.files import atomic_write_json  # noqa: E402
from stages.lib.inference import corrected, decide  # noqa: E402
from stages.lib.params import load_params  # noqa: E402

FIGURES = ("balanced_accuracy", "mel_sensitivity", "macro_f1", "macro_auc")


def mean_sd(values) -> dict:
    """{"mean", "sd", "n"} of one figure over seeds (sd None for a single run)."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def paired_differences(runs: dict, baseline: dict) -> dict:
    """This configuration's figure minus the baseline's, per seed run by both, and their mean ± sd.

    The same seed draws the same data order and augmentation, so the paired difference is less noisy
    than the difference of two means (on one CPU; another CPU's numerics make it a different run).
    """
    seeds = sorted(set(runs) & set(baseline))
    if not seeds:
        raise SystemExit(f"no seed in common: {sorted(runs)} against {sorted(baseline)}")
    paired = {}
    for split in ("val", "test"):
        if not all(split in runs[seed] and split in baseline[seed] for seed in seeds):
            continue
        for key in ("balanced_accuracy", "balanced_accuracy_plain"):
            per_seed = {seed: runs[seed][split][key] - baseline[seed][split][key] for seed in seeds}
            paired[f"{split}_{key}"] = {"per_seed": per_seed} | mean_sd(list(per_seed.values()))
    return paired


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
        summary["paired_against"] = {"baseline": str(args.against)} | paired_differences(rows, baseline)
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
