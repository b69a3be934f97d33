"""Feature schema: the single source of truth for names, dtypes, shapes and padding.

Two record kinds exist (``../shared/DESIGN.md``, "Store each user's history once"):

1. **Per-user record** (written once per user and split by ``beam_jobs.prepare``):
   the user's chronological behaviors, *oldest first*, stored once, plus the
   user's labeled impressions. ``imp_hist_index[j]`` is the number of history
   behaviors that happened strictly before impression ``j``; only
   ``hist_*[:imp_hist_index[j]]`` is visible to it. Three layouts (meta.json
   ``format``): ``per_user_record`` (every field per behavior),
   ``per_user_record_compact_v1`` (section 3 below: category / domain in an item
   table, timestamp deltas, quantised engagement) and ``per_user_record_compact_v2``
   (section 3b: v1 with items as item-table addresses, optional lossy timestamps),
   decoded to the same fields.

2. **Window example** (built in tf.data by :mod:`tfmodels.data`, never stored):
   one impression with its short window (last ``S`` behaviors before it) and
   long window (last ``L`` before it). Windows are *most recent first*
   (index 0 = latest behavior), right-padded with id 0, and carry
   ``*_len`` (number of valid rows). Features that depend on the impression
   (time gap to it, log-bucketised) are computed here, never stored. Each row
   also carries its own timestamp (``*_ts``), so that a module whose features
   depend on the request time caches the timestamps (user only) and measures
   the gaps at request time, exactly as the window does in training.

Ids: 0 = padding, 1 = out-of-vocabulary, 2.. = vocabulary entries (dense).
Domains: 0 = padding, 1 = the default domain of single-domain data, which is also the
TARGET domain of cross-domain data (where impressions / candidates live); 2 = the SOURCE
domain (LCN, METHODS 2.5 / 4.3). With ``FeatureSchema.cross_domain`` the pipeline builds
per-domain windows instead of the mixed short window (docs/cross_domain.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import tfmodels  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf

from tfmodels.errors import LifelongError

PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2
DEFAULT_DOMAIN = 1
TARGET_DOMAIN = 1      # cross-domain data: the domain of impressions / candidates (= DEFAULT_DOMAIN)
SOURCE_DOMAIN = 2      # cross-domain data: the other domain (LCN's lifelong source sequence)

# Time gap between a behavior and the impression: bucket 0 = padding,
# bucket b >= 1 holds gaps with floor(log2(1 + gap_minutes)) = b - 1 (capped).
NUM_GAP_BUCKETS = 32

META_FILE = "meta.json"          # vocab sizes + dataset statistics (written by prepare)
SPLITS = ("train", "valid", "test")

# --------------------------------------------------------------------------------------
# 1. Per-user record
# --------------------------------------------------------------------------------------
# name -> (dtype, kind). kind: "scalar" (one value) or "list" (variable length).
# History lists share one length (the user's number of behaviors H); impression
# lists share another (the user's number of impressions N).
USER_SCALARS = {
    "user_id": tf.int64,        # dense user id (>= FIRST_ID)
    "user_key": tf.string,      # the raw id of the source data, for cache keys and logs
}
HISTORY_FIELDS = {
    "hist_item_id": tf.int64,
    "hist_cate_id": tf.int64,
    "hist_ts": tf.int64,        # unix seconds (or a monotone tick for data without time)
    "hist_engage": tf.float32,  # engagement signal: rating, behavior type code, completion ratio
    "hist_domain": tf.int64,
    # OPTIONAL (TWIN V2, beam_jobs/cluster.py): members behind each row; a row of a
    # clustered history is a virtual item of n >= 1 behaviors. Absent = 1 per row,
    # so records written without it (beam_jobs/prepare.py) mean "every row is one
    # behavior" and parse as before.
    "hist_cluster_size": tf.int64,
}
# Optional history fields -> the per-row value when a record does not store them.
OPTIONAL_HISTORY_DEFAULTS = {"hist_cluster_size": 1}
IMPRESSION_FIELDS = {
    "imp_item_id": tf.int64,
    "imp_cate_id": tf.int64,
    "imp_ts": tf.int64,
    "imp_label": tf.float32,    # 1 = click / positive
    "imp_hist_index": tf.int64,  # number of history rows strictly before the impression
}
USER_RECORD_FIELDS = {**USER_SCALARS, **HISTORY_FIELDS, **IMPRESSION_FIELDS}


def user_record_parse_spec(with_impressions: bool = True) -> Dict[str, object]:
    """``tf.io.parse_example`` spec of the per-user record."""
    spec: Dict[str, object] = {
        "user_id": tf.io.FixedLenFeature([], tf.int64),
        "user_key": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    }
    for name, dtype in HISTORY_FIELDS.items():
        spec[name] = tf.io.VarLenFeature(dtype)
    if with_impressions:
        for name, dtype in IMPRESSION_FIELDS.items():
            spec[name] = tf.io.VarLenFeature(dtype)
    return spec


def _int_feature(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _float_feature(values: Iterable[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _bytes_feature(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


class RecordError(ValueError):
    """A per-user record violates the schema."""


def encode_user_record(user_id: int, user_key: str, history: Mapping[str, Sequence],
                       impressions: Mapping[str, Sequence]) -> bytes:
    """Serialize one per-user record, validating it against the schema.

    ``history`` maps every name of :data:`HISTORY_FIELDS` (those of
    :data:`OPTIONAL_HISTORY_DEFAULTS` may be left out; they are then not written)
    to equally long sequences in chronological order (oldest first);
    ``impressions`` maps every name of :data:`IMPRESSION_FIELDS` to equally long
    sequences.
    """
    feats = {"user_id": _int_feature([int(user_id)]),
             "user_key": _bytes_feature([str(user_key).encode("utf-8")])}
    for name, dtype, values in _checked_fields(history, impressions):
        if dtype == tf.float32:
            feats[name] = _float_feature(float(v) for v in values)
        else:
            feats[name] = _int_feature(int(v) for v in values)
    # deterministic: map order in the bytes must not depend on the process (Beam workers)
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(
        deterministic=True)


def _checked_fields(history: Mapping[str, Sequence], impressions: Mapping[str, Sequence]):
    """Validate a record against the schema; returns ``[(name, dtype, values)]`` of the
    fields to store (both formats share these checks)."""
    out = []
    for group, fields in (("history", HISTORY_FIELDS), ("impressions", IMPRESSION_FIELDS)):
        values = history if group == "history" else impressions
        if group == "history":
            fields = {k: v for k, v in fields.items()
                      if k in values or k not in OPTIONAL_HISTORY_DEFAULTS}
        missing = set(fields) - set(values)
        if missing:
            raise RecordError(f"{group} is missing fields {sorted(missing)}")
        lengths = {name: len(values[name]) for name in fields}
        if len(set(lengths.values())) > 1:
            raise RecordError(f"{group} fields differ in length: {lengths}")
        for name, dtype in fields.items():
            out.append((name, dtype, values[name]))
    ts = list(history["hist_ts"])
    if any(b < a for a, b in zip(ts, ts[1:])):
        raise RecordError("history timestamps must be non-decreasing (oldest first)")
    n_hist = len(ts)
    for idx in impressions["imp_hist_index"]:
        if not 0 <= int(idx) <= n_hist:
            raise RecordError(f"imp_hist_index {idx} outside [0, {n_hist}]")
    for name in ("hist_item_id", "hist_cate_id", "imp_item_id", "imp_cate_id"):
        values = history.get(name, impressions.get(name))
        if any(int(v) < OOV_ID for v in values):
            raise RecordError(f"{name} holds padding/negative ids; real ids start at {OOV_ID}")
    if "hist_cluster_size" in history and any(int(v) < 1 for v in history["hist_cluster_size"]):
        raise RecordError("hist_cluster_size must be >= 1 (a row stands for n >= 1 behaviors)")
    return out


# --------------------------------------------------------------------------------------
# 2. Window example (model input)
# --------------------------------------------------------------------------------------
SEQUENCE_FIELDS = {            # suffix -> dtype; prefixed with "short_" / "long_"
    "item_id": tf.int64,
    "cate_id": tf.int64,
    "engage": tf.float32,
    "gap_bucket": tf.int64,    # log2 bucket of (impression ts - behavior ts) in minutes
    "ts": tf.int64,            # the behavior's own timestamp (0 on padding): a module whose
                               # features depend on the request time (TWIN's gap bucket)
                               # caches these and measures gaps at request time
    "domain": tf.int64,
    "cluster_size": tf.int64,  # behaviors behind the row (1 unless the history is clustered)
}
# Window prefixes. Single-domain (default): "short" (last S behaviors) and "long" (last L).
# Cross-domain (FeatureSchema.cross_domain): "short_t" (last S TARGET-domain behaviors),
# "short_s" (last S SOURCE-domain behaviors) and "long" (last L SOURCE-domain behaviors,
# LCN's lifelong sequence LH_S); no mixed "short" window.
SHORT, LONG = "short", "long"
SHORT_TARGET, SHORT_SOURCE = "short_t", "short_s"
TARGET_FIELDS = {"target_item_id": tf.int64, "target_cate_id": tf.int64}
CONTEXT_FIELDS = {"imp_ts": tf.int64}
LABEL = "label"


def seq_name(prefix: str, field: str) -> str:
    """``seq_name("long", "item_id") -> "long_item_id"``."""
    return f"{prefix}_{field}"


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Vocabulary sizes (max dense id + 1, so ids index embedding tables directly)."""
    num_items: int
    num_categories: int
    num_users: int
    num_domains: int = DEFAULT_DOMAIN + 1

    @classmethod
    def from_meta(cls, meta: Mapping) -> "Vocab":
        v = meta["vocab"]
        return cls(int(v["num_items"]), int(v["num_categories"]), int(v["num_users"]),
                   int(v.get("num_domains", DEFAULT_DOMAIN + 1)))


