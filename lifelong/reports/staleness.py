"""The staleness curve (issue 19 item 3): AUC of served CTRs against the age of the user cache.

``lifelong staleness --runs RUN[,RUN...]`` (or ``--work_dir`` of a ``lifelong compare``
with ``--models``). For each trained run:

1. the requests: each test user's last request (the impressions sharing the largest
   ``imp_hist_index``) with the history strictly before it -- exactly
   :func:`lifelong.replay.last_requests`, so no behavior after the request is seen
   (``--requests all``: every request of the split, :func:`all_requests`, at most
   ``--max_requests`` drawn uniformly);
2. the **one-shot** CTRs: the model's ``serving_default`` signature over the
   request's windows from the training pipeline (:func:`tfmodels.data.make_dataset`);
3. for each cache age ``a`` in ``--ages`` (default 0, 1, 3, 7, 14) x ``--age_unit``
   seconds (default 86,400: days; the synthetic data and MovieLens both store unix
   seconds): the cache a refresh at time ``request_ts - a`` would hold. It sees the
   behaviors of the request's history with ``hist_ts <= request_ts - a``
   (:func:`truncate_history`; age 0 is the request's whole history, the one the
   one-shot path sees), is computed by the ``user_tower`` signature and scored by
   the ``rank`` signature with the request's candidates and ``imp_ts`` = the request
   time -- the signature functions :class:`serving.export.ServingSignatures`
   builds and ``lifelong export`` saves, called in process (no gRPC: the network
   changes no CTR, tests/test_precompute.py shows the two agree to 1e-5);
4. AUC, GAUC and logloss of the served CTRs per age, and each age's AUC minus the
   youngest cache's with its paired bootstrap std over requests
   (:func:`paired_auc_deltas`: the ages score the same impressions).

The short window comes from the cache as well (``--short cached``, the default: what
``RankingClient.rank`` sends when the caller passes no fresher one). ``--short fresh``
[interp] sends the request-time short window, as a deployment with a real-time
short sequence would (``RankingClient.rank_request(short=...)``): only the long
module's cache is stale then.

Writes ``staleness.md`` (table), ``staleness.json`` and ``staleness.png`` (AUC vs cache
age, one line per model) to ``--out`` (default ``<work_dir>/staleness`` or
``./staleness``). At age 0 the served AUC equals the one-shot AUC
(tests/test_staleness.py checks it, with the windows the older caches hold).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfmodels.errors import LifelongError, UsageError

DEFAULT_AGES = "0,1,3,7,14"


class StalenessError(ValueError, LifelongError):
    """Bad arguments or inputs (one line from the CLI)."""


# ---- pure pieces (tested on hand-made users) ------------------------------------------------
def parse_ages(text: str) -> List[float]:
    try:
        ages = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--ages must be comma separated numbers >= 0, got {text!r}") from None
    if not ages or any(a < 0 or not np.isfinite(a) for a in ages):
        raise UsageError(f"--ages must be comma separated numbers >= 0, got {text!r}")
    if len(set(ages)) != len(ages):
        raise UsageError(f"--ages has a repeated value: {text!r}")
    return sorted(ages)


def truncate_history(hist_ts: np.ndarray, request_ts: int, age_s: float) -> int:
    """How many of the request's history rows (oldest first) a cache computed
    ``age_s`` seconds before the request saw: those with ``ts <= request_ts - age_s``.
    Age 0 keeps every row (the request's history already ends before it)."""
    hist_ts = np.asarray(hist_ts, np.int64)
    if age_s <= 0:
        return int(hist_ts.size)
    # ts is non-decreasing in a record (prepare sorts by time); the prefix up to the
    # first row newer than the cutoff, so even an unsorted record never lets a newer
    # row into the cache
    cutoff = request_ts - age_s
    keep = hist_ts <= cutoff
    return int(np.argmin(keep)) if not keep.all() else int(hist_ts.size)


def truncated_records(records: Sequence[bytes], requests: Sequence[Dict],
                      age_s: float) -> Tuple[List[bytes], np.ndarray]:
    """The per-user records (history only) a cache of age ``age_s`` is computed from,
    and how many behaviors each lost."""
    import tensorflow as tf
    from tfmodels import schema as S
    out, lost = [], []
    for raw, req in zip(records, requests):
        f = tf.train.Example.FromString(raw).features.feature
        ts = np.asarray(f["hist_ts"].int64_list.value, np.int64)
        cut = truncate_history(ts, req["ts"], age_s)
        history = {}
        for k, dtype in S.HISTORY_FIELDS.items():
            if k not in f:
                continue
            vals = f[k].float_list.value if dtype == tf.float32 else f[k].int64_list.value
            history[k] = list(vals)[:cut]
        uid = int(f["user_id"].int64_list.value[0])
        key = f["user_key"].bytes_list.value[0].decode("utf-8") if "user_key" in f else str(uid)
        out.append(S.encode_user_record(uid, key, history, {k: [] for k in S.IMPRESSION_FIELDS}))
        lost.append(ts.size - cut)
    return out, np.asarray(lost, np.int64)


def all_requests(records, max_requests: int = 0, seed: int = 0
                 ) -> Tuple[List[bytes], List[Dict]]:
    """Every request of the split (``--requests all``): per user, each group of
    impressions sharing an ``imp_hist_index`` p, with the history before it
    (``history[:p]``), as :func:`lifelong.replay.last_requests` builds the last one.
    ``max_requests`` > 0: that many, drawn uniformly without replacement (``seed``),
    in split order. Returns (records, requests) like ``last_requests``."""
    import tensorflow as tf
    from lifelong.replay import _values, request_at
    parsed, pairs = [], []
    for raw in records:
        f = tf.train.Example.FromString(raw).features.feature
        idx = np.asarray(_values(f["imp_hist_index"], tf.int64), np.int64)
        if idx.size == 0:
            continue
        parsed.append(f)
        pairs += [(len(parsed) - 1, int(p)) for p in np.unique(idx)]
    if max_requests and len(pairs) > max_requests:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_requests,
                                                          replace=False))
        pairs = [pairs[i] for i in keep]
    out, requests = [], []
    for u, p in pairs:
        record, request = request_at(parsed[u], p)
        out.append(record)
        requests.append(request)
    return out, requests


