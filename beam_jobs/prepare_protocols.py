"""Sample protocols (METHODS section 4) as pure per-user functions, unit-testable without Beam.

A user's events ``(item_key, cate_key, ts, engage, domain)`` -> per-user records
(history once + labeled impressions) and a summary of the rows used and filtered:

* :func:`per_event_user` — ``per_event_time_split`` (METHODS 4.2, MovieLens):
  every event is an impression, split by global time cuts;
* :func:`last_item_user` — ``last_item_per_user`` (METHODS 4.1, Taobao): the last
  behavior is the target, replaced by a negative with probability 1/2;
* :func:`labeled_user` — ``labeled_impressions`` (synthetic): explicit impressions;
* :func:`labeled_time_split_user` — ``labeled_impressions_time_split`` (Taobao ad,
  METHODS 4.3): explicit impressions split by fixed time cuts.

The user-split protocols return ``(split_key, record)``; :func:`split_index` places
a key between the global user cuts. :class:`beam_jobs.prepare_transforms.ApplyProtocol`
wraps these functions in the pipeline.
"""
from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from beam_jobs.adapters import TARGET_DOMAIN
from tfmodels import schema as S

# A sorted, dense history row: (ts, item_id, item_key, cate_id, engage, domain)
Row = Tuple[int, int, str, int, float, int]


def dense_rows(events: Iterable[Sequence], item_ids: Mapping[str, int],
               cate_ids: Mapping[str, int]) -> List[Row]:
    """``(item_key, cate_key, ts, engage, domain)`` events -> rows in the stable time order.

    Sorted by ``(ts, item dense id, item key, cate id, engage, domain)``, so ties
    on time are broken the same way on every run and runner.
    """
    rows = [(int(ts), item_ids.get(item, S.OOV_ID), item, cate_ids.get(cate, S.OOV_ID),
             float(engage), int(domain)) for item, cate, ts, engage, domain in events]
    rows.sort()
    return rows


def _history(rows: Sequence[Row]) -> Dict[str, list]:
    return {"hist_item_id": [r[1] for r in rows], "hist_cate_id": [r[3] for r in rows],
            "hist_ts": [r[0] for r in rows], "hist_engage": [r[4] for r in rows],
            "hist_domain": [r[5] for r in rows]}


