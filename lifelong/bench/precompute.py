"""``lifelong bench precompute``: users/s of the Beam user-cache precompute, before
(``--engine runinference``) and after (``--engine batched``), and the cache bytes per
user.

For each model (``--models``, default every cacheable registered one:
:func:`lifelong.bench.serving.cacheable_models`) an untrained export at L = ``--precompute_long_len``
runs through :func:`beam_jobs.precompute.run` (DirectRunner, one worker, in process)
with each engine of ``--precompute_engines``: once over ONE user (start-up: model
load, Beam graph, files) and once over ``--precompute_users`` synthetic users
(generated once per work folder and reused). Steady users/s = (users - 1) / (wall -
start-up wall), so start-up does not hide it; the steady CPU ms per user sits next to
the ``user_tower`` signature's own CPU ms per user (called alone, same batch size):
the rest is pipeline overhead. Writes ``results.json`` (:mod:`lifelong.bench.record`).

``--incremental`` (issue 19 item 2; :func:`bench_incremental`): one full refresh over
the users, then for each ``--changed`` share an incremental refresh
(``--previous_cache`` = the full run's cache) over records where that share of the
users got one new behavior; wall time next to the full refresh, start-up excluded
(start-up = the same run over ONE user, measured for both modes and subtracted);
engine: batched unless ``--precompute_engines`` says otherwise. ``--incremental_modes``:
``fingerprint`` (``--records`` = every user's new record), ``delta``
(``--changed_records`` = the changed users' new records only, in their own file,
``delta<share>-00000-of-00001.tfrecord.gz``; the same users as the fingerprint run's)
or both.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

from lifelong.bench import record
from lifelong.bench.flags import check_serving_flags
from lifelong.bench.workload import synthetic_records, untrained_model


ENGINES = ("runinference", "batched")


def _engines(args):
    from tfmodels.errors import UsageError
    default = "batched" if getattr(args, "incremental", False) else ",".join(ENGINES)
    engines = [e for e in str(getattr(args, "precompute_engines", "") or default).split(",")
               if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise UsageError(f"--precompute_engines must be a comma separated subset of "
                         f"{','.join(ENGINES)}, got {bad or engines}")
    return engines


def _records_file(work: str, n: int, L: int, seed: int, name: str = "users") -> str:
    """``synthetic_records(n, L, L + 200, seed)`` as one gzip TFRecord file, reused when
    a previous bench wrote it to the same work folder (20,000 users take minutes to
    generate; the file name holds n, L and the seed)."""
    import tensorflow as tf
    path = os.path.join(work, f"{name}-n{n}-L{L}-s{seed}-00000-of-00001.tfrecord.gz")
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with tf.io.TFRecordWriter(tmp, options="GZIP") as w:
            for r in synthetic_records(n, L, L + 200, seed):
                w.write(r)
        os.replace(tmp, path)
    return path


def _first_records(path: str, k: int, out: str) -> str:
    """The first ``k`` records of ``path`` in their own file (the start-up runs)."""
    import tensorflow as tf
    if not os.path.exists(out):
        with tf.io.TFRecordWriter(out, options="GZIP") as w:
            for r in tf.data.TFRecordDataset(path, compression_type="GZIP").take(k):
                w.write(r.numpy())
    return out


def _output_bytes(folder: str) -> int:
    from beam_jobs import precompute as P
    return sum(os.path.getsize(f) for f in P.cache_files(folder))


def _tower_cost(model_path: str, records_path: str, batch_size: int, n: int = 512) -> Dict:
    """CPU and wall ms per user of the ``user_tower`` signature alone (batches of
    ``batch_size`` over the first ``n`` records, after one untimed batch): the
    TensorFlow-compute part of a precompute's per-user cost."""
    import time
    import tensorflow as tf
    recs = [r.numpy() for r in tf.data.TFRecordDataset(records_path, compression_type="GZIP")
            .take(n)]
    fn = tf.saved_model.load(model_path).signatures["user_tower"]
    fn(records=tf.constant(recs[:batch_size]))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(recs), batch_size):
        fn(records=tf.constant(recs[i:i + batch_size]))
    return {"tower_ms_per_user": (time.perf_counter() - t0) / len(recs) * 1e3,
            "tower_cpu_ms_per_user": (time.process_time() - c0) / len(recs) * 1e3}


