"""AUC / GAUC / logloss against hand-computed values (METHODS 1.4, G4)."""
import json
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


# ---- strict JSON and undefined metrics ------------------------------------------------------
def _strict(obj):
    """json.dumps with allow_nan=False, read back with a parser that rejects NaN/Infinity."""
    def reject(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(json.dumps(obj, allow_nan=False), parse_constant=reject)


def test_all_metrics_undefined_are_null_with_a_reason():
    # one label only: AUC undefined; every user holds one label: GAUC undefined
    out = M.all_metrics([1, 1, 1], [0.2, 0.7, 0.4], groups=[5, 6, 6])
    assert out["auc"] is None and out["auc_undefined"] == \
        "only one label: all 3 samples are positive"
    assert out["gauc"] is None and out["gauc_undefined"] == "no group has both labels"
    assert out["groups_used"] == 0 and out["groups_skipped"] == 2
    assert out["logloss"] == pytest.approx(-(math.log(.2) + math.log(.7) + math.log(.4)) / 3)
    assert (out["samples"], out["positives"], out["negatives"]) == (3, 3, 0)
    assert _strict(out) == out
    # defined metrics stay numbers and carry no reason
    ok = M.all_metrics([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.6], groups=[1, 1, 2, 2])
    assert ok["auc"] == pytest.approx(0.75) and ok["gauc"] == pytest.approx(0.5)
    assert not [k for k in ok if k.endswith("_undefined")]
    empty = M.all_metrics([], [], groups=[])
    assert empty["auc_undefined"] == empty["logloss_undefined"] == "no samples"
    assert empty["groups_skipped"] == 0 and _strict(empty) == empty


def test_format_metric_never_prints_nan():
    assert M.format_metric(0.73125) == "0.7312"
    assert M.format_metric(None, M.NO_GAUC_GROUP) == "n/a (no group has both labels)"
    assert M.format_metric(float("nan"), "no samples") == "n/a (no samples)"


def test_json_safe_replaces_non_finite_values():
    got = M.json_safe({"auc": float("nan"), "rows": [{"x": float("inf"), "y": 1.5}],
                       "gauc": float("nan"), "gauc_undefined": "no group has both labels",
                       "n": np.int64(3)})
    assert _strict(got) == {"auc": None, "auc_undefined": "not a number",
                            "rows": [{"x": None, "x_undefined": "not a number", "y": 1.5}],
                            "gauc": None, "gauc_undefined": "no group has both labels", "n": 3}


@pytest.mark.parametrize("samples,positives,warns", [
    (5, 3, True), (199, 100, True), (200, 19, True), (200, 181, True),
    (200, 20, False), (200, 180, False), (10_000, 20, False)])
def test_small_sample_warning_thresholds(samples, positives, warns):
    w = M.small_sample_warning(samples, positives)
    assert (w is not None) == warns
    if warns:
        assert w.startswith("warning: the test split holds only")
        assert f"{samples} impressions ({positives} positive, {samples - positives} negative)" \
            in w
