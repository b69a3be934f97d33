"""The batched precompute engine's pieces (beam_jobs/precompute_batched.py): the raw-bytes
record key and fingerprint equal the parsed ones, the wire-format scan falls back on
encodings it does not read, and the per-batch cache-row encoder decodes to what the
per-user encoder writes. The pipelines themselves: tests/test_incremental_refresh.py."""
import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from beam_jobs import precompute as P
from beam_jobs import precompute_batched as B
from tfmodels import schema as S


def _record(uid, n, seed=0, cluster=False, imps=0):
    rng = np.random.default_rng(seed)
    items = rng.integers(S.FIRST_ID, S.FIRST_ID + 50, size=n)
    hist = {"hist_item_id": items, "hist_cate_id": items % 7 + S.FIRST_ID,
            "hist_ts": 1_600_000_000 + np.arange(n, dtype=np.int64) * 60,
            "hist_engage": rng.random(n).astype(np.float32),
            "hist_domain": np.full(n, S.DEFAULT_DOMAIN)}
    if cluster:
        hist["hist_cluster_size"] = np.arange(1, n + 1)
    imp = {"imp_item_id": [S.FIRST_ID] * imps, "imp_cate_id": [S.FIRST_ID] * imps,
           "imp_ts": [1_700_000_000] * imps, "imp_label": [1.0] * imps,
           "imp_hist_index": [n] * imps}
    return S.encode_user_record(uid, f"u{uid}", hist, imp)


def _parsed_key(rec):
    feat = tf.train.Example.FromString(rec).features.feature
    return (int(feat["user_id"].int64_list.value[0]), *P.history_fingerprint(feat))


def test_history_field_names_cover_the_schema():
    """The fingerprint hashes every history field the schema defines (a new field
    missing here would be a change the fingerprint cannot see)."""
    assert set(S.HISTORY_FIELDS) <= set(P.HISTORY_FIELD_NAMES)


def test_record_key_equals_parsed_fingerprint():
    recs = [_record(2, 30, 1), _record(3, 0), _record(4, 5, 2, cluster=True),
            _record(5, 12, 3, imps=2), _record(2**40, 3, 4)]
    for rec in recs:
        assert B.record_key(rec) == _parsed_key(rec)
    assert B.record_key(recs[1])[2] is None                   # empty history: no last ts
    assert B.record_key(recs[0])[2] == 1_600_000_000 + 29 * 60
    # impressions do not count; history values do
    assert B.record_key(_record(5, 12, 3, imps=0))[1] == B.record_key(recs[3])[1]
    assert B.record_key(_record(5, 12, 4))[1] != B.record_key(recs[3])[1]


def test_extra_history_fields_enter_the_fingerprint():
    """A field beyond the v1 names (a compact record's hist_ts_delta) is hashed when
    present; a record without such fields keeps its v1 fingerprint."""
    rec = _record(7, 10, 5)
    ex = tf.train.Example.FromString(rec)
    ex.features.feature["hist_ts_delta"].int64_list.value.extend([1, 2, 3])
    ex.features.feature["record_format"].bytes_list.value.append(b"compact_v1")
    extra = ex.SerializeToString()
    assert B.record_key(extra) == _parsed_key(extra)
    assert B.record_key(extra)[1] != B.record_key(rec)[1]
    ex.features.feature["hist_ts_delta"].int64_list.value[1] = 9
    assert B.record_key(ex.SerializeToString())[1] != B.record_key(extra)[1]


def test_scan_features_spans_and_fallbacks():
    ex = tf.train.Example()
    ex.features.feature["c" * 200].float_list.value.append(1.5)
    assert B.scan_features(ex.SerializeToString()) is None   # a 2-byte key length: parser
    small = tf.train.Example()
    small.features.feature["a"].int64_list.value.extend([1, 300, 2**40])
    small.features.feature["b"].CopyFrom(tf.train.Feature())
    raw = small.SerializeToString()
    spans = B.scan_features(raw)
    assert set(spans) == {"a", "b"}
    assert raw[slice(*spans["a"])] == small.features.feature["a"].SerializeToString()
    assert spans["b"][0] == spans["b"][1]
    assert B.scan_features(b"") == {}
    # two concatenated messages: protobuf merges them (the later user_id wins); the scan
    # refuses and the key comes from the parser, equal to the parsed one
    merged = _record(2, 4, 1) + _record(3, 6, 2)
    assert B.scan_features(merged) is None
    assert B.record_key(merged) == _parsed_key(merged) and B.record_key(merged)[0] == 3
    assert B.scan_features(b"\x0a\x05ab") is None                 # truncated
    assert B.record_key(b"\x00garbage") is None
    assert B.record_key(tf.train.Example().SerializeToString()) is None


