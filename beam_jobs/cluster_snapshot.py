"""TWIN V2 snapshot protocol and the per-record transformation (no Beam).

:func:`cluster_record` turns one per-user record (:func:`parse_record`) into
clustered records (:func:`encode_clustered`): the behaviors before each group's
snapshot become virtual items (:mod:`beam_jobs.cluster_algo`), the rest stay raw.
The Beam job :mod:`beam_jobs.cluster` applies it to every record.

Snapshot protocol (DESIGN "Offline artifacts ... are computed on a snapshot")
=============================================================================
Clusters are built only from behaviors strictly before every impression that
sees them. For each record the job assigns each impression j (time t_j,
visible rows p_j) a snapshot s_j:

* ``--snapshot_ts T`` with ``--refresh_days D > 0``: the refresh grid
  {T + k D days, k in Z}; s_j = the latest grid point <= t_j (the paper
  refreshes every 2 weeks). Impressions sharing s_j form one output record.
* ``--snapshot_ts T`` with ``--refresh_days 0``: s_j = T for t_j >= T; earlier
  impressions use the per-record rule below.
* no ``--snapshot_ts``: per-record rule, s = the record's earliest impression.

The rows clustered for a group of impressions are rows [lo, c) with
c = min(#rows with ts < s, p_min - keep_recent) (clamped at 0), p_min = the
group's smallest p_j, lo = max(0, c - max_cluster_history). The rows
[c, p_max) stay raw. Hence every impression sees clusters of rows with
ts < s <= t_j and index < p_j (never at or after it), plus at least
``keep_recent`` raw most recent behaviors (or all of its past): with
keep_recent >= the model's short window S, the short window is exactly the raw
one, so TWIN V2 and the baselines see identical short windows and impressions.

Per-dataset defaults (``--snapshot_ts auto``): time-split data
(``per_event_time_split``, MovieLens) -> T = the train/test boundary
(``split_rule.valid_end_ts``), D = 14 days: test impressions see the refresh at
or after the boundary, training impressions the refreshes before them. User
splits (``labeled_impressions`` synthetic, ``last_item_per_user`` Taobao): every
impression of a record comes after its whole stored history -> per-record rule.
keep_recent = 100 (>= the default S = 50), max_cluster_history = 100,000 (the
paper's cap).
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from beam_jobs.cluster_algo import (GAMMA, MAX_ITER, Embedder, cluster_accuracy,
                                    engagement_groups, hierarchical_clustering, virtual_items)

MAX_CLUSTER_HISTORY = 100_000
KEEP_RECENT = 100

HIST = ("hist_item_id", "hist_cate_id", "hist_ts", "hist_engage", "hist_domain")
IMPS = ("imp_item_id", "imp_cate_id", "imp_ts", "imp_label", "imp_hist_index")


def snapshot_of(imp_ts: np.ndarray, snapshot_ts: Optional[int], refresh_s: float
                ) -> List[Optional[int]]:
    """The snapshot time of every impression (None = the per-record rule)."""
    out: List[Optional[int]] = []
    for t in np.asarray(imp_ts, np.int64).tolist():
        if snapshot_ts is None:
            out.append(None)
        elif refresh_s > 0:
            k = math.floor((t - snapshot_ts) / refresh_s)
            out.append(int(snapshot_ts + k * refresh_s))
        else:
            out.append(int(snapshot_ts) if t >= snapshot_ts else None)
    return out


def plan_groups(hist_ts: np.ndarray, imp_ts: np.ndarray, imp_hist_index: np.ndarray,
                snapshot_ts: Optional[int] = None, refresh_s: float = 0.0,
                keep_recent: int = KEEP_RECENT, max_cluster_history: int = MAX_CLUSTER_HISTORY
                ) -> List[Dict[str, Any]]:
    """Impressions of one record -> groups sharing a snapshot, with their clustered rows.

    Returns ``[{"imps": [j...], "snapshot": s or None, "lo": lo, "c": c, "hi": p_max}]``
    in time order: rows [lo, c) are clustered, rows [c, hi) stay raw.
    """
    hist_ts = np.asarray(hist_ts, np.int64)
    snaps = snapshot_of(imp_ts, snapshot_ts, refresh_s)
    keys: Dict[Any, List[int]] = {}
    for j, s in enumerate(snaps):
        keys.setdefault(s, []).append(j)
    groups = []
    for s, js in keys.items():
        p = np.asarray(imp_hist_index, np.int64)[js]
        p_min, p_max = int(p.min()), int(p.max())
        c_ts = p_min if s is None else int(np.searchsorted(hist_ts, s, side="left"))
        c = max(0, min(c_ts, p_min - keep_recent))
        lo = max(0, c - max_cluster_history)
        groups.append({"imps": js, "snapshot": s, "lo": lo, "c": c, "hi": p_max})
    groups.sort(key=lambda g: (min(np.asarray(imp_ts)[g["imps"]]), g["imps"][0]))
    return groups


def cluster_record(rec: Mapping[str, Any], embedder: Embedder, engage_mode: str,
                   snapshot_ts: Optional[int] = None, refresh_s: float = 0.0,
                   keep_recent: int = KEEP_RECENT,
                   max_cluster_history: int = MAX_CLUSTER_HISTORY, gamma: int = GAMMA,
                   variant: str = "adaptive", max_iter: int = MAX_ITER, seed: int = 0,
                   stats: Optional[Dict[str, Any]] = None,
                   backend: str = "auto", split_domains: bool = False) -> List[Dict[str, Any]]:
    """One parsed per-user record -> clustered records (one per snapshot group).

    ``rec``: ``user_id``, ``user_key`` and NumPy arrays of :data:`HIST` / :data:`IMPS`.
    Each output: ``user_id``, ``user_key``, ``hist`` (schema history fields incl.
    ``hist_cluster_size``), ``imps``, ``members`` (original row indices per history row,
    for virtual AND raw rows), ``snapshot``, ``clustered_rows``.

    ``split_domains`` (two-domain data, meta ``num_domains`` >= 3): the groups are
    (engagement group, ``hist_domain``) pairs, so no cluster mixes target- and
    source-domain behaviors (a virtual item's domain is its members' domain, and the
    cross-domain windows, which select rows by domain, see each behavior in its own
    domain).
    """
    stats = stats if stats is not None else {}
    out = []
    for gi, g in enumerate(plan_groups(rec["hist_ts"], rec["imp_ts"], rec["imp_hist_index"],
                                       snapshot_ts, refresh_s, keep_recent,
                                       max_cluster_history)):
        lo, c, hi = g["lo"], g["c"], g["hi"]
        rows = {k: np.asarray(rec[k])[lo:c] for k in HIST}
        t0 = time.perf_counter()
        if c > lo:
            emb = embedder(rows["hist_item_id"], rows["hist_cate_id"])
            grp = engagement_groups(rows["hist_engage"], engage_mode)
            if split_domains:            # domains are 0..2 (schema): one group per pair
                grp = grp * 4 + np.asarray(rows["hist_domain"], np.int64)
            labels = hierarchical_clustering(emb, grp, gamma, variant, max_iter,
                                             seed=_seed(seed, rec["user_key"], gi), stats=stats,
                                             backend=backend)
            vi = virtual_items(labels, emb, rows)
            stats["accuracy_sum"] = stats.get("accuracy_sum", 0.0) + cluster_accuracy(
                emb, labels) * len(labels)
        else:
            vi = virtual_items(np.zeros(0, np.int64), np.zeros((0, 1), np.float32), rows)
        stats["cluster_seconds"] = stats.get("cluster_seconds", 0.0) + time.perf_counter() - t0
        n_virtual = len(vi["hist_cluster_size"])
        hist = {k: np.concatenate([vi[k], np.asarray(rec[k])[c:hi]]) for k in HIST}
        hist["hist_cluster_size"] = np.concatenate([vi["hist_cluster_size"],
                                                    np.ones(hi - c, np.int64)])
        js = g["imps"]
        imps = {k: np.asarray(rec[k])[js] for k in IMPS}
        imps["imp_hist_index"] = n_virtual + imps["imp_hist_index"].astype(np.int64) - c
        members = [(m + lo).tolist() for m in vi["members"]] + [[r] for r in range(c, hi)]
        for k, v in (("records_out", 1), ("clustered_rows", c - lo), ("virtual_items", n_virtual),
                     ("raw_rows", hi - c), ("dropped_rows", lo), ("impressions", len(js)),
                     ("records_with_clusters", int(n_virtual > 0))):
            stats[k] = stats.get(k, 0) + v
        out.append({"user_id": int(rec["user_id"]), "user_key": rec["user_key"], "hist": hist,
                    "imps": imps, "members": members, "snapshot": g["snapshot"],
                    "clustered_rows": c - lo})
    return out


def _seed(seed: int, user_key: str, group: int) -> int:
    digest = hashlib.sha256(f"{int(seed)}\x1f{user_key}\x1f{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def parse_record(raw: bytes, item_table=None) -> Dict[str, Any]:
    """Serialized per-user record -> NumPy arrays (TensorFlow's proto, no graph).

    ``item_table`` (:class:`tfmodels.schema.ItemTable`): the dataset is compact
    (issue 19 item 5); records in either format are decoded by
    :func:`tfmodels.schema.decode_user_record`. None: full records only."""
    if item_table is not None:
        from tfmodels import schema as S
        d = S.decode_user_record(raw, item_table)
        return {"user_id": int(d["user_id"]), "user_key": d["user_key"].decode("utf-8"),
                **{name: d[name] for name in HIST + IMPS}}
    from tensorflow.core.example import example_pb2
    ex = example_pb2.Example.FromString(raw)
    f = ex.features.feature
    out: Dict[str, Any] = {"user_id": f["user_id"].int64_list.value[0],
                           "user_key": f["user_key"].bytes_list.value[0].decode("utf-8")}
    for name in HIST + IMPS:
        if name in ("hist_engage", "imp_label"):
            out[name] = np.asarray(f[name].float_list.value, np.float32)
        else:
            out[name] = np.asarray(f[name].int64_list.value, np.int64)
    return out


def encode_clustered(rec: Mapping[str, Any]) -> bytes:
    """A clustered record -> serialized per-user record (validated, deterministic bytes)."""
    from tfmodels import schema as S
    from tensorflow.core.example import example_pb2
    raw = S.encode_user_record(rec["user_id"], rec["user_key"], rec["hist"], rec["imps"])
    return example_pb2.Example.FromString(raw).SerializeToString(deterministic=True)
