"""AUC / GAUC / logloss against hand-computed values (METHODS 1.4, G4)."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tfmodels import metrics as M


def test_auc_hand_case_with_ties():
    # positives scores {0.8, 0.5}, negatives {0.5, 0.2}: pairs (0.8>0.5)=1, (0.8>0.2)=1,
    # (0.5=0.5)=1/2, (0.5>0.2)=1 -> 3.5 / 4
    assert M.auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)


def test_auc_matches_sklearn_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 1)  # many ties
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_single_label_is_nan():
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_gauc_hand_case():
    labels = [1, 0, 0,   1, 0,   1, 1]
    scores = [.9, .1, .95, .3, .3, .5, .6]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    # a: pos .9 vs negs .1 (win), .95 (loss) -> 0.5, n=3
    # b: pos .3 vs neg .3 tie -> 0.5, n=2;  c: single label -> skipped
    out = M.gauc(labels, scores, groups)
    assert out["gauc"] == pytest.approx((3 * 0.5 + 2 * 0.5) / 5)
    assert out["groups_used"] == 2 and out["groups_skipped"] == 1


def test_gauc_weights_by_sample_count():
    labels = [1, 0, 1, 0, 0, 0]
    scores = [.9, .1, .1, .9, .2, .3]      # g1 AUC 1 (n=2), g2 AUC 0 (n=4)
    groups = [1, 1, 2, 2, 2, 2]
    assert M.gauc(labels, scores, groups)["gauc"] == pytest.approx(2 / 6)


def test_logloss_hand_case():
    assert M.logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        M.gauc([1, 0], [0.1, 0.2], [1])
