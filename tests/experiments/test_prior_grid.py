"""experiments/prior_grid.py: lesion-grouped halvings and the cross-validated score of a strength grid."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.prior_grid import lesion_halvings, score_run
from stages.evaluate import EvaluateParams
from stages.lib.dataset import CLASSES

MEL, NV = CLASSES.index("mel"), CLASSES.index("nv")
NARROW = EvaluateParams(batch_size=8, tta="flips", prior_strengths=[-0.5, -0.25, 0.0, 0.25, 0.5],
                        mel_sensitivity_target=0.85, bootstrap_samples=200, seed=1)
WIDE = dataclasses.replace(NARROW, prior_strengths=[-1.0, *NARROW.prior_strengths])
# nv is 9x every other class in training, so negative strengths move decisions towards the rest.
TRAIN_LABELS = np.repeat(np.arange(len(CLASSES)), [90 if k == NV else 10 for k in range(len(CLASSES))])


def test_halvings_take_half_the_lesions_and_never_split_one():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    for half in lesion_halvings(groups, count=20, seed=0):
        chosen = set(groups[half])
        assert len(chosen) == 2  # 5 lesions // 2
        assert not chosen & set(groups[~half]), "a lesion on both sides"


def scores(p_mel_for_melanomas: float) -> dict:
    """score_run on 40 melanomas and 160 nevi, one image per lesion; nevi are called nv with confidence."""
    labels = np.array([MEL] * 40 + [NV] * 160)
    proba = np.full((len(labels), len(CLASSES)), 1e-4)
    proba[labels == MEL, MEL], proba[labels == MEL, NV] = p_mel_for_melanomas, 0.8
    proba[labels == NV, MEL], proba[labels == NV, NV] = 0.01, 0.95
    proba /= proba.sum(axis=1, keepdims=True)
    halvings = lesion_halvings(np.arange(len(labels)), count=10, seed=0)
    return score_run(labels, proba, TRAIN_LABELS, NARROW, WIDE, halvings)


def test_a_wider_grid_scores_higher_where_only_its_edge_recovers_the_rare_class():
    # p(mel) 0.1 against p(nv) 0.8: only strength -1 (bias gap 2.2 > log 8) calls them melanoma.
    row = scores(p_mel_for_melanomas=0.1)
    assert row["committed_grid"] == 0.5  # melanoma recall 0, nv recall 1
    assert row["candidate_grid"] == 1.0
    assert row["gain"] == 0.5
    assert (row["committed_grid_strength_on_all_val"], row["candidate_grid_strength_on_all_val"]) == (0.0, -1.0)
    assert row["val_ba_by_strength"] == {"-1.0": 1.0, "-0.5": 0.5, "-0.25": 0.5, "0.0": 0.5, "0.25": 0.5, "0.5": 0.5}


def test_the_grids_score_alike_where_no_correction_is_needed():
    row = scores(p_mel_for_melanomas=0.9)
    assert row["committed_grid"] == row["candidate_grid"] == 1.0
    assert row["gain"] == 0.0
