"""Sample building: raw logs -> per-user records (history once + labeled impressions).

The ``prepare`` subcommand. One Apache Beam pipeline reads a source (MovieLens
``ratings.csv`` + ``movies.csv``, Taobao ``UserBehavior.csv``, or the seeded
synthetic generator), parses every row with :mod:`beam_jobs.adapters` (malformed
rows become dead letters, never crashes), builds dense vocabularies, applies a
sample protocol (METHODS section 4) and writes

* ``<output>/{train,valid,test}-SSSSS-of-NNNNN.tfrecord.gz`` — one
  :func:`tfmodels.schema.encode_user_record` per user and split,
* ``<output>/vocab/{items,categories,users}.tsv`` — ``dense_id<TAB>raw_key<TAB>count``,
* ``<output>/dead_letter/rows-*.tsv`` — ``reason<TAB>raw line``,
* ``<output>/meta.json`` — vocab sizes, statistics, row accounting, arguments.

See ``docs/data.md`` for formats, protocols and how to run on Dataflow/Flink/Spark.

Design notes
------------
* Every DoFn is a pure function of its element and side inputs (no process
  state), so the same pipeline runs on any runner by pipeline options alone.
* Global steps are combiners + side inputs: vocabularies (a list collected by a
  combiner, ordered by descending count then key), exact time/user quantile cuts
  (:class:`ExactCuts`, two passes: an hourly histogram, then the elements of the
  one or two hours that hold a cut), and one report dictionary.
* The report is not read from Beam metrics (those are also emitted, namespace
  ``prepare``, and cross-checked when the runner reports them) but from a small
  ``_counts.json`` written by the pipeline itself, which works the same on every
  runner and running mode.
* Per-user logic lives in pure functions (:func:`per_event_user`,
  :func:`last_item_user`, :func:`labeled_user`) that the DoFns wrap, so the
  protocols are unit-testable without Beam.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_jobs import adapters as A
from tfmodels import schema as S
from tfmodels.errors import LifelongError

SOURCES = ("synthetic", "movielens", "taobao")
PROTOCOLS = ("per_event_time_split", "last_item_per_user", "labeled_impressions")
DEFAULT_PROTOCOL = {"movielens": "per_event_time_split", "taobao": "last_item_per_user",
                    "synthetic": "labeled_impressions"}
NAMESPACE = "prepare"            # Beam metrics namespace
COUNTS_FILE = "_counts.json"     # the pipeline's own report (read back by the driver)
VOCAB_DIR = "vocab"
DEAD_LETTER_DIR = "dead_letter"
TFRECORD_SUFFIX = ".tfrecord.gz"
_COARSE_SECONDS = 3600           # first-pass bucket of ExactCuts (one hour)


class PrepareError(ValueError, LifelongError):
    """Bad arguments or unusable input; the message is one line for the CLI."""


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


# ======================================================================================
# Arguments
# ======================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` flags. Unknown extra arguments are Beam pipeline options."""
    g = parser.add_argument_group("input / output")
    g.add_argument("--source", default="synthetic",
                   help="synthetic | movielens | taobao (default: synthetic)")
    g.add_argument("--input", default=None,
                   help="movielens: folder with ratings.csv and movies.csv (ml-latest-small, "
                        "ml-32m); taobao: UserBehavior.csv or a glob of such files; "
                        "local or any Beam filesystem (gs://, s3://, hdfs://)")
    g.add_argument("--output", required=True,
                   help="output folder: {train,valid,test}-*.tfrecord.gz, vocab/, "
                        "dead_letter/, meta.json")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a previous prepared dataset in --output first (otherwise "
                        "an existing one is an error: stale shards would mix in)")
    g.add_argument("--num_shards", type=int, default=4,
                   help="TFRecord shards per split (default 4)")

    g = parser.add_argument_group("protocol")
    g.add_argument("--protocol", default=None,
                   help="per_event_time_split | last_item_per_user | labeled_impressions; "
                        "default per source: movielens -> per_event_time_split, "
                        "taobao -> last_item_per_user, synthetic -> labeled_impressions")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the negative sampling (last_item_per_user) and of the "
                        "synthetic generator (default 0)")
    g.add_argument("--min_item_count", type=int, default=1,
                   help="items seen in fewer rows map to the OOV id 1 (default 1 = keep all)")
    g.add_argument("--max_history", type=int, default=0,
                   help="keep at most the N most recent behaviors before each record's first "
                        "impression (0 = unlimited; see docs/data.md for the exact rule)")
    g.add_argument("--label_threshold", type=float, default=4.0,
                   help="per_event_time_split: label = 1 iff engage (MovieLens rating) >= this "
                        "(default 4.0)")
    g.add_argument("--train_fraction", type=float, default=0.8,
                   help="per_event_time_split: train+valid share of events by time (the "
                        "validation period is carved from its end); user splits: train share of "
                        "users ordered by last behavior time (default 0.8)")
    g.add_argument("--valid_fraction", type=float, default=0.1,
                   help="validation share (of events by time, or of users) (default 0.1)")

    g = parser.add_argument_group("source options")
    g.add_argument("--valid_time_window", default=None, metavar="START,END",
                   help="rows with a timestamp outside [START, END] (inclusive) are "
                        "dead-lettered. START/END: unix seconds, an ISO date or date-time "
                        "(2017-11-25, 2017-11-25T00:00:00+08:00; no offset = UTC; a date "
                        "alone as END means its last second), now, now+Nd; 'none' = only "
                        "the sanity bounds 1970..2100. Default per source: taobao "
                        "2017-11-25T00:00:00+08:00,2017-12-03T23:59:59+08:00 (the "
                        "documented range); movielens 1995-01-01,now+1d; synthetic the "
                        "generator's own range (docs/data.md)")
    g.add_argument("--taobao_keep_behaviors", default="pv,cart,fav,buy",
                   help="Taobao behavior types to keep, comma separated (others are counted "
                        "as filtered); default pv,cart,fav,buy")
    g.add_argument("--synthetic_config", default=None,
                   help="JSON file of beam_jobs.synthetic.SyntheticConfig fields (optional; "
                        "the flags below override it)")
    g.add_argument("--synthetic_users", type=int, default=None,
                   help="synthetic: number of users (default: the config's, 2000)")
    g.add_argument("--synthetic_mean_history", type=int, default=None,
                   help="synthetic: mean history length (default: the config's, 1200)")
    g.add_argument("--synthetic_min_history", type=int, default=None,
                   help="synthetic: minimum history length (default: the config's, lowered "
                        "to fit --synthetic_mean_history / --synthetic_max_history)")
    g.add_argument("--synthetic_max_history", type=int, default=None,
                   help="synthetic: maximum history length (default: the config's, 3000)")