class CrossDomainError(ValueError, LifelongError):
    """Cross-domain windows (or CRP) asked on data without source-domain behaviors."""


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Everything that fixes tensor shapes: vocab sizes, window lengths S, L and which
    windows exist (``cross_domain``: per-domain short windows and a source-only long
    window, see :data:`SHORT_TARGET`; off = the single-domain windows)."""
    vocab: Vocab
    short_len: int = 50
    long_len: int = 1000
    cross_domain: bool = False

    def __post_init__(self):
        if self.short_len < 1 or self.long_len < 1:
            raise ValueError(f"sequence lengths must be >= 1, got S={self.short_len}, "
                             f"L={self.long_len}")

    # ---- windows -------------------------------------------------------------------
    def short_prefixes(self) -> Tuple[str, ...]:
        """The short windows: ("short",) or, cross-domain, ("short_t", "short_s")."""
        return (SHORT_TARGET, SHORT_SOURCE) if self.cross_domain else (SHORT,)

    def prefixes(self) -> Tuple[str, ...]:
        """Every window prefix, short ones first."""
        return self.short_prefixes() + (LONG,)

    # ---- feature specs -------------------------------------------------------------
    def seq_len(self, prefix: str) -> int:
        if prefix not in self.prefixes():
            raise KeyError(f"no window {prefix!r} in this schema (windows: {self.prefixes()})")
        return self.long_len if prefix == LONG else self.short_len

    def feature_specs(self, batch: Optional[int] = None) -> Dict[str, tf.TensorSpec]:
        """name -> TensorSpec of every window-example feature (label excluded)."""
        specs: Dict[str, tf.TensorSpec] = {
            "user_id": tf.TensorSpec([batch], tf.int64, "user_id")}
        for name, dtype in {**TARGET_FIELDS, **CONTEXT_FIELDS}.items():
            specs[name] = tf.TensorSpec([batch], dtype, name)
        for prefix in self.prefixes():
            n = self.seq_len(prefix)
            for field, dtype in SEQUENCE_FIELDS.items():
                name = seq_name(prefix, field)
                specs[name] = tf.TensorSpec([batch, n], dtype, name)
            specs[f"{prefix}_len"] = tf.TensorSpec([batch], tf.int64, f"{prefix}_len")
        return specs

    def check_features(self, features: Mapping[str, tf.Tensor], names: Iterable[str]) -> None:
        """Raise a clear error if a named feature is missing or has the wrong shape/dtype."""
        specs = self.feature_specs()
        for name in names:
            if name not in features:
                raise KeyError(f"missing input feature {name!r}; model reads {sorted(names)}")
            spec, value = specs[name], features[name]
            if value.dtype != spec.dtype:
                raise TypeError(f"feature {name!r} has dtype {value.dtype.name}, "
                                f"schema says {spec.dtype.name}")
            if value.shape.rank is not None and value.shape.rank != spec.shape.rank:
                raise ValueError(f"feature {name!r} has shape {value.shape}, "
                                 f"schema says {spec.shape}")
            want = spec.shape[-1] if spec.shape.rank == 2 else None
            got = value.shape[-1] if value.shape.rank == 2 else None
            if want is not None and got is not None and want != got:
                raise ValueError(f"feature {name!r} has length {got}, schema says {want}")

    # ---- (de)serialization ---------------------------------------------------------
    def to_dict(self) -> Dict:
        return {"vocab": dataclasses.asdict(self.vocab), "short_len": self.short_len,
                "long_len": self.long_len, "cross_domain": self.cross_domain}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSchema":
        # cross_domain is absent from schemas written before it existed: single-domain
        return cls(Vocab(**d["vocab"]), int(d["short_len"]), int(d["long_len"]),
                   bool(d.get("cross_domain", False)))

    @classmethod
    def from_data_dir(cls, data_dir: str, short_len: int = 50, long_len: int = 1000,
                      cross_domain: bool = False) -> "FeatureSchema":
        vocab = Vocab.from_meta(read_meta(data_dir))
        if cross_domain:
            require_source_domain(vocab, data_dir)
        return cls(vocab, short_len, long_len, bool(cross_domain))


def require_source_domain(vocab: Vocab, data_dir: str = "the dataset",
                          what: str = "--cross_domain") -> None:
    """Raise :class:`CrossDomainError` unless the data can hold SOURCE-domain behaviors
    (meta ``vocab.num_domains`` > SOURCE_DOMAIN; single-domain data says 2)."""
    if vocab.num_domains <= SOURCE_DOMAIN:
        raise CrossDomainError(
            f"{what} needs source-domain behaviors (domain {SOURCE_DOMAIN}), but {data_dir} "
            f"has none (meta.json vocab.num_domains = {vocab.num_domains}; a two-domain "
            f"dataset has {SOURCE_DOMAIN + 1}). Prepare a two-domain dataset (the "
            "cross-domain adapter or the synthetic generator with two domains, see "
            "docs/cross_domain.md) or drop --cross_domain / --crp_weight")


def read_meta(data_dir: str) -> Dict:
    path = os.path.join(data_dir, META_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {data_dir!r} is not a prepared dataset "
            "(run `lifelong prepare` first)")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def split_pattern(data_dir: str, split: str) -> str:
    """Glob of a split's sharded per-user TFRecords (gzip)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return os.path.join(data_dir, f"{split}-*.tfrecord.gz")


