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
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Sequence, Tuple

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
            | "ReadPrevious" >> beam.io.ReadAllFromTFRecord()
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
