"""The DoFns and PTransforms of the sample-building job (:mod:`beam_jobs.prepare_pipeline`).

Every DoFn is a pure function of its element and side inputs (no state outlives a
bundle), so the same pipeline runs on any runner by pipeline options alone:

* :class:`ParseRows` — raw line -> ``(user_key, event)``, dead letters, counts;
* :class:`GenerateUsers` — synthetic user ranges -> users;
* :class:`ApplyProtocol` — a user -> records (the pure functions of
  :mod:`beam_jobs.prepare_protocols`);
* :class:`EncodeRecords` — record -> ``(split, serialized per-user record)``;
* :class:`ExactCuts` — exact quantile cuts (the time / user split boundaries) in
  two passes: an hourly histogram, then the elements of the one or two hours that
  hold a cut.

Each DoFn emits its report contributions once per bundle as the tagged output
``counts`` (:class:`beam_jobs.sharded_io.CountingDoFn`) and keeps Beam counters in
the namespace ``prepare``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam

from beam_jobs import adapters as A
from beam_jobs.prepare_protocols import (encode_record, labeled_time_split_user, labeled_user,
                                         last_item_user, per_event_user)
from beam_jobs.sharded_io import CountingDoFn

NAMESPACE = "prepare"            # Beam metrics namespace
_COARSE_SECONDS = 3600           # first-pass bucket of ExactCuts (one hour)


# ======================================================================================
# Exact quantile cuts
# ======================================================================================


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
# DoFns (pure functions of element + side inputs)
# ======================================================================================


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


class _CountingDoFn(CountingDoFn):
    """:class:`~beam_jobs.sharded_io.CountingDoFn` in the ``prepare`` namespace, with the
    hottest count (input rows) kept as a plain int and added at the end of the bundle."""

    namespace = NAMESPACE

    def start_bundle(self):
        super().start_bundle()
        self._rows_input = 0

    def finish_bundle(self):
        if self._rows_input:
            self._count({"rows": {"input": self._rows_input}})
        self._rows_input = 0
        yield from super().finish_bundle()


@beam.typehints.with_output_types(Tuple[str, Any])


class ParseRows(_CountingDoFn):
    """Raw line -> ``(user_key, (item, cate, ts, engage, domain))``; tagged outputs
    ``dead`` (``"reason\\traw"`` lines) and ``counts``."""

    def __init__(self, source: str, keep: Optional[Iterable[str]] = None,
                 window: Optional[Sequence[int]] = None, domains: str = "none",
                 sep: str = ","):
        super().__init__()
        self._source = source
        self._domains = domains  # MovieLens: "none" | "genre" (adapters.movielens_domain)
        self._sep = sep          # MovieLens: the layout's ratings separator
        self._keep = frozenset(keep) if keep else frozenset(A.TAOBAO_BEHAVIORS)
        self._window = A.TimeWindow(*window) if window is not None else None

    def process(self, line, genres=None):
        c = self._counters
        c.inc("rows_input")
        self._rows_input += 1
        if self._source == "movielens":
            r = A.parse_movielens_rating(line, genres or {}, self._window, self._domains,
                                         self._sep)
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
        elif self._protocol == "labeled_impressions_time_split":
            out, summary = labeled_time_split_user(user_key, events, imps or [],
                                                   item_vocab["ids"], cate_vocab["ids"], cuts,
                                                   self._max_history)
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


class EncodeRecords(_CountingDoFn):
    """Record -> ``(split, bytes)``; tagged ``counts`` per split. With ``engage_step``
    and the item table side input (a dict of ``cate`` / ``domain`` lists): the compact
    format."""

    def __init__(self, engage_step: Optional[float] = None, record_format: str = "compact",
                 ts_step: int = 1):
        super().__init__()
        self._step = engage_step
        self._format, self._ts_step = record_format, ts_step

    def process(self, rec, user_vocab, item_table=None):
        self._count(_record_counts(rec))
        table = None
        if item_table is not None:
            table = getattr(self, "_table", None)
            if table is None or self._table_src is not item_table:   # once per side input
                from tfmodels import schema as S
                import numpy as np
                table = S.ItemTable(np.asarray(item_table["cate"], np.int64),
                                    np.asarray(item_table["domain"], np.int64))
                self._table, self._table_src = table, item_table
        yield rec["split"], encode_record(rec, user_vocab["ids"], table, self._step or 1.0,
                                          self._format, self._ts_step)
