"""Replay the test split's last requests through the whole serving path.

The last stage of the main job (``./run.sh``), also ``lifelong replay``: for the
trained runs of a ``lifelong compare`` work folder (one seed per model),

1. build one *request* per test user: the user's last impressions (those sharing the
   largest ``imp_hist_index``) with the history strictly before them, written as
   per-user records (``<out>/replay-*.tfrecord.gz``), so no behavior after the
   request leaks into the cache;
2. ``lifelong export --jit_rank`` each run into ``--base`` (a new version);
3. ``lifelong precompute`` (Beam + tfx-bsl RunInference over ``user_tower``) into a
   SQLite cache store;
4. start the local gRPC server on a free port and rank every request through
   :class:`serving.client.RankingClient` (cache read, ``rank`` Predict);
5. report, per model: AUC / GAUC / logloss of the served CTRs against the labels,
   the largest difference to the same model run in process on the same features,
   ``rank`` latency p50 / p99 (sequential requests, after one untimed request per
   distinct candidate count) and the precompute throughput (which, for a few
   hundred users, is mostly Beam's start-up).

Writes ``<out>/replay.{md,json}`` (``<out>`` = ``<work_dir>/serving`` by default;
strict JSON: an undefined metric is ``null`` with a ``"<metric>_undefined"`` reason)
and ``<out>/predictions-<model>.npz`` (``user_id``, ``item_id``, ``label``, ``ctr``: the
served CTR of every replayed impression, in request order), from which the reported
AUC / GAUC / logloss can be recomputed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tfmodels.errors import LifelongError

# TensorFlow and the schema (which imports it) load inside the functions that use them,
# so `lifelong replay --help` answers without TensorFlow.


class ReplayError(ValueError, LifelongError):
    """Bad arguments or inputs (the CLI prints one line and exits 2)."""


def _values(feature, dtype) -> list:
    """The values of one tf.train.Feature as a list (float or int64 by ``dtype``)."""
    import tensorflow as tf
    return list(feature.float_list.value if dtype == tf.float32 else feature.int64_list.value)


def request_at(f, p: int) -> Tuple[bytes, Dict]:
    """One request of a parsed per-user record ``f`` (its feature map): the impressions
    whose ``imp_hist_index`` is ``p``. Returns (a record holding only the history before
    them, ``history[:p]``, and those impressions; the request ``user_id``, ``items``,
    ``cates``, ``labels``, ``ts``). Shared by :func:`last_requests` and the staleness
    report's every-request mode."""
    import tensorflow as tf
    from tfmodels import schema as S
    sel = np.asarray(_values(f["imp_hist_index"], tf.int64), np.int64) == p
    history = {k: _values(f[k], d)[:p] for k, d in S.HISTORY_FIELDS.items()
               if k in f or k not in S.OPTIONAL_HISTORY_DEFAULTS}
    imps = {k: np.asarray(_values(f[k], d))[sel].tolist()
            for k, d in S.IMPRESSION_FIELDS.items()}
    uid = int(f["user_id"].int64_list.value[0])
    key = f["user_key"].bytes_list.value[0].decode("utf-8") if "user_key" in f else str(uid)
    record = S.encode_user_record(uid, key, history, imps)
    return record, {"user_id": uid, "items": np.asarray(imps["imp_item_id"], np.int64),
                    "cates": np.asarray(imps["imp_cate_id"], np.int64),
                    "labels": np.asarray(imps["imp_label"], np.float32),
                    "ts": int(imps["imp_ts"][0])}


def last_requests(records: Iterable[bytes], max_users: int = 0) -> Tuple[List[bytes], List[Dict]]:
    """Per user with impressions: a record holding only the history before the user's
    last request and that request's impressions, and the request itself
    (``user_id``, ``items``, ``cates``, ``labels``, ``ts``). ``max_users`` 0 = all."""
    import tensorflow as tf
    from tfmodels import schema as S
    out, requests = [], []
    for raw in records:
        f = tf.train.Example.FromString(raw).features.feature
        idx = np.asarray(_values(f["imp_hist_index"], tf.int64), np.int64)
        if idx.size == 0:
            continue
        record, request = request_at(f, int(idx.max()))
        out.append(record)
        requests.append(request)
        if max_users and len(requests) >= max_users:
            break
    return out, requests