def _validate_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Check the arguments; returns the resolved settings. Raises PrepareError."""
    source = getattr(args, "source", "synthetic")
    if source not in SOURCES:
        raise PrepareError(f"unknown --source {source!r}; expected one of {', '.join(SOURCES)}")
    protocol = getattr(args, "protocol", None) or DEFAULT_PROTOCOL[source]
    if protocol not in PROTOCOLS:
        raise PrepareError(f"unknown --protocol {protocol!r}; expected one of "
                           f"{', '.join(PROTOCOLS)}")
    if protocol == "labeled_impressions" and source != "synthetic":
        raise PrepareError(f"--protocol labeled_impressions needs a source with explicit "
                           f"impressions (synthetic), not {source}")
    if not getattr(args, "output", None):
        raise PrepareError("--output is required")
    num_shards = int(getattr(args, "num_shards", 4))
    if num_shards < 1:
        raise PrepareError(f"--num_shards must be >= 1, got {num_shards}")
    if int(getattr(args, "min_item_count", 1)) < 1:
        raise PrepareError(f"--min_item_count must be >= 1, got {args.min_item_count}")
    if int(getattr(args, "max_history", 0)) < 0:
        raise PrepareError(f"--max_history must be >= 0, got {args.max_history}")
    tf_ = float(getattr(args, "train_fraction", 0.8))
    vf = float(getattr(args, "valid_fraction", 0.1))
    if not (math.isfinite(tf_) and math.isfinite(vf)) or not 0.0 < tf_ <= 1.0 or vf < 0.0:
        raise PrepareError(f"need 0 < --train_fraction <= 1 and --valid_fraction >= 0, "
                           f"got {tf_} and {vf}")
    if protocol == "per_event_time_split":
        if vf >= tf_:
            raise PrepareError(f"per_event_time_split carves validation from the end of the "
                               f"training period: need --valid_fraction ({vf}) < "
                               f"--train_fraction ({tf_})")
        fractions = (tf_ - vf, tf_)
    else:
        if tf_ + vf > 1.0 + 1e-9:
            raise PrepareError(f"need --train_fraction + --valid_fraction <= 1, got {tf_} + {vf}")
        fractions = (tf_, min(1.0, tf_ + vf))
    if not math.isfinite(float(getattr(args, "label_threshold", 4.0))):
        raise PrepareError("--label_threshold must be finite")
    keep = None
    if source == "taobao":
        try:
            keep = A.parse_keep_behaviors(getattr(args, "taobao_keep_behaviors", "pv,cart,fav,buy"))
        except ValueError as e:
            raise PrepareError(str(e)) from None
    window = None  # None: the source's default, resolved by _resolve_time_window
    spec = getattr(args, "valid_time_window", None)
    if spec is not None and spec.strip().lower() != "default":
        try:
            window = A.parse_time_window(spec)
        except ValueError as e:
            raise PrepareError(str(e)) from None
    return {"source": source, "protocol": protocol, "num_shards": num_shards,
            "fractions": fractions, "keep": keep, "time_window": window,
            "time_window_from": "--valid_time_window" if window is not None else
            f"the {source} default"}


def _resolve_time_window(settings: Dict[str, Any], synthetic_config=None) -> None:
    """Fill ``settings["time_window"]`` with the source's default window when the flag
    did not give one (the synthetic default needs the generator's config)."""
    if settings.get("time_window") is None:
        settings["time_window"] = A.default_time_window(
            settings["source"], synthetic_config=(synthetic_config.to_dict()
                                                  if synthetic_config is not None else None))


def _synthetic_config(args: argparse.Namespace):
    from beam_jobs import synthetic  # lazy: only the synthetic source needs it
    base: Dict[str, Any] = {}
    path = getattr(args, "synthetic_config", None)
    if path:
        if not FileSystems.exists(path):
            raise PrepareError(f"--synthetic_config {path!r} does not exist")
        try:
            with FileSystems.open(path) as f:
                base = json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PrepareError(f"--synthetic_config {path!r} is not valid JSON: {e}") from None
        if not isinstance(base, dict):
            raise PrepareError(f"--synthetic_config {path!r} must hold a JSON object")
    if "seed" not in base:
        base["seed"] = int(getattr(args, "seed", 0))
    overrides = {"num_users": getattr(args, "synthetic_users", None),
                 "mean_history": getattr(args, "synthetic_mean_history", None),
                 "min_history": getattr(args, "synthetic_min_history", None),
                 "max_history": getattr(args, "synthetic_max_history", None)}
    for k, v in overrides.items():
        if v is not None:
            base[k] = int(v)
    try:
        defaults = synthetic.SyntheticConfig.from_dict({k: v for k, v in base.items()
                                                        if k == "seed"})
        if overrides["min_history"] is None and "min_history" not in base:
            mean = base.get("mean_history", defaults.mean_history)
            mx = base.get("max_history", defaults.max_history)
            base["min_history"] = max(1, min(defaults.min_history, mean, mx))
        return synthetic.SyntheticConfig.from_dict(base)
    except (ValueError, TypeError) as e:
        raise PrepareError(f"bad synthetic configuration: {e}") from None


# ======================================================================================
# Pure per-user logic (unit-testable without Beam)
# ======================================================================================

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
    """
    rows = dense_rows(events, item_ids, cate_ids)
    n = len(rows)
    ts = [r[0] for r in rows]
    bounds = [0] + [n if c is None else bisect.bisect_left(ts, c) for c in cuts] + [n]
    records, longest = [], 0
    for split, a, b in zip(S.SPLITS, bounds[:-1], bounds[1:]):
        if a >= b:
            continue
        lo, hi = history_bounds((a, b - 1), max_history)
        imps = [(rows[p][1], rows[p][3], rows[p][0],
                 1.0 if rows[p][4] >= label_threshold else 0.0, p) for p in range(a, b)]
        records.append(_record(split, user_key, rows, lo, hi, imps))
        longest = max(longest, hi - lo)
    # every event is an impression of exactly one split: all rows are used
    return records, _user_summary(rows, range(n), n, {}, longest)


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


def split_index(key, cuts: Sequence[Any]) -> int:
    """0, 1, 2 = train, valid, test: the first cut the key is below (None = +infinity)."""
    for i, c in enumerate(cuts):
        if c is None or key < c:
            return i
    return len(cuts)


# ======================================================================================
# Vocabularies and global cuts
# ======================================================================================


def build_vocab(entries: Iterable[Tuple[str, Any]], min_count: int = 1) -> Dict[str, Any]:
    """``[(key, count)]`` or ``[(key, (count, category))]`` -> dense vocabulary.

    Ordered by descending count then key; ids start at ``FIRST_ID``; entries
    with ``count < min_count`` get no id (they map to ``OOV_ID``).
    """
    ordered = sorted(((k, v if isinstance(v, tuple) else (v, None)) for k, v in entries),
                     key=lambda e: (-e[1][0], e[0]))
    keys, counts, cates = [], [], []
    oov_keys = oov_rows = 0
    for key, (count, cate) in ordered:
        if count < min_count:
            oov_keys += 1
            oov_rows += count
            continue
        keys.append(key)
        counts.append(count)
        cates.append(cate)
    return {"ids": {k: S.FIRST_ID + i for i, k in enumerate(keys)}, "keys": keys,
            "counts": counts, "cates": cates, "oov_keys": oov_keys, "oov_rows": oov_rows}


def vocab_tsv(vocab: Mapping[str, Any]) -> str:
    return "".join(f"{S.FIRST_ID + i}\t{k}\t{c}\n"
                   for i, (k, c) in enumerate(zip(vocab["keys"], vocab["counts"])))


class _CategoryOfItem(beam.CombineFn):
    """category keys of one item's rows -> (row count, most frequent category)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, cate):
        acc[cate] = acc.get(cate, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        out: Dict[str, int] = {}
        for a in accs:
            for k, v in a.items():
                out[k] = out.get(k, 0) + v
        return out

    def extract_output(self, acc):
        if not acc:
            return (0, "")
        best = min(acc.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        return (sum(acc.values()), best)


def _hour(x) -> int:
    return int(x) // _COARSE_SECONDS


def _hour_of_key(k) -> int:
    return int(k[0]) // _COARSE_SECONDS


def plan_cuts(hist: Iterable[Tuple[int, int]], fractions: Sequence[float]) -> Dict[str, Any]:
    """Coarse histogram -> for each fraction f the (bucket, rank) of element ``floor(f*N)``."""
    hist = sorted(hist)
    total = sum(c for _, c in hist)
    targets: List[Optional[Tuple[int, int]]] = []
    for f in fractions:
        k = int(math.floor(f * total + 1e-9))
        if total == 0 or k >= total:
            targets.append(None)
            continue
        cum = 0
        for bucket, c in hist:
            if cum + c > k:
                targets.append((bucket, k - cum))
                break
            cum += c
    return {"n": total, "targets": targets,
            "buckets": sorted({t[0] for t in targets if t is not None})}


def _in_plan(x, coarse, plan) -> bool:
    return coarse(x) in plan["buckets"]


def finish_cuts(fine: Iterable[Any], coarse, plan: Mapping[str, Any]) -> List[Any]:
    """Elements of the target buckets -> the cut elements (None = no cut: all before)."""
    by_bucket: Dict[int, list] = {}
    for x in fine:
        by_bucket.setdefault(coarse(x), []).append(x)
    out = []
    for t in plan["targets"]:
        if t is None:
            out.append(None)
        else:
            out.append(sorted(by_bucket[t[0]])[t[1]])
    return out


class ExactCuts(beam.PTransform):
    """Exact quantile cuts of a PCollection of sortable elements.

    For each fraction f the cut is the element at 0-based position ``floor(f*N)``
    of the sorted collection (None when that is past the end), so "before the cut"
    holds ``floor(f*N)`` elements when elements are distinct (fewer on ties).
    Pass 1 counts elements per coarse bucket (``coarse(x)``, an hour of time);
    pass 2 collects only the elements of the buckets that hold a cut, so memory
    stays bounded by the busiest hour, not the data size.
    """

    def __init__(self, fractions: Sequence[float], coarse):
        super().__init__()
        self._fractions = tuple(fractions)
        self._coarse = coarse

    def expand(self, pcoll):
        plan = (pcoll
                | "Coarse" >> beam.Map(self._coarse)
                | "CountCoarse" >> beam.combiners.Count.PerElement()
                | "CoarseList" >> beam.combiners.ToList()
                | "Plan" >> beam.Map(plan_cuts, self._fractions))
        plan_si = beam.pvalue.AsSingleton(plan)
        return (pcoll
                | "InCutBuckets" >> beam.Filter(_in_plan, self._coarse, plan_si)
                | "FineList" >> beam.combiners.ToList()
                | "Cuts" >> beam.Map(finish_cuts, self._coarse, plan_si))


# ======================================================================================
# Report dictionary (summed over the pipeline)
# ======================================================================================


def merge_counts(acc: Dict[str, Any], d: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively add ``d`` into ``acc``: numbers are summed, other leaves overwritten."""
    for k, v in d.items():
        if isinstance(v, dict):
            merge_counts(acc.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v
        else:
            acc[k] = v
    return acc


class _SumCounts(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, d):
        return merge_counts(acc, d)

    def merge_accumulators(self, accs):
        out: Dict[str, Any] = {}
        for a in accs:
            merge_counts(out, a)
        return out

    def extract_output(self, acc):
        return acc


def _summary_counts(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """A per-user summary -> its contribution to the report."""
    out: Dict[str, Any] = {"rows": {"used": summary["used_rows"]},
                           "filtered_reasons": dict(summary["filtered"]),
                           "events": summary["events"], "domains": dict(summary["domains"])}
    if summary["used_rows"]:
        out["history_length"] = {str(summary["history_length"]): 1}
    return out


def _record_counts(rec: Mapping[str, Any]) -> Dict[str, Any]:
    split, imps = rec["split"], rec["imps"]
    return {"records": {split: 1}, "impressions": {split: len(imps["imp_label"])},
            "positives": {split: float(sum(imps["imp_label"]))},
            "history_rows": {split: len(rec["hist"]["hist_ts"])}}


# ======================================================================================
# DoFns (pure functions of element + side inputs)
# ======================================================================================


class _Counters:
    """Beam counters by name, created lazily (Metrics objects are cheap delegates)."""

    def __init__(self):
        self._c: Dict[str, Any] = {}

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            c = self._c.get(name)
            if c is None:
                c = self._c[name] = Metrics.counter(NAMESPACE, name)
            c.inc(n)


class _CountingDoFn(beam.DoFn):
    """A DoFn that sums its report contributions per bundle and emits them once,
    as the tagged output ``counts``, in ``finish_bundle`` (no state outlives a bundle)."""

    def setup(self):
        self._counters = _Counters()

    def start_bundle(self):
        self._bundle_counts: Dict[str, Any] = {}
        self._rows_input = 0  # the hottest count, kept as a plain int

    def _count(self, d: Dict[str, Any]) -> None:
        merge_counts(self._bundle_counts, d)

    def finish_bundle(self):
        if self._rows_input:
            self._count({"rows": {"input": self._rows_input}})
        if self._bundle_counts:
            yield beam.pvalue.TaggedOutput("counts", WindowedValue(
                self._bundle_counts, GlobalWindow().max_timestamp(), [GlobalWindow()]))
        self._bundle_counts = {}
        self._rows_input = 0


@beam.typehints.with_output_types(Tuple[str, Any])
class ParseRows(_CountingDoFn):
    """Raw line -> ``(user_key, (item, cate, ts, engage, domain))``; tagged outputs
    ``dead`` (``"reason\\traw"`` lines) and ``counts``."""

    def __init__(self, source: str, keep: Optional[Iterable[str]] = None,
                 window: Optional[Sequence[int]] = None):
        super().__init__()
        self._source = source
        self._keep = frozenset(keep) if keep else frozenset(A.TAOBAO_BEHAVIORS)
        self._window = A.TimeWindow(*window) if window is not None else None

    def process(self, line, genres=None):
        c = self._counters
        c.inc("rows_input")
        self._rows_input += 1
        if self._source == "movielens":
            r = A.parse_movielens_rating(line, genres or {}, self._window)
        else:
            r = A.parse_taobao_line(line, self._keep, self._window)
        if isinstance(r, A.DeadLetter):
            kind = A.reason_kind(r.reason)
            c.inc("rows_dead_lettered")
            c.inc(f"dead_letter_{kind}")
            self._count({"dead_letter_reasons": {kind: 1}})
            yield beam.pvalue.TaggedOutput("dead", f"{r.reason}\t{r.raw}")
        elif isinstance(r, A.Filtered):
            kind = A.reason_kind(r.reason)
            c.inc("rows_filtered")
            c.inc(f"filtered_{kind}")
            self._count({"filtered_reasons": {kind: 1}})
        else:
            yield (r[0], r[1:])


class GenerateUsers(_CountingDoFn):
    """A range of synthetic user indices -> ``(user_key, events, impressions)``."""

    def __init__(self, config: Mapping[str, Any], window: Optional[Sequence[int]] = None):
        super().__init__()
        self._config_dict = dict(config)
        self._window = A.TimeWindow(*window) if window is not None else None

    def setup(self):
        super().setup()
        from beam_jobs import synthetic  # lazy: only this source needs the generator
        self._synthetic = synthetic
        self._cfg = synthetic.SyntheticConfig.from_dict(self._config_dict)

    def process(self, index_range):
        start, stop = index_range
        for index in range(start, stop):
            u = self._synthetic.generate_user(self._cfg, index)
            key = u["user_key"]
            events, imps = [], []
            for e in u["events"]:
                reason = A.check_synthetic_event(key, e, self._window)
                if reason:
                    yield self._dead(reason, (key,) + tuple(e))
                else:
                    events.append(tuple(e))
            for i in u["impressions"]:
                reason = A.check_synthetic_impression(key, i, self._window)
                if reason:
                    yield self._dead(reason, (key,) + tuple(i))
                else:
                    imps.append(tuple(i))
            n_input = len(u["events"]) + len(u["impressions"])
            self._counters.inc("rows_input", n_input)
            self._rows_input += n_input
            yield (key, events, imps)

    def _dead(self, reason, raw):
        kind = A.reason_kind(reason)
        self._counters.inc("rows_dead_lettered")
        self._counters.inc(f"dead_letter_{kind}")
        self._count({"dead_letter_reasons": {kind: 1}})
        return beam.pvalue.TaggedOutput("dead", f"{reason}\t{raw!r}")


class ApplyProtocol(_CountingDoFn):
    """``(user_key, events, impressions|None)`` -> records (main) or
    ``(split_key, record)`` (user-split protocols), plus tagged ``counts``
    and ``user_rows`` (``(user_key, used rows)``)."""

    def __init__(self, protocol: str, seed: int, max_history: int, label_threshold: float):
        super().__init__()
        self._protocol = protocol
        self._seed = int(seed)
        self._max_history = int(max_history)
        self._threshold = float(label_threshold)

    def process(self, user, item_vocab, cate_vocab, cuts=None):
        user_key, events, imps = user
        unused_imps = 0
        if self._protocol == "per_event_time_split":
            unused_imps = len(imps) if imps else 0
            records, summary = per_event_user(user_key, events, item_vocab["ids"],
                                              cate_vocab["ids"], cuts, self._threshold,
                                              self._max_history)
            out = records
        elif self._protocol == "last_item_per_user":
            unused_imps = len(imps) if imps else 0
            keyed, summary = last_item_user(user_key, events, item_vocab, cate_vocab["ids"],
                                            self._seed, self._max_history)
            out = [keyed] if keyed else []
        else:
            keyed, summary = labeled_user(user_key, events, imps or [], item_vocab["ids"],
                                          cate_vocab["ids"], self._max_history)
            out = [keyed] if keyed else []
        if unused_imps:
            summary["filtered"]["source_impressions_not_used"] = unused_imps
        c = self._counters
        c.inc("rows_used", summary["used_rows"])
        for kind, n in summary["filtered"].items():
            c.inc("rows_filtered", n)
            c.inc(f"filtered_{kind}", n)
        self._count(_summary_counts(summary))
        if out:
            c.inc("users_with_records")
            yield beam.pvalue.TaggedOutput("user_rows", (user_key, summary["used_rows"]))
        for o in out:
            yield o


def _assign_split(keyed, cuts):
    key, rec = keyed
    rec = dict(rec)
    rec["split"] = S.SPLITS[split_index(key, cuts)]
    return rec


def encode_record(rec: Mapping[str, Any], user_ids: Mapping[str, int]) -> bytes:
    """Record -> serialized per-user tf.Example (validated, deterministic bytes)."""
    return S.encode_user_record(user_ids[rec["user_key"]], rec["user_key"], rec["hist"],
                                rec["imps"])


class EncodeRecords(_CountingDoFn):
    """Record -> ``(split, bytes)``; tagged ``counts`` per split."""

    def process(self, rec, user_vocab):
        self._count(_record_counts(rec))
        yield rec["split"], encode_record(rec, user_vocab["ids"])


def _split_of(kv, n):
    return S.SPLITS.index(kv[0])


def _vocab_item_rows(user, with_impressions: bool):
    _, events, imps = user
    for e in events:
        yield (e[0], e[1])
    if with_impressions and imps:
        for i in imps:
            yield (i[0], i[1])


def _write_text_file(content: str, path: str) -> None:
    """Write one small file from a worker (idempotent: a retry rewrites it)."""
    with FileSystems.create(path) as f:
        f.write(content.encode("utf-8"))


def _read_text_file(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8", errors="replace")


def _vocab_counts(vocab, name: str) -> Dict[str, Any]:
    return {"vocab_entries": {name: len(vocab["keys"]), f"oov_{name}": vocab["oov_keys"],
                              f"oov_{name}_rows": vocab["oov_rows"]}}


# ======================================================================================
# Pipeline
# ======================================================================================


def _join(*parts: str) -> str:
    return FileSystems.join(*parts)


def build_pipeline(p: beam.Pipeline, settings: Mapping[str, Any], args: argparse.Namespace,
                   synthetic_config=None) -> None:
    """Add the whole job to ``p``."""
    source, protocol = settings["source"], settings["protocol"]
    out = args.output
    counts_parts = []

    # ---- 1. source -> users (user_key, events, impressions|None) ----------------------
    if source == "synthetic":
        n = synthetic_config.num_users
        chunk = 100
        gen = (p
               | "UserRanges" >> beam.Create([(s, min(n, s + chunk)) for s in range(0, n, chunk)])
               | "SpreadUsers" >> beam.Reshuffle()
               | "Generate" >> beam.ParDo(GenerateUsers(synthetic_config.to_dict(),
                                                        settings.get("time_window")))
               .with_outputs("dead", "counts", main="users"))
        users, dead = gen.users, gen.dead
        counts_parts.append(gen.counts)
    else:
        if source == "movielens":
            ratings = _join(args.input, "ratings.csv")
            movies = _join(args.input, "movies.csv")
            lines = p | "ReadRatings" >> beam.io.ReadFromText(
                ratings, skip_header_lines=1, coder=beam.coders.BytesCoder())
            movie_table = (p
                           | "MoviesPath" >> beam.Create([movies])
                           | "ReadMovies" >> beam.Map(_read_text_file)
                           | "ParseMovies" >> beam.Map(A.parse_movies_csv))
            genres = beam.pvalue.AsSingleton(movie_table | "Genres" >> beam.Map(lambda t: t[0]))
            counts_parts.append(movie_table | "MovieCounts" >> beam.Map(
                lambda t: {"movies": {"rows": len(t[0]), "malformed": t[1]}}))
            parsed = lines | "Parse" >> beam.ParDo(
                ParseRows(source, window=settings.get("time_window")), genres).with_outputs(
                "dead", "counts", main="behaviors")
        else:
            lines = p | "ReadBehaviors" >> beam.io.ReadFromText(
                args.input, coder=beam.coders.BytesCoder())
            parsed = lines | "Parse" >> beam.ParDo(
                ParseRows(source, settings["keep"], settings.get("time_window"))).with_outputs(
                "dead", "counts", main="behaviors")
        counts_parts.append(parsed.counts)
        dead = parsed.dead
        # GroupByKey spreads users over workers, so no extra Reshuffle is needed here.
        users = (parsed.behaviors
                 | "GroupByUser" >> beam.GroupByKey()
                 | "UserTuple" >> beam.MapTuple(lambda k, evs: (k, list(evs), None)))

    # ---- 2. dead letters ----------------------------------------------------------------
    _ = dead | "WriteDeadLetters" >> beam.io.WriteToText(
        _join(out, DEAD_LETTER_DIR, "rows"), file_name_suffix=".tsv")

    # ---- 3. item and category vocabularies ---------------------------------------------
    item_cate = users | "ItemCateRows" >> beam.FlatMap(
        _vocab_item_rows, protocol == "labeled_impressions")
    item_vocab = (item_cate
                  | "CategoryOfItem" >> beam.CombinePerKey(_CategoryOfItem())
                  | "ItemList" >> beam.combiners.ToList()
                  | "ItemVocab" >> beam.Map(build_vocab, int(args.min_item_count)))
    cate_vocab = (item_cate
                  | "CateKeys" >> beam.Map(lambda ic: ic[1])
                  | "CountCates" >> beam.combiners.Count.PerElement()
                  | "CateList" >> beam.combiners.ToList()
                  | "CateVocab" >> beam.Map(build_vocab, 1))
    item_si = beam.pvalue.AsSingleton(item_vocab)
    cate_si = beam.pvalue.AsSingleton(cate_vocab)
    for name, vocab in (("items", item_vocab), ("categories", cate_vocab)):
        _ = (vocab | f"{name}Tsv" >> beam.Map(vocab_tsv)
             | f"Write_{name}" >> beam.Map(_write_text_file, _join(out, VOCAB_DIR, f"{name}.tsv")))
        counts_parts.append(vocab | f"{name}Counts" >> beam.Map(_vocab_counts, name))

    # ---- 4. protocol --------------------------------------------------------------------
    fractions = settings["fractions"]
    dofn = ApplyProtocol(protocol, args.seed, args.max_history, args.label_threshold)
    if protocol == "per_event_time_split":
        cuts = (users
                | "EventTimes" >> beam.FlatMap(lambda u: [int(e[2]) for e in u[1]])
                | "TimeCuts" >> ExactCuts(fractions, _hour))
        applied = users | "PerEvent" >> beam.ParDo(
            dofn, item_si, cate_si, beam.pvalue.AsSingleton(cuts)).with_outputs(
            "counts", "user_rows", main="records")
        records = applied.records
        counts_parts.append(cuts | "CutCounts" >> beam.Map(
            lambda c: {"split_cuts": {"train_end_ts": c[0], "valid_end_ts": c[1]}}))
    else:
        applied = users | "PerUser" >> beam.ParDo(dofn, item_si, cate_si).with_outputs(
            "counts", "user_rows", main="keyed")
        cuts = (applied.keyed | "SplitKeys" >> beam.Map(lambda kr: kr[0])
                | "UserCuts" >> ExactCuts(fractions, _hour_of_key))
        records = applied.keyed | "AssignSplit" >> beam.Map(
            _assign_split, beam.pvalue.AsSingleton(cuts))
        counts_parts.append(cuts | "CutCounts" >> beam.Map(lambda c: {"split_cuts": {
            "train_end": None if c[0] is None else f"ts={c[0][0]} user={c[0][1]}",
            "valid_end": None if c[1] is None else f"ts={c[1][0]} user={c[1][1]}"}}))
    counts_parts.append(applied.counts)

    # ---- 5. user vocabulary (users with at least one record) ------------------------------
    user_vocab = (applied.user_rows
                  | "UserList" >> beam.combiners.ToList()
                  | "UserVocab" >> beam.Map(build_vocab, 1))
    _ = (user_vocab | "usersTsv" >> beam.Map(vocab_tsv)
         | "Write_users" >> beam.Map(_write_text_file, _join(out, VOCAB_DIR, "users.tsv")))
    counts_parts.append(user_vocab | "usersCounts" >> beam.Map(_vocab_counts, "users"))

    # ---- 6. encode and write sharded TFRecords ----------------------------------------------
    encoded = records | "Encode" >> beam.ParDo(
        EncodeRecords(), beam.pvalue.AsSingleton(user_vocab)).with_outputs("counts", main="records")
    counts_parts.append(encoded.counts)
    encoded = encoded.records
    by_split = encoded | "BySplit" >> beam.Partition(_split_of, len(S.SPLITS))
    for i, split in enumerate(S.SPLITS):
        _ = (by_split[i]
             | f"{split}Bytes" >> beam.Map(lambda kv: kv[1])
             | f"Write_{split}" >> beam.io.WriteToTFRecord(
                 file_path_prefix=_join(out, split), file_name_suffix=TFRECORD_SUFFIX,
                 num_shards=settings["num_shards"], compression_type=CompressionTypes.GZIP))

    # ---- 7. the report's counts ---------------------------------------------------------------
    _ = (tuple(counts_parts)
         | "AllCounts" >> beam.Flatten()
         | "SumCounts" >> beam.CombineGlobally(_SumCounts())
         | "CountsJson" >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
         | "WriteCounts" >> beam.Map(_write_text_file, _join(out, COUNTS_FILE)))


# ======================================================================================
# Driver
# ======================================================================================


def _check_inputs(settings: Mapping[str, Any], args: argparse.Namespace) -> None:
    source = settings["source"]
    if source == "synthetic":
        return
    path = getattr(args, "input", None)
    if not path:
        raise PrepareError(f"--source {source} needs --input (" + (
            "a folder with ratings.csv and movies.csv)" if source == "movielens"
            else "UserBehavior.csv or a glob)"))
    if source == "movielens":
        if not FileSystems.exists(path):
            raise PrepareError(f"--input {path!r} does not exist")
        for name in ("ratings.csv", "movies.csv"):
            f = _join(path, name)
            if not FileSystems.exists(f):
                raise PrepareError(f"--input {path!r} has no {name} (expected a MovieLens "
                                   f"folder such as ml-latest-small or ml-32m)")
        with FileSystems.open(_join(path, "ratings.csv")) as f:
            head = f.readline().decode("utf-8", errors="replace").strip().lstrip("\ufeff")
        if not head:
            raise PrepareError(f"{_join(path, 'ratings.csv')} is empty")
        if head.replace(" ", "") != A.MOVIELENS_RATINGS_HEADER:
            raise PrepareError(f"{_join(path, 'ratings.csv')} must start with the header "
                               f"{A.MOVIELENS_RATINGS_HEADER!r}, found {head[:80]!r}")
    else:
        if "://" not in path and os.path.isdir(path):
            raise PrepareError(f"--input {path!r} is a folder; pass UserBehavior.csv or a glob "
                               f"such as {os.path.join(path, '*.csv')!r}")
        try:
            matched = FileSystems.match([path])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - filesystem errors vary by scheme
            raise PrepareError(f"--input {path!r} cannot be listed: {e}") from None
        matched = [m for m in matched if not m.path.endswith("/")]
        if not matched:
            raise PrepareError(f"--input {path!r} matches no file")
        if all(m.size_in_bytes == 0 for m in matched):
            raise PrepareError(f"--input {path!r} is empty ({len(matched)} file(s), 0 bytes)")


def _existing_outputs(out: str) -> List[str]:
    patterns = [S.split_pattern(out, s) for s in S.SPLITS] + [
        _join(out, S.META_FILE), _join(out, COUNTS_FILE), _join(out, VOCAB_DIR, "*.tsv"),
        _join(out, DEAD_LETTER_DIR, "rows-*.tsv")]
    found = []
    for res in FileSystems.match(patterns):
        found.extend(m.path for m in res.metadata_list)
    return found


def _prepare_output(out: str, overwrite: bool) -> None:
    found = _existing_outputs(out)
    if found:
        if not overwrite:
            raise PrepareError(f"--output {out!r} already holds a prepared dataset "
                               f"({len(found)} files, e.g. {found[0]}); pass --overwrite or "
                               f"choose another folder")
        _log(f"--overwrite: deleting {len(found)} files of the previous dataset in {out}")
        FileSystems.delete(found)
    if "://" not in out:
        try:
            FileSystems.mkdirs(out)
        except IOError:
            pass  # already exists


def _hist_summary(hist: Mapping[str, int]) -> Dict[str, Any]:
    items = sorted((int(k), int(v)) for k, v in hist.items())
    n = sum(v for _, v in items)
    if n == 0:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0, "users": 0}

    def nth(k):  # 0-based k-th smallest
        cum = 0
        for length, c in items:
            cum += c
            if cum > k:
                return length
        return items[-1][0]

    median = nth((n - 1) // 2) if n % 2 else (nth(n // 2 - 1) + nth(n // 2)) / 2.0
    return {"mean": sum(l * c for l, c in items) / n, "median": float(median),
            "min": items[0][0], "max": items[-1][0], "users": n}


def _query_counters(result) -> Optional[Dict[str, int]]:
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return None
    out: Dict[str, int] = {}
    for c in res.get("counters", []):
        value = c.committed if c.committed is not None else c.attempted
        if value is None:
            continue
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value)
    return out


def build_report(counts: Mapping[str, Any], settings: Mapping[str, Any],
                 args: argparse.Namespace, beam_args: Sequence[str],
                 synthetic_config=None) -> Dict[str, Any]:
    """The pipeline's summed counts -> the meta.json / report dictionary."""
    vocab_entries = counts.get("vocab_entries", {})
    n_items, n_cates, n_users = (int(vocab_entries.get(k, 0))
                                 for k in ("items", "categories", "users"))
    domains = [int(d) for d in counts.get("domains", {})]
    num_domains = max([S.DEFAULT_DOMAIN + 1] + [d + 1 for d in domains])
    rows = counts.get("rows", {})
    dead = {k: int(v) for k, v in sorted(counts.get("dead_letter_reasons", {}).items())}
    filtered = {k: int(v) for k, v in sorted(counts.get("filtered_reasons", {}).items()) if v}
    impressions = {s: int(counts.get("impressions", {}).get(s, 0)) for s in S.SPLITS}
    positives = counts.get("positives", {})
    records = {s: int(counts.get("records", {}).get(s, 0)) for s in S.SPLITS}
    history_rows = {s: int(counts.get("history_rows", {}).get(s, 0)) for s in S.SPLITS}
    report: Dict[str, Any] = {
        "format": "per_user_record",
        "vocab": {"num_items": n_items + S.FIRST_ID, "num_categories": n_cates + S.FIRST_ID,
                  "num_users": n_users + S.FIRST_ID, "num_domains": num_domains,
                  "pad_id": S.PAD_ID, "oov_id": S.OOV_ID, "first_id": S.FIRST_ID,
                  "oov_items": int(vocab_entries.get("oov_items", 0)),
                  "oov_item_rows": int(vocab_entries.get("oov_items_rows", 0))},
        "source": settings["source"],
        "protocol": settings["protocol"],
        "seed": int(args.seed),
        "splits": {s: {"files": f"{s}-*-of-{settings['num_shards']:05d}{TFRECORD_SUFFIX}",
                       "records": records[s], "impressions": impressions[s],
                       "history_rows": history_rows[s]} for s in S.SPLITS},
        "split_rule": _split_rule(settings, counts.get("split_cuts", {})),
        "stats": {
            "users": n_users,
            "items": n_items,
            "categories": n_cates,
            "events": int(counts.get("events", 0)),
            "history_length": _hist_summary(counts.get("history_length", {})),
            "impressions": impressions,
            "positive_rate": {s: (float(positives.get(s, 0.0)) / impressions[s]
                                  if impressions[s] else None) for s in S.SPLITS},
        },
        "rows": {"input": int(rows.get("input", 0)), "used": int(rows.get("used", 0)),
                 "filtered": sum(filtered.values()), "dead_lettered": sum(dead.values()),
                 "dead_letter_reasons": dead, "filtered_reasons": filtered},
        "max_history": int(args.max_history),
        "min_item_count": int(args.min_item_count),
    }
    if settings.get("time_window") is not None:
        report["valid_time_window"] = {
            **A.TimeWindow(*settings["time_window"]).to_dict(),
            "from": settings.get("time_window_from", "--valid_time_window"),
            "outside": "dead-lettered (timestamp_before_valid_window / "
                       "timestamp_after_valid_window)"}
    if "movies" in counts:
        report["rows"]["movies_csv"] = {k: int(v) for k, v in counts["movies"].items()}
    if synthetic_config is not None:
        report["synthetic_config"] = synthetic_config.to_dict()
    report["args"] = {k: v for k, v in sorted(vars(args).items())
                      if isinstance(v, (str, int, float, bool, type(None))) and k != "func"}
    report["beam_args"] = list(beam_args)
    return report


def _split_rule(settings: Mapping[str, Any], cuts: Mapping[str, Any]) -> Dict[str, Any]:
    f1, f2 = settings["fractions"]
    if settings["protocol"] == "per_event_time_split":
        return {"kind": "global event time", "train": f"ts < train_end_ts (the {f1:g} quantile)",
                "valid": f"train_end_ts <= ts < valid_end_ts (the {f2:g} quantile; carved from "
                         f"the end of the training period)",
                "test": "ts >= valid_end_ts",
                "train_end_ts": cuts.get("train_end_ts"), "valid_end_ts": cuts.get("valid_end_ts")}
    return {"kind": "users by (last behavior ts, user_key)",
            "train": f"first {f1:g} of users", "valid": f"next {f2 - f1:g}", "test": "the rest",
            "train_end": cuts.get("train_end"), "valid_end": cuts.get("valid_end")}


def run(args: argparse.Namespace, beam_args: List[str]) -> Dict[str, Any]:
    """Run the ``prepare`` pipeline; returns the report (also written as meta.json)."""
    t0 = time.time()
    settings = _validate_args(args)
    if getattr(args, "protocol", None) != settings["protocol"]:
        args.protocol = settings["protocol"]
    _log(f"source={settings['source']} protocol={settings['protocol']} seed={args.seed} "
         f"output={args.output}")
    _log("checking inputs")
    _check_inputs(settings, args)
    synthetic_config = _synthetic_config(args) if settings["source"] == "synthetic" else None
    _resolve_time_window(settings, synthetic_config)
    w = settings["time_window"]
    _log(f"valid time window ({settings['time_window_from']}): {A.iso_utc(w.start)} .. "
         f"{A.iso_utc(w.end)} inclusive; rows outside it are dead-lettered")
    _prepare_output(args.output, bool(getattr(args, "overwrite", False)))

    options = PipelineOptions(list(beam_args))
    runner = options.get_all_options().get("runner") or "DirectRunner"
    _log(f"building pipeline (runner {runner}; Beam options {list(beam_args) or 'none'})")
    p = beam.Pipeline(options=options)
    build_pipeline(p, settings, args, synthetic_config)
    _log("running: read+parse -> vocabularies -> split cuts -> per-user records -> write")
    t_run = time.time()
    result = p.run()
    result.wait_until_finish()
    run_s = time.time() - t_run
    _log(f"pipeline finished in {run_s:.1f}s")

    counts_path = _join(args.output, COUNTS_FILE)
    if not FileSystems.exists(counts_path):
        raise PrepareError(f"the pipeline wrote no {counts_path}; see the runner's log")
    counts = json.loads(_read_text_file(counts_path))
    report = build_report(counts, settings, args, beam_args, synthetic_config)
    rows = report["rows"]

    counters = _query_counters(result)
    if counters is not None and counters:
        report["beam_counters"] = dict(sorted(counters.items()))
        want = {"rows_input": rows["input"], "rows_used": rows["used"],
                "rows_filtered": rows["filtered"], "rows_dead_lettered": rows["dead_lettered"]}
        diff = {k: (counters.get(k, 0), v) for k, v in want.items() if counters.get(k, 0) != v}
        if diff:
            _log(f"note: Beam metrics differ from the pipeline's counts (metric, count): {diff}")

    _verify_shards(args.output, settings["num_shards"])
    report["wall_seconds"] = round(time.time() - t0, 3)
    report["pipeline_seconds"] = round(run_s, 3)
    with FileSystems.create(_join(args.output, S.META_FILE)) as f:
        f.write(json.dumps(report, indent=2, sort_keys=False).encode("utf-8"))
    FileSystems.delete([counts_path])

    st = report["stats"]
    _log(f"users {st['users']:,}  items {st['items']:,} (+{report['vocab']['oov_items']:,} OOV)  "
         f"categories {st['categories']:,}  events {st['events']:,}")
    _log("impressions " + "  ".join(f"{s} {st['impressions'][s]:,}" for s in S.SPLITS)
         + "  positive rate " + "  ".join(
             f"{s} {st['positive_rate'][s]:.4f}" if st["positive_rate"][s] is not None
             else f"{s} -" for s in S.SPLITS))
    h = st["history_length"]
    _log(f"history length per user: mean {h['mean']:.1f}  median {h['median']:g}  "
         f"max {h['max']:,}")
    if rows["dead_lettered"]:
        _log(f"dead letters by reason: {rows['dead_letter_reasons']} -> "
             f"{_join(args.output, DEAD_LETTER_DIR, 'rows-*.tsv')}")
    if rows["filtered"]:
        _log(f"filtered by reason: {rows['filtered_reasons']}")
    ok = rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    _log(f"rows: input {rows['input']:,} = used {rows['used']:,} + filtered "
         f"{rows['filtered']:,} + dead-lettered {rows['dead_lettered']:,}  "
         f"[{'OK' if ok else 'MISMATCH'}]")
    rate = rows["input"] / run_s if run_s > 0 else float("nan")
    _log(f"wrote {args.output} in {report['wall_seconds']:.1f}s ({rate:,.0f} input rows/s "
         f"in the pipeline)")

    if rows["input"] == 0:
        raise PrepareError(f"the input holds no rows ({args.input or 'synthetic'})")
    if rows["used"] == 0:
        raise PrepareError(f"no usable rows: all {rows['input']:,} input rows were dead-lettered "
                           f"({rows['dead_lettered']:,}) or filtered ({rows['filtered']:,}); "
                           f"see {_join(args.output, DEAD_LETTER_DIR)}")
    if not ok:
        raise PrepareError("row accounting mismatch (a bug): input != used + filtered + "
                           "dead-lettered; see meta.json rows")
    return report


def _verify_shards(out: str, num_shards: int) -> None:
    for split in S.SPLITS:
        found = sorted(m.path for m in
                       FileSystems.match([S.split_pattern(out, split)])[0].metadata_list)
        want = sorted(_join(out, f"{split}-{i:05d}-of-{num_shards:05d}{TFRECORD_SUFFIX}")
                      for i in range(num_shards))
        if [f.rsplit("/", 1)[-1] for f in found] != [w.rsplit("/", 1)[-1] for w in want]:
            raise PrepareError(f"unexpected {split} shard files in {out}: "
                               f"{[f.rsplit('/', 1)[-1] for f in found]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m beam_jobs.prepare ...`` (the console entry point calls :func:`run`)."""
    from beam_jobs import beam_main
    return beam_main("prepare", __doc__, add_arguments, run, PrepareError, argv)


if __name__ == "__main__":
    sys.exit(main())
