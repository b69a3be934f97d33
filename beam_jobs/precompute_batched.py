"""Batched user-cache precompute and incremental refresh (``--engine batched``, the default).

Issue 19 items 1 and 2. The RunInference engine (``--engine runinference``,
:mod:`beam_jobs.precompute` and :mod:`beam_jobs.precompute_incremental`) moves every
user through Beam one element at a time: it parses the whole record in Python to
key and fingerprint it, sends it through tfx-bsl ``RunInference`` (which builds a
``PredictionLog`` with one ``TensorProto`` per output per user), rebuilds a
``tf.train.Example`` from Python lists per user, and gzips every row. A profile at
L = 1,000 (docs/benchmarks.md, "User-cache precompute throughput") found those
per-user Python steps, not the model, to dominate. This engine keeps the same
cache record format and the same results, with users handled in batches:

1. ``ScanFile`` (one element per input file): ``tf.data`` reads the file (gunzip
   in C++) and each record is keyed by **scanning its protobuf wire format**
   (:func:`scan_features`): the user id and the history fingerprint come from the
   raw bytes of the history fields, no ``tf.train.Example`` is built. Users are
   grouped into ``num_shards`` buckets (``user_id % num_shards``) and sent on as
   chunks of up to :data:`CHUNK` users: the Beam elements are chunks, not users.
   With ``--previous_cache`` the previous cache files are scanned the same way
   (their tensors are skipped, not decoded).
2. ``GroupByKey`` on the bucket (the shuffle a distributed runner spreads over
   workers; a bucket must fit one worker's memory: raise ``--num_shards`` for more
   users).
3. ``RefreshBucket``: per bucket, the same per-user decision as the RunInference
   engine's ``Classify`` (same counters); carried rows are written as read, byte
   for byte; the others go through the SavedModel's ``user_tower`` signature in
   batches of ``--batch_size`` (loaded once per worker) and are encoded as cache
   records by tfx-bsl's C++ ``RecordBatchToExamples`` (one call per batch); the
   bucket's rows are written to ``cache-BBBBB-of-NNNNN.tfrecord[.gz]`` (a temporary
   name, renamed when complete, so a retried bundle rewrites it whole).

Output compression (``--cache_compression``): ``none`` by default for this engine.
A cache row is mostly float32 values (DIN-L: 68.7 KB per user at L = 1,000), which
zlib shrinks little and slowly (measured: ~2.6 ms of CPU per DIN-L row at level 1,
more than the model's user_tower), and an incremental refresh would have to
gunzip and re-gzip every carried row. ``gzip`` is kept as an option.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import precompute as P

NEW, PREV = "new", "prev"
#: users per element between the scan and the per-bucket step
CHUNK = 2048
#: the most previous-cache rows whose (user, fingerprint) a new-records scan holds
#: (24 bytes each) to tell likely carried users from the others (:class:`ScanFile`)
PREFILTER_MAX = 20_000_000
REMOVED = "removed"
COMPRESSIONS = ("none", "gzip")


def suffix(compression: str) -> str:
    return ".tfrecord.gz" if compression == "gzip" else ".tfrecord"


# ---- protobuf wire-format scanning ---------------------------------------------------------
# Hand-written instead of tf.train.Example.FromString: a per-user record at L = 1,000
# is ~14.5 KB and a DIN-L cache row ~68.7 KB; parsing the whole message in Python to
# read a handful of small fields cost ~0.3 ms per record (the fingerprint re-serialized
# every history field too). The scan only walks the top-level map entries of
# Example.features (a dozen per record) and returns byte ranges; anything it does not
# recognise as a plain, canonical encoding makes it return None, and the caller falls
# back to the protobuf parser (so the scan can only be slower, never differently right).

def _varint(buf, pos: int) -> Tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(buf, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"wire type {wire}")


def scan_features(buf: bytes) -> Optional[Dict[str, Tuple[int, int]]]:
    """``{feature name: (start, end)}`` of each ``tf.train.Feature`` value's bytes in a
    serialized ``tf.train.Example``; None when the encoding is not the plain one this
    scan reads (``features`` twice, a name twice, an unknown field inside a map entry,
    truncation): the caller then parses the message."""
    try:
        n = len(buf)
        pos, feats_at = 0, None
        while pos < n:
            tag, pos = _varint(buf, pos)
            if tag == 0x0A:                     # Example.features (1, length-delimited)
                if feats_at is not None:
                    return None                 # protobuf would merge the two
                size, pos = _varint(buf, pos)
                feats_at = (pos, pos + size)
                pos += size
            else:
                pos = _skip(buf, pos, tag & 7)
        if pos != n or feats_at is None:
            return None if pos != n else {}
        out: Dict[str, Tuple[int, int]] = {}
        pos, end = feats_at
        while pos < end:
            tag = buf[pos]
            if tag != 0x0A:                     # Features.feature map entry (1)
                tag, pos = _varint(buf, pos)
                pos = _skip(buf, pos, tag & 7)
                continue
            size, pos = _varint(buf, pos + 1)
            entry_end = pos + size
            # the canonical entry: key (0x0A, short length), then value (0x12)
            if buf[pos] == 0x0A and buf[pos + 1] < 0x80:
                ln = buf[pos + 1]
                key = buf[pos + 2:pos + 2 + ln].decode("utf-8")
                pos += 2 + ln
                if pos == entry_end:
                    value = (pos, pos)
                elif buf[pos] == 0x12:
                    ln, vpos = _varint(buf, pos + 1)
                    value = (vpos, vpos + ln)
                    pos = vpos + ln
                else:
                    return None
            else:
                return None
            if pos != entry_end or key in out:
                return None
            out[key] = value
        return out if pos == end else None
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _feature(buf, span):
    import tensorflow as tf
    return tf.train.Feature.FromString(bytes(buf[span[0]:span[1]]))


def record_key(serialized: bytes) -> Optional[Tuple[int, bytes, Optional[int]]]:
    """``(user_id, history fingerprint, last behavior ts)`` of a per-user record, from
    its raw bytes; None for a record without exactly one user id.

    The fingerprint equals :func:`beam_jobs.precompute.history_fingerprint` (tested):
    each history field's raw ``Feature`` bytes are what ``SerializeToString`` of the
    parsed field gives for a record written by protobuf or TensorFlow (packed lists).
    A record encoded otherwise (unpacked lists) gets another fingerprint than its
    parsed values would: a needless recompute, never a wrong carry-over, since equal
    bytes still mean equal values."""
    spans = scan_features(serialized)
    if spans is None:                                   # fall back to the parser
        import tensorflow as tf
        try:
            feat = tf.train.Example.FromString(serialized).features.feature
            ids = feat["user_id"].int64_list.value if "user_id" in feat else []
        except Exception:
            return None
        if len(ids) != 1:
            return None
        return (int(ids[0]), *P.history_fingerprint(feat))
    if "user_id" not in spans:
        return None
    ids = _feature(serialized, spans["user_id"]).int64_list.value
    if len(ids) != 1:
        return None
    h = hashlib.blake2b(P._FINGERPRINT_VERSION, digest_size=16)
    for name in P.HISTORY_FIELD_NAMES:
        h.update(name.encode("ascii"))
        if name in spans:
            a, b = spans[name]
            h.update((b - a).to_bytes(8, "little"))
            h.update(memoryview(serialized)[a:b])
        else:
            h.update(b"\xff" * 8)
    for name in P.extra_history_fields(spans):
        a, b = spans[name]
        h.update(name.encode("utf-8") + (b - a).to_bytes(8, "little"))
        h.update(memoryview(serialized)[a:b])
    last = None
    if "hist_ts" in spans:
        ts = _feature(serialized, spans["hist_ts"]).int64_list.value
        last = int(ts[-1]) if len(ts) else None
    return int(ids[0]), h.digest(), last


def cache_row_meta(serialized: bytes) -> P.CacheMeta:
    """:func:`beam_jobs.precompute.cache_record_meta` without decoding the tensors."""
    spans = scan_features(serialized)
    if spans is None or not {"user_id", "model_name", "model_version"} <= set(spans):
        return P.cache_record_meta(serialized)
    f = lambda k: _feature(serialized, spans[k])
    fp = f(P.FINGERPRINT).bytes_list.value if P.FINGERPRINT in spans else []
    last = f(P.LAST_TS).int64_list.value if P.LAST_TS in spans else []
    return P.CacheMeta(int(f("user_id").int64_list.value[0]),
                       f("model_name").bytes_list.value[0].decode("utf-8"),
                       int(f("model_version").int64_list.value[0]),
                       bytes(fp[0]) if fp else None, int(last[0]) if last else None)


# ---- batch encoding of cache records -------------------------------------------------------
def _list_column(flat: np.ndarray, rows: int):
    import pyarrow as pa
    per = flat.size // rows if rows else 0
    offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * per)
    return pa.LargeListArray.from_arrays(offsets, pa.array(flat))


def _const_column(values: Sequence, rows: int, typ):
    import pyarrow as pa
    return pa.array([list(values)] * rows, type=pa.large_list(typ))


def encode_cache_batch(model_name: str, model_version: int, outputs: Dict[str, np.ndarray],
                       fingerprints: Sequence[Optional[bytes]],
                       last_ts: Sequence[Optional[int]]) -> List[bytes]:
    """A ``user_tower`` batch's outputs (with ``user_id`` [B]) -> B serialized cache
    records, each decoding (:func:`beam_jobs.precompute.decode_cache_record`,
    ``cache_record_meta``) to what :func:`beam_jobs.precompute.encode_cache_record`
    gives for the same user (tested). Encoded by tfx-bsl's C++
    ``RecordBatchToExamples`` over Arrow list columns: the per-user Python
    ``FloatList(value=...)`` of the RunInference engine cost ~17 ms per DIN-L row."""
    import pyarrow as pa
    from tfx_bsl.coders import example_coder
    uid = np.asarray(outputs["user_id"]).reshape(-1).astype(np.int64)
    rows = uid.size
    if rows == 0:
        return []
    has_last = np.array([t is not None for t in last_ts] if last_ts is not None
                        else [False] * rows, bool)
    if last_ts is not None and not has_last.all():   # absent, as the row encoder, when empty
        out: List[Optional[bytes]] = [None] * rows
        for keep in (has_last, ~has_last):
            idx = np.flatnonzero(keep)
            if idx.size:
                part = encode_cache_batch(
                    model_name, model_version, {k: np.asarray(v)[idx] for k, v in outputs.items()},
                    [fingerprints[i] for i in idx],
                    [last_ts[i] for i in idx] if keep is has_last else None)
                for i, rec in zip(idx, part):
                    out[i] = rec
        return out
    names = [k for k in outputs if k != "user_id"]
    cols = {"user_id": _list_column(uid, rows),
            "model_name": _const_column([model_name.encode("utf-8")], rows, pa.large_binary()),
            "model_version": _const_column([int(model_version)], rows, pa.int64()),
            "tensor_names": _const_column([n.encode("utf-8") for n in names], rows,
                                          pa.large_binary())}
    if any(fp is None for fp in fingerprints):
        raise ValueError("encode_cache_batch needs every user's history fingerprint")
    cols[P.FINGERPRINT] = pa.LargeListArray.from_arrays(
        pa.array(np.arange(rows + 1, dtype=np.int64)),
        pa.array([bytes(fp) for fp in fingerprints], pa.large_binary()))
    if last_ts is not None:
        cols[P.LAST_TS] = _list_column(np.asarray(last_ts, np.int64), rows)
    for name in names:
        arr = np.asarray(outputs[name])
        if arr.shape[:1] != (rows,):
            raise ValueError(f"user_tower output {name!r} has shape {arr.shape}, "
                             f"not [{rows}, ...]")
        if arr.dtype.kind == "f":
            flat = arr.reshape(-1).astype(np.float32, copy=False)
        elif arr.dtype.kind in "iub":
            flat = arr.reshape(-1).astype(np.int64, copy=False)
        else:
            raise ValueError(f"cache tensor {name!r} has unsupported dtype {arr.dtype}")
        cols[f"t/{name}"] = _list_column(flat, rows)
        cols[f"t/{name}/shape"] = _const_column([1, *arr.shape[1:]], rows, pa.int64())
        dt = arr.dtype.newbyteorder("<").str if arr.dtype.itemsize > 1 else arr.dtype.str
        cols[f"t/{name}/dtype"] = _const_column([dt.encode("ascii")], rows, pa.large_binary())
    batch = pa.RecordBatch.from_arrays(list(cols.values()), list(cols))
    return list(example_coder.RecordBatchToExamples(batch))


# ---- shard index ---------------------------------------------------------------------------
INDEX_PREFIX = "index"
#: the framing TFRecord adds to each record: length (8), its CRC (4), the data CRC (4)
FRAME = 16


def index_path(shard_path: str) -> str:
    """``.../cache-BBBBB-of-NNNNN.tfrecord`` -> ``.../index-BBBBB-of-NNNNN.npz``."""
    folder, name = os.path.split(shard_path)
    stem = name[len(P.OUTPUT_PREFIX):].split(".tfrecord")[0]
    return os.path.join(folder, f"{INDEX_PREFIX}{stem}.npz")


def write_index(shard_path: str, model_name: str, model_version: int, entries: List,
                shard_bytes: Optional[int] = None) -> None:
    """The shard's row index next to it: per row ``user_id``, history ``fingerprint``,
    ``last_ts`` (``has_last``), and the ``offset`` / ``length`` of its framed TFRecord
    bytes in the (uncompressed) shard, with the shard's model, version and size. An
    incremental refresh reads this instead of every row, and copies carried rows as
    byte ranges (:class:`RefreshBucket`). ``shard_bytes``: the shard's size where the
    entries do not cover it (a delta refresh's ``.sparse`` shard, :func:`is_sparse`)."""
    import io
    from apache_beam.io.filesystems import FileSystems
    n = len(entries)
    uid, fp, last, off, ln = (zip(*entries) if n else ([], [], [], [], []))
    buf = io.BytesIO()
    np.savez(buf, user_id=np.asarray(uid, np.int64).reshape(n),
             fingerprint=np.frombuffer(b"".join(f or b"\0" * 16 for f in fp),
                                       np.uint8).reshape(n, 16),
             has_fingerprint=np.array([f is not None for f in fp], bool).reshape(n),
             last_ts=np.array([0 if t is None else t for t in last], np.int64).reshape(n),
             has_last=np.array([t is not None for t in last], bool).reshape(n),
             offset=np.asarray(off, np.int64).reshape(n),
             length=np.asarray(ln, np.int64).reshape(n),
             model_name=np.array(model_name), model_version=np.array(int(model_version)),
             shard_bytes=np.array(int(sum(ln)) if shard_bytes is None else int(shard_bytes)))
    with FileSystems.create(index_path(shard_path)) as f:
        f.write(buf.getvalue())


#: the name mark of a shard a delta refresh shared with the previous cache (a hard link)
#: that still holds rows of superseded users: only its index's rows are live
SPARSE_MARK = ".sparse.tfrecord"


def is_sparse(shard_path: str) -> bool:
    """Whether ``shard_path`` holds superseded rows: read it through its index only
    (:func:`live_records`; :mod:`beam_jobs.precompute_incremental`, delta refresh)."""
    return shard_path.endswith(SPARSE_MARK)


class SparseShardError(IOError, P.LifelongError):
    """A ``.sparse`` shard without a matching index: its live rows cannot be told apart."""


def live_records(shard_path: str) -> Iterator[bytes]:
    """The live rows of a ``.sparse`` shard (the ones its index lists), in index order,
    each checked against its TFRecord CRCs (Beam's reader, the one tf.data's matches)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.tfrecordio import _TFRecordUtil
    idx = read_index(shard_path)
    order = np.argsort(idx["offset"], kind="stable")
    with FileSystems.open(shard_path, compression_type="uncompressed") as f:
        for off, ln in zip(idx["offset"][order].tolist(), idx["length"][order].tolist()):
            f.seek(off)
            rec = _TFRecordUtil.read_record(f)
            if rec is None or len(rec) + FRAME != ln:
                raise SparseShardError(f"{shard_path}: no row of {ln} bytes at {off}, where "
                                       f"its index names one")
            yield rec


def read_index(shard_path: str) -> Optional[Dict[str, np.ndarray]]:
    """The index of an uncompressed shard if it has one that matches its size, else None
    (a gzip shard, a shard of the RunInference engine, an edited shard). A ``.sparse``
    shard (:func:`is_sparse`) cannot be read without it: then :class:`SparseShardError`."""
    if is_sparse(shard_path):
        idx = _read_index(shard_path)
        if idx is None:
            raise SparseShardError(
                f"{shard_path} holds rows of superseded users (a delta refresh's shard) and "
                f"its index {index_path(shard_path)} is missing or does not match its size: "
                f"its live rows cannot be told apart (rebuild the cache with a full refresh)")
        return idx
    return _read_index(shard_path)


def _read_index(shard_path: str) -> Optional[Dict[str, np.ndarray]]:
    import io
    from apache_beam.io.filesystems import FileSystems
    if shard_path.endswith(".gz"):
        return None
    ipath = index_path(shard_path)
    try:
        if not FileSystems.exists(ipath):
            return None
        with FileSystems.open(ipath) as f:
            idx = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
        size = FileSystems.match([shard_path])[0].metadata_list[0].size_in_bytes
    except Exception:       # unreadable: read the rows instead
        return None
    if int(idx["shard_bytes"]) != size:
        return None
    return idx


# ---- pipeline ------------------------------------------------------------------------------
def _tfrecords(path: str) -> Iterator[bytes]:
    """The records of one TFRecord file (gzip by name), read by tf.data in C++."""
    import tensorflow as tf
    comp = "GZIP" if path.endswith(".gz") else ""
    ds = tf.data.TFRecordDataset(path, compression_type=comp, buffer_size=1 << 22)
    for chunk in ds.batch(256).prefetch(2).as_numpy_iterator():
        yield from chunk


class ScanFile(beam.DoFn):
    """``(file index, path)`` -> ``(bucket, (side, [row, ...]))`` chunks.

    New side rows: ``(user_id, fingerprint, last_ts, payload)``; previous side rows:
    ``(user_id, model_name, model_version, fingerprint, last_ts, payload)``. The payload
    is the record itself for the new side of a full run (every record goes to the
    model), else its locator ``(file index, record index)``: an incremental refresh
    shuffles only these few bytes per user, and :class:`RefreshBucket` reads the rows it
    carries over or recomputes from the files (moving 68.7 KB DIN-L rows through the
    DirectRunner's shuffle cost more than the whole refresh)."""

    def __init__(self, side: str, num_buckets: int, with_records: bool,
                 previous_files: Sequence[str] = ()):
        self.side, self.num_buckets = side, int(num_buckets)
        self.with_records = bool(with_records)
        self.previous_files = list(previous_files)
        self._known = None

    def _carryable(self):
        """``(sorted user ids, their fingerprints)`` from the previous shards' indexes, or
        None if one has no index (or they hold more than :data:`PREFILTER_MAX` rows).
        A new record whose user and fingerprint are in it is sent on as a locator (it is
        most likely carried over); any other as its bytes, so that RefreshBucket need not
        read the new records a second time for the users it recomputes."""
        if self._known is None:
            self._known = False
            uids, fps = [], []
            for path in self.previous_files:
                idx = read_index(path)
                if idx is None:
                    return None
                keep = idx["has_fingerprint"]
                uids.append(idx["user_id"][keep])
                fps.append(idx["fingerprint"][keep])
            if uids and sum(len(u) for u in uids) <= PREFILTER_MAX:
                uid = np.concatenate(uids)
                order = np.argsort(uid, kind="stable")
                self._known = (uid[order], np.concatenate(fps)[order])
        return self._known or None

    def _payload(self, known, file_index: int, i: int, rec: bytes, key) -> object:
        if self.with_records:
            return rec
        if known is None:
            return (file_index, i)
        uids, fps = known
        j = int(np.searchsorted(uids, key[0]))
        # a user twice in the previous cache: any of its rows may match (a locator is
        # always safe, only slower)
        while j < len(uids) and uids[j] == key[0]:
            if fps[j].tobytes() == key[1]:
                return (file_index, i)
            j += 1
        return rec

    def process(self, element):
        file_index, path = element
        known = self._carryable() if self.side == NEW and self.previous_files else None
        if self.side == PREV:
            idx = read_index(path)
            if idx is not None:
                yield from self._from_index(file_index, idx)
                return
        buckets: Dict[int, List] = {}
        for i, rec in enumerate(_tfrecords(path)):
            if self.side == NEW:
                key = record_key(rec)
                if key is None:
                    Metrics.counter(P.NAMESPACE, "records_without_user_id").inc()
                    continue
                Metrics.counter(P.NAMESPACE, "records_read").inc()
                row = (*key, self._payload(known, file_index, i, rec, key))
            else:
                try:
                    meta = cache_row_meta(rec)
                except Exception:   # a corrupt row: its user is recomputed, the job goes on
                    Metrics.counter(P.NAMESPACE, "previous_rows_unreadable").inc()
                    continue
                row = (meta.user_id, meta.model_name, meta.model_version, meta.fingerprint,
                       meta.last_behavior_ts, (file_index, i))
            b = row[0] % self.num_buckets
            lst = buckets.setdefault(b, [])
            lst.append(row)
            if len(lst) >= CHUNK:
                yield b, (self.side, buckets.pop(b))
        for b, lst in buckets.items():
            yield b, (self.side, lst)

    def _from_index(self, file_index: int, idx):
        """Previous rows from a shard's index: the payload is ``(file, offset, length)``."""
        name, version = str(idx["model_name"]), int(idx["model_version"])
        uids = idx["user_id"].tolist()
        fps = [f.tobytes() if h else None
               for f, h in zip(idx["fingerprint"], idx["has_fingerprint"])]
        lasts = [int(t) if h else None for t, h in zip(idx["last_ts"].tolist(), idx["has_last"])]
        buckets: Dict[int, List] = {}
        for u, fp, last, off, ln in zip(uids, fps, lasts, idx["offset"].tolist(),
                                        idx["length"].tolist()):
            buckets.setdefault(u % self.num_buckets, []).append(
                (u, name, version, fp, last, (file_index, off, ln)))
        Metrics.counter(P.NAMESPACE, "previous_rows_from_index").inc(len(uids))
        for b, lst in buckets.items():
            for i in range(0, len(lst), CHUNK):
                yield b, (self.side, lst[i:i + CHUNK])


def _copy_ranges(files: Sequence[str], ranges: Sequence[Tuple[int, int, int]], out,
                 chunk: int = 1 << 24) -> None:
    """Copy the framed records at ``(file, offset, length)`` (sorted) to ``out`` as raw
    bytes; contiguous ranges are read as one (a 1% refresh copies near-whole shards)."""
    from apache_beam.io.filesystems import FileSystems
    try:
        out_fd = out.fileno()          # a local file: copy in the kernel (os.copy_file_range)
    except (AttributeError, OSError, io.UnsupportedOperation):
        out_fd = None
    i = 0
    while i < len(ranges):
        f = ranges[i][0]
        with FileSystems.open(files[f], compression_type="uncompressed") as src:
            while i < len(ranges) and ranges[i][0] == f:
                start, end = ranges[i][1], ranges[i][1] + ranges[i][2]
                i += 1
                while i < len(ranges) and ranges[i][0] == f and ranges[i][1] == end:
                    end += ranges[i][2]
                    i += 1
                left = end - start
                if out_fd is not None:
                    out.flush()                # what Python buffered goes first
                    if _kernel_copy(files[f], start, left, out_fd):
                        continue
                src.seek(start)
                while left:
                    data = src.read(min(chunk, left))
                    if not data:
                        raise IOError(f"{files[f]} ends before byte {end} its index names")
                    out.write(data)
                    left -= len(data)


def _kernel_copy(path: str, start: int, count: int, out_fd: int) -> bool:
    """``count`` bytes of local file ``path`` from ``start`` appended to ``out_fd`` by
    ``os.copy_file_range`` (no copy through Python; a reflink where the filesystem
    shares extents). False where it does not apply (not local, not supported)."""
    if "://" in path or not hasattr(os, "copy_file_range"):
        return False
    done = 0
    try:
        with open(path, "rb") as src:
            while done < count:
                k = os.copy_file_range(src.fileno(), out_fd, count - done, start + done)
                if k <= 0:
                    raise OSError("copy_file_range copied nothing")
                done += k
        return True
    except OSError:
        if done:
            raise                      # a partial copy cannot be redone by the fallback
        return False


def _fetch(files: Sequence[str], locators: Sequence[Tuple[int, int]]) -> Iterator[bytes]:
    """The records at ``locators`` ``(file index, record index)``, file by file in
    record order: each file that holds one is streamed once (tf.data)."""
    by_file: Dict[int, set] = {}
    for f, i in locators:
        by_file.setdefault(f, set()).add(i)
    for f in sorted(by_file):
        want, left = by_file[f], len(by_file[f])
        for i, rec in enumerate(_tfrecords(files[f])):
            if i in want:
                yield rec
                left -= 1
                if not left:
                    break


class RefreshBucket(beam.DoFn):
    """One bucket's chunks -> its cache shard written (yields the shard path) and the
    removed users' ids (``removed`` output). ``previous_files`` given: an incremental
    refresh, classified as :class:`beam_jobs.precompute_incremental.Classify` does,
    payloads are locators into ``record_files`` / ``previous_files``."""

    def __init__(self, model_path: str, model_name: str, model_version: int, output: str,
                 num_buckets: int, batch_size: int, compression: str,
                 record_files: Sequence[str], previous_files: Sequence[str]):
        self.model_path, self.model_name = model_path, model_name
        self.model_version, self.output = int(model_version), output
        self.num_buckets, self.batch_size = int(num_buckets), int(batch_size)
        self.compression = compression
        self.record_files, self.previous_files = list(record_files), list(previous_files)
        self.incremental = bool(previous_files)
        self._fn = None

    def setup(self):
        import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
        import tensorflow as tf
        self._loaded = tf.saved_model.load(self.model_path)
        self._fn = self._loaded.signatures[P.SIGNATURE]

    def _classify(self, new: Dict, prev: Dict, carry: List, compute: List):
        counter = lambda name: Metrics.counter(P.NAMESPACE, name).inc()
        for uid in prev:
            if uid not in new:
                counter("users_removed")
                yield uid
        for uid, recs in new.items():
            old = prev.get(uid, [])
            if len(recs) == 1 and len(old) == 1:
                (_, fp, last, _), (_, name, version, old_fp, old_last, where) = recs[0], old[0]
                if name != self.model_name or version != self.model_version:
                    counter("users_other_model_or_version")
                elif old_fp is None:
                    counter("users_without_fingerprint")
                elif old_fp == fp and old_last == last:
                    counter("users_carried")
                    carry.append((where, uid, fp, last))     # written byte for byte
                    continue
                else:
                    counter("users_changed")
            elif not old:
                if self.incremental:
                    counter("users_new")
            else:
                counter("duplicate_users")
            compute.extend(recs)

    def _towers(self, compute: List) -> Iterator[bytes]:
        """Cache rows of the ``compute`` users (``(uid, fp, last, record)``), in batches."""
        import tensorflow as tf
        bs = self.batch_size
        for i in range(0, len(compute), bs):
            part = compute[i:i + bs]
            Metrics.counter(P.NAMESPACE, "users_to_model").inc(len(part))
            # Fixed batch shape: a short (tail) batch is padded with copies of its last
            # record, whose rows are cut off below. An XLA-compiled user_tower (export
            # --jit_user_tower) then compiles once, for batch_size, at the first batch
            # (start-up), not again for each tail size; the plain export pays at most
            # batch_size - 1 extra users per bucket.
            recs = [r[3] for r in part]
            recs += recs[-1:] * (bs - len(recs))
            res = self._fn(records=tf.constant(recs))
            outputs = {k: v.numpy()[:len(part)] for k, v in res.items()}
            got = outputs["user_id"].reshape(-1)
            want = np.array([r[0] for r in part], np.int64)
            if not np.array_equal(got, want):
                raise RuntimeError(f"user_tower returned user ids {got[:5]}... for the records "
                                   f"of users {want[:5]}...")
            yield from encode_cache_batch(self.model_name, self.model_version, outputs,
                                          [r[1] for r in part], [r[2] for r in part])
            Metrics.counter(P.NAMESPACE, "cache_records").inc(len(part))

    def process(self, element):
        bucket, chunks = element
        new: Dict[int, List] = {}
        prev: Dict[int, List] = {}
        for side, rows in chunks:
            target = new if side == NEW else prev
            for row in rows:
                target.setdefault(row[0], []).append(row)
        carry: List = []
        compute: List = []
        for uid in self._classify(new, prev, carry, compute):
            yield beam.pvalue.TaggedOutput(REMOVED, str(uid))
        del new, prev
        if not carry and not compute:
            return
        located = sorted((r for r in compute if isinstance(r[3], tuple)), key=lambda r: r[3])
        if located:                          # locators -> the records, read from the files
            records = _fetch(self.record_files, [r[3] for r in located])
            compute = [r for r in compute if not isinstance(r[3], tuple)] + [
                (u, fp, last, rec) for (u, fp, last, _), rec in zip(located, records)]
        name = f"{P.OUTPUT_PREFIX}-{bucket:05d}-of-{self.num_buckets:05d}{suffix(self.compression)}"
        path = os.path.join(self.output, name)
        tmp = os.path.join(self.output, f".tmp-{name}")
        self._write(path, tmp, carry, compute)
        yield path

    def _write(self, path: str, tmp: str, carry: List, compute: List) -> None:
        """Carried rows (byte ranges, or records read by index), then the computed ones;
        an uncompressed shard gets its index (:func:`write_index`)."""
        from apache_beam.io.filesystems import CompressionTypes, FileSystems
        from apache_beam.io.tfrecordio import _TFRecordUtil
        gz = self.compression == "gzip"
        entries: List = []
        pos = 0
        with FileSystems.create(tmp, compression_type=CompressionTypes.GZIP if gz
                                else CompressionTypes.UNCOMPRESSED) as out:
            ranged = sorted((c for c in carry if len(c[0]) == 3), key=lambda c: c[0])
            _copy_ranges(self.previous_files, [c[0] for c in ranged], out)
            for (_, _, ln), uid, fp, last in ranged:
                entries.append((uid, fp, last, pos, ln))
                pos += ln
            by_index = sorted((c for c in carry if len(c[0]) == 2), key=lambda c: c[0])
            rows = _fetch(self.previous_files, [c[0] for c in by_index])
            metas = [c[1:] for c in by_index] + [r[:3] for r in compute]
            for row, (uid, fp, last) in zip(itertools.chain(rows, self._towers(compute)),
                                            metas):
                # TFRecord framing by Beam's own writer (google-crc32c): the same bytes
                # tf.io.TFRecordWriter writes (tested), and byte ranges can be mixed in
                _TFRecordUtil.write_record(out, row)
                entries.append((uid, fp, last, pos, len(row) + FRAME))
                pos += len(row) + FRAME
        FileSystems.rename([tmp], [path])
        if not gz:
            write_index(path, self.model_name, self.model_version, entries)


def build_pipeline(p: beam.Pipeline, record_files: Sequence[str],
                   previous_files: Sequence[str], model_path: str, model_name: str,
                   model_version: int, output: str, num_shards: int = 0, batch_size: int = 64,
                   compression: str = "none") -> None:
    """Full precompute (no ``previous_files``) or incremental refresh, batched."""
    if compression not in COMPRESSIONS:
        raise P.PrecomputeError(f"--cache_compression must be one of {COMPRESSIONS}, "
                                f"got {compression!r}")
    if batch_size < 1:
        raise P.PrecomputeError(f"--batch_size must be >= 1, got {batch_size}")
    n = int(num_shards) or max(1, len(record_files))
    record_files, previous_files = sorted(record_files), sorted(previous_files)
    incremental = bool(previous_files)
    sides = [p
             | "NewFiles" >> beam.Create(list(enumerate(record_files)))
             | "SpreadNew" >> beam.Reshuffle()
             | "ScanNew" >> beam.ParDo(ScanFile(NEW, n, with_records=not incremental,
                                                previous_files=previous_files))]
    if incremental:
        sides.append(p
                     | "PreviousFiles" >> beam.Create(list(enumerate(previous_files)))
                     | "SpreadPrevious" >> beam.Reshuffle()
                     | "ScanPrevious" >> beam.ParDo(ScanFile(PREV, n, with_records=False)))
    res = (sides
           | "Sides" >> beam.Flatten()
           | "ByBucket" >> beam.GroupByKey()
           | "RefreshBucket" >> beam.ParDo(RefreshBucket(
               model_path, model_name, model_version, output, n, batch_size, compression,
               record_files, previous_files)).with_outputs(REMOVED, main="written"))
    if previous_files:
        from beam_jobs import precompute_incremental as INC
        (res[REMOVED]
         | "WriteRemoved" >> beam.io.WriteToText(os.path.join(output, INC.REMOVED_PREFIX),
                                                 file_name_suffix=".txt", num_shards=1))
