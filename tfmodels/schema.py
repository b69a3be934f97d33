"""Feature schema: the single source of truth for names, dtypes, shapes and padding.

Two record kinds exist (``../shared/DESIGN.md``, "Store each user's history once"):

1. **Per-user record** (written once per user and split by ``beam_jobs.prepare``):
   the user's chronological behaviors, *oldest first*, stored once, plus the
   user's labeled impressions. ``imp_hist_index[j]`` is the number of history
   behaviors that happened strictly before impression ``j``; only
   ``hist_*[:imp_hist_index[j]]`` is visible to it.

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
            if dtype == tf.float32:
                feats[name] = _float_feature(float(v) for v in values[name])
            else:
                feats[name] = _int_feature(int(v) for v in values[name])
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
    # deterministic: map order in the bytes must not depend on the process (Beam workers)
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(
        deterministic=True)


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
