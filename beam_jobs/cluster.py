"""TWIN V2 offline hierarchical clustering (METHODS 2.4, Algorithm 1) as an Apache Beam job.

Reads a prepared dataset (``lifelong prepare``: per-user records, history once
+ labeled impressions), clusters each user's behaviors before a snapshot into
virtual items and writes a new dataset in the SAME per-user record format
(``tfmodels/schema.py``) whose history is

    [virtual items of the behaviors before the snapshot]  ++  [raw behaviors after it]

with ``hist_cluster_size`` = n (members of the virtual item; 1 for a raw row).
``lifelong train --data <output> --model twin_v2`` then trains on it unchanged:
the tf.data windows carry ``long_cluster_size`` and the TWIN V2 layer adds ln n.

Modules: this one is the Beam job (flags, the graph, the run and its report);
the per-record work is :mod:`beam_jobs.cluster_snapshot` (snapshot protocol),
the algorithm :mod:`beam_jobs.cluster_algo` (Algorithm 1 in NumPy, with the
compiled backend :mod:`beam_jobs.cluster_numba`); shards, text files and counts
come from :mod:`beam_jobs.sharded_io`. The snapshot defaults per dataset
(``--snapshot_ts auto``) are described in :mod:`beam_jobs.cluster_snapshot`.

Output: ``<output>/{train,valid,test}-*.tfrecord.gz`` (one record per user and
snapshot group), ``meta.json`` (the input's, plus ``clustering``: settings and
statistics), ``vocab/`` (copied), ``embeddings.npz`` when ``--embeddings`` was
given, and with ``--write_members`` ``members/*.jsonl`` (the original row indices
of every virtual item, for audits and the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import beam_main, cluster_numba
from beam_jobs import flags
from beam_jobs.cluster_algo import NUM_GROUPS, ClusterError, Embedder, load_run_tables
from beam_jobs.cluster_snapshot import cluster_record, encode_clustered, parse_record
from beam_jobs.sharded_io import (CountingDoFn, WriteCounts, join, match_paths, read_split,
                                  read_text_file, split_files, sum_counts, write_split,
                                  write_text_file)
from tfmodels import schema as S

REFRESH_DAYS = 14.0
# taobao_ad's behavior_log btag uses Taobao's codes (pv 1, cart 2, fav 3, buy 4)
ENGAGE_BY_SOURCE = {"synthetic": "ratio", "movielens": "rating", "taobao": "type",
                    "taobao_ad": "type"}
#: protocols whose splits are cut by time: --snapshot_ts auto = the valid/test boundary
TIME_SPLIT_PROTOCOLS = ("per_event_time_split", "labeled_impressions_time_split")
NAMESPACE = "cluster"
COUNTS_FILE = "_cluster_counts.json"
EMBEDDINGS_FILE = "embeddings.npz"
MEMBERS_DIR = "members"


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# The flags live in beam_jobs/flags.py (no Beam, no TensorFlow there): `lifelong cluster
# --help` is fast.
add_arguments = flags.add_cluster_arguments

def resolve_settings(args: argparse.Namespace, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Arguments + the input's meta.json -> the job's settings (defaults per dataset)."""
    source, protocol = meta.get("source"), meta.get("protocol")
    mode = args.engage_mode
    if mode == "auto":
        mode = ENGAGE_BY_SOURCE.get(source, "ratio")
    snap = str(args.snapshot_ts).strip().lower()
    if snap == "auto":
        snapshot_ts = (meta.get("split_rule", {}).get("valid_end_ts")
                       if protocol in TIME_SPLIT_PROTOCOLS else None)
    elif snap in ("none", ""):
        snapshot_ts = None
    else:
        try:
            snapshot_ts = int(float(snap))
        except ValueError:
            raise ClusterError(f"--snapshot_ts must be unix seconds, auto or none; got "
                               f"{args.snapshot_ts!r}") from None
    refresh_days = args.refresh_days
    if refresh_days is None:
        refresh_days = REFRESH_DAYS if snapshot_ts is not None else 0.0
    if refresh_days < 0:
        raise ClusterError(f"--refresh_days must be >= 0, got {refresh_days}")
    if args.gamma < 2:
        raise ClusterError(f"--gamma must be >= 2, got {args.gamma}")
    for name in ("keep_recent", "num_shards", "max_iter", "max_cluster_history", "fallback_dim"):
        if getattr(args, name) < (0 if name == "keep_recent" else 1):
            raise ClusterError(f"--{name} must be >= {0 if name == 'keep_recent' else 1}")
    # two-domain data (taobao_ad, synthetic --synthetic_domains 2, MovieLens genre split):
    # clusters never mix domains (cluster_snapshot.cluster_record split_domains)
    num_domains = int((meta.get("vocab") or {}).get("num_domains", S.DEFAULT_DOMAIN + 1))
    return {"variant": args.variant, "gamma": int(args.gamma), "engage_mode": mode,
            "split_domains": num_domains > S.SOURCE_DOMAIN,
            "num_groups": {"ratio": NUM_GROUPS, "rating": NUM_GROUPS, "none": 1}.get(
                mode, "one per behavior type"),
            "max_iter": int(args.max_iter), "seed": int(args.seed),
            "snapshot_ts": snapshot_ts, "refresh_s": float(refresh_days) * 86400.0,
            "refresh_days": float(refresh_days), "keep_recent": int(args.keep_recent),
            "max_cluster_history": int(args.max_cluster_history),
            "embeddings": args.embeddings or f"fallback:category_anchored_random(d="
                                              f"{args.fallback_dim})",
            "fallback_dim": int(args.fallback_dim), "backend": _backend(args.backend),
            "kmeans": "Lloyd (k-means++), " + {"numba": "compiled per-set queue",
                                               "numpy": "numpy batched"}[_backend(args.backend)]}


