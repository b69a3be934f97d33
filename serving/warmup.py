"""TF Serving warmup records: written by the export, replayed by the server before AVAILABLE.

TF Serving's format (https://www.tensorflow.org/tfx/serving/saved_model_warmup):
``<version>/assets.extra/tf_serving_warmup_requests``, a TFRecord file (no
compression) of ``tensorflow.serving.PredictionLog`` messages, at most 1,000. TF
Serving replays each request once when it loads the version, before the version
is AVAILABLE, and fails the load when a record cannot be run; the local server does
the same (:func:`replay`, called by :meth:`serving.servable.SavedModelServable.warmup`
from the model manager's load, so a version is only swapped in warm).

What :func:`warmup_requests` writes for one export (all ``predict_log``):

* one ``rank`` request per XLA candidate bucket up to ``max_candidates`` (the export's
  ``rank_buckets`` ladder, :func:`serving.export.rank_bucket`: 8, 16, ..., 64, 80, 96,
  ..., the first bucket >= ``max_candidates``; a ``--jit_rank`` export pads N to
  those buckets and XLA compiles once per bucket, so each bucket's first request
  would otherwise pay a compilation), with exactly the bucket size as N: the user
  side is a synthetic user's cache computed by the export's own ``user_tower``, so
  the cache values are what a real cache looks like (not zeros);
* one ``user_tower`` request (that user's serialized record) and one
  ``serving_default`` request (the same user, one candidate).

The synthetic user has a full history (the longest window's length) of random
in-vocabulary items and categories, one hour apart. Only the shapes and the code
paths matter for the warm-up; the values only have to be valid.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving import protos
from serving.export import RANK_BUCKETS, rank_bucket
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import LifelongError

log = logging.getLogger("serving.server")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000          # TF Serving reads at most this many warmup records


class WarmupError(ValueError, LifelongError):
    """Warmup records that cannot be written, read or run (the version's load fails)."""


def bucket_sizes(max_candidates: int, ladder: str = RANK_BUCKETS[0]) -> List[int]:
    """The XLA candidate buckets a server with this cap can see, smallest first, up to
    the first one >= the cap: the values of the export's own
    :func:`serving.export.rank_bucket` (evaluated here, not a second copy of the rule)."""
    if int(max_candidates) < 1:
        raise WarmupError(f"max_candidates must be >= 1, got {max_candidates}")
    if ladder not in RANK_BUCKETS:
        raise WarmupError(f"unknown rank_buckets {ladder!r}; one of {list(RANK_BUCKETS)}")

    def bucket(n: int) -> int:
        return int(rank_bucket(tf.constant(n, tf.int32), ladder))
    out = [bucket(1)]
    while out[-1] < int(max_candidates):
        out.append(bucket(out[-1] + 1))
    return out


def synthetic_record(fs: S.FeatureSchema, seed: int = 0) -> bytes:
    """One per-user record with a full history of valid ids (no impressions)."""
    rng = np.random.default_rng(seed)
    v = fs.vocab
    h = max(fs.seq_len(p) for p in fs.prefixes())
    ts = 1_600_000_000 + 3600 * np.arange(h, dtype=np.int64)
    hist = {"hist_item_id": rng.integers(S.FIRST_ID, max(v.num_items, S.FIRST_ID + 1), h),
            "hist_cate_id": rng.integers(S.FIRST_ID, max(v.num_categories, S.FIRST_ID + 1),
                                         h),
            "hist_ts": ts, "hist_engage": rng.random(h).astype(np.float32),
            "hist_domain": (np.where(np.arange(h) % 2 == 0, S.TARGET_DOMAIN, S.SOURCE_DOMAIN)
                            if fs.cross_domain else np.full(h, S.DEFAULT_DOMAIN))}
    user = min(S.FIRST_ID, max(int(v.num_users) - 1, 0))
    return S.encode_user_record(user, "warmup", hist, {k: [] for k in S.IMPRESSION_FIELDS})


def _request(name: str, signature: str, inputs) -> "predict_pb2.PredictRequest":
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = signature
    for k in sorted(inputs):
        protos.fill_tensor_proto(req.inputs[k], inputs[k])
    return req


def warmup_requests(sigs, name: str, max_candidates: int, seed: int = 0
                    ) -> List["predict_pb2.PredictRequest"]:
    """The requests of one export (``sigs``: its :class:`serving.export.ServingSignatures`)."""
    fs = sigs.fs
    record = synthetic_record(fs, seed)
    tower = {k: t.numpy() for k, t in sigs.functions["user_tower"](tf.constant([record])).items()}
    rng = np.random.default_rng(seed + 1)
    v = fs.vocab
    user = {k: tower[k] for k in list(sigs.cache_keys) + list(sigs.short_names)}
    feats = {k: t.numpy() for k, t in D.user_history_features(tf.constant([record]),
                                                              fs).items()}
    for k in sigs.user_scalars:              # user_id / imp_ts [1], as the client sends them
        user[k] = np.asarray(feats[k], sigs.specs[k].dtype.as_numpy_dtype).reshape(1)

    def candidates(n):
        return {"target_item_id": rng.integers(S.FIRST_ID, max(v.num_items, S.FIRST_ID + 1),
                                               n).astype(np.int64),
                "target_cate_id": rng.integers(S.FIRST_ID,
                                               max(v.num_categories, S.FIRST_ID + 1),
                                               n).astype(np.int64)}

    out = [_request(name, "rank", {**user, **candidates(n)})
           for n in bucket_sizes(max_candidates, sigs.rank_buckets)]
    out.append(_request(name, "user_tower", {"records": np.array([record], dtype=object)}))
    default = {k: np.asarray(feats[k], s.dtype.as_numpy_dtype)
               for k, s in sigs.default_specs.items() if k in feats}
    default.update(candidates(1))
    out.append(_request(name, "serving_default", default))
    if len(out) > MAX_RECORDS:
        raise WarmupError(f"{len(out)} warmup requests; TF Serving reads at most {MAX_RECORDS}")
    return out


def write_warmup_file(version_path: str, requests) -> str:
    """Write ``requests`` as ``<version_path>/assets.extra/tf_serving_warmup_requests``."""
    if len(requests) > MAX_RECORDS:
        raise WarmupError(f"{len(requests)} warmup requests; TF Serving reads at most "
                          f"{MAX_RECORDS}")
    path = os.path.join(version_path, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as w:
        for r in requests:
            entry = prediction_log_pb2.PredictionLog()
            entry.predict_log.request.CopyFrom(r)
            w.write(entry.SerializeToString())
    return path


def read_warmup_requests(version_path: str) -> Optional[List["predict_pb2.PredictRequest"]]:
    """The PredictRequests of a version's warmup file; ``None`` when it has none."""
    path = os.path.join(version_path, WARMUP_FILE)
    if not os.path.exists(path):
        return None
    out = []
    try:
        for i, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            if i >= MAX_RECORDS:
                raise WarmupError(f"{path}: more than {MAX_RECORDS} warmup records (TF "
                                  "Serving's limit)")
            entry = prediction_log_pb2.PredictionLog.FromString(raw)
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise WarmupError(f"{path}: record {i} is a {kind}; this server replays "
                                  "predict_log records only")
            out.append(entry.predict_log.request)
    except tf.errors.OpError as e:
        raise WarmupError(f"{path}: not a TFRecord file of PredictionLog: "
                          f"{str(e).splitlines()[0]}") from None
    return out


def replay(servable, requests) -> int:
    """Run each request once on ``servable`` (raises :class:`WarmupError` naming the
    first record that fails); returns how many ran."""
    for i, r in enumerate(requests):
        sig = r.model_spec.signature_name or "serving_default"
        if sig not in servable.signatures:
            raise WarmupError(f"warmup record {i}: no signature '{sig}' in "
                              f"{servable.name} version {servable.version}")
        try:
            servable.run(sig, {k: protos.to_ndarray(t) for k, t in r.inputs.items()})
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WarmupError(f"warmup record {i} ({sig}) failed: {first}") from None
    return len(requests)