def gap_bucket_np(gap_seconds: np.ndarray) -> np.ndarray:
    """NumPy twin of the in-graph bucketing (for tests and offline jobs)."""
    minutes = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0) / 60.0
    b = np.floor(np.log2(1.0 + minutes)).astype(np.int64) + 1
    return np.minimum(b, NUM_GAP_BUCKETS - 1)


def names_with_prefix(prefix: str) -> List[str]:
    return [seq_name(prefix, f) for f in SEQUENCE_FIELDS] + [f"{prefix}_len"]


# --------------------------------------------------------------------------------------
# 3. Compact per-user record (issue 19 item 5; docs/data.md "Record formats")
# --------------------------------------------------------------------------------------
# Still ONE tf.train.Example per user (plain int64/float/bytes lists, readable by TFX
# tools), but the item-side fields live once in an ITEM TABLE (vocab/item_table.tsv:
# item id -> category id, domain) written by prepare next to the vocabularies and
# looked up when the record is read; per behavior only the item id, the timestamp as a
# delta to the previous behavior (small varints) and the engagement quantised to an
# integer multiple of ``engage_step`` remain. Rows whose category / domain differ from
# the table's (an out-of-vocabulary item: id 1 stands for many raw items; an item seen
# under several categories) are kept exactly as sparse exceptions (row, value), so every
# field decodes to the full format's value, engagement up to the stated quantisation.
FORMAT_FULL = "per_user_record"
FORMAT_COMPACT = "per_user_record_compact_v1"
FORMAT_COMPACT_V2 = "per_user_record_compact_v2"   # section 3b below
RECORD_FORMATS = {"full": FORMAT_FULL, "compact": FORMAT_COMPACT,
                  "compact2": FORMAT_COMPACT_V2}
