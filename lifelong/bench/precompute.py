"""``lifelong bench precompute``: users/s of the Beam user-cache precompute and the cache
bytes per user.

For each model (``--models``, default every registered one) an untrained export at
L = ``--precompute_long_len`` runs through :func:`beam_jobs.precompute.run`
(DirectRunner, one worker, in process) over ``--precompute_users`` synthetic users;
the table gives users/s, the stored entry's bytes and the TFRecord bytes per user,
and the cached tensors' shapes. Writes ``results.json`` (:mod:`lifelong.bench.record`).

``--incremental`` (issue 19 item 2; :func:`bench_incremental`): one full refresh over
the users, then for each ``--changed`` share an incremental refresh
(``--previous_cache`` = the full run's cache) over records where that share of the
users got one new behavior; wall time next to the full refresh, start-up excluded
(start-up = the same run over ONE user, measured for both modes and subtracted).
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


def _parse_shares(text: str):
    from tfmodels.errors import UsageError
    try:
        shares = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--changed must be comma separated shares in (0, 1], got {text!r}") \
            from None
    if not shares or any(not 0.0 < x <= 1.0 for x in shares):
        raise UsageError(f"--changed must be comma separated shares in (0, 1], got {text!r}")
    return shares


def grow_history(serialized: bytes, seconds: int = 60) -> bytes:
    """The record with one more behavior: a copy of its last one, ``seconds`` later
    (so the history, and its fingerprint, change)."""
    import tensorflow as tf
    ex = tf.train.Example.FromString(serialized)
    feat = ex.features.feature
    for name in ("hist_item_id", "hist_cate_id", "hist_ts", "hist_engage", "hist_domain"):
        lst = feat[name].float_list if name == "hist_engage" else feat[name].int64_list
        lst.value.append(lst.value[-1] + (seconds if name == "hist_ts" else 0))
    return ex.SerializeToString()


def _write(path: str, records) -> str:
    import tensorflow as tf
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in records:
            w.write(r)
    return path


def bench_incremental(args) -> Dict:
    import numpy as np
    import tfmodels  # noqa: F401
    from beam_jobs import precompute as P
    from serving.export import export_model

    shares = _parse_shares(args.changed)
    L, n = args.precompute_long_len, args.precompute_users
    models = [m for m in args.models.split(",") if m] or ["cformer"]
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    records = synthetic_records(n, L, L + 200, args.seed)
    old = _write(os.path.join(work, "old-00000-of-00001.tfrecord.gz"), records)
    one = _write(os.path.join(work, "one-00000-of-00001.tfrecord.gz"), records[:1])
    rng = np.random.default_rng(args.seed + 7)
    new_files = {}
    for share in shares:
        k = max(1, int(round(share * n)))
        grow = set(rng.choice(n, size=k, replace=False).tolist())
        new_files[share] = (k, _write(
            os.path.join(work, f"new{share:g}-00000-of-00001.tfrecord.gz"),
            [grow_history(r) if i in grow else r for i, r in enumerate(records)]))
    rows = []
    for m in models:
        export_model(untrained_model(args, m, L), base, m, 1)

        def run(recs, output, previous=None):
            ns = argparse.Namespace(records=recs, model=m, base=base, version=1,
                                    model_dir=None, output=os.path.join(work, f"{m}-{output}"),
                                    num_shards=1, no_reshuffle=False, store=None,
                                    previous_cache=previous)
            return P.run(ns, ["--direct_num_workers=1"])

        # start-up: the same pipelines over one user (model load, Beam graph, files),
        # after an untimed one-user run (the process's first pipeline pays imports and
        # TensorFlow's first session on top)
        run(one, "warmup")
        s_full = run(one, "one")
        s_incr = run(one, "one-incr", os.path.join(work, f"{m}-one"))
        full = run(old, "full")
        prev = os.path.join(work, f"{m}-full")
        full_net = full["wall_s"] - s_full["wall_s"]
        full_cpu = full["cpu_s"] - s_full["cpu_s"]
        rows.append({"model": m, "mode": "full", "changed_share": 1.0, "changed_users": n,
                     "users": full["users"], "users_to_model": full["users_to_model"],
                     "wall_s": full["wall_s"], "startup_s": s_full["wall_s"], "net_s": full_net,
                     "net_vs_full": 1.0, "cpu_s": full["cpu_s"],
                     "startup_cpu_s": s_full["cpu_s"], "net_cpu_s": full_cpu,
                     "net_cpu_vs_full": 1.0})
        for share in shares:
            k, path = new_files[share]
            rep = run(path, f"incr{share:g}", prev)
            if rep["users_to_model"] != k or rep["users_carried"] != n - k:
                raise RuntimeError(f"incremental run at {share:g}: {rep['users_to_model']} "
                                   f"users to the model, {rep['users_carried']} carried; "
                                   f"expected {k} and {n - k}")
            net = rep["wall_s"] - s_incr["wall_s"]
            net_cpu = rep["cpu_s"] - s_incr["cpu_s"]
            rows.append({"model": m, "mode": "incremental", "changed_share": share,
                         "changed_users": k, "users": rep["users"],
                         "users_to_model": rep["users_to_model"], "wall_s": rep["wall_s"],
                         "startup_s": s_incr["wall_s"], "net_s": net,
                         "net_vs_full": net / full_net if full_net > 0 and net >= 0 else None,
                         "cpu_s": rep["cpu_s"], "startup_cpu_s": s_incr["cpu_s"],
                         "net_cpu_s": net_cpu, "net_cpu_vs_full":
                         net_cpu / full_cpu if full_cpu > 0 and net_cpu >= 0 else None})
            print(f"[bench] precompute {m} incremental {share:.0%}: {rep['wall_s']:.1f} s "
                  f"({net:.1f} s net, {_pct(rows[-1]['net_vs_full'])} of full; CPU "
                  f"{net_cpu:.1f} s net, {_pct(rows[-1]['net_cpu_vs_full'])})",
                  file=sys.stderr, flush=True)
    return {"rows": rows, "L": L, "users": n, "incremental": True}


def _pct(x) -> str:
    return "n/a (start-up >= wall)" if x is None else f"{x:.1%}"


def print_incremental(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print("| model | refresh | changed users | users to model | wall s | start-up s | "
          "wall - start-up s | vs full (wall, start-up excluded) | CPU s | start-up CPU s | "
          "CPU - start-up s | vs full (CPU, start-up excluded) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        what = "full" if r["mode"] == "full" else f"incremental, {r['changed_share']:.0%} changed"
        print(f"| {r['model']} | {what} | {r['changed_users']:,} | {r['users_to_model']:,} | "
              f"{r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['net_s']:.1f} | "
              f"{_pct(r['net_vs_full'])} | {r['cpu_s']:.1f} | {r['startup_cpu_s']:.1f} | "
              f"{r['net_cpu_s']:.1f} | {_pct(r['net_cpu_vs_full'])} |")


def print_precompute(res: Dict, command: str) -> None:
    if res.get("incremental"):
        return print_incremental(res, command)
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
    if getattr(args, "incremental", False):
        _parse_shares(args.changed)          # a typo is one line before any folder exists
        return record.run_in_folder(args, bench_incremental, print_precompute)
    return record.run_in_folder(args, bench_precompute, print_precompute)
