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


# --- the user tower's batched parse (issue 19 item 1) against the per-record path -----
# item id -> category / domain (rows 0 pad, 1 OOV, then 2..7); domain 3 = neither the
# target (1) nor the source (2) domain of a cross-domain schema
_TABLE = S.ItemTable(np.array([0, 1, 5, 6, 5, 7, 3, 3]), np.array([0, 1, 1, 2, 1, 2, 1, 2]))
_HIST_LENS = (0, 1, 3, 7, 12, 30, 0, 9)   # L = 8 below: empty, short, exactly-ish, > L


def _tower_records(compact: bool, cross: bool, seed: int = 0):
    """One record per _HIST_LENS entry; every other user stores hist_cluster_size;
    category / domain exceptions against _TABLE; timestamps with ties."""
    rng = np.random.default_rng(seed)
    out, hists = [], []
    for u, n in enumerate(_HIST_LENS):
        items = rng.integers(S.OOV_ID, len(_TABLE), n)
        hist = {"hist_item_id": items,
                "hist_cate_id": np.where(rng.random(n) < 0.3, rng.integers(2, 9, n),
                                         _TABLE.cate[items]),
                "hist_ts": np.sort(rng.integers(1_500_000_000, 1_500_000_000 + 90_000, n) // 60 * 60),
                "hist_engage": rng.integers(0, 8, n) * 0.5,
                "hist_domain": (np.where(rng.random(n) < 0.3, rng.integers(1, 4, n),
                                         _TABLE.domain[items]) if cross else np.ones(n, int))}
        if u % 2:
            hist["hist_cluster_size"] = rng.integers(1, 5, n)
        imps = {k: [] for k in S.IMPRESSION_FIELDS}
        out.append(S.encode_compact_user_record(S.FIRST_ID + u, f"u{u}", hist, imps, _TABLE, 0.5)
                   if compact else S.encode_user_record(S.FIRST_ID + u, f"u{u}", hist, imps))
        hists.append(hist)
    return out, hists


def _assert_same(got, want, what):
    assert set(got) == set(want), (what, set(got) ^ set(want))
    for k in want:
        g, w = got[k].numpy(), want[k].numpy()
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.shape, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("cross", [False, True], ids=["single_domain", "cross_domain"])
@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
def test_batched_user_history_features_equal_the_per_record_path(compact, cross):
    recs, hists = _tower_records(compact, cross)
    fs = S.FeatureSchema(S.Vocab(20, 20, 20, 4), short_len=3, long_len=8, cross_domain=cross)
    table = _TABLE if compact else None
    batch = tf.constant(recs)
    # (the per-record reference costs ~1 s an eager call: three snapshots, one empty batch)
    for snap in (1_500_045_000, 0, None):   # mid-history, before every behavior, none
        st = None if snap is None else tf.constant(snap, tf.int64)
        got = D.user_history_features(batch, fs, st, item_table=table)
        _assert_same(got, D.user_history_features_map_fn(batch, fs, st, item_table=table),
                     f"snapshot {snap}")
    # in a graph too (against the eager result just compared), and an empty batch
    graph = tf.function(lambda r: D.user_history_features(r, fs, item_table=table))
    _assert_same(graph(batch), got, "tf.function")
    _assert_same(D.user_history_features(batch[:0], fs, item_table=table),
                 D.user_history_features_map_fn(batch[:0], fs, item_table=table), "empty batch")
    if cross:
        return
    # by hand: user 4 (12 behaviors > L = 8) sees its latest 8, most recent first; user 5
    # stores cluster sizes, user 4 does not (1 per row); user 0 has no behaviors
    h = hists[4]
    np.testing.assert_array_equal(got["long_item_id"][4].numpy(), h["hist_item_id"][::-1][:8])
    np.testing.assert_array_equal(got["short_item_id"][4].numpy(), h["hist_item_id"][::-1][:3])
    np.testing.assert_array_equal(got["long_cluster_size"][4].numpy(), [1] * 8)
    np.testing.assert_array_equal(got["long_cluster_size"][5].numpy(),
                                  hists[5]["hist_cluster_size"][::-1][:8])
    assert got["long_len"].numpy().tolist() == [min(n, 8) for n in _HIST_LENS]
    assert got["imp_ts"][4].numpy() == h["hist_ts"][-1] and got["imp_ts"][0].numpy() == 0
    assert not got["long_item_id"][0].numpy().any() and not got["long_gap_bucket"][0].numpy().any()
    # user 2 (3 behaviors): rows 3.. are padding (0 in every field); its last behavior's
    # gap to the reference (its own timestamp) is 0 minutes -> bucket 1
    assert not got["long_engage"][2].numpy()[3:].any() and got["long_gap_bucket"][2, 0] == 1


def test_batched_user_history_features_reject_bad_records():
    fs = S.FeatureSchema(S.Vocab(20, 20, 20), short_len=3, long_len=8)
    recs, _ = _tower_records(compact=True, cross=False)
    # the messages of the per-record path
    with pytest.raises(tf.errors.InvalidArgumentError, match="read without its item table"):
        D.user_history_features(tf.constant(recs), fs)
    small = S.ItemTable(_TABLE.cate[:4], _TABLE.domain[:4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds item ids outside the item"):
        D.user_history_features(tf.constant(recs), fs, item_table=small)
    # an exception position past the record's rows: per record the scatter failed; in a
    # batch it would write into the next user's rows
    ex = tf.train.Example.FromString(recs[3])
    pos = ex.features.feature["hist_cate_exc_pos"].int64_list
    del pos.value[:]
    pos.value.extend([7] * len(ex.features.feature["hist_cate_exc_id"].int64_list.value))
    bad = [recs[2], ex.SerializeToString(), recs[4]]
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the record's rows"):
        D.user_history_features(tf.constant(bad), fs, item_table=_TABLE)
    # a full record whose hist_cate_id is shorter than hist_item_id: per record a gather
    # failed; in a batch the rows would come from another user
    full, _ = _tower_records(compact=False, cross=False)
    ex = tf.train.Example.FromString(full[3])
    del ex.features.feature["hist_cate_id"].int64_list.value[-1]
    bad = [full[2], ex.SerializeToString(), full[4]]
    with pytest.raises(tf.errors.InvalidArgumentError):
        D.user_history_features_map_fn(tf.constant(bad), fs)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="hist_cate_id has fewer values than hist_item_id"):
        D.user_history_features(tf.constant(bad), fs)
    cross = S.FeatureSchema(S.Vocab(20, 20, 20, 3), short_len=3, long_len=8, cross_domain=True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="hist_cate_id has fewer values than the target- and source-domain"):
        D.user_history_features(tf.constant(bad), cross)