# ---- served and one-shot CTRs --------------------------------------------------------------
def one_shot_ctrs(sigs, records: Sequence[bytes], work: str, batch_size: int) -> np.ndarray:
    """``serving_default`` over the requests' windows from the training pipeline, in
    request order (users in record order, impressions in order)."""
    import tensorflow as tf
    from tfmodels import data as D
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "requests-00000-of-00001.tfrecord.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in records:
            w.write(r)
    fs = sigs.fs
    fn = sigs.functions["serving_default"]
    names = list(sigs.default_specs)
    out = []
    for batch in D.make_dataset(path, fs.short_len, fs.long_len, batch_size,
                                cross_domain=fs.cross_domain):
        out.append(fn({k: batch[k] for k in names})["ctr"].numpy())
    return np.concatenate(out) if out else np.zeros([0], np.float32)


def user_caches(sigs, records: Sequence[bytes], batch_size: int) -> Dict[str, np.ndarray]:
    """``user_tower`` outputs of ``records``, batch first, in record order."""
    import tensorflow as tf
    fn = sigs.functions["user_tower"]
    parts: Dict[str, List[np.ndarray]] = {}
    for i in range(0, len(records), batch_size):
        out = fn(tf.constant(list(records[i:i + batch_size])))
        for k, v in out.items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def served_ctrs(sigs, caches: Dict[str, np.ndarray], requests: Sequence[Dict],
                fresh_short: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """``rank`` per request with its user's cache row (and, given, a fresher short window)."""
    import tensorflow as tf
    fn = sigs.functions["rank"]
    out = []
    for i, req in enumerate(requests):
        if int(caches["user_id"][i]) != req["user_id"]:
            raise RuntimeError(f"cache row {i} is user {caches['user_id'][i]}, the request "
                               f"user {req['user_id']}")
        inputs = {}
        for name in sigs.rank_specs:
            if name in ("target_item_id", "target_cate_id"):
                continue
            if name == "imp_ts":
                inputs[name] = tf.constant([req["ts"]], tf.int64)
            elif name == "user_id":
                inputs[name] = tf.constant([req["user_id"]], tf.int64)
            elif fresh_short is not None and name in fresh_short:
                inputs[name] = tf.constant(fresh_short[name][i:i + 1])
            else:
                inputs[name] = tf.constant(caches[name][i:i + 1])
        inputs["target_item_id"] = tf.constant(req["items"], tf.int64)
        inputs["target_cate_id"] = tf.constant(req["cates"], tf.int64)
        out.append(fn(inputs)["ctr"].numpy())
    return np.concatenate(out) if out else np.zeros([0], np.float32)


def _metrics(labels, ctrs, groups) -> Dict:
    from tfmodels import metrics as M
    m = M.all_metrics(labels, ctrs, groups)
    out = {k: m[k] for k in ("auc", "gauc", "logloss")}
    out.update({k: v for k, v in m.items() if k.endswith("_undefined")})
    return out


def paired_auc_deltas(labels: np.ndarray, groups: np.ndarray, ctrs: Sequence[np.ndarray],
                      resamples: int = 200, seed: int = 0) -> List[Tuple[float, float]]:
    """``(AUC(ctrs[k]) - AUC(ctrs[0]), bootstrap std of that difference)`` per k.

    The ages score the SAME impressions, so their AUCs are compared paired: each
    resample draws requests (users) with replacement and takes the difference of the
    two AUCs on it; the std over ``resamples`` draws is the noise of the difference
    (much smaller than that of each AUC alone). The resampling is hand-written for
    the per-request grouping; the AUC is :func:`tfmodels.metrics.auc`."""
    from tfmodels import metrics as M
    base = M.auc(labels, ctrs[0])
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(uniq.size)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples if uniq.size > 1 else 0):
        idx = np.concatenate([members[i] for i in rng.integers(0, uniq.size, uniq.size)])
        draws.append(idx)
    out = []
    for c in ctrs:
        diffs = [M.auc(labels[i], c[i]) - M.auc(labels[i], ctrs[0][i]) for i in draws]
        diffs = [d for d in diffs if np.isfinite(d)]
        out.append((M.auc(labels, c) - base, float(np.std(diffs, ddof=1)) if len(diffs) > 1
                    else float("nan")))
    return out


