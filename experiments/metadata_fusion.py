"""Does patient metadata (age, sex, site) help, and with what weight and regularisation? Seeds, paired.

    python -m experiments.metadata_fusion runs/metadata --model 42=models/model.keras \
        --model 43=../s43/models/model.keras [--test 42] [--weights 0.5 1 --regularizations 0.1 1]

For each trained model (seed=path), the validation probabilities under `evaluate.tta` are
computed once and kept in RUNS/seed<N>.npz (score_seeds' layout, plus image ids). For each
configuration (metadata weight x regularisation; weight 0 is the image alone), the metadata model
is fitted on the training split's rows (stages/lib/metadata.py), the decision rule is chosen on
validation exactly as `evaluate` does it, and validation is scored, also under the alternative
rule of deciding on the shown probabilities' order, and the shown probabilities' NLL (a proper
score, less noisy than balanced accuracy). `--test SEED` also scores that
seed's test split with each configuration's validation-chosen rule: read it once, for the
configuration already chosen. Writes RUNS/summary.json: per configuration and seed the figures,
and mean ± sd over seeds with the paired difference to the image alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from experiments.score_seeds import mean_sd, save_probabilities
from stages.evaluate import (
    EvaluateParams,
    choose_decision,
    classification_metrics,
    metadata_of,
    operating_point,
    real_train_labels,
    rows_of_each_image,
)
from stages.lib import metadata
from stages.lib.calibration import calibrated, fit_temperature, nll
from stages.lib.files import atomic_write_json, read_table
from stages.lib.inference import class_shares, corrected, decide, feature_model, model_outputs
from stages.lib.params import load_params
from stages.lib.shards import read_shards


def probabilities(npz: Path, model_path: Path, splits: list[str], params: EvaluateParams, data: Path) -> dict:
    """{split_labels, split_<tta>, split_image_ids} of one model, computed once and kept in `npz`."""
    if npz.exists():
        kept = dict(np.load(npz))
        if all(f"{split}_labels" in kept for split in splits):
            return kept
    import keras

    model = feature_model(keras.saving.load_model(model_path))
    out = {}
    for split in splits:
        images, labels, ids = read_shards(data, split)
        out[f"{split}_labels"], out[f"{split}_image_ids"] = labels, ids
        out[f"{split}_{params.tta}"] = model_outputs(model, images, params.tta, params.batch_size)[0]
    save_probabilities(npz, out)
    return out


def score(weight: float, model: metadata.MetadataModel | None, run: dict, splits: list[str], params: EvaluateParams,
          train_labels: np.ndarray, rows: dict[str, list[metadata.Metadata]]) -> dict:
    """One configuration on one seed (weight 0: the image alone, `model` unused); `rows`: each
    split's Metadata, in the shards' order."""
    combined = {}
    for split in splits:
        proba = run[f"{split}_{params.tta}"]
        combined[split] = metadata.combine(proba, model.log_ratio(rows[split]), weight) if weight else proba
    decision = choose_decision(params, run["val_labels"], combined["val"], train_labels)
    prior = class_shares(train_labels)
    temperature = fit_temperature(run["val_labels"], combined["val"], prior)
    row = {"prior_strength": decision.prior_strength, "mel_threshold": decision.mel_threshold,
           "temperature": temperature}
    for split in splits:
        adjusted = corrected(combined[split], decision.class_bias)
        figures, _ = classification_metrics(run[f"{split}_labels"], adjusted)
        row[split] = {"balanced_accuracy": figures["balanced_accuracy"],
                      "per_class_recall": {dx: v["recall"] for dx, v in figures["per_class"].items()},
                      "operating_point": operating_point(run[f"{split}_labels"],
                                                         decide(adjusted, decision.mel_threshold)),
                      # the alternative rule for the page: decide on the shown (calibrated) probabilities' order
                      "shown_argmax_balanced_accuracy": float(balanced_accuracy_score(
                          run[f"{split}_labels"], calibrated(combined[split], temperature, prior).argmax(axis=1))),
                      # a proper score of the shown probabilities: less noisy than balanced accuracy
                      "shown_nll": nll(run[f"{split}_labels"], calibrated(combined[split], temperature, prior))}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--model", action="append", required=True, help="SEED=PATH of a trained model.keras")
    parser.add_argument("--test", type=int, action="append", default=[], help="seed whose test split is scored")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    parser.add_argument("--regularizations", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--split", type=Path, default=Path("data/split"))
    args = parser.parse_args()
    params = load_params("evaluate", EvaluateParams, args.params)
    train_labels = real_train_labels(args.data)
    train = read_table(args.split / "train.csv", required=("image_id", "label"))
    train_rows = metadata.of_table(train)
    runs = {}
    for item in args.model:
        seed, path = item.split("=", 1)
        splits = ["val", "test"] if int(seed) in args.test else ["val"]
        runs[int(seed)] = (probabilities(args.runs / f"seed{seed}.npz", Path(path), splits, params, args.data), splits)
    rows = {}  # every seed's shards hold the same images: each split's metadata is read once
    for run, splits in runs.values():
        for split in splits:
            if split not in rows:
                table = rows_of_each_image(args.split, split, run[f"{split}_image_ids"])
                rows[split] = metadata_of(table, args.split / f"{split}.csv")
    models = {c: metadata.fit(train_rows, train["label"].to_numpy(), metadata.FIELDS, c) for c in args.regularizations}
    configs = [(0.0, None)] + [(w, c) for w in args.weights for c in args.regularizations]
    results = {}
    for weight, c in configs:
        name = "image only" if not weight else f"weight {weight:g}, C {c:g}"
        per_seed = {seed: score(weight, models.get(c), run, splits, params, train_labels, rows)
                    for seed, (run, splits) in runs.items()}
        results[name] = {"weight": weight, "regularization": c, "per_seed": per_seed,
                         "val_balanced_accuracy": mean_sd([r["val"]["balanced_accuracy"] for r in per_seed.values()]),
                         "val_shown_nll": mean_sd([r["val"]["shown_nll"] for r in per_seed.values()])}
        print(f"{name:22s}", " ".join(f"s{s} val {r['val']['balanced_accuracy']:.4f}" +
                                      (f" test {r['test']['balanced_accuracy']:.4f}" if "test" in r else "")
                                      for s, r in per_seed.items()),
              f"mean {results[name]['val_balanced_accuracy']['mean']:.4f},",
              f"NLL {results[name]['val_shown_nll']['mean']:.4f}")
    baseline = results["image only"]["per_seed"]
    for result in results.values():
        diffs = [r["val"]["balanced_accuracy"] - baseline[s]["val"]["balanced_accuracy"]
                 for s, r in result["per_seed"].items()]
        result["paired_val_difference"] = mean_sd(diffs)
    atomic_write_json(args.runs / "summary.json", {"evaluate_params": vars(params), "configurations": results})


if __name__ == "__main__":
    main()