def test_encode_cache_batch_decodes_as_the_row_encoder():
    rng = np.random.default_rng(0)
    outputs = {"user_id": np.array([11, 12, 13], np.int64),
               "keys": rng.standard_normal((3, 4, 2)).astype(np.float32),
               "mask": np.array([[1, 0], [1, 1], [0, 0]], np.float32),
               "wide": rng.standard_normal((3, 2)),                       # float64
               "ids": np.array([[5], [6], [7]], np.int32),
               "flag": np.array([[True, False]] * 3)}
    fps = [bytes([i]) * 16 for i in range(3)]
    lasts = [100, None, 300]
    rows = B.encode_cache_batch("m", 4, outputs, fps, lasts)
    assert len(rows) == 3
    for i, row in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in outputs.items() if k != "user_id"}
        ref = P.encode_cache_record("m", 4, int(outputs["user_id"][i]), one, fps[i], lasts[i])
        (n1, u1, v1, t1), (n2, u2, v2, t2) = P.decode_cache_record(row), \
            P.decode_cache_record(ref)
        assert (n1, u1, v1) == (n2, u2, v2) == ("m", 11 + i, 4)
        assert sorted(t1) == sorted(t2) == sorted(one)
        for k in t1:
            assert t1[k].dtype == t2[k].dtype and t1[k].shape == t2[k].shape == one[k].shape
            np.testing.assert_array_equal(t1[k], t2[k])
        assert P.cache_record_meta(row) == P.cache_record_meta(ref)
        assert B.cache_row_meta(row) == P.cache_record_meta(row)
        present = set(tf.train.Example.FromString(row).features.feature)
        assert (P.LAST_TS in present) == (lasts[i] is not None)
    # float64 outputs are stored as float32 values (FloatList), dtype "<f8", by both encoders
    np.testing.assert_array_equal(P.decode_cache_record(rows[1])[3]["wide"],
                                  outputs["wide"][1:2].astype(np.float32).astype(np.float64))
    with pytest.raises(ValueError, match="fingerprint"):
        B.encode_cache_batch("m", 4, outputs, [None] * 3, lasts)
    with pytest.raises(ValueError, match="unsupported dtype"):
        B.encode_cache_batch("m", 4, {"user_id": np.array([1]), "s": np.array([["x"]])},
                             [b"f" * 16], [1])


class _FakeTower:
    """A ``user_tower`` stand-in: record b"u<id>" -> user_id id and x = [id, 2 id];
    ``wrong`` user ids are returned as id + 1000 (a model answering for other users)."""

    def __init__(self, wrong=()):
        self.wrong, self.calls = set(wrong), []

    def __call__(self, records):
        ids = [int(r[1:]) for r in records.numpy()]
        self.calls.append(ids)
        uid = [i + 1000 if i in self.wrong else i for i in ids]
        return {"user_id": tf.constant(uid, tf.int64),
                "x": tf.constant([[i, 2 * i] for i in ids], tf.float32)}


def _bucket(fn, batch_size):
    rb = B.RefreshBucket("unused", "m", 3, "unused", 1, batch_size, "none", [], [])
    rb._fn = fn
    return rb


def test_towers_keep_order_and_pad_the_tail():
    """Rows come out in input order, one per user with its own tensors and metadata;
    the tail batch is padded to the batch size with its last record (one XLA shape)
    and the padding rows are cut off."""
    users = list(range(1, 8))
    compute = [(u, bytes([u]) * 16, 100 + u, b"u%d" % u) for u in users]
    fn = _FakeTower()
    rows = list(_bucket(fn, 3)._towers(compute))
    assert fn.calls == [[1, 2, 3], [4, 5, 6], [7, 7, 7]]
    assert [P.decode_cache_record(r)[1] for r in rows] == users
    for u, r in zip(users, rows):
        np.testing.assert_array_equal(P.decode_cache_record(r)[3]["x"], [[u, 2 * u]])
        assert P.cache_record_meta(r).last_behavior_ts == 100 + u
    assert list(_bucket(fn, 3)._towers([])) == []


def test_towers_error_of_a_batch_is_raised_at_that_batch():
    """A batch whose user ids do not match its records fails the bundle with the ids
    named; the batches before it were yielded, none after it."""
    compute = [(u, bytes([u]) * 16, 100 + u, b"u%d" % u) for u in range(1, 8)]
    out = []
    with pytest.raises(RuntimeError, match=r"user_tower returned user ids \[1005"):
        for r in _bucket(_FakeTower(wrong={5}), 2)._towers(compute):
            out.append(P.decode_cache_record(r)[1])
    assert out == [1, 2, 3, 4]
