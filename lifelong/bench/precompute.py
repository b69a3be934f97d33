"""``lifelong bench precompute``: users/s of the Beam user-cache precompute and the cache
bytes per user.

For each model (``--models``, default every registered one) an untrained export at
L = ``--precompute_long_len`` runs through :func:`beam_jobs.precompute.run`
(DirectRunner, one worker, in process) over ``--precompute_users`` synthetic users;
the table gives users/s, the stored entry's bytes and the TFRecord bytes per user,
and the cached tensors' shapes. Writes ``results.json`` (:mod:`lifelong.bench.record`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

from lifelong.bench import record
from lifelong.bench.flags import check_serving_flags
from lifelong.bench.workload import synthetic_records, untrained_model


def bench_precompute(args) -> Dict:
    import tfmodels  # noqa: F401
    import tensorflow as tf
    from tfmodels import registry
    from beam_jobs import precompute as P
    from serving.cache_store import SQLiteCacheStore
    from serving.export import export_model

    L = args.precompute_long_len
    models = [m for m in args.models.split(",") if m] or registry.names()
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    rec_path = os.path.join(work, "users-00000-of-00001.tfrecord.gz")
    records = synthetic_records(args.precompute_users, L, L + 200, args.seed)
    with tf.io.TFRecordWriter(rec_path, options="GZIP") as w:
        for r in records:
            w.write(r)
    rows = []
    for m in models:
        out = export_model(untrained_model(args, m, L), base, m, 1)
        ns = argparse.Namespace(records=rec_path, model=m, base=base, version=1, model_dir=None,
                                output=os.path.join(work, f"cache_{m}"), num_shards=1,
                                no_reshuffle=False, store=None)
        store = SQLiteCacheStore(os.path.join(work, f"cache_{m}.db"))
        rep = P.run(ns, ["--direct_num_workers=1"], store=store)
        entry = store.get(m, 2)
        store.close()
        rows.append({"model": m, "L": L, "users": rep["users"], "wall_s": rep["wall_s"],
                     "users_per_s": rep["users_per_s"],
                     "store_bytes_per_user": entry.nbytes if entry else None,
                     "record_bytes_per_user": rep.get("record_bytes_per_user"),
                     "cache_tensors": {k: list(v.shape) for k, v in entry.tensors.items()}
                     if entry else {}, "export_s": out["wall_s"]})
        print(f"[bench] precompute {m}: {rep['users_per_s']:.0f} users/s, "
              f"{rows[-1]['store_bytes_per_user']} B/user", file=sys.stderr, flush=True)
    return {"rows": rows, "L": L, "users": args.precompute_users}


def print_precompute(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print("| model | L | users | wall s | users/s | stored bytes/user | record bytes/user | "
          "cache tensors (per user) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        tensors = ", ".join(f"{k} {v}" for k, v in r["cache_tensors"].items())
        print(f"| {r['model']} | {r['L']:,} | {r['users']} | {r['wall_s']:.1f} | "
              f"{r['users_per_s']:.0f} | {r['store_bytes_per_user']:,} | "
              f"{r['record_bytes_per_user']:,.0f} | {tensors} |")


def run(args) -> int:
    check_serving_flags(args)
    return record.run_in_folder(args, bench_precompute, print_precompute)
