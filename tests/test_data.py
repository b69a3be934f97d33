"""Windowing of per-user records (schema + tf.data): correctness against a NumPy reference."""
import numpy as np
import pytest
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S


def _record(n_hist=7, cut=(0, 3, 7), seed=0):
    rng = np.random.default_rng(seed)
    hist = {"hist_item_id": np.arange(10, 10 + n_hist), "hist_cate_id": np.arange(2, 2 + n_hist),
            "hist_ts": 1000 + 600 * np.arange(n_hist), "hist_engage": rng.random(n_hist),
            "hist_domain": np.ones(n_hist, int)}
    k = len(cut)
    imps = {"imp_item_id": np.full(k, 99), "imp_cate_id": np.full(k, 5),
            "imp_ts": np.array([1000 + 600 * c + 30 for c in cut]), "imp_label": np.ones(k),
            "imp_hist_index": np.array(cut)}
    return hist, imps, S.encode_user_record(7, "u7", hist, imps)


def reference_window(hist, cut, ts, length):
    """NumPy reference: last `length` rows before `cut`, most recent first, 0-padded."""
    rows = list(range(cut - 1, max(cut - length, 0) - 1, -1))
    item = np.zeros(length, int)
    gap = np.zeros(length, int)
    item[:len(rows)] = hist["hist_item_id"][rows]
    gap[:len(rows)] = S.gap_bucket_np(ts - hist["hist_ts"][rows])
    return item, gap, len(rows)


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_windows_match_reference(length):
    hist, imps, rec = _record()
    out = D.impression_windows(D.parse_user_records(tf.constant(rec)), short_len=2,
                               long_len=length)
    for j, cut in enumerate(imps["imp_hist_index"]):
        item, gap, n = reference_window(hist, cut, imps["imp_ts"][j], length)
        np.testing.assert_array_equal(out["long_item_id"][j].numpy(), item)
        np.testing.assert_array_equal(out["long_gap_bucket"][j].numpy(), gap)
        assert out["long_len"][j].numpy() == n
        # padded positions are exactly zero in every field
        for field in S.SEQUENCE_FIELDS:
            assert np.all(out[S.seq_name("long", field)][j].numpy()[n:] == 0)
    np.testing.assert_array_equal(out["target_item_id"].numpy(), imps["imp_item_id"])


def test_no_future_behavior_is_visible():
    hist, imps, rec = _record(n_hist=20, cut=(0, 1, 5, 19, 20))
    out = D.impression_windows(D.parse_user_records(tf.constant(rec)), 4, 30)
    ts = out["imp_ts"].numpy()
    for j in range(len(ts)):
        n = out["long_len"][j].numpy()
        visible = out["long_item_id"][j].numpy()[:n] - 10   # history index of each row
        assert np.all(hist["hist_ts"][visible] < ts[j])
        assert set(visible) == set(range(imps["imp_hist_index"][j]))


def test_empty_history_user():
    hist, imps, rec = _record(n_hist=0, cut=(0, 0))
    out = D.impression_windows(D.parse_user_records(tf.constant(rec)), 3, 4)
    assert out["long_item_id"].shape == (2, 4)
    assert np.all(out["long_item_id"].numpy() == 0) and np.all(out["long_len"].numpy() == 0)


def test_gap_bucket_tf_matches_numpy():
    gaps = np.array([0, 59, 60, 3600, 86400, 10 ** 9, -5])
    np.testing.assert_array_equal(D.gap_bucket(tf.constant(gaps)).numpy(), S.gap_bucket_np(gaps))
    assert S.gap_bucket_np(np.array([0]))[0] == 1   # a real behavior never lands in bucket 0


def test_dataset_counts_and_shapes(tiny_data):
    meta = S.read_meta(tiny_data)
    ds = D.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 16, shuffle=True, seed=3)
    n = 0
    for batch in ds:
        n += int(batch["label"].shape[0])
        assert batch["long_item_id"].shape[1:] == (24,)
        assert batch["short_item_id"].shape[1:] == (5,)
    assert n == meta["stats"]["impressions"]["train"]


def test_storage_independent_of_window_length(tiny_data):
    """Records hold the history once: nothing on disk depends on L."""
    ds1 = D.make_dataset(S.split_pattern(tiny_data, "test"), 5, 10, 1000)
    ds2 = D.make_dataset(S.split_pattern(tiny_data, "test"), 5, 100, 1000)
    b1, b2 = next(iter(ds1)), next(iter(ds2))
    np.testing.assert_array_equal(b1["long_item_id"].numpy(), b2["long_item_id"].numpy()[:, :10])


def test_user_history_features_sees_whole_history():
    hist, imps, rec = _record(n_hist=7)
    fs = S.FeatureSchema(S.Vocab(200, 20, 20), short_len=3, long_len=5)
    out = D.user_history_features(tf.constant([rec, rec]), fs)
    np.testing.assert_array_equal(out["long_item_id"][0].numpy(), [16, 15, 14, 13, 12])
    np.testing.assert_array_equal(out["short_item_id"][1].numpy(), [16, 15, 14])


def test_encode_rejects_bad_records():
    hist, imps, _ = _record()
    bad = dict(imps, imp_hist_index=np.array([0, 3, 8]))
    with pytest.raises(S.RecordError, match="imp_hist_index 8"):
        S.encode_user_record(1, "u", hist, bad)
    unsorted = dict(hist, hist_ts=hist["hist_ts"][::-1])
    with pytest.raises(S.RecordError, match="non-decreasing"):
        S.encode_user_record(1, "u", unsorted, imps)
    with pytest.raises(S.RecordError, match="missing"):
        S.encode_user_record(1, "u", {"hist_item_id": []}, imps)


def test_schema_check_features_messages():
    fs = S.FeatureSchema(S.Vocab(10, 5, 5), short_len=3, long_len=4)
    with pytest.raises(KeyError, match="missing input feature 'long_item_id'"):
        fs.check_features({}, ["long_item_id"])
    with pytest.raises(ValueError, match="length 7"):
        fs.check_features({"long_item_id": tf.zeros([2, 7], tf.int64)}, ["long_item_id"])
    with pytest.raises(TypeError, match="dtype"):
        fs.check_features({"long_item_id": tf.zeros([2, 4], tf.int32)}, ["long_item_id"])
    with pytest.raises(ValueError, match="lengths must be"):
        S.FeatureSchema(S.Vocab(10, 5, 5), short_len=0)
