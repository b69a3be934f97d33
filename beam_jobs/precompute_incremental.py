"""Incremental user-cache refresh: recompute only the users whose history changed.

``lifelong precompute --previous_cache OLD --records NEW --output OUT`` (issue 19
item 2; :func:`beam_jobs.precompute.run` dispatches here). One Beam pipeline:

1. the new per-user records, keyed by user with their **history fingerprint**
   (:func:`beam_jobs.precompute.history_fingerprint`: a BLAKE2b of the history
   fields the user tower reads; impressions do not count);
2. the previous cache records, keyed by user (only their identity and fingerprint
   are decoded, :func:`beam_jobs.precompute.cache_record_meta`);
3. ``CoGroupByKey`` on the user id, then per user (:class:`Classify`):

   * **carried**: exactly one new record and one previous row whose model name,
     model version and fingerprint equal the new record's: the previous row is
     passed through unchanged (its bytes are written as read) and the model never
     sees the user;
   * **recomputed**: anything else with a new record (history changed, the row
     was written for another model or version, a previous cache from before
     fingerprints existed: it has none, so every such user counts as changed)
     goes through ``user_tower`` (RunInference) exactly as in a full run;
   * **new**: a user with a new record and no previous row: recomputed (counted
     apart from the changed ones);
   * **removed**: a previous row without a new record is dropped, as a full
     recompute over the new records would not have it; its id is written to
     ``<output>/removed-SSSSS-of-NNNNN.txt`` so a store loaded from the old cache
     can delete it (``run(..., store=...)`` does).

4. carried and recomputed rows are flattened and written like a full run's.

So the output holds the same set of records as a full recompute over the new
records (tests/test_incremental_refresh.py checks it record by record); only the
file order and sharding may differ, which no reader depends on.

The delta refresh (``--changed_records``, :func:`run_delta`, section at the end):
only the changed users' records are given, read and recomputed; the previous cache's
shards are hard-linked, not rewritten.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import precompute as P

REMOVED_PREFIX = "removed"
#: the counters :func:`beam_jobs.precompute.run` reports for an incremental run
REPORT_COUNTERS = ("users_carried", "users_changed", "users_new", "users_removed",
                   "users_other_model_or_version", "users_without_fingerprint",
                   "previous_rows_unreadable", "duplicate_users",
                   "previous_rows_from_index")     # batched engine: rows known by their index

CARRY, COMPUTE, REMOVED = "carry", "compute", "removed"


def previous_key(serialized: bytes) -> Iterator[Tuple[bytes, Tuple]]:
    """A previous cache record -> ``(b"<user_id>", (meta, serialized))``."""
    try:
        meta = P.cache_record_meta(serialized)
    except Exception:   # a corrupt row: recompute its user rather than crash the job
        Metrics.counter(P.NAMESPACE, "previous_rows_unreadable").inc()
        return
    yield str(meta.user_id).encode("ascii"), (tuple(meta), serialized)


def new_key(kv: Tuple[bytes, bytes]) -> Tuple[bytes, Tuple[bytes, bytes]]:
    """``(fingerprint key, record)`` -> ``(b"<user_id>", (fingerprint key, record))``."""
    return kv[0].split(b"|", 1)[0], kv


class Classify(beam.DoFn):
    """One user's ``{"new": [...], "prev": [...]}`` -> carried row (main output),
    ``compute`` ``(key, record)`` or ``removed`` user id (see the module doc)."""

    def __init__(self, model_name: str, model_version: int):
        self.model_name, self.model_version = model_name, int(model_version)

    def process(self, element):
        uid, groups = element
        new, prev = list(groups["new"]), list(groups["prev"])
        if not new:
            Metrics.counter(P.NAMESPACE, "users_removed").inc()
            yield beam.pvalue.TaggedOutput(REMOVED, uid.decode("ascii"))
            return
        if len(new) == 1 and len(prev) == 1:
            (key, record), ((_, name, version, fingerprint, last_ts), row) = new[0], prev[0]
            _, new_fp, new_last = P.parse_key(key)
            if name != self.model_name or version != self.model_version:
                Metrics.counter(P.NAMESPACE, "users_other_model_or_version").inc()
            elif fingerprint is None:
                Metrics.counter(P.NAMESPACE, "users_without_fingerprint").inc()
            elif fingerprint == new_fp and last_ts == new_last:
                Metrics.counter(P.NAMESPACE, "users_carried").inc()
                yield row                               # passed through, byte for byte
                return
            else:
                Metrics.counter(P.NAMESPACE, "users_changed").inc()
        elif not prev:
            Metrics.counter(P.NAMESPACE, "users_new").inc()
        else:   # the same user twice in either input: recompute whatever the new side holds
            Metrics.counter(P.NAMESPACE, "duplicate_users").inc()
        for kv in new:
            yield beam.pvalue.TaggedOutput(COMPUTE, kv)


def build_incremental_pipeline(p: beam.Pipeline, records: str, previous_files: Sequence[str],
                               model_path: str, model_name: str, model_version: int,
                               output: str, num_shards: int = 0,
                               reshuffle: bool = True) -> None:
    new = (P.read_keyed_records(p, records)
           | "ByUserNew" >> beam.Map(new_key))
    prev = (p
            | "PreviousFiles" >> beam.Create(list(previous_files))
            # P.read_cache_records, not ReadAllFromTFRecord: a delta refresh's .sparse
            # shard holds superseded rows that only its index tells apart
            | "ReadPrevious" >> beam.FlatMap(lambda path: P.read_cache_records(path))
            | "ByUserPrevious" >> beam.FlatMap(previous_key))
    split = ({"new": new, "prev": prev}
             | "JoinUsers" >> beam.CoGroupByKey()
             | "Classify" >> beam.ParDo(Classify(model_name, model_version)).with_outputs(
                 COMPUTE, REMOVED, main=CARRY))
    to_model = split[COMPUTE] | "TypedCompute" >> beam.Map(lambda kv: kv).with_output_types(
        beam.typehints.Tuple[bytes, bytes])
    computed = P.infer_cache_records(to_model, model_path, model_name, model_version, reshuffle)
    P.write_cache((split[CARRY], computed) | "CarriedAndComputed" >> beam.Flatten(),
                  output, num_shards)
    (split[REMOVED]
     | "WriteRemoved" >> beam.io.WriteToText(os.path.join(output, REMOVED_PREFIX),
                                             file_name_suffix=".txt", num_shards=1))


def read_removed(output: str) -> List[int]:
    """The removed user ids an incremental run wrote to ``output`` (sorted)."""
    import glob
    ids: List[int] = []
    for path in sorted(glob.glob(os.path.join(output, f"{REMOVED_PREFIX}-*.txt"))):
        with open(path) as f:
            ids += [int(line) for line in f if line.strip()]
    return sorted(ids)


# ---- delta refresh (--changed_records) -----------------------------------------------------
# ``lifelong precompute --previous_cache OLD --changed_records DELTA --output OUT``: DELTA
# holds the per-user records of the users whose history changed (and new users) ONLY, as
# a daily job that joins new behavior logs can emit them; every other user of OLD is
# carried without reading any record of it. The model sees exactly DELTA's users
# (the batched engine's full pipeline over DELTA, written to OUT's
# ``cache-BBBBB-of-NNNNN.tfrecord``); OLD's shards are then shared, not rewritten:
#
# * a previous shard none of whose users is in DELTA: hard-linked into OUT
#   (``cache-prevJJJJJ-of-MMMMM.tfrecord``) with a copy of its index;
# * one that holds some: hard-linked as ``cache-prevJJJJJ-of-MMMMM.sparse.tfrecord``
#   with a new index that lists its live rows only (the superseded users' rows stay in
#   the file, dead): every reader resolves it (``precompute_batched.is_sparse``:
#   ``read_cache_records`` / ``load_into_store`` read the listed rows, an incremental
#   refresh reads the index, a ``.sparse`` shard without its index is an error);
# * one whose dead rows would exceed :data:`DELTA_COMPACT_DEAD_SHARE` of its bytes (or
#   that a hard link cannot reach: another filesystem) is rewritten with its live rows
#   (byte ranges, as the fingerprint refresh copies them); one with none is dropped.
#
# No user is removed (DELTA says nothing about users it does not hold): a fingerprint
# refresh (``--records`` with every user) drops users and compacts every shard.

#: a previous shard whose dead (superseded) rows would exceed this share of its bytes is
#: rewritten with its live rows instead of being shared [interp: not in METHODS; bounds
#: the dead bytes a chain of daily deltas leaves in the cache to about as many as live]
DELTA_COMPACT_DEAD_SHARE = 0.5
#: the counters of a delta refresh's report, beyond :data:`REPORT_COUNTERS`
DELTA_REPORT = ("previous_shards_linked", "previous_shards_sparse",
                "previous_shards_rewritten", "previous_shards_dropped",
                "carried_bytes_rewritten", "dead_bytes_shared")
PREV_NAME = "prev"


def _fail(msg: str):
    raise P.PrecomputeError(msg)


def check_delta_records(files: Sequence[str]) -> None:
    """Each ``--changed_records`` file's first record must be a per-user record (what
    ``lifelong prepare`` writes, full or compact): not a user-cache row, with one
    ``user_id`` and history fields. (Every record's user id is checked by the job.)"""
    import tensorflow as tf
    from tfmodels import schema as S
    for path in files:
        comp = "GZIP" if path.endswith(".gz") else ""
        try:
            first = next(iter(tf.data.TFRecordDataset(path, compression_type=comp)
                              .take(1).as_numpy_iterator()), None)
        except tf.errors.OpError as e:
            _fail(f"--changed_records {path}: not a readable TFRecord file"
                  f"{' (gzip)' if comp else ''}: {e.message.splitlines()[0]}")
        if first is None:
            continue
        try:
            feat = tf.train.Example.FromString(first).features.feature
        except Exception:
            _fail(f"--changed_records {path}: its first record is not a tf.train.Example")
        if "tensor_names" in feat or "model_name" in feat:
            _fail(f"--changed_records {path} holds user-cache rows, not per-user records "
                  f"(give the records `lifelong prepare` writes)")
        ids = feat["user_id"].int64_list.value if "user_id" in feat else []
        compact = ("record_format" in feat
                   and len(feat["record_format"].bytes_list.value) == 1
                   and feat["record_format"].bytes_list.value[0] in S.COMPACT_MARKERS)
        if len(ids) != 1 or not ("hist_item_id" in feat or compact):
            _fail(f"--changed_records {path}: its first record is not a per-user record of "
                  f"`lifelong prepare` (needs one user_id and the history fields, "
                  f"hist_item_id ...; has {sorted(feat)[:8]})")


def _previous_indexes(previous_files: Sequence[str], model_name: str, version: int) -> List:
    """Each previous shard's index; the previous cache must be the batched engine's
    (uncompressed, indexed), of this model and version, with fingerprints, each user once."""
    from beam_jobs import precompute_batched as B
    out = []
    for path in previous_files:
        idx = B.read_index(path)
        if idx is None:
            _fail(f"--changed_records needs a previous cache with shard indexes (the batched "
                  f"engine's uncompressed cache); {path} has none (gzip, the runinference "
                  f"engine's, or edited): run a --records refresh once")
        name, ver = str(idx["model_name"]), int(idx["model_version"])
        if (name, ver) != (model_name, int(version)):
            _fail(f"--previous_cache {path} holds {name} v{ver}, this run is {model_name} "
                  f"v{version}: a delta refresh can only carry rows of the same model and "
                  f"version (run a full refresh)")
        if not idx["has_fingerprint"].all():
            _fail(f"--previous_cache {path} has rows without a history fingerprint (a cache "
                  f"written before them): run a --records refresh once")
        out.append(idx)
    uids = np.concatenate([i["user_id"] for i in out]) if out else np.zeros(0, np.int64)
    u, c = np.unique(uids, return_counts=True)
    if (c > 1).any():
        _fail(f"--previous_cache holds user {int(u[c > 1][0])} {int(c[c > 1][0])} times: a "
              f"delta refresh would carry every copy (run a --records refresh, which "
              f"recomputes such users)")
    return out


def _link_or_copy(src: str, dst: str) -> bool:
    """``dst`` a hard link of ``src`` (True); where none can be made (another filesystem,
    not local) a copy (False). Shards are never modified in place (written to a temporary
    name and renamed), so a shard shared by two caches stays right for both."""
    import shutil
    from apache_beam.io.filesystems import FileSystems
    if "://" not in src and "://" not in dst:
        try:
            os.link(src, dst)
            return True
        except OSError:
            shutil.copyfile(src, dst)
            return False
    FileSystems.copy([src], [dst])
    return False


def share_previous(previous_files: Sequence[str], indexes: Sequence, superseded: np.ndarray,
                   output: str, model_name: str, version: int,
                   dead_share: float = DELTA_COMPACT_DEAD_SHARE) -> Dict[str, int]:
    """OLD's shards into ``output`` without the ``superseded`` users (module section
    above); -> counts (``users_carried`` and :data:`DELTA_REPORT`)."""
    from apache_beam.io.filesystems import FileSystems
    from beam_jobs import precompute_batched as B
    m = len(previous_files)
    rep = {k: 0 for k in DELTA_REPORT}
    rep["users_carried"] = 0
    for j, (path, idx) in enumerate(zip(previous_files, indexes)):
        live = ~np.isin(idx["user_id"], superseded)
        size = int(idx["shard_bytes"])
        live_bytes = int(idx["length"][live].sum())
        n_live = int(live.sum())
        rep["users_carried"] += n_live
        if not n_live:
            rep["previous_shards_dropped"] += 1
            continue
        stem = f"{P.OUTPUT_PREFIX}-{PREV_NAME}{j:05d}-of-{m:05d}"
        entries = list(zip(idx["user_id"][live].tolist(),
                           [f.tobytes() for f in idx["fingerprint"][live]],
                           [int(t) if h else None for t, h in
                            zip(idx["last_ts"][live].tolist(), idx["has_last"][live])],
                           idx["offset"][live].tolist(), idx["length"][live].tolist()))
        whole = live_bytes == size and live.all()
        dead_after = 1.0 - live_bytes / size if size else 0.0
        if whole or dead_after <= dead_share:
            dst = os.path.join(output, stem + (".tfrecord" if whole else ".sparse.tfrecord"))
            if _link_or_copy(path, dst):
                rep["previous_shards_linked"] += 1
                if not whole:
                    rep["previous_shards_sparse"] += 1
                    rep["dead_bytes_shared"] += size - live_bytes
                B.write_index(dst, model_name, version, entries,
                              shard_bytes=None if whole else size)
                continue
            FileSystems.delete([dst])   # copied, not linked: rewrite the live rows instead
        # rewrite the live rows as a plain shard (contiguous ranges copied in one go)
        dst = os.path.join(output, stem + ".tfrecord")
        tmp = os.path.join(output, f".tmp-{stem}.tfrecord")
        order = np.argsort(idx["offset"][live], kind="stable")
        entries = [entries[k] for k in order.tolist()]
        with FileSystems.create(tmp) as out:
            B._copy_ranges([path], [(0, e[3], e[4]) for e in entries], out)
        FileSystems.rename([tmp], [dst])
        pos, moved = 0, []
        for uid, fp, last, _, ln in entries:
            moved.append((uid, fp, last, pos, ln))
            pos += ln
        B.write_index(dst, model_name, version, moved)
        rep["previous_shards_rewritten"] += 1
        rep["carried_bytes_rewritten"] += pos
    return rep


def run_delta(args, beam_args: Sequence[str] = (), store=None) -> Dict:
    """``--changed_records`` (see the section above): the report of
    :func:`beam_jobs.precompute.run`, with ``mode: "delta"``, ``users_changed`` (in
    OLD), ``users_new`` and :data:`DELTA_REPORT`. A store given gets the recomputed
    users only: it must be the one loaded from ``--previous_cache``."""
    import glob
    import sys
    import time
    from apache_beam.options.pipeline_options import PipelineOptions
    from beam_jobs import precompute_batched as B
    delta = args.changed_records
    previous = getattr(args, "previous_cache", None)
    if getattr(args, "records", None):
        _fail("--records and --changed_records exclude each other: --records holds every "
              "user (a fingerprint refresh), --changed_records only the changed ones")
    if not previous:
        _fail("--changed_records needs --previous_cache (the cache whose other users it "
              "carries)")
    if (getattr(args, "engine", None) or "batched") != "batched":
        _fail("--changed_records runs on the batched engine (--engine batched)")
    if (getattr(args, "cache_compression", None) or "none") != "none":
        _fail("--changed_records writes uncompressed, indexed shards (--cache_compression none)")
    batch_size = int(getattr(args, "batch_size", None) or 64)
    if batch_size < 1:
        _fail(f"--batch_size must be >= 1, got {batch_size}")
    model_path, model_name, version = P.resolve_model(args)
    if not os.path.exists(os.path.join(model_path, "saved_model.pb")):
        _fail(f"{model_path!r} holds no SavedModel")
    files = sorted(glob.glob(delta))
    if not files:
        _fail(f"no record files match --changed_records {delta!r}")
    try:
        previous_files = P.cache_files(previous)
    except FileNotFoundError:
        _fail(f"--previous_cache {previous!r} holds no cache records "
              f"({P.OUTPUT_PREFIX}-*.tfrecord)")
    out_abs = os.path.abspath(args.output)
    if any(os.path.dirname(os.path.abspath(f)) == out_abs for f in previous_files):
        _fail("--previous_cache must not be the --output folder (the output's old cache "
              "files are deleted before the run)")
    check_delta_records(files)
    t0, c0 = time.perf_counter(), time.process_time()
    indexes = _previous_indexes(previous_files, model_name, version)
    os.makedirs(args.output, exist_ok=True)

    def clean():
        stale = [f for f in glob.glob(os.path.join(args.output, f"{P.OUTPUT_PREFIX}-*"))
                 if ".tfrecord" in f]
        stale += glob.glob(os.path.join(args.output, ".tmp-*"))
        stale += glob.glob(os.path.join(args.output, "index-*-of-*.npz"))
        stale += glob.glob(os.path.join(args.output, f"{REMOVED_PREFIX}-*"))
        for path in stale:
            os.remove(path)
    clean()
    print(f"[precompute] {model_name} v{version} ({model_path}) delta {delta} over "
          f"{previous} -> {args.output}", file=sys.stderr, flush=True)
    p = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    B.build_pipeline(p, files, [], os.path.abspath(model_path), model_name, version,
                     args.output, args.num_shards, batch_size, "none")
    result = p.run()
    result.wait_until_finish()
    counters = P._counters(result)
    written = sorted(glob.glob(os.path.join(args.output,
                                            f"{P.OUTPUT_PREFIX}-[0-9]*-of-*.tfrecord")))
    delta_idx = [B.read_index(f) for f in written]
    uids = (np.concatenate([i["user_id"] for i in delta_idx]) if delta_idx
            else np.zeros(0, np.int64))
    u, c = np.unique(uids, return_counts=True)
    if counters.get("records_without_user_id", 0) or (c > 1).any():
        clean()
        if counters.get("records_without_user_id", 0):
            _fail(f"--changed_records {delta}: {counters['records_without_user_id']} "
                  f"record(s) without exactly one user_id (not per-user records)")
        _fail(f"--changed_records {delta} holds user {int(u[c > 1][0])} "
              f"{int(c[c > 1][0])} times: a delta must hold each changed user once")
    prev_uids = (np.concatenate([i["user_id"] for i in indexes]) if indexes
                 else np.zeros(0, np.int64))
    t1 = time.perf_counter()
    rep = share_previous(previous_files, indexes, u, args.output, model_name, version)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep["share_previous_s"] = time.perf_counter() - t1     # of wall_s: linking, indexes
    changed = int(np.isin(u, prev_uids).sum())
    users = int(u.size) + rep["users_carried"]
    report = {"model": model_name, "version": version, "engine": "batched", "mode": "delta",
              "users": users, "wall_s": wall, "cpu_s": cpu,
              "users_per_s": users / wall if wall > 0 else 0.0, "output": args.output,
              "users_to_model": counters.get("users_to_model", 0)}
    report.update({k: 0 for k in REPORT_COUNTERS})
    report.update(rep)
    report.update({"users_changed": changed, "users_new": int(u.size) - changed,
                   "removed_user_ids": []})
    if store is not None:      # the changed users only: the store holds the others
        report.update(P.load_into_store(
            os.path.join(args.output, f"{P.OUTPUT_PREFIX}-[0-9]*-of-*.tfrecord"), store))
    return report