def staleness_of_model(model, records: Sequence[bytes], requests: Sequence[Dict],
                       ages: Sequence[float], age_unit: float, work: str,
                       batch_size: int = 64, short: str = "cached",
                       bootstrap: int = 200) -> Dict:
    """One model's rows (one per age) and the one-shot reference; see the module doc."""
    from serving.export import ServingSignatures
    sigs = ServingSignatures(model)
    labels = np.concatenate([r["labels"] for r in requests]).astype(np.float32)
    groups = np.concatenate([np.full(r["items"].size, r["user_id"]) for r in requests])
    one_shot = one_shot_ctrs(sigs, records, work, batch_size)
    if one_shot.size != labels.size:
        raise RuntimeError(f"one-shot path scored {one_shot.size} impressions, the requests "
                           f"hold {labels.size}")
    fresh = None
    if short == "fresh":
        now = user_caches(sigs, truncated_records(records, requests, 0.0)[0], batch_size)
        fresh = {k: v for k, v in now.items() if k in sigs.short_names}
    rows, served = [], []
    for age in ages:
        recs, lost = truncated_records(records, requests, age * age_unit)
        caches = user_caches(sigs, recs, batch_size)
        ctr = served_ctrs(sigs, caches, requests, fresh)
        row = {"age": age, "age_s": age * age_unit, **_metrics(labels, ctr, groups),
               "behaviors_excluded_mean": float(lost.mean()) if lost.size else 0.0,
               "requests_with_excluded": int((lost > 0).sum()),
               "requests": len(requests), "impressions": int(labels.size),
               "max_abs_diff_vs_one_shot": float(np.abs(ctr - one_shot).max())
               if ctr.size else 0.0}
        rows.append(row)
        served.append(ctr)
        print(f"[staleness] {model.model_name} age {age:g}: AUC {row['auc']}, "
              f"{row['behaviors_excluded_mean']:.1f} behaviors excluded per request",
              file=sys.stderr, flush=True)
    # differences to the youngest cache, paired over the same impressions
    for row, (delta, std) in zip(rows, paired_auc_deltas(labels, groups, served, bootstrap)):
        row["auc_delta_vs_youngest"], row["auc_delta_std"] = delta, std
    return {"rows": rows, "one_shot": _metrics(labels, one_shot, groups),
            "ctrs_one_shot": one_shot}


