"""Source of ``prepare --source taobao_ad``: Taobao display-ad click data (Tianchi 56,
METHODS 4.3, LCN's public cross-domain set) -> users ``(user_key, events, impressions)``.

:class:`TaobaoAdUsers` reads three files of the input folder, each with its header
line (checked by the driver, :mod:`beam_jobs.prepare`):

* ``ad_feature.csv`` -> the ad lookup ``adgroup_id -> (cate_id, brand)``;
* ``raw_sample.csv`` -> impressions, joined with the lookup by ``adgroup_id``
  (``CoGroupByKey``: no side input holds the 0.85M ads); label = clk;
* ``behavior_log.csv`` -> behaviors ``(item = c{cate}_b{brand}, cate, ts, btag code,
  domain)``;

then groups both by user. Row accounting (every row of the three files counted once,
``rows.by_file`` in ``meta.json``):

* ad_feature: **used** = the row that is the lookup entry of its adgroup_id;
  dead letter = malformed, or a duplicate adgroup_id (the row with the smallest raw
  text is the entry; the others are ``duplicate adgroup_id``);
* raw_sample: dead letter = malformed or ``unknown adgroup_id`` (no ad_feature
  entry); **filtered** ``impression_not_target_domain`` = the ad's cate_id >= 2000
  (dropped by the protocol); every other impression becomes a labeled impression
  (used);
* behavior_log: dead letter = malformed (incl. an unknown btag, a timestamp outside
  the valid window); filtered = btag not kept (``--taobao_keep_behaviors``) or by the
  protocol (``user_without_impressions``, ``after_last_impression``, ``max_history``);
  used = stored in a record.

``user_profile.csv`` is not read: the per-user record has no profile fields.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import apache_beam as beam

from beam_jobs import adapters as A
from beam_jobs.prepare_transforms import _CountingDoFn
from beam_jobs.sharded_io import join

SAMPLE, AD, BEHAVIOR = "sample", "ad", "behavior"
FILE_OF = {SAMPLE: A.TAOBAO_AD_RAW_SAMPLE, AD: A.TAOBAO_AD_FEATURE,
           BEHAVIOR: A.TAOBAO_AD_BEHAVIOR_LOG}


class _AdDoFn(_CountingDoFn):
    def _file_count(self, kind: str, what: str, n: int = 1) -> None:
        self._count({"by_file": {FILE_OF[kind]: {what: n}}})

    def _dead(self, kind: str, reason: str, raw: str):
        k = A.reason_kind(reason)
        self._counters.inc("rows_dead_lettered")
        self._counters.inc(f"dead_letter_{k}")
        self._count({"dead_letter_reasons": {k: 1}})
        self._file_count(kind, "dead_lettered")
        return beam.pvalue.TaggedOutput("dead", f"{reason}\t{raw}")

    def _filtered(self, kind: str, reason: str, n: int = 1) -> None:
        k = A.reason_kind(reason)
        self._counters.inc("rows_filtered", n)
        self._counters.inc(f"filtered_{k}", n)
        self._count({"filtered_reasons": {k: n}})
        self._file_count(kind, "filtered", n)


class ParseAdFile(_AdDoFn):
    """A raw line of one file -> keyed row: sample ``(adgroup, (user, ts, label, raw))``,
    ad ``(adgroup, (cate, brand, raw))``, behavior ``(user, (item, cate, ts, engage,
    domain))``; tagged ``dead`` and ``counts``."""

    def __init__(self, kind: str, keep: Optional[Iterable[str]] = None,
                 window: Optional[Sequence[int]] = None):
        super().__init__()
        self._kind = kind
        self._keep = frozenset(keep) if keep else frozenset(A.TAOBAO_BEHAVIORS)
        self._window = A.TimeWindow(*window) if window is not None else None

    def process(self, line):
        self._counters.inc("rows_input")
        self._rows_input += 1
        self._file_count(self._kind, "input")
        kind = self._kind
        if kind == SAMPLE:
            r = A.parse_taobao_ad_sample(line, self._window)
        elif kind == AD:
            r = A.parse_taobao_ad_feature(line)
        else:
            r = A.parse_taobao_ad_behavior(line, self._keep, self._window)
        if isinstance(r, A.DeadLetter):
            yield self._dead(kind, r.reason, r.raw)
        elif isinstance(r, A.Filtered):
            self._filtered(kind, r.reason)
        elif kind == SAMPLE:
            yield (r.adgroup, (r.user, r.ts, r.label, A.decode_line(line)[1]))
        elif kind == AD:
            yield (r.adgroup, (r.cate, r.brand, A.decode_line(line)[1]))
        else:
            yield (r[0], r[1:])


class JoinAds(_AdDoFn):
    """``(adgroup, {"ads": [...], "imps": [...]})`` -> ``(user, (item, cate, ts, label))``
    for target-domain ads; unknown / duplicate adgroups -> dead letters; source-domain
    ads' impressions -> filtered ``impression_not_target_domain``."""

    def process(self, kv):
        adgroup, grouped = kv
        ads = sorted(grouped["ads"], key=lambda a: a[2])   # a few rows per adgroup
        imps = grouped["imps"]       # iterated once, never listed: an ad can have 100k+
        for _, _, raw in ads[1:]:
            yield self._dead(AD, f"duplicate adgroup_id: {adgroup} (first row kept)", raw)
        if not ads:
            for _, _, _, raw in imps:
                yield self._dead(SAMPLE, f"unknown adgroup_id: {adgroup} (not in "
                                         f"{A.TAOBAO_AD_FEATURE})", raw)
            return
        cate, brand, _ = ads[0]
        self._counters.inc("rows_used")
        self._count({"rows": {"used": 1}})
        self._file_count(AD, "used")
        if A.taobao_ad_domain(cate) != A.TARGET_DOMAIN:
            n = sum(1 for _ in imps)
            if n:
                self._filtered(SAMPLE, "impression not target domain", n)
            return
        item = A.taobao_ad_item_key(cate, brand)
        for user, ts, label, _ in imps:
            yield (user, (item, cate, ts, label))


