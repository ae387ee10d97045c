"""experiments/score_seeds: per-seed differences against another configuration; probability files
saved whole or not at all."""
import os

import numpy as np
import pytest

from experiments.score_seeds import paired_differences, paired_figures, save_probabilities


def row(val, plain, test=None):
    """One seed's scores as score_run gives them (the keys paired_figures reads)."""
    scores = {"val": {"balanced_accuracy": val, "balanced_accuracy_plain": plain}}
    if test is not None:
        scores["test"] = {"balanced_accuracy": test, "balanced_accuracy_plain": test}
    return scores


def test_paired_differences_use_only_the_seeds_both_ran():
    runs = {"seed1": row(0.75, 0.70, 0.72), "seed2": row(0.72, 0.71, 0.70), "seed9": row(0.10, 0.10, 0.10)}
    baseline = {"seed1": row(0.73, 0.71, 0.70), "seed2": row(0.73, 0.70, 0.69), "seed3": row(0.99, 0.99, 0.99)}
    paired = paired_differences(paired_figures(runs), paired_figures(baseline))
    val = paired["val_balanced_accuracy"]
    assert val["per_seed"] == pytest.approx({"seed1": 0.02, "seed2": -0.01})
    assert val["mean"] == pytest.approx(0.005) and val["n"] == 2
    assert paired["val_balanced_accuracy_plain"]["mean"] == pytest.approx(0.0)
    assert paired["test_balanced_accuracy"]["per_seed"] == pytest.approx({"seed1": 0.02, "seed2": 0.01})


def test_paired_differences_skip_a_figure_one_side_lacks():
    runs, baseline = {"seed1": row(0.75, 0.70, 0.72)}, {"seed1": row(0.73, 0.71)}
    paired = paired_differences(paired_figures(runs), paired_figures(baseline))
    assert set(paired) == {"val_balanced_accuracy", "val_balanced_accuracy_plain"}
    assert paired["val_balanced_accuracy"]["sd"] is None


def test_paired_differences_pair_any_figures_by_any_seed_key():
    """As sweep_summary calls it: integer seeds, figures named FILE:KEY."""
    runs = {1: {"metrics/val.json:balanced_accuracy": 0.70}, 2: {"metrics/val.json:balanced_accuracy": 0.74}}
    baseline = {1: {"metrics/val.json:balanced_accuracy": 0.71}, 2: {"metrics/val.json:balanced_accuracy": 0.71}}
    paired = paired_differences(runs, baseline)["metrics/val.json:balanced_accuracy"]
    assert paired["per_seed"] == pytest.approx({1: -0.01, 2: 0.03})
    assert paired["mean"] == pytest.approx(0.01) and paired["sd"] == pytest.approx(np.std([-0.01, 0.03], ddof=1))


def test_paired_differences_refuse_runs_with_no_seed_in_common():
    with pytest.raises(SystemExit, match="no seed in common"):
        paired_differences(paired_figures({"seed1": row(0.7, 0.7)}), paired_figures({"seed2": row(0.7, 0.7)}))


def test_probabilities_are_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    npz = tmp_path / "seed1.npz"
    save_probabilities(npz, {"val_none": np.ones((2, 7))})

    def disk_full(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_probabilities(npz, {"val_none": np.zeros((2, 7))})
    assert sorted(p.name for p in tmp_path.glob("seed*.npz")) == ["seed1.npz"]  # what score_seeds reads
    assert [p.name for p in tmp_path.iterdir()] == ["seed1.npz"]                 # no temporary file left
    with np.load(npz) as saved:
        assert saved["val_none"].tolist() == np.ones((2, 7)).tolist()