def _backend(name: str) -> str:
    if name == "auto":
        return "numba" if cluster_numba.AVAILABLE else "numpy"
    if name == "numba" and not cluster_numba.AVAILABLE:
        raise ClusterError("--backend numba: numba is not installed (pip install numba)")
    return name


class ClusterRecords(CountingDoFn):
    """Serialized per-user record -> clustered records; tagged outputs ``members``
    (JSON lines) and ``counts`` (one dict per bundle, emitted in finish_bundle)."""

    namespace = NAMESPACE

    def __init__(self, settings: Mapping[str, Any], split: str, emb_path: Optional[str],
                 with_members: bool, data_dir: Optional[str] = None):
        super().__init__()
        self._s, self._split = dict(settings), split
        self._emb_path, self._with_members = emb_path, with_members
        self._data_dir = data_dir

    def setup(self):
        super().setup()
        tables = None
        if self._emb_path:
            with FileSystems.open(self._emb_path) as f:
                z = np.load(f)
                tables = (z["item_table"], z["cate_table"])
        self._embedder = Embedder(tables, self._s["fallback_dim"], self._s["seed"])
        # compact input records (issue 19 item 5): decoded with the dataset's item table,
        # loaded once per worker; the output records are written in the full format
        self._item_table = S.load_item_table(self._data_dir)

    def process(self, raw: bytes):
        s = self._s
        rec = parse_record(raw, self._item_table)
        stats: Dict[str, Any] = {"users": 1, "input_rows": int(len(rec["hist_ts"]))}
        outs = cluster_record(rec, self._embedder, s["engage_mode"], s["snapshot_ts"],
                              s["refresh_s"], s["keep_recent"], s["max_cluster_history"],
                              s["gamma"], s["variant"], s["max_iter"], s["seed"], stats,
                              s["backend"], s.get("split_domains", False))
        self._count({self._split: stats})
        self._counters.inc("users")
        for o in outs:
            self._counters.inc("records_out")
            yield encode_clustered(o)
            if self._with_members:
                yield beam.pvalue.TaggedOutput("members", json.dumps(
                    {"user_key": o["user_key"], "snapshot": o["snapshot"],
                     "imp_ts": o["imps"]["imp_ts"].tolist(), "members": o["members"]},
                    sort_keys=True))


