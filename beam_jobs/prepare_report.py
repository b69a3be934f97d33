"""The report of the sample-building job: the pipeline's summed counts -> ``meta.json``.

:func:`build_report` turns the dictionary the pipeline wrote (``_counts.json``)
into the report: vocabulary sizes, statistics, the split rule, row accounting
(input = used + filtered + dead-lettered) and the arguments.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Mapping, Sequence

from beam_jobs import adapters as A
from beam_jobs.sharded_io import TFRECORD_SUFFIX
from tfmodels import schema as S


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
        "format": S.RECORD_FORMATS[settings.get("record_format", "full")],
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
    if settings.get("record_format", "full") == "compact":
        step = float(settings["engage_step"])
        report["record"] = {
            "item_table": S.ITEM_TABLE_FILE, "engage_step": step,
            "engage_max_abs_error": step / 2,
            "layout": "per behavior: item id, timestamp delta, round(engage / engage_step); "
                      "category and domain from the item table (exceptions stored per row)"}
    elif settings.get("record_format", "full") == "compact2":
        step, ts_step = float(settings["engage_step"]), int(settings.get("ts_step", 1))
        report["record"] = {
            "item_table": S.ITEM_TABLE_FILE, "engage_step": step,
            "engage_max_abs_error": step / 2, "ts_step": ts_step,
            "hist_ts_max_abs_error": ts_step // 2,
            "layout": "per behavior: item address (category group, rank in the item table), "
                      "delta of round(ts / ts_step), round(engage / engage_step); category "
                      "and domain from the item table (exceptions stored per row)"}
    if settings.get("time_window") is not None:
        report["valid_time_window"] = {
            **A.TimeWindow(*settings["time_window"]).to_dict(),
            "from": settings.get("time_window_from", "--valid_time_window"),
            "outside": "dead-lettered (timestamp_before_valid_window / "
                       "timestamp_after_valid_window)"}
    if "movies" in counts:
        report["rows"]["movies_csv"] = {k: int(v) for k, v in counts["movies"].items()}
    if "by_file" in counts:   # taobao_ad: the same accounting per input file
        report["rows"]["by_file"] = _by_file(counts["by_file"], report)
    if synthetic_config is not None:
        report["synthetic_config"] = synthetic_config.to_dict()
    report["args"] = {k: v for k, v in sorted(vars(args).items())
                      if isinstance(v, (str, int, float, bool, type(None))) and k != "func"}
    report["beam_args"] = list(beam_args)
    return report


def _by_file(by_file: Mapping[str, Any], report: Mapping[str, Any]) -> Dict[str, Any]:
    """taobao_ad per-file rows: input, dead_lettered and (ads) used / (samples) filtered
    are counted where they happen; every impression reaching the protocol is used, so
    raw_sample used = the impressions, and behavior_log gets the rest of used / filtered."""
    out = {name: {k: int(by_file.get(name, {}).get(k, 0))
                  for k in ("input", "used", "filtered", "dead_lettered")}
           for name in (A.TAOBAO_AD_RAW_SAMPLE, A.TAOBAO_AD_FEATURE, A.TAOBAO_AD_BEHAVIOR_LOG)}
    rows = report["rows"]
    imps = sum(report["stats"]["impressions"].values())
    out[A.TAOBAO_AD_RAW_SAMPLE]["used"] = imps
    behavior = out[A.TAOBAO_AD_BEHAVIOR_LOG]
    behavior["used"] = rows["used"] - imps - out[A.TAOBAO_AD_FEATURE]["used"]
    behavior["filtered"] = rows["filtered"] - out[A.TAOBAO_AD_RAW_SAMPLE]["filtered"]
    return out


def _split_rule(settings: Mapping[str, Any], cuts: Mapping[str, Any]) -> Dict[str, Any]:
    f1, f2 = settings["fractions"]
    if settings["protocol"] == "labeled_impressions_time_split":
        a, b = settings["cuts"]
        return {"kind": "impressions by fixed time cuts (taobao_ad days, UTC+8)",
                "train": f"ts < train_end_ts ({A.iso_utc(a)})",
                "valid": f"train_end_ts <= ts < valid_end_ts ({A.iso_utc(b)})" if a < b
                else "none (--taobao_ad_valid none)",
                "test": "ts >= valid_end_ts", "train_end_ts": a, "valid_end_ts": b}
    if settings["protocol"] == "per_event_time_split":
        return {"kind": "global event time", "train": f"ts < train_end_ts (the {f1:g} quantile)",
                "valid": f"train_end_ts <= ts < valid_end_ts (the {f2:g} quantile; carved from "
                         f"the end of the training period)",
                "test": "ts >= valid_end_ts",
                "train_end_ts": cuts.get("train_end_ts"), "valid_end_ts": cuts.get("valid_end_ts")}
    return {"kind": "users by (last behavior ts, user_key)",
            "train": f"first {f1:g} of users", "valid": f"next {f2 - f1:g}", "test": "the rest",
            "train_end": cuts.get("train_end"), "valid_end": cuts.get("valid_end")}
