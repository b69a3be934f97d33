"""User-cache precompute: per-user records -> ``user_tower`` (tfx-bsl RunInference) -> cache.

The ``precompute`` subcommand (``docs/serving.md``). :func:`run` dispatches to one of
two engines that write the same cache records: ``--engine batched`` (the default,
:mod:`beam_jobs.precompute_batched`: users in chunks and batches, uncompressed shards
with a row index) or ``--engine runinference``, this module's pipeline, one Beam
element per user:

1. ``ReadFromTFRecord`` the per-user records that ``lifelong prepare`` wrote
   (gzip detected from the file name);
2. key each record by its user id: ``(b"<user_id>", serialized)``, declared
   ``Tuple[bytes, bytes]`` (without the declaration Beam picks a proto coder and
   fails with "'tuple' object has no attribute 'SerializePartialToString'");
   ``RunInference``'s PredictionLog would echo the whole record, the key is how a
   result finds its user;
3. ``beam.Reshuffle()`` (a single input file is one bundle; a distributed runner
   spreads the users over workers);
4. tfx-bsl ``RunInference`` with a ``SavedModelSpec`` naming the ``user_tower``
   signature (one string input: exactly what its Predict path feeds);
5. one **cache record** per user (a ``tf.train.Example``)::

       user_id        int64   the user
       model_name     bytes   the served model name
       model_version  int64   the exported version the cache belongs to
       tensor_names   bytes[] the user_tower outputs stored (all but user_id)
       t/<name>       float_list | int64_list   values, flattened row-major
       t/<name>/shape int64_list   shape, with the leading batch dimension 1
       t/<name>/dtype bytes        NumPy dtype string, e.g. "<f4", "<i8"
       history_fingerprint bytes   16-byte BLAKE2b of the user's history fields
                                   (:func:`history_fingerprint`; absent in caches
                                   written before it: incremental refresh then
                                   recomputes the user)
       last_behavior_ts    int64   the history's last timestamp (absent: empty history)

   written to ``<output>/cache-SSSSS-of-NNNNN.tfrecord.gz``.

:func:`load_into_store` reads those files into any store with ``put_many``
(``serving.cache_store``: SQLite, Redis); the CLI wires the two (``beam_jobs`` does
not import ``serving``).

Every DoFn is a pure function of its element, so the pipeline runs unchanged on
Dataflow / Flink / Spark by pipeline options. The history snapshot is the record
as given (windows end at its last behavior): write snapshot records with the
prepare job to precompute as of a cut time.

Incremental refresh (``--previous_cache``, :mod:`beam_jobs.precompute_incremental`):
join the new records with a previous cache by user, carry over the rows whose
model, version and history fingerprint are unchanged, recompute only the others.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from tfmodels.errors import LifelongError
from beam_jobs import flags
import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

NAMESPACE = "precompute"
OUTPUT_PREFIX = "cache"
SUFFIX = ".tfrecord.gz"
SIGNATURE = "user_tower"
FINGERPRINT = "history_fingerprint"    # cache record features (module doc)
LAST_TS = "last_behavior_ts"


#: ``--engine``: ``batched`` (:mod:`beam_jobs.precompute_batched`, the default) or
#: ``runinference`` (this module's tfx-bsl RunInference pipeline, one Beam element per
#: user; kept to measure the batched engine against and for its per-user Beam graph)
ENGINES = ("batched", "runinference")


class PrecomputeError(ValueError, LifelongError):
    """Bad arguments (one line for the CLI)."""


# ---- cache record ------------------------------------------------------------------------
def encode_cache_record(model_name: str, model_version: int, user_id: int,
                        tensors: Dict[str, np.ndarray], fingerprint: Optional[bytes] = None,
                        last_behavior_ts: Optional[int] = None) -> bytes:
    """One user's cache as a serialized ``tf.train.Example`` (see the module doc)."""
    import tensorflow as tf
    f = tf.train.Feature
    feats = {"user_id": f(int64_list=tf.train.Int64List(value=[int(user_id)])),
             "model_name": f(bytes_list=tf.train.BytesList(value=[model_name.encode("utf-8")])),
             "model_version": f(int64_list=tf.train.Int64List(value=[int(model_version)])),
             "tensor_names": f(bytes_list=tf.train.BytesList(
                 value=[n.encode("utf-8") for n in tensors]))}
    if fingerprint is not None:
        feats[FINGERPRINT] = f(bytes_list=tf.train.BytesList(value=[bytes(fingerprint)]))
    if last_behavior_ts is not None:
        feats[LAST_TS] = f(int64_list=tf.train.Int64List(value=[int(last_behavior_ts)]))
    for name, value in tensors.items():
        arr = np.asarray(value)
        flat = arr.reshape(-1)
        if arr.dtype.kind == "f":
            feats[f"t/{name}"] = f(float_list=tf.train.FloatList(value=flat.astype(np.float32)))
        elif arr.dtype.kind in "iub":
            feats[f"t/{name}"] = f(int64_list=tf.train.Int64List(value=flat.astype(np.int64)))
        else:
            raise ValueError(f"cache tensor {name!r} has unsupported dtype {arr.dtype}")
        feats[f"t/{name}/shape"] = f(int64_list=tf.train.Int64List(value=list(arr.shape)))
        dt = arr.dtype.newbyteorder("<").str if arr.dtype.itemsize > 1 else arr.dtype.str
        feats[f"t/{name}/dtype"] = f(bytes_list=tf.train.BytesList(value=[dt.encode("ascii")]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def decode_cache_record(serialized: bytes) -> Tuple[str, int, int, Dict[str, np.ndarray]]:
    """-> ``(model_name, user_id, model_version, {name: array})`` (the store's put_many tuple)."""
    import tensorflow as tf
    ex = tf.train.Example.FromString(serialized)
    feat = ex.features.feature
    tensors = {}
    for raw in feat["tensor_names"].bytes_list.value:
        name = raw.decode("utf-8")
        dtype = np.dtype(feat[f"t/{name}/dtype"].bytes_list.value[0].decode("ascii"))
        shape = list(feat[f"t/{name}/shape"].int64_list.value)
        values = feat[f"t/{name}"]
        kind = values.WhichOneof("kind")
        data = np.asarray(getattr(values, kind).value)
        tensors[name] = data.astype(dtype).reshape(shape)
    return (feat["model_name"].bytes_list.value[0].decode("utf-8"),
            int(feat["user_id"].int64_list.value[0]),
            int(feat["model_version"].int64_list.value[0]), tensors)


class CacheMeta(NamedTuple):
    """What incremental refresh reads of a cache record (no tensors decoded)."""
    user_id: int
    model_name: str
    model_version: int
    fingerprint: Optional[bytes]        # None: a cache written before fingerprints
    last_behavior_ts: Optional[int]


def cache_record_meta(serialized: bytes) -> CacheMeta:
    """The identity and history fingerprint of one cache record (old records: None)."""
    import tensorflow as tf
    feat = tf.train.Example.FromString(serialized).features.feature
    fp = feat[FINGERPRINT].bytes_list.value if FINGERPRINT in feat else []
    last = feat[LAST_TS].int64_list.value if LAST_TS in feat else []
    return CacheMeta(int(feat["user_id"].int64_list.value[0]),
                     feat["model_name"].bytes_list.value[0].decode("utf-8"),
                     int(feat["model_version"].int64_list.value[0]),
                     bytes(fp[0]) if fp else None, int(last[0]) if last else None)


# ---- history fingerprint -------------------------------------------------------------------
#: the per-user record fields the user tower reads (the schema's HISTORY_FIELDS; kept
#: here as names so this module needs no schema import): a change in any of them
#: changes the fingerprint. Impressions and user_key are not read by user_tower.
HISTORY_FIELD_NAMES = ("hist_item_id", "hist_cate_id", "hist_ts", "hist_engage",
                       "hist_domain", "hist_cluster_size")
_FINGERPRINT_VERSION = b"lifelong-history-fingerprint-v1"


def extra_history_fields(names) -> List[str]:
    """The present fields, beyond :data:`HISTORY_FIELD_NAMES`, that the fingerprint also
    hashes (sorted, each only when present, so a record without them hashes as before):
    any other ``hist_*`` field and ``record_format`` (a compact per-user record stores
    its history as ``hist_ts_delta``, ``hist_engage_q``, ...). Not covered: an item
    table a compact record's history is read through; a changed item table needs a full
    refresh, as a new model version does."""
    return sorted(n for n in names if n not in HISTORY_FIELD_NAMES
                  and (n.startswith("hist_") or n == "record_format"))


def history_fingerprint(feature_map) -> Tuple[bytes, Optional[int]]:
    """``(16-byte BLAKE2b, last behavior ts or None)`` of a parsed per-user record's
    ``features.feature`` map.

    Each history field is hashed as its serialized ``tf.train.Feature`` (one packed
    list, deterministic for the same values, unlike a whole Example whose map order
    protobuf does not fix), in a fixed field order with its name; an absent field
    hashes as absent. So equal fingerprints mean equal history values, and a record
    that spells an optional field out (``hist_cluster_size`` all 1) differs from one
    that leaves it out: a conservative recompute, never a wrong carry-over. BLAKE2b
    from the standard library: stable across processes and machines (Python's
    ``hash`` is salted per process).
    """
    h = hashlib.blake2b(_FINGERPRINT_VERSION, digest_size=16)
    for name in HISTORY_FIELD_NAMES:
        h.update(name.encode("ascii"))
        if name in feature_map:
            data = feature_map[name].SerializeToString()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        else:
            h.update(b"\xff" * 8)
    for name in extra_history_fields(feature_map):
        data = feature_map[name].SerializeToString()
        h.update(name.encode("utf-8") + len(data).to_bytes(8, "little"))
        h.update(data)
    ts = feature_map["hist_ts"].int64_list.value if "hist_ts" in feature_map else []
    return h.digest(), (int(ts[-1]) if len(ts) else None)


def make_key(user_id: int, fingerprint: Optional[bytes] = None,
             last_behavior_ts: Optional[int] = None) -> bytes:
    """The pipeline key of a record: ``b"<user_id>"`` or
    ``b"<user_id>|<fingerprint hex>|<last ts or empty>"`` (the key is what travels
    through RunInference with its result, so the fingerprint rides in it)."""
    key = str(int(user_id)).encode("ascii")
    if fingerprint is None:
        return key
    last = b"" if last_behavior_ts is None else str(int(last_behavior_ts)).encode("ascii")
    return key + b"|" + fingerprint.hex().encode("ascii") + b"|" + last


def parse_key(key: bytes) -> Tuple[int, Optional[bytes], Optional[int]]:
    """Inverse of :func:`make_key`."""
    parts = key.split(b"|")
    uid = int(parts[0])
    if len(parts) == 1:
        return uid, None, None
    return uid, bytes.fromhex(parts[1].decode("ascii")), (int(parts[2]) if parts[2] else None)


# ---- pipeline steps -----------------------------------------------------------------------
def user_key(serialized: bytes, fingerprint: bool = False) -> Iterator[Tuple[bytes, bytes]]:
    """``serialized`` per-user record -> ``(b"<user_id>", serialized)``; bad records counted.
    ``fingerprint``: the key also carries the history fingerprint (:func:`make_key`)."""
    import tensorflow as tf
    try:
        feat = tf.train.Example.FromString(serialized).features.feature
        ids = feat["user_id"].int64_list.value
    except Exception:  # a corrupt record: count it, never crash the job
        ids = []
    if len(ids) != 1:
        Metrics.counter(NAMESPACE, "records_without_user_id").inc()
        return
    Metrics.counter(NAMESPACE, "records_read").inc()
    if fingerprint:
        yield (make_key(int(ids[0]), *history_fingerprint(feat)), serialized)
    else:
        yield (str(int(ids[0])).encode("ascii"), serialized)


class ToCacheRecord(beam.DoFn):
    """``(key, PredictionLog)`` -> serialized cache record."""

    def __init__(self, model_name: str, model_version: int):
        self.model_name, self.model_version = model_name, int(model_version)

    def process(self, element):
        import tensorflow as tf
        key, log = element
        outputs = {k: tf.make_ndarray(v) for k, v in log.predict_log.response.outputs.items()}
        uid = int(outputs.pop("user_id").reshape(-1)[0])
        key_uid, fingerprint, last_ts = parse_key(key)
        if uid != key_uid:
            raise RuntimeError(f"user_tower returned user_id {uid} for the record keyed {key!r}")
        record = encode_cache_record(self.model_name, self.model_version, uid, outputs,
                                     fingerprint, last_ts)
        Metrics.counter(NAMESPACE, "cache_records").inc()
        yield record


def infer_cache_records(keyed, model_path: str, model_name: str, model_version: int,
                        reshuffle: bool = True):
    """``(key, serialized record)`` PCollection -> serialized cache records, through
    ``user_tower`` (RunInference). The number of users it sees is the
    ``precompute/users_to_model`` counter."""
    from tfx_bsl.public.beam import RunInference
    from tfx_bsl.public.proto import model_spec_pb2

    if reshuffle:
        keyed = (keyed
                 | "SpreadUsers" >> beam.Reshuffle()
                 | "Typed" >> beam.Map(lambda kv: kv).with_output_types(
                     beam.typehints.Tuple[bytes, bytes]))
    spec = model_spec_pb2.InferenceSpecType(saved_model_spec=model_spec_pb2.SavedModelSpec(
        model_path=model_path, signature_name=[SIGNATURE]))
    return (keyed
            | "CountToModel" >> beam.Map(_count_to_model).with_output_types(
                beam.typehints.Tuple[bytes, bytes])
            | "UserTower" >> RunInference(spec)
            | "ToCacheRecord" >> beam.ParDo(ToCacheRecord(model_name, model_version)))


def _count_to_model(kv):
    Metrics.counter(NAMESPACE, "users_to_model").inc()
    return kv


def write_cache(records, output: str, num_shards: int = 0):
    return records | "WriteCache" >> beam.io.WriteToTFRecord(
        os.path.join(output, OUTPUT_PREFIX), file_name_suffix=SUFFIX, num_shards=num_shards)


def read_keyed_records(p: beam.Pipeline, records: str):
    """Per-user records -> ``(key with fingerprint, serialized)``."""
    return (p
            | "ReadRecords" >> beam.io.ReadFromTFRecord(records)
            | "KeyByUser" >> beam.FlatMap(user_key, fingerprint=True).with_output_types(
                beam.typehints.Tuple[bytes, bytes]))


def build_pipeline(p: beam.Pipeline, records: str, model_path: str, model_name: str,
                   model_version: int, output: str, num_shards: int = 0,
                   reshuffle: bool = True) -> None:
    """The full precompute: every user of ``records`` through ``user_tower``."""
    keyed = read_keyed_records(p, records)
    write_cache(infer_cache_records(keyed, model_path, model_name, model_version, reshuffle),
                output, num_shards)


# ---- reading / loading ---------------------------------------------------------------------
#: the cache file names of both engines: gzip (RunInference engine, ``--cache_compression
#: gzip``) and uncompressed (the batched engine's default)
SUFFIXES = (SUFFIX, ".tfrecord")


def cache_files(output_or_pattern: str) -> List[str]:
    if os.path.isdir(output_or_pattern):
        pattern = os.path.join(output_or_pattern, f"{OUTPUT_PREFIX}-*.tfrecord*")
        files = sorted(f for f in glob.glob(pattern) if f.endswith(SUFFIXES))
    else:
        pattern = output_or_pattern
        files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no cache records match {pattern!r}")
    return files


def read_cache_records(output_or_pattern: str) -> Iterator[bytes]:
    import tensorflow as tf
    from beam_jobs import precompute_batched as B
    for path in cache_files(output_or_pattern):
        if B.is_sparse(path):    # a delta refresh's shared shard: its live rows only
            yield from B.live_records(path)
            continue
        comp = "GZIP" if path.endswith(".gz") else ""
        for rec in tf.data.TFRecordDataset(path, compression_type=comp).as_numpy_iterator():
            yield rec


def load_into_store(output_or_pattern: str, store, batch: int = 500) -> Dict[str, float]:
    """Put every cache record into ``store`` (anything with ``put_many`` of entry tuples)."""
    n, record_bytes, chunk = 0, 0, []
    for rec in read_cache_records(output_or_pattern):
        record_bytes += len(rec)
        chunk.append(decode_cache_record(rec))
        if len(chunk) >= batch:
            n += store.put_many(chunk)
            chunk = []
    if chunk:
        n += store.put_many(chunk)
    return {"loaded": n, "record_bytes_per_user": record_bytes / max(n, 1)}


# ---- CLI -----------------------------------------------------------------------------------
# The flags live in beam_jobs/flags.py (no Beam, no TensorFlow there): `lifelong
# precompute --help` is fast.
add_arguments = flags.add_precompute_arguments

def resolve_model(args) -> Tuple[str, str, int]:
    """-> (SavedModel version folder, served model name, version)."""
    if args.model_dir:
        path = os.path.normpath(args.model_dir)
        version = os.path.basename(path)
        if not re.fullmatch(r"[0-9]{1,18}", version):
            raise PrecomputeError(f"--model_dir {args.model_dir!r} is not a numbered version folder")
        return path, args.model or os.path.basename(os.path.dirname(path)), int(version)
    if not args.model or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", args.model) \
            or ".." in args.model:
        raise PrecomputeError(f"give a valid --model NAME (got {args.model!r}) or --model_dir")
    mdir = os.path.join(args.base, args.model)
    versions = sorted(int(v) for v in (os.listdir(mdir) if os.path.isdir(mdir) else [])
                      if re.fullmatch(r"[0-9]{1,18}", v))
    if not versions:
        raise PrecomputeError(f"no exported versions under {mdir!r} (run `lifelong export`)")
    version = args.version if args.version is not None else versions[-1]
    if version not in versions:
        raise PrecomputeError(f"{args.model} has no version {version}; versions: {versions}")
    return os.path.join(mdir, str(version)), args.model, version


def _counters(result) -> Dict[str, int]:
    """The ``precompute`` namespace's committed counters of a finished pipeline."""
    from apache_beam.metrics.metric import MetricsFilter
    out = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def run(args, beam_args: Sequence[str] = (), store=None) -> Dict:
    """Run the pipeline (and load into ``store`` if given); returns the report.

    With ``args.previous_cache`` (a folder or glob of cache records) the run is an
    incremental refresh (:mod:`beam_jobs.precompute_incremental`); the report then
    counts carried, recomputed, new and removed users, and a store given gets the
    whole new cache and loses the removed users' entries."""
    if getattr(args, "changed_records", None):   # a delta refresh: the changed users only
        from beam_jobs import precompute_incremental as INC
        return INC.run_delta(args, beam_args, store)
    model_path, model_name, version = resolve_model(args)
    if not os.path.exists(os.path.join(model_path, "saved_model.pb")):
        raise PrecomputeError(f"{model_path!r} holds no SavedModel")
    if not getattr(args, "records", None):
        raise PrecomputeError("give --records (every user's records) or, with "
                              "--previous_cache, --changed_records (the changed users')")
    if not glob.glob(args.records):
        raise PrecomputeError(f"no record files match {args.records!r}")
    previous = getattr(args, "previous_cache", None)
    previous_files: List[str] = []
    if previous:
        try:
            previous_files = cache_files(previous)
        except FileNotFoundError:
            raise PrecomputeError(f"--previous_cache {previous!r} holds no cache records "
                                  f"({OUTPUT_PREFIX}-*{SUFFIX})") from None
        out_abs = os.path.abspath(args.output)
        if any(os.path.dirname(os.path.abspath(f)) == out_abs for f in previous_files):
            raise PrecomputeError("--previous_cache must not be the --output folder (the "
                                  "output's old cache files are deleted before the run)")
    engine = getattr(args, "engine", "batched") or "batched"
    if engine not in ENGINES:
        raise PrecomputeError(f"--engine must be one of {ENGINES}, got {engine!r}")
    compression = getattr(args, "cache_compression", None) or "none"
    batch_size = getattr(args, "batch_size", None)
    batch_size = 64 if batch_size is None else int(batch_size)
    if engine == "batched":
        from beam_jobs import precompute_batched as B
        if compression not in B.COMPRESSIONS or batch_size < 1:
            raise PrecomputeError(f"--cache_compression must be one of {B.COMPRESSIONS} "
                                  f"(got {compression!r}) and --batch_size >= 1 "
                                  f"(got {batch_size})")
    os.makedirs(args.output, exist_ok=True)
    stale = [f for f in glob.glob(os.path.join(args.output, f"{OUTPUT_PREFIX}-*.tfrecord*"))
             if f.endswith(SUFFIXES)]
    stale += glob.glob(os.path.join(args.output, "index-*-of-*.npz"))  # the batched engine's
    if previous:
        from beam_jobs import precompute_incremental as INC
        stale += glob.glob(os.path.join(args.output, f"{INC.REMOVED_PREFIX}-*"))
    for path in stale:       # a rerun replaces the previous cache files
        os.remove(path)
    options = PipelineOptions(list(beam_args))
    print(f"[precompute] {model_name} v{version} ({model_path}) on {args.records} -> "
          f"{args.output}" + (f" (incremental over {previous})" if previous else ""),
          file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    p = beam.Pipeline(options=options)
    if engine == "batched":
        B.build_pipeline(p, sorted(glob.glob(args.records)), previous_files,
                         os.path.abspath(model_path), model_name, version, args.output,
                         args.num_shards, batch_size, compression)
    elif previous:
        INC.build_incremental_pipeline(
            p, args.records, previous_files, os.path.abspath(model_path), model_name, version,
            args.output, args.num_shards, reshuffle=not args.no_reshuffle)
    else:
        build_pipeline(p, args.records, os.path.abspath(model_path), model_name, version,
                       args.output, args.num_shards, reshuffle=not args.no_reshuffle)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - t0
    # CPU seconds of this process, every thread (the DirectRunner and TensorFlow run in
    # it): on a shared machine a steadier cost than the wall time
    cpu = time.process_time() - c0
    counters = _counters(result)
    # users written = model outputs + carried rows, from the job's counters (reading the
    # output back through tf.data cost ~0.6 ms per user, 1.7 s of 3,000, timed or not)
    users = counters.get("cache_records", 0) + counters.get("users_carried", 0)
    report = {"model": model_name, "version": version, "engine": engine,
              "users": users, "wall_s": wall,
              "cpu_s": cpu,
              "users_per_s": users / wall if wall > 0 else 0.0, "output": args.output,
              "users_to_model": counters.get("users_to_model", 0)}
    if previous:
        report.update({k: counters.get(k, 0) for k in INC.REPORT_COUNTERS})
        report["removed_user_ids"] = INC.read_removed(args.output)
    if store is not None:
        report.update(load_into_store(args.output, store))
        if previous:
            report["deleted_from_store"] = sum(
                bool(store.delete(model_name, uid)) for uid in report["removed_user_ids"])
    if previous and len(report["removed_user_ids"]) > 20:   # the file lists them all
        report["removed_user_ids"] = report["removed_user_ids"][:20] + ["..."]
    return report