def _user_tuple(kv):
    user, grouped = kv
    return (user, list(grouped["events"]), list(grouped["imps"]))


class TaobaoAdUsers(beam.PTransform):
    """Pipeline root -> ``{"users", "dead", "counts"}`` (module doc)."""

    def __init__(self, folder: str, keep: Optional[Iterable[str]] = None,
                 window: Optional[Sequence[int]] = None):
        super().__init__()
        self._folder = folder
        self._keep = keep
        self._window = window

    def expand(self, p) -> Dict[str, Any]:
        parsed = {}
        for kind in (AD, SAMPLE, BEHAVIOR):
            lines = p | f"Read_{kind}" >> beam.io.ReadFromText(
                join(self._folder, FILE_OF[kind]), skip_header_lines=1,
                coder=beam.coders.BytesCoder())
            parsed[kind] = lines | f"Parse_{kind}" >> beam.ParDo(
                ParseAdFile(kind, self._keep, self._window)).with_outputs(
                "dead", "counts", main="rows")
        joined = ({"ads": parsed[AD].rows, "imps": parsed[SAMPLE].rows}
                  | "ByAdgroup" >> beam.CoGroupByKey()
                  | "JoinAds" >> beam.ParDo(JoinAds()).with_outputs("dead", "counts",
                                                                   main="imps"))
        # CoGroupByKey spreads users over workers (as GroupByKey does for the other sources)
        users = ({"events": parsed[BEHAVIOR].rows, "imps": joined.imps}
                 | "ByUser" >> beam.CoGroupByKey()
                 | "UserTuple" >> beam.Map(_user_tuple))
        dead = (tuple(parsed[k].dead for k in (AD, SAMPLE, BEHAVIOR)) + (joined.dead,)
                | "FlattenDead" >> beam.Flatten())
        counts = (tuple(parsed[k].counts for k in (AD, SAMPLE, BEHAVIOR)) + (joined.counts,)
                  | "FlattenCounts" >> beam.Flatten())
        return {"users": users, "dead": dead, "counts": counts}