# ---- CLI ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="", help="comma separated trained run directories "
                   "(lifelong train --out_dir)")
    p.add_argument("--work_dir", help="or a `lifelong compare` work folder (lowest seed per "
                   "model)")
    p.add_argument("--models", default="", help="with --work_dir: comma separated models "
                   "(default: every model of the folder)")
    p.add_argument("--data", help="the prepared dataset (default: each run's own)")
    p.add_argument("--split", default="test", help="train | valid | test (default test)")
    p.add_argument("--users", type=int, default=500,
                   help="--requests last: requests, one per user (default 500; 0 = all)")
    p.add_argument("--requests", choices=["last", "all"], default="last",
                   help="each user's last request (default) or every request of the split "
                   "(per-event data such as MovieLens has one impression per request)")
    p.add_argument("--max_requests", type=int, default=2000,
                   help="--requests all: at most this many, drawn uniformly (default 2000; "
                   "0 = all)")
    p.add_argument("--ages", default=DEFAULT_AGES,
                   help=f"cache ages in --age_unit (default {DEFAULT_AGES})")
    p.add_argument("--age_unit", type=float, default=86400.0,
                   help="seconds per age unit (default 86400: days; the data stores unix "
                   "seconds)")
    p.add_argument("--short", choices=["cached", "fresh"], default="cached",
                   help="short window from the cache (default; as served) or from the "
                   "request time [interp] (only the long cache is stale)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples of requests for the paired AUC-difference std (default 200)")
    p.add_argument("--out", help="output folder (default <work_dir>/staleness or ./staleness)")


def _run_dirs(args) -> List[Tuple[str, str]]:
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if runs and args.work_dir:
        raise StalenessError("give --runs or --work_dir, not both")
    if args.work_dir:
        from lifelong.replay import _runs
        return _runs(args.work_dir, [m.strip() for m in args.models.split(",") if m.strip()])
    if not runs:
        raise StalenessError("give --runs RUN_DIR[,RUN_DIR...] or --work_dir")
    out = []
    for r in runs:
        if not os.path.exists(os.path.join(r, "config.json")):
            raise StalenessError(f"{r!r} is not a run directory (no config.json)")
        with open(os.path.join(r, "config.json")) as f:
            out.append((json.load(f).get("model", os.path.basename(r)), r))
    return out


