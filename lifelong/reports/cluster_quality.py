"""Clustering quality of a trained C-Former: silhouette of its assignment vs K-means.

The paper (METHODS 2.1, "Clustering quality") reports that C-Former's clusters
have a higher silhouette coefficient than K-means with the same number of
centers. For a sample of users of a split this module computes, per user:

* the user's real behaviors' embeddings E^S (the rows C-Former's centroids
  aggregate: the long window the user tower sees, i.e. the last L behaviors of
  the user's whole stored history, built with
  :func:`tfmodels.data.user_history_features`);
* C-Former's hard assignment c_i = argmax_j A[j, i] of the trained encoder's
  last attention map (C11; for a run with k > 1 this is each behavior's
  primary cluster, so every behavior has one label);
* scikit-learn ``KMeans`` with the same J on the same embeddings;
* ``sklearn.metrics.silhouette_score`` of both labelings (``--metric``:
  euclidean by default, the distance K-means minimises; cosine optional).

Users with fewer than J + 1 real behaviors are skipped (the silhouette needs
fewer labels than points), and so are users for whom either labeling has a
single non-empty cluster (silhouette undefined). Prints mean ± std over users.

Usage: ``lifelong cluster-quality --run RUN_DIR`` (the report the ``cformer`` registry
entry declares), or::

    python -m lifelong.reports.cluster_quality --run RUN_DIR [--split test] [--num_users 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Dict, List, Optional

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

# TensorFlow, the schema and the trainer load inside the functions that use them, so
# `lifelong cluster-quality --help` answers without TensorFlow.


def _user_batches(data_dir: str, split: str, num_users: int, batch_size: int, seed: int,
                  schema):
    """User-tower windows (whole stored history) of a seeded sample of a split's users,
    in batches of ``batch_size``: a ``tf.data.Dataset`` (``schema``: the run's
    :class:`tfmodels.schema.FeatureSchema`)."""
    import tensorflow as tf
    from tfmodels import data as D
    from tfmodels import schema as S
    files = D.list_files(S.split_pattern(data_dir, split))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=False)
    table = D.item_table_for(S.split_pattern(data_dir, split))   # compact records: their table
    return (ds.take(num_users).batch(batch_size)
            .map(lambda x: D.user_history_features(x, schema, item_table=table)).prefetch(1))


def user_assignments(model, features) -> Dict[str, np.ndarray]:
    """Embeddings, mask and C-Former labels for a batch of user windows.

    Returns ``emb`` [B, L, d], ``mask`` [B, L] and ``labels`` [B, L] (argmax over
    J of the last encoder attention A [B, J, L]; meaningless where mask = 0).
    """
    import tensorflow as tf
    seq = model.embed_sequence(features, "long")
    enc = model.long_module.encode(seq)
    labels = tf.argmax(enc["attention"], axis=1)                        # [B, L]
    return {"emb": enc["emb"].numpy(), "mask": enc["mask"].numpy(),
            "labels": labels.numpy()}


def _silhouette(x: np.ndarray, labels: np.ndarray, metric: str) -> Optional[float]:
    from sklearn.metrics import silhouette_score
    if len(np.unique(labels)) < 2:
        return None
    return float(silhouette_score(x, labels, metric=metric))


def cluster_quality(run_dir: str, split: str = "test", num_users: int = 200,
                    data: Optional[str] = None, metric: str = "euclidean", seed: int = 0,
                    batch_size: int = 64, kmeans_n_init: int = 4) -> Dict:
    """Silhouette of C-Former's assignment vs K-means (same J, same embeddings) per user."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from tfmodels import schema as S
    from tfmodels.methods.cformer import CFormer
    from tfmodels.train import ConfigError, git_commit, load_run

    if metric not in ("euclidean", "cosine"):
        raise ConfigError(f"metric must be euclidean or cosine, got {metric!r}")
    if split not in S.SPLITS:
        raise ConfigError(f"split must be one of {S.SPLITS}, got {split!r}")
    cfg, model = load_run(run_dir, data)
    if not isinstance(model.long_module, CFormer):
        raise ConfigError(f"{run_dir!r} is a {cfg.model!r} run; cluster quality needs a "
                          "C-Former model (cformer, cformer_wo_*)")
    num_clusters = model.long_module.num_clusters
    rows: List[Dict] = []
    skipped = {"too_short": 0, "single_cluster": 0}
    seen = 0
    for feats in _user_batches(cfg.data, split, num_users, batch_size, seed,
                               model.feature_schema):
        out = user_assignments(model, feats)
        for b in range(out["mask"].shape[0]):
            seen += 1
            valid = out["mask"][b] > 0
            x = out["emb"][b][valid].astype(np.float64)
            if x.shape[0] < num_clusters + 1:
                skipped["too_short"] += 1
                continue
            c_labels = out["labels"][b][valid]
            with warnings.catch_warnings():
                # Fewer distinct points than J (repeated items) is expected, not an error.
                warnings.simplefilter("ignore", ConvergenceWarning)
                k_labels = KMeans(num_clusters, n_init=kmeans_n_init,
                                  random_state=seed).fit_predict(x)
            s_c, s_k = _silhouette(x, c_labels, metric), _silhouette(x, k_labels, metric)
            if s_c is None or s_k is None:
                skipped["single_cluster"] += 1
                continue
            rows.append({"user_id": int(feats["user_id"][b]), "behaviors": int(x.shape[0]),
                         "cformer": s_c, "kmeans": s_k,
                         "cformer_clusters": int(len(np.unique(c_labels))),
                         "kmeans_clusters": int(len(np.unique(k_labels)))})

    def stats(key):
        v = np.array([r[key] for r in rows], dtype=float)
        return {"mean": float(v.mean()) if v.size else float("nan"),
                "std": float(v.std()) if v.size else float("nan")}

    wins = float(np.mean([r["cformer"] > r["kmeans"] for r in rows])) if rows else float("nan")
    return {"run": run_dir, "model": cfg.model, "data": cfg.data, "split": split,
            "metric": metric, "num_clusters": num_clusters, "long_len": cfg.long_len,
            "users_sampled": seen, "users_evaluated": len(rows), "skipped": skipped,
            "seed": seed, "cformer": stats("cformer"), "kmeans": stats("kmeans"),
            "cformer_clusters": stats("cformer_clusters"),
            "kmeans_clusters": stats("kmeans_clusters"),
            "behaviors": stats("behaviors"), "cformer_better_fraction": wins,
            "git_commit": git_commit(), "per_user": rows}


