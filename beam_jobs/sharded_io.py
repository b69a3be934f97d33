"""Files, shards and counts shared by the Beam jobs (:mod:`beam_jobs.prepare`,
:mod:`beam_jobs.cluster`).

* A split of a dataset is ``<folder>/<split>-SSSSS-of-NNNNN.tfrecord.gz``:
  :func:`read_split` / :func:`write_split` are its Beam reader and writer,
  :func:`split_files` lists the shards it has.
* Small text files (vocabularies, the pipeline's own counts) are written from a
  worker and read back by the driver: :func:`write_text_file`, :func:`read_text_file`.
* A job's report is summed from per-bundle count dictionaries: a
  :class:`CountingDoFn` emits one per bundle as the tagged output ``counts``,
  :class:`WriteCounts` adds them up (:class:`SumCounts`: numbers are summed, nested
  dictionaries merged) into one JSON file that the driver reads back.
  This works the same on every runner, unlike Beam metrics, which some runners do
  not report; those are also kept (:class:`Counters`) and read back with
  :func:`query_counters` when the runner has them.

Everything goes through ``FileSystems``, so local paths and gs://, s3://, hdfs://
work alike.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from tfmodels import schema as S

TFRECORD_SUFFIX = ".tfrecord.gz"


# ---- files ---------------------------------------------------------------------------------


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def write_text_file(content: str, path: str) -> None:
    """Write one small file from a worker (idempotent: a retry rewrites it)."""
    with FileSystems.create(path) as f:
        f.write(content.encode("utf-8"))


def read_text_file(path: str, errors: str = "strict") -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8", errors=errors)


def match_paths(patterns: Iterable[str]) -> List[str]:
    """Every file matching any of the glob ``patterns``."""
    found: List[str] = []
    for res in FileSystems.match(list(patterns)):
        found.extend(m.path for m in res.metadata_list)
    return found


# ---- sharded TFRecords of a split ------------------------------------------------------------


def split_files(folder: str, split: str) -> List[str]:
    """The shard files of ``split`` in ``folder``, sorted."""
    return sorted(match_paths([S.split_pattern(folder, split)]))


def read_split(folder: str, split: str) -> beam.PTransform:
    """Serialized records of every shard of ``split`` (gzip TFRecords)."""
    return beam.io.ReadFromTFRecord(S.split_pattern(folder, split),
                                    coder=beam.coders.BytesCoder(),
                                    compression_type=CompressionTypes.GZIP)


def shard_of(record: bytes, num_shards: int) -> int:
    """The shard a serialized record goes to: a hash of its bytes, so the same records
    land in the same shard on every run, runner and bundle split."""
    return _digest(record) % num_shards


def _keyed(record: bytes, num_shards: int):
    """record -> (its shard, (its hash, record)): the hash is computed once and serves
    both the shard (:func:`shard_of`) and the order within it."""
    digest = _digest(record)
    return digest % num_shards, (digest, record)


def _digest(record: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(record, digest_size=8).digest(), "little")


class _WriteShard(beam.DoFn):
    """(shard index, (hash, record) pairs) -> one gzip TFRecord file, records in a
    fixed order (their hash, then their bytes), written under a temporary name and renamed when
    complete, so a retried bundle rewrites the shard whole."""

    def __init__(self, prefix: str, num_shards: int):
        self._prefix = prefix
        self._n = num_shards

    def process(self, element):
        # Beam has no public per-file TFRecord writer; _TFRecordUtil is the framing its
        # own WriteToTFRecord uses (and beam_jobs.precompute_batched writes with)
        from apache_beam.io.tfrecordio import _TFRecordUtil
        index, records = element
        rows = sorted(r for r in records if r is not None)   # (hash, bytes) pairs
        path = shard_path(self._prefix, index, self._n)
        folder, name = FileSystems.split(path)
        tmp = FileSystems.join(folder, f".tmp-{name}")
        with FileSystems.create(tmp, compression_type=CompressionTypes.GZIP) as out:
            for _, r in rows:
                _TFRecordUtil.write_record(out, r)
        FileSystems.rename([tmp], [path])
        yield path


def shard_path(prefix: str, index: int, num_shards: int) -> str:
    """``<prefix>-SSSSS-of-NNNNN.tfrecord.gz``, the name Beam's sharded writers use."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{TFRECORD_SUFFIX}"


