"""Offline metrics (METHODS 1.4): AUC, GAUC (G4), logloss.

* AUC: ROC-AUC over all samples; tied scores count 1/2 (the Mann-Whitney
  statistic with average ranks; identical to scikit-learn's ``roc_auc_score``).
* GAUC = sum_g n_g AUC_g / sum_g n_g over groups g whose samples hold both
  labels; n_g = number of samples of g (all of them, not only the positives);
  groups with a single label are skipped (counted in ``groups_skipped``).
  The group key is a parameter (user by default; a request id for ENCODE/LREA).
* Logloss: mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7].

NumPy rather than ``tf.keras.metrics.AUC``: the Keras metric approximates with
thresholds buckets and has no grouping; here results must be exact.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from scipy.stats import rankdata

EPS = 1e-7


def auc(labels, scores) -> float:
    """Exact ROC-AUC with ties 1/2; NaN if only one label is present."""
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks: a tie contributes 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels, scores, groups) -> Dict[str, float]:
    """Group AUC (G4) with the count of groups used and skipped."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if not (y.shape == s.shape == g.shape):
        raise ValueError(f"labels {y.shape}, scores {s.shape}, groups {g.shape} differ in shape")
    order = np.argsort(g, kind="stable")
    g, y, s = g[order], y[order], s[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], g.size]
    num, den, used = 0.0, 0.0, 0
    for a, b in zip(starts, ends):
        value = auc(y[a:b], s[a:b])
        if np.isnan(value):
            continue
        num += (b - a) * value
        den += b - a
        used += 1
    return {"gauc": num / den if den else float("nan"), "groups_used": used,
            "groups_skipped": int(starts.size - used)}


def logloss(labels, probs) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def all_metrics(labels, probs, groups=None) -> Dict[str, float]:
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs),
           "samples": int(np.asarray(labels).size),
           "positive_rate": float(np.mean(np.asarray(labels) > 0.5)) if np.size(labels) else 0.0}
    if groups is not None:
        out.update(gauc(labels, probs, groups))
    return out
