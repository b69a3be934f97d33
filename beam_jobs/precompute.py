"""User-cache precompute: per-user records -> ``user_tower`` (tfx-bsl RunInference) -> cache.

The ``precompute`` subcommand (``docs/serving.md``). One Apache Beam pipeline:

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

   written to ``<output>/cache-SSSSS-of-NNNNN.tfrecord.gz``.

:func:`load_into_store` reads those files into any store with ``put_many``
(``serving.cache_store``: SQLite, Redis); the CLI wires the two (``beam_jobs`` does
not import ``serving``).

Every DoFn is a pure function of its element, so the pipeline runs unchanged on
Dataflow / Flink / Spark by pipeline options. The history snapshot is the record
as given (windows end at its last behavior): write snapshot records with the
prepare job to precompute as of a cut time.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import time
from typing import Dict, Iterator, List, Sequence, Tuple

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


class PrecomputeError(ValueError, LifelongError):
    """Bad arguments (one line for the CLI)."""


# ---- cache record ------------------------------------------------------------------------
def encode_cache_record(model_name: str, model_version: int, user_id: int,
                        tensors: Dict[str, np.ndarray]) -> bytes:
    """One user's cache as a serialized ``tf.train.Example`` (see the module doc)."""
    import tensorflow as tf
    f = tf.train.Feature
    feats = {"user_id": f(int64_list=tf.train.Int64List(value=[int(user_id)])),
             "model_name": f(bytes_list=tf.train.BytesList(value=[model_name.encode("utf-8")])),
             "model_version": f(int64_list=tf.train.Int64List(value=[int(model_version)])),
             "tensor_names": f(bytes_list=tf.train.BytesList(
                 value=[n.encode("utf-8") for n in tensors]))}
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


# ---- pipeline steps -----------------------------------------------------------------------
def user_key(serialized: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """``serialized`` per-user record -> ``(b"<user_id>", serialized)``; bad records counted."""
    import tensorflow as tf
    try:
        ids = tf.train.Example.FromString(serialized).features.feature["user_id"].int64_list.value
    except Exception:  # a corrupt record: count it, never crash the job
        ids = []
    if len(ids) != 1:
        Metrics.counter(NAMESPACE, "records_without_user_id").inc()
        return
    Metrics.counter(NAMESPACE, "records_read").inc()
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
        if str(uid).encode("ascii") != key:
            raise RuntimeError(f"user_tower returned user_id {uid} for the record keyed {key!r}")
        record = encode_cache_record(self.model_name, self.model_version, uid, outputs)
        Metrics.counter(NAMESPACE, "cache_records").inc()
        yield record


def build_pipeline(p: beam.Pipeline, records: str, model_path: str, model_name: str,
                   model_version: int, output: str, num_shards: int = 0,
                   reshuffle: bool = True) -> None:
    from tfx_bsl.public.beam import RunInference
    from tfx_bsl.public.proto import model_spec_pb2

    keyed = (p
             | "ReadRecords" >> beam.io.ReadFromTFRecord(records)
             | "KeyByUser" >> beam.FlatMap(user_key).with_output_types(
                 beam.typehints.Tuple[bytes, bytes]))
    if reshuffle:
        keyed = (keyed
                 | "SpreadUsers" >> beam.Reshuffle()
                 | "Typed" >> beam.Map(lambda kv: kv).with_output_types(
                     beam.typehints.Tuple[bytes, bytes]))
    spec = model_spec_pb2.InferenceSpecType(saved_model_spec=model_spec_pb2.SavedModelSpec(
        model_path=model_path, signature_name=[SIGNATURE]))
    (keyed
     | "UserTower" >> RunInference(spec)
     | "ToCacheRecord" >> beam.ParDo(ToCacheRecord(model_name, model_version))
     | "WriteCache" >> beam.io.WriteToTFRecord(os.path.join(output, OUTPUT_PREFIX),
                                               file_name_suffix=SUFFIX, num_shards=num_shards))


# ---- reading / loading ---------------------------------------------------------------------
def cache_files(output_or_pattern: str) -> List[str]:
    pattern = (os.path.join(output_or_pattern, f"{OUTPUT_PREFIX}-*{SUFFIX}")
               if os.path.isdir(output_or_pattern) else output_or_pattern)
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no cache records match {pattern!r}")
    return files


def read_cache_records(output_or_pattern: str) -> Iterator[bytes]:
    import tensorflow as tf
    for path in cache_files(output_or_pattern):
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


def run(args, beam_args: Sequence[str] = (), store=None) -> Dict:
    """Run the pipeline (and load into ``store`` if given); returns the report."""
    model_path, model_name, version = resolve_model(args)
    if not os.path.exists(os.path.join(model_path, "saved_model.pb")):
        raise PrecomputeError(f"{model_path!r} holds no SavedModel")
    if not glob.glob(args.records):
        raise PrecomputeError(f"no record files match {args.records!r}")
    os.makedirs(args.output, exist_ok=True)
    stale = glob.glob(os.path.join(args.output, f"{OUTPUT_PREFIX}-*{SUFFIX}"))
    for path in stale:       # a rerun replaces the previous cache files
        os.remove(path)
    options = PipelineOptions(list(beam_args))
    print(f"[precompute] {model_name} v{version} ({model_path}) on {args.records} -> "
          f"{args.output}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, args.records, os.path.abspath(model_path), model_name, version,
                       args.output, args.num_shards, reshuffle=not args.no_reshuffle)
    wall = time.perf_counter() - t0
    users = sum(1 for _ in read_cache_records(args.output))
    report = {"model": model_name, "version": version, "users": users, "wall_s": wall,
              "users_per_s": users / wall if wall > 0 else 0.0, "output": args.output}
    if store is not None:
        report.update(load_into_store(args.output, store))
    return report