def format_table(result: Dict) -> str:
    r = result
    lines = [f"run={r['run']} model={r['model']} split={r['split']} J={r['num_clusters']} "
             f"L={r['long_len']} metric={r['metric']} seed={r['seed']}",
             f"users: {r['users_evaluated']} evaluated of {r['users_sampled']} sampled "
             f"(skipped: {r['skipped']['too_short']} with < J+1 behaviors, "
             f"{r['skipped']['single_cluster']} with one non-empty cluster); "
             f"behaviors/user {r['behaviors']['mean']:.1f}",
             "",
             "| method | silhouette (mean ± std over users) | non-empty clusters (mean) |",
             "|---|---|---|"]
    for key, name in (("cformer", "C-Former (argmax of A)"),
                      ("kmeans", f"K-means (J={r['num_clusters']})")):
        lines.append(f"| {name} | {r[key]['mean']:.4f} ± {r[key]['std']:.4f} | "
                     f"{r[key + '_clusters']['mean']:.1f} |")
    lines.append("")
    lines.append(f"C-Former above K-means for {100 * r['cformer_better_fraction']:.1f}% of users")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a C-Former run directory (lifelong train)")
    parser.add_argument("--split", default="test", help="train | valid | test (default test)")
    parser.add_argument("--num_users", type=int, default=200,
                        help="users sampled from the split (default 200)")
    parser.add_argument("--data", help="another prepared dataset with the same vocab")
    parser.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"],
                        help="silhouette distance (default euclidean, K-means' own)")
    parser.add_argument("--seed", type=int, default=0, help="user sample and K-means seed")
    parser.add_argument("--batch_size", type=int, default=64, help="users per encoder batch")
    parser.add_argument("--kmeans_n_init", type=int, default=4, help="K-means restarts")
    parser.add_argument("--json", help="also write the result (with per-user rows) here")


def run(args, extra: Optional[List[str]] = None) -> int:
    result = cluster_quality(args.run, args.split, args.num_users, args.data, args.metric,
                             args.seed, args.batch_size, args.kmeans_n_init)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cluster_quality", description="Silhouette of a trained C-Former's behavior "
        "assignment vs scikit-learn K-means with the same J, per sampled user.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from tfmodels.train import ConfigError
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cluster_quality: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