def build_pipeline(p, settings: Mapping[str, Any], args: argparse.Namespace,
                   emb_path: Optional[str]) -> None:
    """Read every split, cluster per user record, write the clustered splits."""
    counts = []
    for split in S.SPLITS:
        if not split_files(args.data, split):
            continue
        res = (p
               | f"Read_{split}" >> read_split(args.data, split)
               # a shard arrives as one bundle: let a distributed runner spread the users
               | f"Spread_{split}" >> beam.Reshuffle()
               | f"Cluster_{split}" >> beam.ParDo(
                   ClusterRecords(settings, split, emb_path, args.write_members,
                                  args.data)).with_outputs(
                   "members", "counts", main="records"))
        _ = res.records | f"Write_{split}" >> write_split(args.output, split, args.num_shards)
        if args.write_members:
            _ = res.members | f"WriteMembers_{split}" >> beam.io.WriteToText(
                join(args.output, MEMBERS_DIR, split), file_name_suffix=".jsonl")
        counts.append(res.counts)
    _ = tuple(counts) | "Counts" >> WriteCounts(join(args.output, COUNTS_FILE))


def _existing(out: str) -> List[str]:
    return match_paths([S.split_pattern(out, s) for s in S.SPLITS] + [
        join(out, n) for n in (S.META_FILE, COUNTS_FILE, EMBEDDINGS_FILE)] + [
        join(out, MEMBERS_DIR, "*.jsonl"), join(out, "vocab", "*.tsv")])


def _summary(counts: Mapping[str, Any]) -> Dict[str, Any]:
    tot = sum_counts(counts.values())
    clustered = tot.get("clustered_rows", 0)
    virtual = tot.get("virtual_items", 0)
    return {"users": tot.get("users", 0), "records_out": tot.get("records_out", 0),
            "records_with_clusters": tot.get("records_with_clusters", 0),
            "input_rows": tot.get("input_rows", 0), "clustered_rows": clustered,
            "virtual_items": virtual, "raw_rows": tot.get("raw_rows", 0),
            "dropped_rows": tot.get("dropped_rows", 0),
            "impressions": tot.get("impressions", 0),
            "mean_cluster_size": clustered / virtual if virtual else None,
            "compression": virtual / clustered if clustered else None,
            "cluster_accuracy": tot.get("accuracy_sum", 0.0) / clustered if clustered else None,
            "cluster_seconds": round(tot.get("cluster_seconds", 0.0), 3),
            "kmeans_sets": tot.get("kmeans_sets", 0),
            "chunk_fallbacks": tot.get("chunk_fallbacks", 0)}