def history_bounds(hist_indices: Sequence[int], max_history: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of the sorted history a record stores.

    ``hi`` = the largest ``imp_hist_index`` (the rows visible to the last
    impression: nothing later is ever stored). ``lo`` = ``max(0, p_first -
    max_history)`` with ``p_first`` the smallest index (0 when unlimited): the
    record keeps the ``max_history`` rows before its first impression and
    everything after them, so every impression at absolute position ``p`` sees
    exactly the true rows ``[lo, p)`` — a contiguous suffix of its past holding at
    least its ``min(p, max_history)`` most recent behaviors, never a future row.
    """
    p_first, p_last = min(hist_indices), max(hist_indices)
    lo = max(0, p_first - max_history) if max_history > 0 else 0
    return lo, p_last


def _record(split: Optional[str], user_key: str, rows: Sequence[Row], lo: int, hi: int,
            imps: Sequence[Tuple[int, int, int, float, int]]) -> Dict[str, Any]:
    """imps: (item_id, cate_id, ts, label, absolute hist index) in record order."""
    return {"split": split, "user_key": user_key, "hist": _history(rows[lo:hi]),
            "imps": {"imp_item_id": [i[0] for i in imps], "imp_cate_id": [i[1] for i in imps],
                     "imp_ts": [i[2] for i in imps], "imp_label": [i[3] for i in imps],
                     "imp_hist_index": [i[4] - lo for i in imps]}}


def _user_summary(rows: Sequence[Row], used_events: Iterable[int], used_rows: int,
                  filtered: Dict[str, int], history_length: int) -> Dict[str, Any]:
    domains: Dict[str, int] = {}
    n_events = 0
    for p in used_events:
        d = str(rows[p][5])
        domains[d] = domains.get(d, 0) + 1
        n_events += 1
    return {"used_rows": used_rows, "filtered": {k: v for k, v in filtered.items() if v},
            "events": n_events, "history_length": history_length, "domains": domains}


def per_event_user(user_key: str, events: Sequence[Sequence], item_ids: Mapping[str, int],
                   cate_ids: Mapping[str, int], cuts: Sequence[Optional[int]],
                   label_threshold: float, max_history: int = 0
                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """METHODS 4.2: every event is an impression; split by the global time cuts.

    ``cuts = (train_end, valid_end)`` timestamps (None = after everything): an
    event with ``ts < train_end`` is train, ``< valid_end`` valid, else test.
    The impression at sorted position ``p`` has ``imp_hist_index = p``. Returns
    (records, summary).

    Two-domain data (``--movielens_domains genre``): only events of the target
    domain (``TARGET_DOMAIN``) become impressions; source-domain events are history
    only. A source event is used when a record stores it, else filtered
    (``after_last_impression``, ``max_history``; ``user_without_impressions`` for a
    user with no target event). Single-domain data is all target: unchanged.
    """
    rows = dense_rows(events, item_ids, cate_ids)
    n = len(rows)
    ts = [r[0] for r in rows]
    target = [p for p in range(n) if rows[p][5] == TARGET_DOMAIN]
    bounds = [0] + [n if c is None else bisect.bisect_left(ts, c) for c in cuts] + [n]
    records, longest, stored = [], 0, set()
    for split, a, b in zip(S.SPLITS, bounds[:-1], bounds[1:]):
        pos = target[bisect.bisect_left(target, a):bisect.bisect_left(target, b)]
        if not pos:
            continue
        lo, hi = history_bounds((pos[0], pos[-1]), max_history)
        imps = [(rows[p][1], rows[p][3], rows[p][0],
                 1.0 if rows[p][4] >= label_threshold else 0.0, p) for p in pos]
        records.append(_record(split, user_key, rows, lo, hi, imps))
        longest = max(longest, hi - lo)
        if len(target) < n:
            stored.update(range(lo, hi))
    if len(target) == n:
        # every event is an impression of exactly one split: all rows are used
        return records, _user_summary(rows, range(n), n, {}, longest)
    used = sorted(stored.union(target))
    filtered = {"user_without_impressions": n} if not target else {
        "after_last_impression": n - 1 - target[-1],
        "max_history": sum(1 for q in range(target[-1]) if q not in stored and
                           rows[q][5] != TARGET_DOMAIN)}
    return records, _user_summary(rows, used, len(used), filtered, longest)


def user_seed(seed: int, user_key: str) -> int:
    """Per-user RNG seed, stable across processes (unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{user_key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def last_item_user(user_key: str, events: Sequence[Sequence], item_vocab: Mapping[str, Any],
                   cate_ids: Mapping[str, int], seed: int, max_history: int = 0
                   ) -> Tuple[Optional[Tuple[Tuple[int, str], Dict[str, Any]]], Dict[str, Any]]:
    """METHODS 4.1: last behavior = target, negative with probability 1/2.

    Users with < 3 behaviors are dropped (all their rows "filtered"). With
    probability 1/2 (seeded by ``(seed, user_key)``) the target is replaced by a
    uniformly random OTHER item of the item vocabulary (label 0, its most
    frequent category), else label 1. History = the earlier behaviors (cut by
    ``max_history``). Returns ``((split_key, record or None), summary)`` where
    ``split_key = (last ts, user_key)`` orders users for the 80/10/10 split.
    """
    item_ids = item_vocab["ids"]
    rows = dense_rows(events, item_ids, cate_ids)
    n = len(rows)
    if n < 3:
        return None, _user_summary(rows, (), 0, {"user_too_few_behaviors": n}, 0)
    t = n - 1
    target = rows[t]
    lo, hi = history_bounds((t,), max_history)
    rng = random.Random(user_seed(seed, user_key))
    item_id, cate_id, label = target[1], target[3], 1.0
    keys = item_vocab["keys"]
    orig = item_ids.get(target[2])
    n_other = len(keys) - (1 if orig is not None else 0)
    if rng.random() < 0.5 and n_other > 0:
        j = rng.randrange(n_other)
        if orig is not None and j >= orig - S.FIRST_ID:
            j += 1
        item_id = S.FIRST_ID + j
        cate_id = cate_ids.get(item_vocab["cates"][j], S.OOV_ID)
        label = 0.0
    rec = _record(None, user_key, rows, lo, hi, [(item_id, cate_id, target[0], label, t)])
    summary = _user_summary(rows, list(range(lo, n)), n - lo, {"max_history": lo}, hi - lo)
    return ((target[0], user_key), rec), summary


def labeled_user(user_key: str, events: Sequence[Sequence], impressions: Sequence[Sequence],
                 item_ids: Mapping[str, int], cate_ids: Mapping[str, int], max_history: int = 0
                 ) -> Tuple[Optional[Tuple[Tuple[int, str], Dict[str, Any]]], Dict[str, Any]]:
    """Explicit impressions (synthetic source): ``imp_hist_index`` = number of the
    user's events with ``ts`` strictly before the impression.

    The record stores the rows visible to its last impression (cut by
    ``max_history``); later events are "filtered". Users without impressions
    give no record. ``split_key = (last event ts, user_key)``.
    """
    rows = dense_rows(events, item_ids, cate_ids)
    n = len(rows)
    if not impressions:
        return None, _user_summary(rows, (), 0, {"user_without_impressions": n}, 0)
    ts = [r[0] for r in rows]
    imps = sorted((item_ids.get(it, S.OOV_ID), cate_ids.get(c, S.OOV_ID), int(t), float(lab),
                   bisect.bisect_left(ts, int(t))) for it, c, t, lab in impressions)
    imps.sort(key=lambda i: (i[2], i[4], i[0], i[1], i[3]))
    lo, hi = history_bounds([i[4] for i in imps], max_history)
    rec = _record(None, user_key, rows, lo, hi, imps)
    last_ts = ts[-1] if rows else max(i[2] for i in imps)
    summary = _user_summary(rows, range(lo, hi), (hi - lo) + len(imps),
                            {"max_history": lo, "after_last_impression": n - hi}, hi - lo)
    return ((last_ts, user_key), rec), summary


def labeled_time_split_user(user_key: str, events: Sequence[Sequence],
                            impressions: Sequence[Sequence], item_ids: Mapping[str, int],
                            cate_ids: Mapping[str, int], cuts: Sequence[Optional[int]],
                            max_history: int = 0
                            ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Explicit impressions split by fixed time cuts (``labeled_impressions_time_split``;
    the Taobao ad source, METHODS 4.3).

    ``cuts = (train_end, valid_end)``: an impression with ``ts < train_end`` is train,
    ``< valid_end`` valid, else test. One record per split the user has impressions in
    (as :func:`per_event_user`): its impressions in ``(ts, imp_hist_index, item, cate,
    label)`` order, ``imp_hist_index`` = the number of the user's events with ``ts``
    strictly before the impression, history = the rows visible to its last impression
    (cut by ``max_history``). Events no record stores are filtered
    (``user_without_impressions``, ``after_last_impression``, ``max_history``).
    Returns (records, summary).
    """
    rows = dense_rows(events, item_ids, cate_ids)
    n = len(rows)
    if not impressions:
        return [], _user_summary(rows, (), 0, {"user_without_impressions": n}, 0)
    ts = [r[0] for r in rows]
    imps = sorted((item_ids.get(it, S.OOV_ID), cate_ids.get(c, S.OOV_ID), int(t), float(lab),
                   bisect.bisect_left(ts, int(t))) for it, c, t, lab in impressions)
    imps.sort(key=lambda i: (i[2], i[4], i[0], i[1], i[3]))
    by_split: Dict[int, list] = {}
    for i in imps:
        by_split.setdefault(split_index(i[2], cuts), []).append(i)
    records, longest, stored = [], 0, set()
    for k in sorted(by_split):
        group = by_split[k]
        lo, hi = history_bounds([i[4] for i in group], max_history)
        records.append(_record(S.SPLITS[k], user_key, rows, lo, hi, group))
        longest = max(longest, hi - lo)
        stored.update(range(lo, hi))
    last = max(i[4] for i in imps)  # rows at or after it are seen by no impression
    used = sorted(stored)
    filtered = {"after_last_impression": n - last,
                "max_history": sum(1 for q in range(last) if q not in stored)}
    return records, _user_summary(rows, used, len(used) + len(imps), filtered, longest)


def split_index(key, cuts: Sequence[Any]) -> int:
    """0, 1, 2 = train, valid, test: the first cut the key is below (None = +infinity)."""
    for i, c in enumerate(cuts):
        if c is None or key < c:
            return i
    return len(cuts)


def encode_record(rec: Mapping[str, Any], user_ids: Mapping[str, int],
                  item_table: Optional["S.ItemTable"] = None, engage_step: float = 1.0,
                  record_format: str = "compact", ts_step: int = 1) -> bytes:
    """Record -> serialized per-user tf.Example (validated, deterministic bytes); with an
    ``item_table``, in the compact format (:func:`tfmodels.schema.encode_compact_user_record`;
    ``record_format`` "compact2": :func:`tfmodels.schema.encode_compact_v2_user_record`)."""
    if item_table is not None and record_format == "compact2":
        return S.encode_compact_v2_user_record(user_ids[rec["user_key"]], rec["user_key"],
                                               rec["hist"], rec["imps"], item_table,
                                               engage_step, ts_step)
    if item_table is not None:
        return S.encode_compact_user_record(user_ids[rec["user_key"]], rec["user_key"],
                                            rec["hist"], rec["imps"], item_table, engage_step)
    return S.encode_user_record(user_ids[rec["user_key"]], rec["user_key"], rec["hist"],
                                rec["imps"])