def bench_precompute(args) -> Dict:
    """Before/after: each model through both engines (``--precompute_engines``), full
    refresh over ``--precompute_users`` users and over ONE user (start-up); steady
    users/s = (users - 1) / (wall - start-up wall)."""
    import tfmodels  # noqa: F401
    from beam_jobs import precompute as P
    from serving.export import export_model

    L, n = args.precompute_long_len, args.precompute_users
    engines = _engines(args)
    # default: every cacheable registered model (a long module, no preset variant), the
    # list `bench serving` calls `all`
    from lifelong.bench.serving import cacheable_models
    models = [m for m in args.models.split(",") if m] or cacheable_models()
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    rec_path = _records_file(work, n, L, args.seed)
    one = _first_records(rec_path, 1, os.path.join(work, f"one-L{L}-s{args.seed}.tfrecord.gz"))
    batch_size = getattr(args, "precompute_batch_size", 64)
    rows = []
    xla_modes = {"off": [False], "on": [True], "both": [False, True]}[
        getattr(args, "precompute_xla", "off")]
    for m, xla in [(m, x) for m in models for x in xla_modes]:
        # --precompute_xla: the user_tower under XLA (serving.export jit_user_tower),
        # exported under its own name so that both settings can run in one bench
        name = f"{m}_xla" if xla else m
        out = export_model(untrained_model(args, m, L), base, name, 1, jit_user_tower=xla)

        def run(recs, output, engine):
            ns = argparse.Namespace(records=recs, model=name, base=base, version=1,
                                    model_dir=None, output=os.path.join(work, f"{name}-{output}"),
                                    num_shards=1, no_reshuffle=False, store=None,
                                    engine=engine, batch_size=batch_size,
                                    cache_compression="none")
            return P.run(ns, ["--direct_num_workers=1"])

        run(one, "warmup", engines[0])    # the process's first pipeline pays imports on top
        tower = _tower_cost(os.path.join(base, name, "1"), rec_path, batch_size)
        for engine in engines:
            start = run(one, f"{engine}-one", engine)
            full = run(rec_path, f"{engine}-full", engine)
            net = full["wall_s"] - start["wall_s"]
            net_cpu = full["cpu_s"] - start["cpu_s"]
            folder = os.path.join(work, f"{name}-{engine}-full")
            first = next(P.read_cache_records(folder))
            _, _, _, tensors = P.decode_cache_record(first)
            rows.append({
                "model": m, "xla": xla, "L": L, "engine": engine, "users": full["users"],
                "wall_s": full["wall_s"], "cpu_s": full["cpu_s"],
                "startup_s": start["wall_s"], "startup_cpu_s": start["cpu_s"],
                "users_per_s": full["users_per_s"],
                "steady_users_per_s": (full["users"] - 1) / net if net > 0 else None,
                "steady_cpu_ms_per_user": net_cpu / max(full["users"] - 1, 1) * 1e3,
                "record_bytes_per_user": _output_bytes(folder) / max(full["users"], 1),
                "store_bytes_per_user": int(sum(v.nbytes for v in tensors.values())),
                "cache_tensors": {k: list(v.shape) for k, v in tensors.items()},
                "export_s": out["wall_s"], **tower})
            r = rows[-1]
            print(f"[bench] precompute {name} {engine}: {_num(r['steady_users_per_s'])} users/s "
                  f"steady ({r['steady_cpu_ms_per_user']:.2f} ms CPU/user, user_tower "
                  f"{tower['tower_cpu_ms_per_user']:.2f}), start-up {start['wall_s']:.1f} s, "
                  f"{r['record_bytes_per_user']:,.0f} B/user", file=sys.stderr, flush=True)
    return {"rows": rows, "L": L, "users": n, "engines": engines}