COMPACT_FORMATS = (FORMAT_COMPACT, FORMAT_COMPACT_V2)   # formats that need the item table
COMPACT_MARKER = b"compact_v1"   # the record's own "record_format" feature
COMPACT_V2_MARKER = b"compact_v2"
COMPACT_MARKERS = (COMPACT_MARKER, COMPACT_V2_MARKER)
ITEM_TABLE_FILE = "vocab/item_table.tsv"   # relative to the prepared dataset
ITEM_TABLE_HEADER = "item_id\tcate_id\tdomain"
# Fields of a compact record (int64 lists unless said otherwise):
#   record_format (bytes) COMPACT_MARKER; user_id; user_key (bytes);
#   hist_item_id; hist_ts_delta (ts[0], then ts[i] - ts[i-1] >= 0); hist_engage_q
#   (round(engage / step)); engage_step (float, one value, a power of two);
#   hist_cate_exc_pos / hist_cate_exc_id and hist_domain_exc_pos / hist_domain_exc_val
#   (rows that differ from the item table); hist_cluster_size (optional, as full);
#   imp_item_id; imp_cate_exc_pos / imp_cate_exc_id; imp_ts_delta (as hist_ts_delta,
#   signed); imp_label_q (integer labels); imp_hist_index_delta (signed deltas).
_COMPACT_INT_LISTS = ("hist_item_id", "hist_ts_delta", "hist_engage_q", "hist_cate_exc_pos",
                      "hist_cate_exc_id", "hist_domain_exc_pos", "hist_domain_exc_val",
                      "hist_cluster_size")
_COMPACT_IMP_LISTS = ("imp_item_id", "imp_cate_exc_pos", "imp_cate_exc_id", "imp_ts_delta",
                      "imp_label_q", "imp_hist_index_delta")
_COMPACT_V2_LISTS = ("hist_item_group", "hist_item_rank")       # v2 only (section 3b)
_COMPACT_V2_IMP_LISTS = ("imp_item_group", "imp_item_rank")


class CompactRecordError(RecordError, LifelongError):
    """A compact per-user record cannot be written or decoded (an item id outside the
    item table, an engagement step that is not a power of two, non-integer labels)."""


class MissingItemTableError(FileNotFoundError, LifelongError):
    """A compact per-user record dataset is read without its item table."""


