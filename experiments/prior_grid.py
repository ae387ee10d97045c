"""Would another grid of class-prior strengths score better on images it was not chosen on?

    python -m experiments.prior_grid runs/seeds/seed*.npz --grid -1 -0.75 -0.5 -0.25 0 0.25 0.5 --out runs/grid.json

Reads saved validation probabilities (`val_labels`, `val_<tta>`: score_seeds.save_probabilities);
test is never read. Validation is halved at random by lesion group (no lesion on both sides); the
strength is chosen on one half with evaluate's own rule and scored on the other, both ways round,
over many halvings. Writes, per run, the validation balanced accuracy at each strength, the
cross-validated balanced accuracy of the committed grid and of `--grid`, and their difference.
Why: when evaluate's pick sits at the grid's edge, a wider grid looks better on the same images
by construction; only held-out halves show whether it generalises.
Results: docs/experiments.md (the prior-grid row).
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import numpy as np

from experiments.score_seeds import mean_sd
from stages.evaluate import (
    EvaluateParams,
    choose_decision,
    corrected_ba,
    real_train_labels,
    rows_of_each_image,
)
from stages.lib.files import atomic_write_json
from stages.lib.inference import prior_bias
from stages.lib.params import load_params
from stages.lib.shards import read_shards


def lesion_halvings(groups: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """`count` random masks, each selecting half of the lesion groups (all of a group's images or none)."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    return [np.isin(groups, rng.choice(unique, size=len(unique) // 2, replace=False)) for _ in range(count)]


def cross_validated_ba(labels: np.ndarray, proba: np.ndarray, train_labels: np.ndarray,
                       params: EvaluateParams, halvings: list[np.ndarray]) -> float:
    """Mean balanced accuracy on each half, with the prior strength chosen on the other half."""
    scores = []
    for half in halvings:
        for chosen_on, scored_on in ((half, ~half), (~half, half)):
            decision = choose_decision(params, labels[chosen_on], proba[chosen_on], train_labels)
            scores.append(corrected_ba(labels[scored_on], proba[scored_on], decision.class_bias))
    return float(np.mean(scores))


def score_run(labels: np.ndarray, proba: np.ndarray, train_labels: np.ndarray, committed: EvaluateParams,
              candidate: EvaluateParams, halvings: list[np.ndarray]) -> dict:
    """One model's validation figures: at each strength, and cross-validated for both grids."""
    strengths = sorted({*committed.prior_strengths, *candidate.prior_strengths})
    row = {"val_ba_by_strength": {str(s): corrected_ba(labels, proba, prior_bias(train_labels, s)) for s in strengths}}
    for name, params in (("committed_grid", committed), ("candidate_grid", candidate)):
        row[name] = cross_validated_ba(labels, proba, train_labels, params, halvings)
        row[f"{name}_strength_on_all_val"] = choose_decision(params, labels, proba, train_labels).prior_strength
    row["gain"] = row["candidate_grid"] - row["committed_grid"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="seed<N>.npz probability files")
    parser.add_argument("--grid", type=float, nargs="+", required=True, help="candidate prior strengths")
    parser.add_argument("--halvings", type=int, default=200)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--split-dir", type=Path, default=Path("data/split"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # A half can lack a rare class (vasc, df) that the model still predicts; balanced accuracy then
    # averages over the classes present, as evaluate does, and sklearn's warning says only that.
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    committed = load_params("evaluate", EvaluateParams, args.params)
    candidate = dataclasses.replace(committed, prior_strengths=list(args.grid))
    train_labels = real_train_labels(args.data)
    _, val_labels, val_ids = read_shards(args.data, "val")
    groups = rows_of_each_image(args.split_dir, "val", val_ids)["lesion_group"].to_numpy()
    halvings = lesion_halvings(groups, args.halvings, committed.seed)
    rows = {}
    for run in args.runs:
        data = np.load(run)
        labels, proba = data["val_labels"], data[f"val_{committed.tta}"]
        if not np.array_equal(labels, val_labels):
            raise SystemExit(f"{run}: its validation labels are not those of {args.data} (another split?)")
        row = score_run(labels, proba, train_labels, committed, candidate, halvings)
        rows[f"{run.parent.name}/{run.stem}"] = row
        print(f"{run}: committed grid {row['committed_grid']:.4f}, candidate {row['candidate_grid']:.4f}, "
              f"gain {row['gain']:+.4f}", flush=True)
    gain = mean_sd([row["gain"] for row in rows.values()])
    summary = {"committed_grid": committed.prior_strengths, "candidate_grid": list(args.grid),
               "halvings": args.halvings, "runs": rows, "gain_mean": gain["mean"], "gain_sd": gain["sd"]}
    atomic_write_json(args.out, summary)
    print(f"gain over {gain['n']} runs: {gain['mean']:+.4f}")


if __name__ == "__main__":
    main()
