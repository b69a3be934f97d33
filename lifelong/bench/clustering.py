"""``lifelong cluster-bench``: speed and accuracy of the TWIN V2 hierarchical clustering.

The numbers of the paper's Table 4 and of the clustering issue's targets.

For users with T = 1,000 / 14,500 / 100,000 behaviors (the synthetic generator's
event stream: items, categories and engagement of one user, embedded with the
category-anchored fallback of :mod:`beam_jobs.cluster`, d = 64 as in
``../shared/ANCHORS.md``) it measures, on ONE thread (BLAS limited to 1 thread):

* seconds per user (median wall and median process CPU time over ``--repeats``
  users) of Algorithm 1 for the Adaptive, Binary and Balanced&Binary variants,
  with the batched NumPy k-means and, for comparison, scikit-learn's ``KMeans``
  (the queue reference; skipped above ``--sklearn_max`` behaviors, it takes
  ~10 s per user at 100,000);
* cluster accuracy (mean cosine of every item to its cluster's centroid), clusters
  per user and the mean cluster size;
* the Beam clustering job's users/s (DirectRunner, one process) on
  ``--beam_users`` users of ``--beam_history`` behaviors.

Prints a Markdown table and the command line; ``--out`` also writes JSON + Markdown.

    python -m lifelong.bench.clustering [--sizes 1000,14500,100000] [--repeats 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from beam_jobs import cluster_algo as C      # NumPy + numba; the Beam job loads when run

# The item space of the benchmark users, pinned (not the generator's defaults, which
# other work may resize): 20,000 items in 200 categories.
ITEM_SPACE = {"num_items": 20000, "num_categories": 200}
# the job's concrete backends (cluster.BACKENDS without "auto") + the scikit-learn reference
BENCH_BACKENDS = tuple(b for b in C.BACKENDS if b != "auto") + ("sklearn",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1000,14500,100000",
                        help="history lengths T to time (default 1000,14500,100000)")
    parser.add_argument("--variants", default=",".join(C.VARIANTS),
                        help="adaptive,binary,balanced_binary (default all three)")
    parser.add_argument("--backends", default=",".join(BENCH_BACKENDS),
                        help="numba (compiled queue, the job's default), numpy (batched "
                             "fallback) and/or sklearn (queue reference); "
                             f"default {','.join(BENCH_BACKENDS)}")
    parser.add_argument("--sklearn_max", type=int, default=14500,
                        help="skip the sklearn backend above this T (default 14500)")
    parser.add_argument("--repeats", type=int, default=3, help="users per (T, variant) (default 3)")
    parser.add_argument("--dim", type=int, default=64, help="embedding size d (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam_users", type=int, default=60,
                        help="users of the Beam job throughput run; 0 = skip (default 60)")
    parser.add_argument("--beam_history", type=int, default=14500,
                        help="behaviors per user in the Beam run (default 14500)")
    parser.add_argument("--out", default=None, help="folder for results.json / results.md")


def _user(t: int, index: int, seed: int, dim: int) -> Dict[str, np.ndarray]:
    """One synthetic user's T behaviors -> (embeddings [T, dim], engagement groups [T])."""
    from beam_jobs import synthetic
    cfg = synthetic.SyntheticConfig(num_users=index + 1, min_history=t, max_history=t,
                                    mean_history=t, seed=seed, **ITEM_SPACE)
    sim = synthetic._simulate(cfg, index)
    emb = C.fallback_embeddings(sim["items"] + 2, sim["cats"] + 2, dim, seed)
    return {"emb": emb, "groups": C.engagement_groups(sim["engage"], "ratio"),
            "items": sim["items"], "cats": sim["cats"], "ts": sim["ts"],
            "engage": sim["engage"], "imp": sim}


def time_clustering(sizes: List[int], variants: List[str], backends: List[str], repeats: int,
                    dim: int, seed: int, sklearn_max: int) -> List[Dict[str, Any]]:
    from threadpoolctl import threadpool_limits
    rows = []
    with threadpool_limits(1):
        for t in sizes:
            users = [_user(t, i, seed, dim) for i in range(repeats)]
            for backend in backends:
                if backend == "sklearn" and t > sklearn_max:
                    continue
                for variant in variants:
                    if backend == "sklearn" and variant == "balanced_binary":
                        continue                      # no balanced assignment in sklearn
                    if backend == "sklearn":
                        fn = functools.partial(C.hierarchical_clustering_queue, backend="sklearn")
                    else:
                        fn = functools.partial(C.hierarchical_clustering, backend=backend)
                    fn(users[0]["emb"][:2000], users[0]["groups"][:2000], variant=variant)  # warm
                    walls, cpus, accs, ncl = [], [], [], []
                    for i, u in enumerate(users):
                        w0, c0 = time.perf_counter(), time.process_time()
                        labels = fn(u["emb"], u["groups"], variant=variant, seed=seed + i)
                        cpus.append(time.process_time() - c0)
                        walls.append(time.perf_counter() - w0)
                        accs.append(C.cluster_accuracy(u["emb"], labels))
                        ncl.append(int(labels.max()) + 1)
                        assert np.bincount(labels).max() < C.GAMMA
                    row = {"T": t, "variant": variant, "backend": backend,
                           "s_per_user_wall": statistics.median(walls),
                           "s_per_user_cpu": statistics.median(cpus),
                           "cluster_accuracy": float(np.mean(accs)),
                           "clusters_per_user": float(np.mean(ncl)),
                           "mean_cluster_size": float(t / np.mean(ncl)), "users": repeats}
                    rows.append(row)
                    print(f"[cluster_bench] T={t:>6} {variant:<15} {backend:<7} "
                          f"{row['s_per_user_wall']:.4f} s/user wall, "
                          f"{row['s_per_user_cpu']:.4f} cpu, accuracy "
                          f"{row['cluster_accuracy']:.3f}, {row['clusters_per_user']:.0f} clusters",
                          file=sys.stderr, flush=True)
    return rows