class _WriteSplit(beam.PTransform):
    def __init__(self, folder: str, split: str, num_shards: int):
        super().__init__()
        if int(num_shards) < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self._prefix = join(folder, split)
        self._n = int(num_shards)

    def expand(self, records):
        n = self._n
        keyed = records | "ShardKey" >> beam.Map(_keyed, n)
        # one marker per shard, so that a shard no record hashes to is still written
        markers = records.pipeline | "ShardMarkers" >> beam.Create([(i, None) for i in range(n)])
        return ((keyed, markers) | "WithMarkers" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(self._prefix, n)))


def write_split(folder: str, split: str, num_shards: int) -> beam.PTransform:
    """Serialized records -> ``<folder>/<split>-SSSSS-of-NNNNN.tfrecord.gz``.

    Deterministic, unlike ``WriteToTFRecord(num_shards=N)``, whose round-robin starts
    at a random shard per bundle (the same records, but under other shard names from
    run to run, so a seeded file shuffle read them in another order): a record's shard
    is a hash of its bytes (:func:`shard_of`) and a shard's records are written in a
    fixed order, so two runs over the same input write byte-identical files. A shard
    is held in one worker's memory while it is written: raise ``num_shards`` for
    larger splits.
    """
    return _WriteSplit(folder, split, num_shards)


# ---- the job's report: per-bundle counts, summed -----------------------------------------------


def merge_counts(acc: Dict[str, Any], d: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively add ``d`` into ``acc``: numbers are summed, other leaves overwritten."""
    for k, v in d.items():
        if isinstance(v, dict):
            merge_counts(acc.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v
        else:
            acc[k] = v
    return acc


def sum_counts(parts: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """The sum (:func:`merge_counts`) of count dictionaries, as a new dictionary."""
    out: Dict[str, Any] = {}
    for d in parts:
        merge_counts(out, d)
    return out


class SumCounts(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, d):
        return merge_counts(acc, d)

    def merge_accumulators(self, accs):
        out: Dict[str, Any] = {}
        for a in accs:
            merge_counts(out, a)
        return out

    def extract_output(self, acc):
        return acc


class WriteCounts(beam.PTransform):
    """Count dictionaries (a tuple of PCollections) -> their sum as one JSON file at
    ``path`` (sorted keys), which the driver reads back after the run."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, parts):
        return (parts
                | "AllCounts" >> beam.Flatten()
                | "SumCounts" >> beam.CombineGlobally(SumCounts())
                | "CountsJson" >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
                | "WriteCounts" >> beam.Map(write_text_file, self._path))


class Counters:
    """Beam counters by name, created lazily (Metrics objects are cheap delegates)."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._c: Dict[str, Any] = {}

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            c = self._c.get(name)
            if c is None:
                c = self._c[name] = Metrics.counter(self._namespace, name)
            c.inc(n)


class CountingDoFn(beam.DoFn):
    """A DoFn that sums its report contributions per bundle (``self._count``) and emits
    them once, as the tagged output ``counts``, in ``finish_bundle`` (no state outlives
    a bundle). ``self._counters`` are its Beam counters in :attr:`namespace`."""

    namespace = "beam_jobs"

    def setup(self):
        self._counters = Counters(self.namespace)

    def start_bundle(self):
        self._bundle_counts: Dict[str, Any] = {}

    def _count(self, d: Mapping[str, Any]) -> None:
        merge_counts(self._bundle_counts, d)

    def finish_bundle(self):
        if self._bundle_counts:
            yield beam.pvalue.TaggedOutput("counts", WindowedValue(
                self._bundle_counts, GlobalWindow().max_timestamp(), [GlobalWindow()]))
        self._bundle_counts = {}


def query_counters(result, namespace: str) -> Optional[Dict[str, int]]:
    """The job's Beam counters ``{name: value}``, or None when the runner has none."""
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return None
    out: Dict[str, int] = {}
    for c in res.get("counters", []):
        value = c.committed if c.committed is not None else c.attempted
        if value is None:
            continue
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value)
    return out