@dataclasses.dataclass(frozen=True)
class ItemTable:
    """Item-side fields by dense item id: ``cate[i]``, ``domain[i]`` (row 0 = padding,
    row 1 = the out-of-vocabulary item: category OOV, the default domain)."""
    cate: np.ndarray
    domain: np.ndarray
    source: str = "an item table"

    def __post_init__(self):
        if self.cate.shape != self.domain.shape or self.cate.ndim != 1:
            raise ValueError(f"item table columns must be 1-D and equally long, got "
                             f"{self.cate.shape} and {self.domain.shape}")

    def __len__(self) -> int:
        return int(self.cate.shape[0])

    @functools.cached_property
    def groups(self) -> Dict[str, np.ndarray]:
        """The compact_v2 item address (section 3b). An item's GROUP is its category's
        index among the table's distinct categories (ascending; = the category id for
        prepare's dense ids when every category has an item), its RANK its place among
        that group's items in id order: ``order`` lists the items by (group, id), group
        ``g``'s items are ``order[start[g] : start[g] + size[g]]``. Item ids run by
        descending count (prepare's vocabulary), so a rank is the item's popularity
        rank within its category. Derived from the table alone: no file changes."""
        n = len(self)
        cats, group = np.unique(self.cate, return_inverse=True)
        group = group.reshape(-1).astype(np.int64)
        order = np.lexsort((np.arange(n), group)).astype(np.int64)
        size = np.bincount(group, minlength=1).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n, dtype=np.int64) - start[group[order]]
        return {"order": order, "start": start, "size": size, "rank": rank,
                "group": group, "categories": cats.astype(np.int64)}

    def check_ids(self, ids: np.ndarray, what: str) -> None:
        """Raise :class:`CompactRecordError` unless every id is a row of the table."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < OOV_ID or ids.max() >= len(self)):
            bad = ids[(ids < OOV_ID) | (ids >= len(self))][0]
            raise CompactRecordError(
                f"{what} holds item id {int(bad)} outside the item table ({self.source}: "
                f"ids {OOV_ID}..{len(self) - 1}); the records and the item table come from "
                f"different prepare runs")

    def to_tsv(self) -> str:
        rows = "".join(f"{i}\t{c}\t{d}\n" for i, (c, d) in
                       enumerate(zip(self.cate.tolist(), self.domain.tolist())))
        return f"{ITEM_TABLE_HEADER}\n{rows}"

    @classmethod
    def from_tsv(cls, text: str, source: str = "an item table") -> "ItemTable":
        lines = text.split("\n", 1)
        if lines[0].strip() != ITEM_TABLE_HEADER:
            raise CompactRecordError(f"{source} must start with the header "
                                     f"{ITEM_TABLE_HEADER!r}, found {lines[0][:60]!r}")
        body = np.array((lines[1] if len(lines) > 1 else "").split(), dtype=np.int64)
        if body.size % 3:
            raise CompactRecordError(f"{source}: every row needs 3 columns")
        body = body.reshape(-1, 3)
        if not np.array_equal(body[:, 0], np.arange(len(body))):
            raise CompactRecordError(f"{source}: item ids must run 0, 1, 2, ... in order")
        return cls(body[:, 1].copy(), body[:, 2].copy(), source)


def _format_of(meta: Mapping, data_dir: str) -> str:
    fmt = meta.get("format", FORMAT_FULL)
    if fmt not in RECORD_FORMATS.values():
        raise CompactRecordError(f"{data_dir}: unknown record format {fmt!r} in meta.json "
                                 f"(known: {sorted(RECORD_FORMATS.values())})")
    return fmt


def record_format(data_dir: str) -> str:
    """The per-user record format of a prepared dataset (meta.json ``format``)."""
    return _format_of(read_meta(data_dir), data_dir)


def load_item_table(data_dir: Optional[str]) -> Optional[ItemTable]:
    """The item table of a compact dataset; None for a full-format one, and for a
    folder that is not a prepared dataset (no ``data_dir`` or no meta.json: its records
    are read as full, and a compact record among them fails with a clear message).
    Every reader that learns its format from the data folder calls this (training's
    ``make_dataset``, export, replay, the cluster job, the reports).

    Raises :class:`MissingItemTableError` when meta.json says compact but the table
    file is not there (records copied without ``vocab/``).
    """
    if not data_dir or not tf.io.gfile.exists(os.path.join(data_dir, META_FILE)):
        return None
    meta = read_meta(data_dir)
    fmt = _format_of(meta, data_dir)
    if fmt not in COMPACT_FORMATS:
        return None
    rel = meta.get("record", {}).get("item_table", ITEM_TABLE_FILE)
    path = os.path.join(data_dir, rel)
    if not tf.io.gfile.exists(path):
        raise MissingItemTableError(
            f"{data_dir} holds compact per-user records ({fmt}) but their item "
            f"table {path} is missing: copy {rel} with the records, or prepare the data "
            f"again with --record_format full")
    with tf.io.gfile.GFile(path) as f:
        table = ItemTable.from_tsv(f.read(), path)
    n_items = int(meta.get("vocab", {}).get("num_items", len(table)))
    if len(table) != n_items:
        raise CompactRecordError(f"{path} has {len(table)} rows but meta.json says "
                                 f"num_items = {n_items}")
    return table


def check_engage_step(step: float) -> float:
    """``step`` must be a power of two (2**-20 .. 2**20): q * step is then exact in
    float32 as in float64, so the graph and NumPy decoders agree bit for bit."""
    step = float(step)
    if not (step > 0 and np.isfinite(step)) or np.frexp(step)[0] != 0.5 \
            or not 2.0 ** -20 <= step <= 2.0 ** 20:
        raise CompactRecordError(f"engage step must be a power of two between 2**-20 and "
                                 f"2**20 (e.g. 0.5, 1, 0.0625), got {step}")
    return step


def _exceptions(values: np.ndarray, table_values: np.ndarray):
    pos = np.nonzero(values != table_values)[0]
    return pos, values[pos]


def encode_compact_user_record(user_id: int, user_key: str, history: Mapping[str, Sequence],
                               impressions: Mapping[str, Sequence], item_table: ItemTable,
                               engage_step: float) -> bytes:
    """Serialize one per-user record in the compact format (validated as the full one).

    Decoding (:func:`decode_user_record`, or the tf.data pipeline) gives the full
    record back exactly, except ``hist_engage`` = ``round(engage / engage_step) *
    engage_step`` (|error| <= engage_step / 2; 0 for engagements on the step's grid:
    half-star ratings with step 0.5, behavior-type codes with step 1). Labels must be
    integers (they are stored as such).
    """
    step = check_engage_step(engage_step)
    _checked_fields(history, impressions)
    item = np.asarray(history["hist_item_id"], np.int64)
    imp_item = np.asarray(impressions["imp_item_id"], np.int64)
    item_table.check_ids(item, f"the history of user {user_key!r}")
    item_table.check_ids(imp_item, f"the impressions of user {user_key!r}")
    ts = np.asarray(history["hist_ts"], np.int64)
    engage = np.asarray(history["hist_engage"], np.float64)
    q = np.rint(engage / step)
    if q.size and np.abs(q).max() >= 2 ** 24:
        raise CompactRecordError(f"engagement {engage[np.abs(q).argmax()]} / step {step} is "
                                 f"too large for an exact float32 decode; use a larger step")
    labels = np.asarray(impressions["imp_label"], np.float64)
    if labels.size and not np.array_equal(labels, np.rint(labels)):
        raise CompactRecordError(f"user {user_key!r}: the compact format stores integer "
                                 f"labels, got {labels[labels != np.rint(labels)][0]}")
    hc, hce = _exceptions(np.asarray(history["hist_cate_id"], np.int64), item_table.cate[item])
    hd, hdv = _exceptions(np.asarray(history["hist_domain"], np.int64), item_table.domain[item])
    ic, ice = _exceptions(np.asarray(impressions["imp_cate_id"], np.int64),
                          item_table.cate[imp_item])
    imp_ts = np.asarray(impressions["imp_ts"], np.int64)
    idx = np.asarray(impressions["imp_hist_index"], np.int64)
    feats = {
        "record_format": _bytes_feature([COMPACT_MARKER]),
        "user_id": _int_feature([int(user_id)]),
        "user_key": _bytes_feature([str(user_key).encode("utf-8")]),
        "engage_step": _float_feature([step]),
        "hist_item_id": _int_feature(item.tolist()),
        "hist_ts_delta": _int_feature(np.diff(ts, prepend=0).tolist()),
        "hist_engage_q": _int_feature(q.astype(np.int64).tolist()),
        "hist_cate_exc_pos": _int_feature(hc.tolist()),
        "hist_cate_exc_id": _int_feature(hce.tolist()),
        "hist_domain_exc_pos": _int_feature(hd.tolist()),
        "hist_domain_exc_val": _int_feature(hdv.tolist()),
        "imp_item_id": _int_feature(imp_item.tolist()),
        "imp_cate_exc_pos": _int_feature(ic.tolist()),
        "imp_cate_exc_id": _int_feature(ice.tolist()),
        "imp_ts_delta": _int_feature(np.diff(imp_ts, prepend=0).tolist()),
        "imp_label_q": _int_feature(np.rint(labels).astype(np.int64).tolist()),
        "imp_hist_index_delta": _int_feature(np.diff(idx, prepend=0).tolist()),
    }
    if "hist_cluster_size" in history:
        feats["hist_cluster_size"] = _int_feature(int(v) for v in history["hist_cluster_size"])
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(
        deterministic=True)


# --------------------------------------------------------------------------------------
# 3b. Compact per-user record v2 (issue 19 item 5, session 8; docs/data.md)
# --------------------------------------------------------------------------------------
# v1 with two changes, chosen by measuring gzip bytes per behavior on the synthetic
# 1,000-user data (docs/benchmarks.md "Compact records v2 (session 8)"):
# * the item id is stored as its ITEM-TABLE ADDRESS: ``hist_item_group`` = the item's
#   table category (its index among the table's distinct categories),
#   ``hist_item_rank`` = its place among that category's items in id
#   (= popularity) order (:attr:`ItemTable.groups`). Same information, but the group
#   repeats along a history (users revisit categories) and the rank is small, so
#   deflate codes the two lists in fewer bytes than the one id list (0.40 vs 0.42 of
#   the full format's gzip bytes on the synthetic data). The row's own category stays
#   exact through v1's exception lists, which are written against the same table.
# * opt-in lossy timestamps: ``ts_step`` (int seconds, default 1 = exact): history
#   timestamps are stored as ``round(ts / ts_step)`` (deltas of those), decoded as
#   ``q * ts_step``, |error| <= ts_step / 2; impression timestamps stay exact.
#   [interp: the issue asks for 1/3 of the bytes; deflate on the lossless layouts
#   tried stays at ~0.40 (the exact second-resolution gaps alone cost ~1.25 B per
#   behavior), so reaching 1/3 needs coarser history timestamps; ts_step 60 gives
#   0.32.] The gap buckets (log2 minutes to the impression) move only for behaviors
#   within ts_step / 2 of a bucket edge; a gap that rounds below 0 is bucket 1 as 0 is.
# Byte-shuffled fixed-width columns (bytes features, Blosc-style byte planes) were
# measured and not kept: 0.43 vs 0.42 for protobuf varints on the same fields.
# Fields that differ from v1: ``hist_item_id`` / ``imp_item_id`` are replaced by
# ``hist_item_group`` + ``hist_item_rank`` / ``imp_item_group`` + ``imp_item_rank``;
# ``ts_step`` (int64, one value) is added; ``hist_ts_delta`` holds deltas of
# ``round(ts / ts_step)``. Everything else is v1's, so one decoder reads both.
MAX_TS_STEP = 86400


def check_ts_step(step) -> int:
    """``step`` must be a whole number of seconds in 1 .. :data:`MAX_TS_STEP`."""
    try:
        ok = float(step) == int(step) and 1 <= int(step) <= MAX_TS_STEP
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise CompactRecordError(f"ts step must be a whole number of seconds between 1 "
                                 f"(exact) and {MAX_TS_STEP}, got {step!r}")
    return int(step)


def quantise_ts(ts, ts_step: int) -> np.ndarray:
    """``round(ts / ts_step)`` (halves up) in integers: the v2 history timestamps."""
    return np.floor_divide(np.asarray(ts, np.int64) + ts_step // 2, ts_step)


def encode_compact_v2_user_record(user_id: int, user_key: str,
                                  history: Mapping[str, Sequence],
                                  impressions: Mapping[str, Sequence], item_table: ItemTable,
                                  engage_step: float, ts_step: int = 1) -> bytes:
    """Serialize one per-user record in the compact v2 format (section 3b).

    Decoding gives the full record back exactly, except ``hist_engage`` as in v1
    (|error| <= engage_step / 2) and, with ``ts_step`` > 1, ``hist_ts`` =
    ``round(ts / ts_step) * ts_step`` (|error| <= ts_step / 2).
    """
    ts_step = check_ts_step(ts_step)
    v1 = tf.train.Example.FromString(encode_compact_user_record(
        user_id, user_key, history, impressions, item_table, engage_step))
    feats = v1.features.feature
    g = item_table.groups
    for prefix in ("hist", "imp"):
        item = np.asarray(feats[f"{prefix}_item_id"].int64_list.value, np.int64)
        del feats[f"{prefix}_item_id"]
        feats[f"{prefix}_item_group"].CopyFrom(_int_feature(g["group"][item].tolist()))
        feats[f"{prefix}_item_rank"].CopyFrom(_int_feature(g["rank"][item].tolist()))
    tq = quantise_ts(history["hist_ts"], ts_step)
    feats["hist_ts_delta"].CopyFrom(_int_feature(np.diff(tq, prepend=0).tolist()))
    feats["ts_step"].CopyFrom(_int_feature([ts_step]))
    feats["record_format"].CopyFrom(_bytes_feature([COMPACT_V2_MARKER]))
    return v1.SerializeToString(deterministic=True)


def _item_from_address(group: np.ndarray, rank: np.ndarray, item_table: ItemTable,
                       what: str) -> np.ndarray:
    """v2 ``(group, rank)`` lists -> item ids; :class:`CompactRecordError` when the
    lists differ in length or an address is not in the table."""
    if group.shape != rank.shape:
        raise CompactRecordError(f"compact v2 record: {what} has {group.size} item groups "
                                 f"but {rank.size} item ranks (a corrupt record)")
    g = item_table.groups
    n_groups = g["size"].shape[0]
    ok = (group >= 0) & (group < n_groups)
    ok[ok] &= (rank[ok] >= 0) & (rank[ok] < g["size"][group[ok]])
    if not ok.all():
        i = int(np.argmin(ok))
        raise CompactRecordError(
            f"compact v2 record: {what} holds item address (group {int(group[i])}, rank "
            f"{int(rank[i])}) that is not in the item table ({item_table.source}); the "
            f"records and the item table come from different prepare runs")
    return g["order"][g["start"][group] + rank]


def _values(feature: tf.train.Feature):
    kind = feature.WhichOneof("kind")
    return [] if kind is None else list(getattr(feature, kind).value)


def is_compact_record(raw: bytes) -> bool:
    """True for a compact record of either version (v1, v2)."""
    f = tf.train.Example.FromString(raw).features.feature
    return "record_format" in f and tuple(_values(f["record_format"])) in {
        (m,) for m in COMPACT_MARKERS}


def decode_user_record(raw: bytes, item_table: Optional[ItemTable] = None
                       ) -> Dict[str, np.ndarray]:
    """ONE serialized per-user record, full or compact, -> the full layout as NumPy.

    Returns ``user_id`` (int64 scalar), ``user_key`` (bytes), every ``hist_*`` field
    of :data:`HISTORY_FIELDS` stored (``hist_cluster_size`` only when stored) and every
    ``imp_*`` field, with the schema's dtypes (int64 / float32). A compact record (v1
    or v2) needs the dataset's ``item_table`` (:func:`load_item_table`); without it,
    with an item id (v2: an item address) outside it, or with lists of different
    lengths, this raises :class:`CompactRecordError`.
    """
    f = tf.train.Example.FromString(raw).features.feature
    get = lambda k: _values(f[k]) if k in f else []  # noqa: E731
    out: Dict[str, np.ndarray] = {"user_id": np.int64(get("user_id")[0]),
                                  "user_key": (get("user_key") or [b""])[0]}
    marker = get("record_format")
    if marker and marker[0] not in COMPACT_MARKERS:
        raise CompactRecordError(f"user {out['user_key']!r}: unknown per-user record format "
                                 f"marker {marker[0]!r} (known: {list(COMPACT_MARKERS)})")
    if not marker:
        for name, dtype in {**HISTORY_FIELDS, **IMPRESSION_FIELDS}.items():
            if name in OPTIONAL_HISTORY_DEFAULTS and name not in f:
                continue
            out[name] = np.asarray(get(name), dtype.as_numpy_dtype)
        return out
    if item_table is None:
        raise CompactRecordError(
            f"user {out['user_key']!r}: a compact per-user record "
            f"({FORMAT_COMPACT if marker[0] == COMPACT_MARKER else FORMAT_COMPACT_V2}) needs "
            f"the dataset's item table (tfmodels.schema.load_item_table(data_dir), "
            f"{ITEM_TABLE_FILE}) to be decoded")
    i64 = lambda k: np.asarray(get(k), np.int64)  # noqa: E731
    who = f"user {out['user_key']!r}"
    if (any(k in f for k in _COMPACT_V2_LISTS + _COMPACT_V2_IMP_LISTS)
            and any(k in f for k in ("hist_item_id", "imp_item_id"))):
        raise CompactRecordError(f"compact record of {who} stores both item ids and item "
                                 f"addresses (a corrupt record)")
    if marker[0] == COMPACT_V2_MARKER:
        item = _item_from_address(i64("hist_item_group"), i64("hist_item_rank"), item_table,
                                  f"the history of {who}")
        imp_item = _item_from_address(i64("imp_item_group"), i64("imp_item_rank"), item_table,
                                      f"the impressions of {who}")
    else:
        item, imp_item = i64("hist_item_id"), i64("imp_item_id")
    for what, n, names in (("history", item.size, ("hist_ts_delta", "hist_engage_q")),
                           ("impressions", imp_item.size,
                            ("imp_ts_delta", "imp_label_q", "imp_hist_index_delta"))):
        bad = [k for k in names if len(get(k)) != n]
        if bad:
            raise CompactRecordError(f"compact record of {who}: the {what} has {n} items but "
                                     f"{bad[0]} holds {len(get(bad[0]))} values (a corrupt "
                                     f"record)")
    item_table.check_ids(item, f"the history of user {out['user_key']!r}")
    item_table.check_ids(imp_item, f"the impressions of user {out['user_key']!r}")
    cate, domain = item_table.cate[item], item_table.domain[item]
    cate[i64("hist_cate_exc_pos")] = i64("hist_cate_exc_id")
    domain[i64("hist_domain_exc_pos")] = i64("hist_domain_exc_val")
    imp_cate = item_table.cate[imp_item]
    imp_cate[i64("imp_cate_exc_pos")] = i64("imp_cate_exc_id")
    step = np.float32((get("engage_step") or [1.0])[0])
    ts_step = int((get("ts_step") or [1])[0])
    out.update({
        "hist_item_id": item, "hist_cate_id": cate,
        "hist_ts": np.cumsum(i64("hist_ts_delta")) * ts_step,
        "hist_engage": i64("hist_engage_q").astype(np.float32) * step, "hist_domain": domain,
        "imp_item_id": imp_item, "imp_cate_id": imp_cate, "imp_ts": np.cumsum(i64("imp_ts_delta")),
        "imp_label": i64("imp_label_q").astype(np.float32),
        "imp_hist_index": np.cumsum(i64("imp_hist_index_delta"))})
    if "hist_cluster_size" in f:
        out["hist_cluster_size"] = i64("hist_cluster_size")
    return out


def full_record_bytes(raw: bytes, item_table: Optional[ItemTable] = None) -> bytes:
    """A record in either format -> the full format's bytes (a full record is returned
    unchanged): for readers that parse ``tf.train.Example`` fields themselves."""
    f = tf.train.Example.FromString(raw).features.feature
    if "record_format" not in f or not _values(f["record_format"]):
        return raw
    d = decode_user_record(raw, item_table)
    hist = {k: d[k] for k in HISTORY_FIELDS if k in d}
    imps = {k: d[k] for k in IMPRESSION_FIELDS}
    return encode_user_record(int(d["user_id"]), d["user_key"].decode("utf-8"), hist, imps)


def compact_parse_spec(with_impressions: bool = True) -> Dict[str, object]:
    """``tf.io.parse_example`` spec of the compact per-user record, v1 and v2 (the
    union of their fields: a field a record does not store parses as empty / default)."""
    spec: Dict[str, object] = {
        "user_id": tf.io.FixedLenFeature([], tf.int64),
        "user_key": tf.io.FixedLenFeature([], tf.string, default_value=b""),
        "engage_step": tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
        "ts_step": tf.io.FixedLenFeature([], tf.int64, default_value=1)}
    for name in (_COMPACT_INT_LISTS + _COMPACT_V2_LISTS
                 + ((_COMPACT_IMP_LISTS + _COMPACT_V2_IMP_LISTS) if with_impressions else ())):
        spec[name] = tf.io.VarLenFeature(tf.int64)
    return spec


def item_table_tensors(item_table: ItemTable) -> Dict[str, tf.Tensor]:
    """The item table as the in-graph decoders' constants: ``cate``, ``domain`` and the
    v2 address tables ``order`` / ``start`` / ``size`` (:attr:`ItemTable.groups`)."""
    g = item_table.groups
    return {"cate": tf.constant(item_table.cate, tf.int64),
            "domain": tf.constant(item_table.domain, tf.int64),
            "order": tf.constant(g["order"], tf.int64), "start": tf.constant(g["start"], tf.int64),
            "size": tf.constant(g["size"], tf.int64)}


def item_from_address_tensor(group: tf.Tensor, rank: tf.Tensor, tables: Mapping[str, tf.Tensor],
                             what: str) -> tf.Tensor:
    """In-graph twin of the v2 item address decode (1-D ``group`` / ``rank`` of equal
    length, any number of records' rows): ``order[start[group] + rank]``; an address
    outside the table or lists of different lengths fail with InvalidArgumentError."""
    n_groups = tf.shape(tables["size"], out_type=tf.int64)[0]
    same = tf.equal(tf.size(group), tf.size(rank))
    g = tf.clip_by_value(group, 0, n_groups - 1)
    # rank cut / padded to group's length, so that a length mismatch reaches the
    # Assert below (its message) instead of failing an elementwise op first
    r = tf.concat([rank, tf.zeros_like(group)], 0)[:tf.size(group)]
    ok = tf.logical_and(same, tf.reduce_all(
        (group >= 0) & (group < n_groups) & (r >= 0)
        & (r < tf.gather(tables["size"], g))))
    with tf.control_dependencies([tf.debugging.Assert(ok, [
            f"compact v2 per-user record: {what} holds item addresses (group, rank) "
            f"that are not in the item table, or its item group and rank lists differ in "
            f"length (a corrupt record, or records and {ITEM_TABLE_FILE} from different "
            "prepare runs). groups, ranks:", group, rank], summarize=8)]):
        n_items = tf.shape(tables["order"], out_type=tf.int64)[0]
        return tf.gather(tables["order"], tf.clip_by_value(
            tf.gather(tables["start"], g) + r, 0, n_items - 1))


def decode_compact_tensors(parsed: Mapping[str, tf.Tensor], cate_table: tf.Tensor,
                           domain_table: tf.Tensor,
                           tables: Optional[Mapping[str, tf.Tensor]] = None
                           ) -> Dict[str, tf.Tensor]:
    """In-graph twin of :func:`decode_user_record` for one parsed compact record, v1 or
    v2 (dense 1-D tensors from :func:`compact_parse_spec`): the full layout's tensors.
    ``tables`` (:func:`item_table_tensors`) is needed for v2 records (their item
    addresses). An item id outside the table, or lists whose lengths disagree, fail the
    run with an InvalidArgumentError naming the problem.

    One graph reads both versions without a branch: a v1 record stores ``hist_item_id``
    and no item address, a v2 record the reverse, so the items are the concatenation of
    the two (checked: as long as the timestamp list); ``ts_step`` parses as 1 for v1."""
    n_table = tf.shape(cate_table, out_type=tf.int64)[0]

    def lookup(ids, table, pos, vals, what):
        ok = tf.reduce_all((ids >= OOV_ID) & (ids < n_table))
        with tf.control_dependencies([tf.debugging.Assert(ok, [
                f"compact per-user record: {what} holds item ids outside the item table "
                f"(ids {OOV_ID}..n-1); the records and {ITEM_TABLE_FILE} come from "
                "different prepare runs. n, ids:", n_table, ids], summarize=8)]):
            got = tf.gather(table, tf.clip_by_value(ids, 0, n_table - 1))
        return tf.tensor_scatter_nd_update(got, pos[:, None], vals)

    def items(prefix, what, others):
        item = parsed[f"{prefix}_item_id"]
        group = parsed.get(f"{prefix}_item_group")
        if group is not None:
            if tables is None:
                raise ValueError("decode_compact_tensors: pass tables=item_table_tensors("
                                 "item_table) to decode compact v2 records")
            item = tf.concat([item, item_from_address_tensor(
                group, parsed[f"{prefix}_item_rank"], tables, what)], 0)
        n = tf.size(item)
        ok = tf.reduce_all(tf.stack([tf.equal(tf.size(parsed[k]), n) for k in others]))
        with tf.control_dependencies([tf.debugging.Assert(ok, [
                f"compact per-user record: {what}'s lists ({prefix}_item_id or the item "
                f"address, {', '.join(others)}) differ in length (a corrupt record)"])]):
            return tf.identity(item)

    item = items("hist", "the history", ("hist_ts_delta", "hist_engage_q"))
    ts_step = tf.cast(parsed.get("ts_step", tf.constant(1, tf.int64)), tf.int64)
    out = {"user_id": parsed["user_id"], "user_key": parsed["user_key"],
           "hist_item_id": item,
           "hist_cate_id": lookup(item, cate_table, parsed["hist_cate_exc_pos"],
                                  parsed["hist_cate_exc_id"], "the history"),
           "hist_ts": tf.cumsum(parsed["hist_ts_delta"]) * ts_step,
           "hist_engage": tf.cast(parsed["hist_engage_q"], tf.float32) * parsed["engage_step"],
           "hist_domain": lookup(item, domain_table, parsed["hist_domain_exc_pos"],
                                 parsed["hist_domain_exc_val"], "the history"),
           "hist_cluster_size": parsed["hist_cluster_size"]}
    if "imp_item_id" in parsed:
        imp = items("imp", "the impressions",
                    ("imp_ts_delta", "imp_label_q", "imp_hist_index_delta"))
        out.update({"imp_item_id": imp,
                    "imp_cate_id": lookup(imp, cate_table, parsed["imp_cate_exc_pos"],
                                          parsed["imp_cate_exc_id"], "the impressions"),
                    "imp_ts": tf.cumsum(parsed["imp_ts_delta"]),
                    "imp_label": tf.cast(parsed["imp_label_q"], tf.float32),
                    "imp_hist_index": tf.cumsum(parsed["imp_hist_index_delta"])})
    return out