def _read_records(pattern: str) -> Iterator[bytes]:
    """The records of ``pattern``, lazily: :func:`last_requests` stops reading after
    ``--users`` users instead of decoding the whole split. Always in the FULL layout:
    compact records (``meta.json`` beside the files says so) are decoded once here
    with the dataset's item table (:func:`tfmodels.schema.full_record_bytes`), so
    every reader after this (replay, the staleness report, bench accuracy) parses the
    full record's fields as before."""
    import tensorflow as tf
    from tfmodels import data as D
    from tfmodels import schema as S
    files = sorted(glob.glob(pattern))
    if not files:
        raise ReplayError(f"no record files match {pattern!r}")
    table = D.item_table_for(pattern)
    raws = (r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    if table is None:
        return raws
    return (S.full_record_bytes(r, table) for r in raws)


def _runs(work_dir: str, models: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """(model, run_dir) per model of a compare work folder, lowest seed first."""
    path = os.path.join(work_dir, "results.json")
    if not os.path.exists(path):
        raise ReplayError(f"{work_dir!r} holds no results.json (run `lifelong compare "
                          f"--work_dir {work_dir}` first)")
    with open(path) as f:
        rows = json.load(f)["rows"]
    chosen: Dict[str, Tuple[int, str]] = {}
    for r in rows:
        if r["model"] not in chosen or r["seed"] < chosen[r["model"]][0]:
            chosen[r["model"]] = (r["seed"], r["run_dir"])
    names = list(models) if models else list(chosen)
    missing = [m for m in names if m not in chosen]
    if missing:
        raise ReplayError(f"no finished run of {missing} in {path}; it has {sorted(chosen)}")
    return [(m, chosen[m][1]) for m in names]


def replay_model(name: str, run_dir: str, args, store) -> Dict:
    """Requests, export and precompute (into ``store``) of one run; see the module doc."""
    from beam_jobs import precompute as P
    from serving import export as E
    import tensorflow as tf
    from tfmodels import data as D
    from tfmodels import schema as S
    from tfmodels.train import load_run
    cfg, model = load_run(run_dir)
    data_dir = cfg.data
    records, requests = last_requests(_read_records(S.split_pattern(data_dir, args.split)),
                                      args.users)
    if not requests:
        raise ReplayError(f"no impressions in {args.split} records of {data_dir!r}")
    rec_dir = os.path.join(args.out, f"records-{name}")
    os.makedirs(rec_dir, exist_ok=True)
    rec_path = os.path.join(rec_dir, "replay-00000-of-00001.tfrecord.gz")
    with tf.io.TFRecordWriter(rec_path, options="GZIP") as w:
        for r in records:
            w.write(r)
    info = E.export_model(model, args.base, name, jit_rank=not args.no_jit_rank,
                          item_table=S.load_item_table(data_dir))
    pre = P.run(argparse.Namespace(records=rec_path, model=name, base=args.base,
                                   version=info["version"], model_dir=None,
                                   output=os.path.join(args.out, f"cache-{name}"),
                                   num_shards=1, no_reshuffle=True, store=None), [],
                store=store)
    # the same model in process, on the features the cache was computed from
    feats = D.user_history_features(tf.constant(records), model.feature_schema)
    return {"model": name, "run_dir": run_dir, "version": info["version"],
            "requests": requests, "feats": feats, "keras": model,
            "precompute": pre}


def rank_all(job: Dict, address: str, store, timeout_s: float) -> Dict:
    import tensorflow as tf
    from serving.client import RankingClient
    from tfmodels import metrics as M
    client = RankingClient(address, job["model"], store, timeout_s=timeout_s)
    feats, model = job["feats"], job["keras"]
    labels, served, groups, lat, worst = [], [], [], [], 0.0
    try:
        # Untimed warm-up, one request per distinct candidate count: an XLA `rank`
        # compiles on the first request of each power-of-two bucket.
        seen = set()
        for req in job["requests"]:
            if req["items"].size not in seen:
                seen.add(req["items"].size)
                client.rank(req["user_id"], (req["items"], req["cates"]), imp_ts=req["ts"])
        for i, req in enumerate(job["requests"]):
            n = req["items"].size
            t0 = time.perf_counter()
            ctr = client.rank(req["user_id"], (req["items"], req["cates"]), imp_ts=req["ts"])
            lat.append(time.perf_counter() - t0)
            rows = {k: tf.repeat(v[i:i + 1], n, axis=0) for k, v in feats.items()}
            rows.update(target_item_id=tf.constant(req["items"]),
                        target_cate_id=tf.constant(req["cates"]),
                        imp_ts=tf.fill([n], tf.constant(req["ts"], tf.int64)))
            ref = model.predict_ctr(rows, training=False).numpy()
            worst = max(worst, float(np.abs(ctr - ref).max()))
            labels.append(req["labels"])
            served.append(ctr)
            groups.append(np.full(n, req["user_id"]))
    finally:
        client.close()
    y, s, g = np.concatenate(labels), np.concatenate(served), np.concatenate(groups)
    items = np.concatenate([req["items"] for req in job["requests"]])
    ms = np.asarray(lat) * 1e3
    pre = job["precompute"]
    m = M.all_metrics(y, s, g)   # strict JSON: an undefined metric is None + its reason
    metrics = {k: m[k] for k in ("auc", "gauc", "logloss")}
    metrics.update({k: v for k, v in m.items() if k.endswith("_undefined")})
    return {"model": job["model"], "version": job["version"], "users": len(job["requests"]),
            "impressions": int(y.size), "positives": m["positives"], **metrics,
            "max_abs_diff_vs_in_process": worst,
            "predictions": {"user_id": g.astype(np.int64), "item_id": items.astype(np.int64),
                            "label": y.astype(np.float32), "ctr": s},
            "rank_p50_ms": float(np.percentile(ms, 50)), "rank_p99_ms": float(np.percentile(ms, 99)),
            "candidates_mean": float(y.size / max(len(job["requests"]), 1)),
            "precompute_users_per_s": pre["users_per_s"],
            "cache_bytes_per_user": pre.get("record_bytes_per_user"), "run_dir": job["run_dir"]}


def format_table(rows: List[Dict], command: str) -> str:
    lines = [f"command: {command}", "",
             "| model | version | users | impressions | AUC | GAUC | logloss | "
             "max abs diff vs in-process | rank p50 ms | rank p99 ms | precompute users/s | "
             "cache record bytes/user |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    from tfmodels import metrics as M
    for r in rows:
        auc, gauc, logloss = (M.format_metric(r[k], r.get(f"{k}_undefined"))
                              for k in ("auc", "gauc", "logloss"))
        lines.append(f"| {r['model']} | {r['version']} | {r['users']} | {r['impressions']} | "
                     f"{auc} | {gauc} | {logloss} | "
                     f"{r['max_abs_diff_vs_in_process']:.2e} | {r['rank_p50_ms']:.2f} | "
                     f"{r['rank_p99_ms']:.2f} | {r['precompute_users_per_s']:.0f} | "
                     f"{(r['cache_bytes_per_user'] or 0):.0f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work_dir", required=True, help="a `lifelong compare` work folder")
    p.add_argument("--models", default="", help="comma separated (default: every model of "
                   "the work folder)")
    p.add_argument("--base", default="saved_models",
                   help="model base path the versions are exported to (default saved_models)")
    p.add_argument("--out", help="output folder (default <work_dir>/serving)")
    p.add_argument("--split", default="test", help="train | valid | test (default test)")
    p.add_argument("--users", type=int, default=300,
                   help="requests replayed per model, one per user (default 300; 0 = all)")
    p.add_argument("--timeout_s", type=float, default=30.0, help="per-request deadline")
    p.add_argument("--no_jit_rank", action="store_true",
                   help="export rank without XLA (default: with, as recommended)")


def run(args, extra: Sequence[str] = ()) -> int:
    from serving.cache_store import SQLiteCacheStore
    from serving.server import LocalServer
    from tfmodels import schema as S
    if args.split not in S.SPLITS:   # checked here, not by argparse: the schema loads TensorFlow
        raise ReplayError(f"--split must be one of {', '.join(S.SPLITS)}, got {args.split!r}")
    if args.users < 0:
        raise ReplayError("--users must be >= 0")
    args.out = args.out or os.path.join(args.work_dir, "serving")
    os.makedirs(args.out, exist_ok=True)
    db = os.path.join(args.out, "cache.sqlite")
    if os.path.exists(db):            # a rerun starts from an empty cache
        os.remove(db)
    runs = _runs(args.work_dir, [m.strip() for m in args.models.split(",") if m.strip()])
    command = ("lifelong " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["replay"]
               else f"lifelong replay --work_dir {args.work_dir} ...")
    store = SQLiteCacheStore(db)
    rows = []
    try:
        jobs = []
        for i, (name, run_dir) in enumerate(runs, 1):
            print(f"[replay] ({i}/{len(runs)}) {name}: requests, export, precompute "
                  f"({run_dir})", file=sys.stderr, flush=True)
            jobs.append(replay_model(name, run_dir, args, store))
        server = LocalServer(args.base, port=0, poll_interval_s=0)
        print(f"[replay] local gRPC server on {server.address}", file=sys.stderr, flush=True)
        try:
            for job in jobs:
                print(f"[replay] {job['model']}: ranking {len(job['requests'])} requests "
                      f"over gRPC", file=sys.stderr, flush=True)
                rows.append(rank_all(job, server.address, store, args.timeout_s))
        finally:
            server.stop()
    finally:
        store.close()
    from tfmodels import metrics as M
    for r in rows:
        np.savez(os.path.join(args.out, f"predictions-{r['model']}.npz"), **r.pop("predictions"))
    table = format_table(rows, command)
    print(table)
    with open(os.path.join(args.out, "replay.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "replay.json"), "w") as f:
        json.dump(M.json_safe({"command": command, "rows": rows}), f, indent=2, allow_nan=False)
    print(f"[replay] results in {args.out}/replay.{{md,json}}", file=sys.stderr)
    return 0