def run(args: argparse.Namespace, beam_args: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the clustering job; returns the report (also stored in the output's meta.json)."""
    t0 = time.time()
    beam_args = list(beam_args or [])
    try:
        meta = S.read_meta(args.data)
    except FileNotFoundError as e:
        raise ClusterError(str(e)) from None
    if meta.get("clustering"):
        raise ClusterError(f"--data {args.data!r} is already a clustered dataset; pass the "
                           f"prepared (unclustered) one")
    settings = resolve_settings(args, meta)
    found = _existing(args.output)
    if found:
        if not args.overwrite:
            raise ClusterError(f"--output {args.output!r} already holds a dataset ({len(found)} "
                               f"files); pass --overwrite or choose another folder")
        FileSystems.delete(found)
    if "://" not in args.output:
        os.makedirs(args.output, exist_ok=True)
    emb_path = None
    if args.embeddings:
        _log(f"loading item embeddings from run {args.embeddings}")
        item, cate = load_run_tables(args.embeddings, meta["vocab"])
        emb_path = join(args.output, EMBEDDINGS_FILE)
        with FileSystems.create(emb_path) as f:
            np.savez(f, item_table=item, cate_table=cate)
    _log(f"data={args.data} output={args.output} variant={settings['variant']} "
         f"gamma={settings['gamma']} engage={settings['engage_mode']} "
         f"snapshot_ts={settings['snapshot_ts']} refresh_days={settings['refresh_days']} "
         f"keep_recent={settings['keep_recent']} embeddings={settings['embeddings']}")
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(p, settings, args, emb_path)
    t_run = time.time()
    result = p.run()
    result.wait_until_finish()
    run_s = time.time() - t_run
    counts_path = join(args.output, COUNTS_FILE)
    counts = json.loads(read_text_file(counts_path)) if FileSystems.exists(counts_path) else {}
    summary = _summary(counts)
    out_meta = dict(meta)
    # clustered records are always written in the full format (their rows are cluster
    # representatives with aggregated engagement, off any quantisation grid)
    out_meta["format"] = S.FORMAT_FULL
    out_meta.pop("record", None)
    out_meta["clustering"] = {
        "settings": settings, "source_data": args.data, "summary": summary,
        "per_split": {k: _summary({k: v}) for k, v in counts.items()},
        "pipeline_seconds": round(run_s, 3),
        "users_per_second": round(summary["users"] / run_s, 2) if run_s > 0 else None,
        "beam_args": beam_args}
    for split in S.SPLITS:
        if split in out_meta.get("splits", {}) and split in counts:
            out_meta["splits"][split] = dict(out_meta["splits"][split],
                                             records=counts[split].get("records_out", 0),
                                             history_rows=counts[split].get("virtual_items", 0)
                                             + counts[split].get("raw_rows", 0))
    # vocabularies are unchanged: copy them so the output is a complete dataset
    for path in match_paths([join(args.data, "vocab", "*.tsv")]):
        dst = join(args.output, "vocab", path.rsplit("/", 1)[-1])
        if "://" not in dst:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        write_text_file(read_text_file(path), dst)
    _verify_shards(args.output, args.num_shards, [s for s in S.SPLITS if s in counts])
    with FileSystems.create(join(args.output, S.META_FILE)) as f:
        f.write(json.dumps(out_meta, indent=2, default=str).encode("utf-8"))
    if FileSystems.exists(counts_path):
        FileSystems.delete([counts_path])
    report = dict(out_meta["clustering"], wall_seconds=round(time.time() - t0, 3),
                  output=args.output)
    acc = summary["cluster_accuracy"]
    size = summary["mean_cluster_size"]
    _log(f"users {summary['users']:,} -> records {summary['records_out']:,} "
         f"({summary['records_with_clusters']:,} with clusters); behaviors clustered "
         f"{summary['clustered_rows']:,} -> {summary['virtual_items']:,} virtual items "
         f"(mean size {size:.2f}; accuracy {acc:.3f}); raw rows {summary['raw_rows']:,}"
         if size is not None else
         f"users {summary['users']:,} -> records {summary['records_out']:,}; nothing clustered "
         f"(histories shorter than keep_recent, or no snapshot before the impressions)")
    _log(f"pipeline {run_s:.1f}s = {report['users_per_second']} users/s "
         f"(clustering itself {summary['cluster_seconds']:.1f}s); wrote {args.output}")
    return report


def _verify_shards(out: str, num_shards: int, splits: Sequence[str]) -> None:
    for split in splits:
        found = split_files(out, split)
        if len(found) != num_shards:
            raise ClusterError(f"expected {num_shards} {split} shards in {out}, found "
                               f"{len(found)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m beam_jobs.cluster --data D --output O [Beam options]``."""
    return beam_main("cluster", __doc__, add_arguments, run, ClusterError, argv)


if __name__ == "__main__":
    sys.exit(main())
