"""experiments/score_seeds.paired_differences: per-seed differences against another configuration."""
import pytest

from experiments.score_seeds import paired_differences


def run(val, plain, test=None):
    row = {"val": {"balanced_accuracy": val, "balanced_accuracy_plain": plain}}
    if test is not None:
        row["test"] = {"balanced_accuracy": test, "balanced_accuracy_plain": test}
    return row


def test_paired_differences_use_only_the_seeds_both_ran():
    runs = {"seed1": run(0.75, 0.70, 0.72), "seed2": run(0.72, 0.71, 0.70), "seed9": run(0.10, 0.10, 0.10)}
    baseline = {"seed1": run(0.73, 0.71, 0.70), "seed2": run(0.73, 0.70, 0.69), "seed3": run(0.99, 0.99, 0.99)}
    paired = paired_differences(runs, baseline)
    val = paired["val_balanced_accuracy"]
    assert val["per_seed"] == pytest.approx({"seed1": 0.02, "seed2": -0.01})
    assert val["mean"] == pytest.approx(0.005) and val["n"] == 2
    assert paired["val_balanced_accuracy_plain"]["mean"] == pytest.approx(0.0)
    assert paired["test_balanced_accuracy"]["per_seed"] == pytest.approx({"seed1": 0.02, "seed2": 0.01})


def test_paired_differences_skip_a_split_one_side_lacks():
    paired = paired_differences({"seed1": run(0.75, 0.70, 0.72)}, {"seed1": run(0.73, 0.71)})
    assert set(paired) == {"val_balanced_accuracy", "val_balanced_accuracy_plain"}
    assert paired["val_balanced_accuracy"]["sd"] is None


def test_paired_differences_refuse_runs_with_no_seed_in_common():
    with pytest.raises(SystemExit, match="no seed in common"):
        paired_differences({"seed1": run(0.7, 0.7)}, {"seed2": run(0.7, 0.7)})