def format_table(result: Dict) -> str:
    from tfmodels import metrics as M
    lines = [f"command: {result['command']}", "",
             f"cache age unit: {result['age_unit']:g} s; short window: {result['short']}", "",
             "| model | cache age | AUC | AUC - youngest cache's (paired bootstrap std) | GAUC | "
             "logloss | behaviors excluded / request | requests with a stale cache | "
             "max abs diff vs one-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        o = m["one_shot"]
        lines.append(f"| {m['model']} | one-shot | {M.format_metric(o['auc'], o.get('auc_undefined'))}"
                     f" | - | {M.format_metric(o['gauc'], o.get('gauc_undefined'))} | "
                     f"{M.format_metric(o['logloss'], o.get('logloss_undefined'))} | 0 | 0 | - |")
        for r in m["rows"]:
            lines.append(
                f"| {m['model']} | {r['age']:g} | {M.format_metric(r['auc'], r.get('auc_undefined'))}"
                f" | {r['auc_delta_vs_youngest']:+.4f} ({r['auc_delta_std']:.4f})"
                f" | {M.format_metric(r['gauc'], r.get('gauc_undefined'))} | "
                f"{M.format_metric(r['logloss'], r.get('logloss_undefined'))} | "
                f"{r['behaviors_excluded_mean']:.1f} | {r['requests_with_excluded']} / "
                f"{r['requests']} | {r['max_abs_diff_vs_one_shot']:.2e} |")
    return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in result["models"]:
        ages = [r["age"] for r in m["rows"] if r["auc"] is not None]
        aucs = [r["auc"] for r in m["rows"] if r["auc"] is not None]
        ax.plot(ages, aucs, marker="o", label=m["model"])
    unit = "days" if result["age_unit"] == 86400 else f"x {result['age_unit']:g} s"
    ax.set_xlabel(f"cache age ({unit})")
    ax.set_ylabel("AUC of served CTRs")
    ax.set_title(f"Staleness ({result['requests']} requests, short window {result['short']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args, extra: Sequence[str] = ()) -> int:
    import shlex
    from tfmodels import schema as S
    from tfmodels import metrics as M
    ages = parse_ages(args.ages)
    if args.age_unit <= 0:
        raise UsageError(f"--age_unit must be > 0 seconds, got {args.age_unit}")
    if args.split not in S.SPLITS:
        raise StalenessError(f"--split must be one of {', '.join(S.SPLITS)}, got {args.split!r}")
    if args.users < 0 or args.max_requests < 0 or args.batch_size < 1:
        raise StalenessError("--users and --max_requests must be >= 0, --batch_size >= 1")
    runs = _run_dirs(args)
    out = args.out or (os.path.join(args.work_dir, "staleness") if args.work_dir
                       else "staleness")
    os.makedirs(out, exist_ok=True)
    from lifelong.replay import _read_records, last_requests
    from tfmodels.train import load_run
    command = "lifelong " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv[1:2] == ["staleness"] else "lifelong staleness ..."
    result = {"command": command, "ages": ages, "age_unit": args.age_unit,
              "short": args.short, "requests_kind": args.requests, "models": []}
    for name, run_dir in runs:
        cfg, model = load_run(run_dir, args.data)
        if args.requests == "all":
            records, requests = all_requests(
                _read_records(S.split_pattern(cfg.data, args.split)), args.max_requests)
        else:
            records, requests = last_requests(
                _read_records(S.split_pattern(cfg.data, args.split)), args.users)
        if not requests:
            raise StalenessError(f"no impressions in the {args.split} records of {cfg.data!r}")
        print(f"[staleness] {name} ({run_dir}): {len(requests)} requests", file=sys.stderr,
              flush=True)
        res = staleness_of_model(model, records, requests, ages, args.age_unit,
                                 os.path.join(out, f"work-{name}"), args.batch_size,
                                 args.short, args.bootstrap)
        res.pop("ctrs_one_shot")
        result["models"].append({"model": name, "run_dir": run_dir, "data": cfg.data, **res})
        result["requests"] = len(requests)
    table = format_table(result)
    print(table)
    with open(os.path.join(out, "staleness.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "staleness.json"), "w") as f:
        json.dump(M.json_safe(result), f, indent=2, allow_nan=False)
    plot(result, os.path.join(out, "staleness.png"))
    print(f"[staleness] results in {out}/staleness.{{md,json,png}}", file=sys.stderr)
    return 0
