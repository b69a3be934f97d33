"""Flags of the Beam jobs (``lifelong prepare``, ``lifelong cluster``, ``lifelong
precompute``; ``python -m beam_jobs.<job>``), kept free of Beam and TensorFlow imports
so that ``lifelong <cmd> --help`` answers without loading them. Each job module
exposes its function here as its ``add_arguments``.
"""
from __future__ import annotations

import argparse


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` flags. Unknown extra arguments are Beam pipeline options."""
    g = parser.add_argument_group("input / output")
    g.add_argument("--source", default="synthetic",
                   help="synthetic | movielens | taobao | taobao_ad (default: synthetic; "
                        "taobao_ad = Tianchi 56 display-ad clicks, two domains, METHODS 4.3)")
    g.add_argument("--input", default=None,
                   help="movielens: a MovieLens folder, ratings.csv + movies.csv "
                        "(ml-latest-small, ml-20m .. ml-32m), ratings.dat + movies.dat "
                        "(ml-1m, ml-10m) or u.data + u.item (ml-100k); taobao: UserBehavior.csv or a glob of such files; "
                        "taobao_ad: folder with raw_sample.csv, ad_feature.csv and "
                        "behavior_log.csv (with their header lines); "
                        "local or any Beam filesystem (gs://, s3://, hdfs://)")
    g.add_argument("--output", required=True,
                   help="output folder: {train,valid,test}-*.tfrecord.gz, vocab/, "
                        "dead_letter/, meta.json")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a previous prepared dataset in --output first (otherwise "
                        "an existing one is an error: stale shards would mix in)")
    g.add_argument("--num_shards", type=int, default=4,
                   help="TFRecord shards per split (default 4)")
    g.add_argument("--record_format", default="full", choices=["full", "compact", "compact2"],
                   help="per-user record layout: full (default; per_user_record, every field "
                        "per behavior) | compact (per_user_record_compact_v1: item-side fields "
                        "in vocab/item_table.tsv, timestamp deltas, engagement quantised to "
                        "--engage_step) | compact2 (per_user_record_compact_v2: compact with "
                        "items as item-table addresses, optional --ts_step; see docs/data.md)")
    g.add_argument("--engage_step", type=float, default=None,
                   help="compact: engagement quantisation step, a power of two (default per "
                        "source: movielens 0.5 (half stars, exact), taobao / taobao_ad 1 "
                        "(behavior codes, exact), synthetic 1/16 (|error| <= 1/32))")
    g.add_argument("--ts_step", type=int, default=None,
                   help="compact2: history timestamps rounded to this many seconds (LOSSY: "
                        "|error| <= ts_step / 2; impression timestamps stay exact); default 1 "
                        "= exact")

    g = parser.add_argument_group("protocol")
    g.add_argument("--protocol", default=None,
                   help="per_event_time_split | last_item_per_user | labeled_impressions | "
                        "labeled_impressions_time_split; default per source: movielens -> "
                        "per_event_time_split, taobao -> last_item_per_user, synthetic -> "
                        "labeled_impressions, taobao_ad -> labeled_impressions_time_split "
                        "(its only protocol)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the negative sampling (last_item_per_user) and of the "
                        "synthetic generator (default 0)")
    g.add_argument("--min_item_count", type=int, default=1,
                   help="items seen in fewer rows map to the OOV id 1 (default 1 = keep all)")
    g.add_argument("--max_history", type=int, default=0,
                   help="keep at most the N most recent behaviors before each record's first "
                        "impression (0 = unlimited; see docs/data.md for the exact rule)")
    g.add_argument("--label_threshold", type=float, default=4.0,
                   help="per_event_time_split: label = 1 iff engage (MovieLens rating) >= this "
                        "(default 4.0)")
    g.add_argument("--train_fraction", type=float, default=0.8,
                   help="per_event_time_split: train+valid share of events by time (the "
                        "validation period is carved from its end); user splits: train share of "
                        "users ordered by last behavior time (default 0.8)")
    g.add_argument("--valid_fraction", type=float, default=0.1,
                   help="validation share (of events by time, or of users) (default 0.1)")

    g = parser.add_argument_group("source options")
    g.add_argument("--valid_time_window", default=None, metavar="START,END",
                   help="rows with a timestamp outside [START, END] (inclusive) are "
                        "dead-lettered. START/END: unix seconds, an ISO date or date-time "
                        "(2017-11-25, 2017-11-25T00:00:00+08:00; no offset = UTC; a date "
                        "alone as END means its last second), now, now+Nd; 'none' = only "
                        "the sanity bounds 1970..2100. Default per source: taobao "
                        "2017-11-25T00:00:00+08:00,2017-12-03T23:59:59+08:00 (the "
                        "documented range); movielens 1995-01-01,now+1d; synthetic the "
                        "generator's own range (docs/data.md)")
    g.add_argument("--taobao_keep_behaviors", default="pv,cart,fav,buy",
                   help="Taobao behavior types to keep, comma separated (others are counted "
                        "as filtered); default pv,cart,fav,buy")
    g.add_argument("--taobao_ad_valid", default="last_day", choices=("last_day", "none"),
                   help="taobao_ad: last_day (default) = the last train day 2017-05-12 is the "
                        "validation split (train 05-06..05-11); none = no validation split "
                        "(train 05-06..05-12, the official split as is); test = 05-13 (UTC+8)")
    g.add_argument("--movielens_domains", default="none", choices=("none", "genre"),
                   help="movielens: none (default, one domain) | genre = two domains by the "
                        "movie's first genre (target: Animation, Children, Comedy, "
                        "Documentary, Musical, Romance; the rest source); only target-domain "
                        "ratings become impressions (docs/data.md)")
    g.add_argument("--synthetic_domains", type=int, default=None, choices=(1, 2),
                   help="synthetic: 2 = the two-domain preset (disjoint target/source items "
                        "sharing each user's latent interests; impressions in the target "
                        "domain, most history in the source domain; docs/synthetic.md); "
                        "default: the config's num_domains (1)")
    g.add_argument("--synthetic_preset", default=None,
                   help="synthetic: a named preset of generator fields (bench = sized for "
                        "L = 1,000 and >= 100k training impressions, oracle-calibrated; "
                        "docs/synthetic.md); --synthetic_config and the flags below "
                        "override its fields")
    g.add_argument("--synthetic_config", default=None,
                   help="JSON file of beam_jobs.synthetic.SyntheticConfig fields (optional; "
                        "the flags below override it)")
    g.add_argument("--synthetic_users", type=int, default=None,
                   help="synthetic: number of users (default: the config's, 2000)")
    g.add_argument("--synthetic_mean_history", type=int, default=None,
                   help="synthetic: mean history length (default: the config's, 1200)")
    g.add_argument("--synthetic_min_history", type=int, default=None,
                   help="synthetic: minimum history length (default: the config's, lowered "
                        "to fit --synthetic_mean_history / --synthetic_max_history)")
    g.add_argument("--synthetic_max_history", type=int, default=None,
                   help="synthetic: maximum history length (default: the config's, 3000)")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the ``cluster`` subcommand; unknown extra arguments are Beam pipeline options."""
    # The defaults are the algorithm's constants; their modules load NumPy and numba
    # (about 1 s), not Beam or TensorFlow.
    from beam_jobs.cluster_algo import (BACKENDS, ENGAGE_MODES, FALLBACK_DIM, GAMMA, MAX_ITER,
                                        VARIANTS)
    from beam_jobs.cluster_snapshot import KEEP_RECENT, MAX_CLUSTER_HISTORY
    g = parser.add_argument_group("input / output")
    g.add_argument("--data", required=True,
                   help="a prepared dataset (lifelong prepare --output): per-user records")
    g.add_argument("--output", required=True,
                   help="output folder: a clustered dataset in the same format "
                        "({train,valid,test}-*.tfrecord.gz, meta.json, vocab/)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a previous clustered dataset in --output first")
    g.add_argument("--num_shards", type=int, default=4, help="shards per split (default 4)")
    g.add_argument("--write_members", action="store_true",
                   help="also write members/<split>-*.jsonl: the original row indices behind "
                        "every history row of every output record (audits, tests)")
    g = parser.add_argument_group("clustering (Algorithm 1)")
    g.add_argument("--variant", default="adaptive", choices=VARIANTS,
                   help="adaptive: delta = floor(|V|^0.3) (the paper); binary: delta = 2; "
                        "balanced_binary: delta = 2 with equal halves (Table 4)")
    g.add_argument("--gamma", type=int, default=GAMMA,
                   help=f"maximum cluster size, exclusive (default {GAMMA}: sizes <= {GAMMA - 1})")
    g.add_argument("--engage_mode", default="auto", choices=ENGAGE_MODES,
                   help="engagement grouping: ratio (5 ranges of [0,1]), rating (MovieLens "
                        "0.5-5 -> [0,1], 5 ranges), type (one group per behavior code), none "
                        "(M = 1); auto: by the dataset source (synthetic ratio, movielens "
                        "rating, taobao and taobao_ad type); on two-domain data the groups "
                        "are also split by domain (no cluster mixes domains)")
    g.add_argument("--max_iter", type=int, default=MAX_ITER, help="Lloyd iterations (default 20)")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="k-means implementation: numba (compiled per-set queue), numpy "
                        "(batched Lloyd), auto = numba when installed (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the k-means++ draws")
    g.add_argument("--embeddings", default=None,
                   help="a `lifelong train` run directory: cluster on its item embeddings "
                        "[item_table; cate_table]; default: the category-anchored random "
                        "fallback (first pass, no trained model)")
    g.add_argument("--fallback_dim", type=int, default=FALLBACK_DIM,
                   help=f"dimension of the fallback embeddings (default {FALLBACK_DIM})")
    g = parser.add_argument_group("snapshot protocol")
    g.add_argument("--snapshot_ts", default="auto",
                   help="unix seconds of the (first) snapshot; 'auto' = per dataset (time "
                        "split: the train/test boundary; user splits: none); 'none' = "
                        "per-record rule (before each record's earliest impression)")
    g.add_argument("--refresh_days", type=float, default=None,
                   help="refresh period of the snapshot grid in days (default: 14 with a "
                        "snapshot_ts, as the paper's 2 weeks; 0 = one snapshot)")
    g.add_argument("--keep_recent", type=int, default=KEEP_RECENT,
                   help=f"raw behaviors kept before each group's first impression (default "
                        f"{KEEP_RECENT}; set >= the model's --short_len so short windows stay raw)")
    g.add_argument("--max_cluster_history", type=int, default=MAX_CLUSTER_HISTORY,
                   help=f"cluster at most this many behaviors before the snapshot (default "
                        f"{MAX_CLUSTER_HISTORY:,}; older ones are dropped)")


def add_precompute_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``precompute`` flags. Unknown extra arguments are Beam pipeline options."""
    p.add_argument("--records",
                   help="per-user record files (glob), e.g. data/test-*.tfrecord.gz "
                   "(required unless --changed_records)")
    p.add_argument("--model", help="served model name under --base")
    p.add_argument("--base", default="saved_models", help="model base path (default saved_models)")
    p.add_argument("--version", type=int, help="model version (default: the latest)")
    p.add_argument("--model_dir", help="a SavedModel version folder (instead of --model/--base)")
    p.add_argument("--output", required=True, help="folder for the cache TFRecords")
    p.add_argument("--num_shards", type=int, default=0, help="output shards (0 = runner decides)")
    p.add_argument("--no_reshuffle", action="store_true",
                   help="skip the Reshuffle before inference (single process runs)")
    p.add_argument("--engine", choices=("batched", "runinference"), default="batched",
                   help="batched (default): users in chunks and batches, records keyed from "
                   "their raw bytes, cache rows encoded per batch (beam_jobs/"
                   "precompute_batched.py); runinference: the earlier tfx-bsl RunInference "
                   "pipeline, one Beam element per user, gzip output")
    p.add_argument("--batch_size", type=int, default=64,
                   help="batched engine: users per user_tower call (default 64)")
    p.add_argument("--cache_compression", choices=("none", "gzip"), default="none",
                   help="batched engine: cache file compression (default none: float cache "
                   "rows barely compress and gzip costs more CPU than the model)")
    p.add_argument("--store", help="also load the cache into a store: sqlite:PATH or "
                   "redis://host:port/db")
    p.add_argument("--previous_cache",
                   help="incremental refresh: a previous cache folder (or glob); users whose "
                   "history fingerprint, model and version match are carried over unchanged, "
                   "only the others go through user_tower; users absent from --records are "
                   "dropped (listed in <output>/removed-*.txt, deleted from --store)")
    p.add_argument("--changed_records",
                   help="delta refresh (with --previous_cache, instead of --records): the "
                   "per-user records of the changed and new users ONLY (glob); they go "
                   "through user_tower, every other user of --previous_cache is carried "
                   "without reading a record (its shards hard-linked into --output, rows "
                   "of changed users masked by the shard index); no user is removed; "
                   "--store gets the changed users only (it must hold --previous_cache)")