def _num(x, fmt="{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


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


MODES = ("fingerprint", "delta")


def _modes(args):
    from tfmodels.errors import UsageError
    modes = [m for m in str(getattr(args, "incremental_modes", "") or "fingerprint").split(",")
             if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--incremental_modes must be a comma separated subset of "
                         f"{','.join(MODES)}, got {bad or modes}")
    if "delta" in modes and _engines(args) != ["batched"]:
        raise UsageError("--incremental_modes delta runs on the batched engine only "
                         "(--precompute_engines batched)")
    return modes


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
    import tensorflow as tf
    engines = _engines(args)
    old = _records_file(work, n, L, args.seed)
    one = _first_records(old, 1, os.path.join(work, f"one-L{L}-s{args.seed}.tfrecord.gz"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(old, compression_type="GZIP")]
    modes = _modes(args)
    rng = np.random.default_rng(args.seed + 7)
    new_files, delta_files = {}, {}
    for share in shares:
        k = max(1, int(round(share * n)))
        grow = set(rng.choice(n, size=k, replace=False).tolist())
        if "fingerprint" in modes:
            new_files[share] = (k, _write(
                os.path.join(work, f"new{share:g}-00000-of-00001.tfrecord.gz"),
                [grow_history(r) if i in grow else r for i, r in enumerate(records)]))
        if "delta" in modes:     # what a log-joining job emits: the changed users only
            delta_files[share] = (k, _write(
                os.path.join(work, f"delta{share:g}-00000-of-00001.tfrecord.gz"),
                [grow_history(records[i]) for i in sorted(grow)]))
    del records
    rows = []
    batch_size = getattr(args, "precompute_batch_size", 64)
    for m, engine in [(m, e) for m in models for e in engines]:
        export_model(untrained_model(args, m, L), base, m, 1)

        def run(recs, output, previous=None, delta=False):
            ns = argparse.Namespace(records=None if delta else recs,
                                    changed_records=recs if delta else None, model=m,
                                    base=base, version=1, model_dir=None,
                                    output=os.path.join(work, f"{m}-{engine}-{output}"),
                                    num_shards=1, no_reshuffle=False, store=None,
                                    previous_cache=previous, engine=engine,
                                    batch_size=batch_size, cache_compression="none")
            return P.run(ns, ["--direct_num_workers=1"])

        # start-up: the same pipelines over one user (model load, Beam graph, files),
        # after an untimed one-user run (the process's first pipeline pays imports and
        # TensorFlow's first session on top)
        run(one, "warmup")
        s_full = run(one, "one")
        s_mode = {}
        if "fingerprint" in modes:
            s_mode["fingerprint"] = run(one, "one-incr", os.path.join(work, f"{m}-{engine}-one"))
        if "delta" in modes:
            s_mode["delta"] = run(one, "one-delta", os.path.join(work, f"{m}-{engine}-one"),
                                  delta=True)
        full = run(old, "full")
        prev = os.path.join(work, f"{m}-{engine}-full")
        full_net = full["wall_s"] - s_full["wall_s"]
        full_cpu = full["cpu_s"] - s_full["cpu_s"]
        rows.append({"model": m, "engine": engine, "mode": "full", "changed_share": 1.0,
                     "changed_users": n,
                     "users": full["users"], "users_to_model": full["users_to_model"],
                     "wall_s": full["wall_s"], "startup_s": s_full["wall_s"], "net_s": full_net,
                     "net_vs_full": 1.0, "cpu_s": full["cpu_s"],
                     "startup_cpu_s": s_full["cpu_s"], "net_cpu_s": full_cpu,
                     "net_cpu_vs_full": 1.0})
        for share, mode in [(s, md) for s in shares for md in modes]:
            s_incr = s_mode[mode]
            if mode == "delta":
                k, path = delta_files[share]
                rep = run(path, f"delta{share:g}", prev, delta=True)
            else:
                k, path = new_files[share]
                rep = run(path, f"incr{share:g}", prev)
            if rep["users_to_model"] != k or rep["users_carried"] != n - k:
                raise RuntimeError(f"{mode} run at {share:g}: {rep['users_to_model']} "
                                   f"users to the model, {rep['users_carried']} carried; "
                                   f"expected {k} and {n - k}")
            net = rep["wall_s"] - s_incr["wall_s"]
            net_cpu = rep["cpu_s"] - s_incr["cpu_s"]
            rows.append({"model": m, "engine": engine,
                         "mode": "delta" if mode == "delta" else "incremental",
                         "changed_share": share,
                         "changed_users": k, "users": rep["users"],
                         "users_to_model": rep["users_to_model"], "wall_s": rep["wall_s"],
                         "startup_s": s_incr["wall_s"], "net_s": net,
                         "net_vs_full": net / full_net if full_net > 0 and net >= 0 else None,
                         "cpu_s": rep["cpu_s"], "startup_cpu_s": s_incr["cpu_s"],
                         "net_cpu_s": net_cpu, "net_cpu_vs_full":
                         net_cpu / full_cpu if full_cpu > 0 and net_cpu >= 0 else None,
                         **{k2: rep[k2] for k2 in ("previous_shards_sparse",
                                                   "previous_shards_rewritten",
                                                   "dead_bytes_shared") if k2 in rep}})
            print(f"[bench] precompute {m} {engine} {mode} {share:.0%}: {rep['wall_s']:.1f} s "
                  f"({net:.1f} s net, {_pct(rows[-1]['net_vs_full'])} of full; CPU "
                  f"{net_cpu:.1f} s net, {_pct(rows[-1]['net_cpu_vs_full'])})",
                  file=sys.stderr, flush=True)
    return {"rows": rows, "L": L, "users": n, "incremental": True, "modes": modes}


def _pct(x) -> str:
    return "n/a (start-up >= wall)" if x is None else f"{x:.1%}"


def print_incremental(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print("| model | engine | refresh | changed users | users to model | wall s | start-up s | "
          "wall - start-up s | vs full (wall, start-up excluded) | CPU s | start-up CPU s | "
          "CPU - start-up s | vs full (CPU, start-up excluded) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        what = "full" if r["mode"] == "full" else f"{r['mode']}, {r['changed_share']:.0%} changed"
        print(f"| {r['model']} | {r.get('engine', 'runinference')} | {what} | "
              f"{r['changed_users']:,} | {r['users_to_model']:,} | "
              f"{r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['net_s']:.1f} | "
              f"{_pct(r['net_vs_full'])} | {r['cpu_s']:.1f} | {r['startup_cpu_s']:.1f} | "
              f"{r['net_cpu_s']:.1f} | {_pct(r['net_cpu_vs_full'])} |")


def print_precompute(res: Dict, command: str) -> None:
    if res.get("incremental"):
        return print_incremental(res, command)
    print(f"command: {command}\n")
    print("| model | engine | users | steady users/s | vs runinference | start-up s | "
          "steady CPU ms/user | user_tower CPU ms/user | other CPU ms/user | "
          "file bytes/user | stored bytes/user | cache tensors (per user) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    # "vs runinference": against the runinference row of the same export (XLA or not)
    before = {(r["model"], r.get("xla", False)): r for r in res["rows"]
              if r["engine"] == "runinference"}
    for r in res["rows"]:
        tensors = ", ".join(f"{k} {v}" for k, v in r["cache_tensors"].items())
        b = before.get((r["model"], r.get("xla", False)))
        ratio = (r["steady_users_per_s"] / b["steady_users_per_s"]
                 if b and r["steady_users_per_s"] and b["steady_users_per_s"] else None)
        other = r["steady_cpu_ms_per_user"] - r["tower_cpu_ms_per_user"]
        model = r["model"] + (" (XLA user_tower)" if r.get("xla") else "")
        print(f"| {model} | {r['engine']} | {r['users']:,} | "
              f"{_num(r['steady_users_per_s'])} | {_num(ratio, '{:.2f}x')} | "
              f"{r['startup_s']:.1f} | {r['steady_cpu_ms_per_user']:.2f} | "
              f"{r['tower_cpu_ms_per_user']:.2f} | {other:.2f} | "
              f"{r['record_bytes_per_user']:,.0f} | {r['store_bytes_per_user']:,} | {tensors} |")


def run(args) -> int:
    check_serving_flags(args)
    _engines(args)                           # a typo is one line before any folder exists
    if getattr(args, "incremental", False):
        _parse_shares(args.changed)
        _modes(args)
        return record.run_in_folder(args, bench_incremental, print_precompute)
    return record.run_in_folder(args, bench_precompute, print_precompute)
