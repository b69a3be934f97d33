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

:func:`auc` and :func:`gauc` return NaN where the metric is undefined (one label
only; no group with both labels). :func:`all_metrics` -- what ``metrics-*.json``,
``results.json`` and ``replay.json`` hold -- is strict JSON instead: an undefined
metric is ``None`` (``null``) with the reason in ``"<metric>_undefined"``, and
:func:`format_metric` prints it as ``n/a (<reason>)``.

A test split can also be too small for its AUC to mean anything:
:func:`small_sample_warning` (fewer than :data:`MIN_IMPRESSIONS` impressions or
fewer than :data:`MIN_PER_LABEL` of either label) says so in one line.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

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
    if g.size == 0:
        return {"gauc": float("nan"), "groups_used": 0, "groups_skipped": 0}
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


# Undefined-metric reasons (the "<metric>_undefined" fields).
NO_SAMPLES = "no samples"
NO_GAUC_GROUP = "no group has both labels"

# Below these a split's AUC is noise, not a comparison: with n_pos positives and n_neg
# negatives the AUC's standard error is about sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg))
# (Hanley & McNeil 1982, at AUC 0.5): 20 + 180 -> 0.068, i.e. about +-0.13 at 95%.
MIN_IMPRESSIONS = 200
MIN_PER_LABEL = 20


def _one_label_reason(n_pos: int, n: int) -> str:
    return f"only one label: all {n} samples are {'positive' if n_pos else 'negative'}"


def all_metrics(labels, probs, groups=None) -> Dict[str, Any]:
    """AUC, logloss (and GAUC with ``groups``), sample and label counts, as strict JSON:
    an undefined metric is ``None`` with its reason in ``"<metric>_undefined"``."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    n, n_pos = int(y.size), int(np.sum(y > 0.5))
    out: Dict[str, Any] = {
        "auc": auc(labels, probs), "logloss": logloss(labels, probs) if n else float("nan"),
        "samples": n, "positives": n_pos, "negatives": n - n_pos,
        "positive_rate": n_pos / n if n else 0.0}
    if groups is not None:
        out.update(gauc(labels, probs, groups))
    reasons = {"auc": NO_SAMPLES if n == 0 else _one_label_reason(n_pos, n),
               "logloss": NO_SAMPLES, "gauc": NO_SAMPLES if n == 0 else NO_GAUC_GROUP}
    for k, reason in reasons.items():
        if k in out and not math.isfinite(out[k]):
            out[k] = None
            out[f"{k}_undefined"] = reason
    return out


def is_defined(value) -> bool:
    """A metric value that is a finite number (not None, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def format_metric(value, reason: Optional[str] = None, fmt: str = ".4f") -> str:
    """``0.7312`` for a number; ``n/a (<reason>)`` for None / NaN (never ``nan``)."""
    if is_defined(value):
        return format(value, fmt)
    return f"n/a ({reason or 'undefined'})"


def json_safe(obj, reason: str = "not a number") -> Any:
    """``obj`` with every non-finite float replaced by ``None``; in a dict each such
    key ``k`` also gets ``"k_undefined": reason`` (unless the dict already has one).
    Makes ``json.dumps(..., allow_nan=False)`` pass on values read from older files."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
                if isinstance(k, str) and f"{k}_undefined" not in obj:
                    out[f"{k}_undefined"] = reason
            else:
                out[k] = json_safe(v, reason)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, reason) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return json_safe(obj.item(), reason)
    return obj


def small_sample_warning(samples: int, positives: int, what: str = "the test split"
                         ) -> Optional[str]:
    """One warning line when ``samples`` impressions with ``positives`` positives are too
    few for an AUC to mean anything (< MIN_IMPRESSIONS, or < MIN_PER_LABEL of a label);
    None otherwise."""
    negatives = samples - positives
    if samples >= MIN_IMPRESSIONS and min(positives, negatives) >= MIN_PER_LABEL:
        return None
    return (f"warning: {what} holds only {samples} impressions ({positives} positive, "
            f"{negatives} negative): AUC/GAUC on fewer than {MIN_IMPRESSIONS} impressions or "
            f"fewer than {MIN_PER_LABEL} of either label is noise, not a comparison")