def beam_throughput(users: int, history: int, seed: int) -> Dict[str, Any]:
    """Write a prepared-format dataset of ``users`` x ``history`` and run the job on it."""
    import tensorflow as tf
    from beam_jobs import synthetic
    from beam_jobs import cluster as CJ
    from tfmodels import schema as S
    work = tempfile.mkdtemp(prefix="cluster_bench_")
    data = os.path.join(work, "data")
    os.makedirs(data)
    cfg = synthetic.SyntheticConfig(num_users=users, min_history=history, max_history=history,
                                    mean_history=history, seed=seed, **ITEM_SPACE)
    per_split = {"train": [], "valid": [], "test": []}
    for u in range(users):
        sim = synthetic._simulate(cfg, u)
        n = len(sim["ts"])
        hist = {"hist_item_id": sim["items"] + 2, "hist_cate_id": sim["cats"] + 2,
                "hist_ts": sim["ts"], "hist_engage": sim["engage"],
                "hist_domain": np.ones(n, np.int64)}
        imps = {"imp_item_id": sim["imp_items"] + 2, "imp_cate_id": sim["imp_cats"] + 2,
                "imp_ts": sim["imp_ts"], "imp_label": sim["labels"],
                "imp_hist_index": np.full(len(sim["imp_ts"]), n)}
        split = "train" if u % 10 < 8 else ("valid" if u % 10 == 8 else "test")
        per_split[split].append(S.encode_user_record(u + 2, f"u{u}", hist, imps))
    for split, recs in per_split.items():
        with tf.io.TFRecordWriter(os.path.join(data, f"{split}-00000-of-00001.tfrecord.gz"),
                                  options="GZIP") as w:
            for r in recs:
                w.write(r)
    meta = {"vocab": {"num_items": cfg.num_items + 2, "num_categories": cfg.num_categories + 2,
                      "num_users": users + 2, "num_domains": 2},
            "source": "synthetic", "protocol": "labeled_impressions", "stats": {}}
    with open(os.path.join(data, S.META_FILE), "w") as f:
        json.dump(meta, f)
    parser = argparse.ArgumentParser()
    CJ.add_arguments(parser)
    args, beam_args = parser.parse_known_args(["--data", data, "--output",
                                               os.path.join(work, "out"), "--num_shards", "1"])
    report = CJ.run(args, beam_args)
    return {"users": users, "history": history, "pipeline_seconds": report["pipeline_seconds"],
            "users_per_second": report["users_per_second"],
            "cluster_seconds": report["summary"]["cluster_seconds"],
            "cluster_accuracy": report["summary"]["cluster_accuracy"],
            "mean_cluster_size": report["summary"]["mean_cluster_size"],
            "runner": "DirectRunner (one process)", "work_dir": work}


def format_table(rows: List[Dict[str, Any]], beam: Optional[Dict[str, Any]], command: str,
                 dim: int) -> str:
    lines = [f"command: `{command}`", "",
             f"One thread (BLAS limited to 1), d = {dim}, gamma = {C.GAMMA}, M = {C.NUM_GROUPS}, "
             f"<= {C.MAX_ITER} Lloyd iterations; median over users.", "",
             "| T | variant | k-means | s/user (wall) | s/user (CPU) | cluster accuracy | "
             "clusters/user | mean size |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']:,} | {r['variant']} | {r['backend']} | "
                     f"{r['s_per_user_wall']:.4f} | {r['s_per_user_cpu']:.4f} | "
                     f"{r['cluster_accuracy']:.3f} | {r['clusters_per_user']:.0f} | "
                     f"{r['mean_cluster_size']:.1f} |")
    if beam:
        lines += ["", f"Beam job ({beam['runner']}): {beam['users']} users x "
                      f"{beam['history']:,} behaviors in {beam['pipeline_seconds']:.1f} s = "
                      f"**{beam['users_per_second']:.2f} users/s** (clustering itself "
                      f"{beam['cluster_seconds']:.1f} s; accuracy "
                      f"{beam['cluster_accuracy']:.3f}, mean cluster size "
                      f"{beam['mean_cluster_size']:.1f})"]
    return "\n".join(lines)


def run(args: argparse.Namespace, extra: Optional[List[str]] = None) -> Dict[str, Any]:
    sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    variants = [v.strip() for v in str(args.variants).split(",") if v.strip()]
    backends = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    bad = [v for v in variants if v not in C.VARIANTS] + [b for b in backends
                                                          if b not in BENCH_BACKENDS]
    if bad:
        raise C.ClusterError(f"unknown variant/backend {bad}")
    command = "python -m lifelong.bench.clustering " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if extra is None else extra))
    rows = time_clustering(sizes, variants, backends, args.repeats, args.dim, args.seed,
                           args.sklearn_max)
    beam = beam_throughput(args.beam_users, args.beam_history, args.seed) \
        if args.beam_users > 0 else None
    table = format_table(rows, beam, command, args.dim)
    print(table)
    result = {"command": command, "rows": rows, "beam": beam, "dim": args.dim}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table + "\n")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster_bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args, sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
