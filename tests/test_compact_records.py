"""Compact per-user records (issue 19 item 5, docs/data.md "Record formats").

The compact record (``per_user_record_compact_v1``) keeps category and domain in the
item table and stores timestamp deltas and quantised engagement; decoded it must equal
the full record exactly (engagement: up to ``engage_step / 2``).
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import LifelongError

# item id -> category / domain: ids 0 (pad), 1 (OOV), 2..5
TABLE = S.ItemTable(np.array([0, 1, 5, 6, 5, 7]), np.array([0, 1, 1, 2, 1, 2]))
# rows: item 2 (table cate 5), 3 (6), 4 (5) but stored with cate 8 (an exception),
# the OOV item 1 with its own category 9 and domain 2, item 2 again with domain 2.
HIST = {"hist_item_id": [2, 3, 4, 1, 2], "hist_cate_id": [5, 6, 8, 9, 5],
        "hist_ts": [1_500_000_100, 1_500_000_160, 1_500_000_160, 1_500_003_000, 1_500_003_100],
        "hist_engage": [0.5, 4.0, 3.5, 1.0, 0.26], "hist_domain": [1, 2, 1, 2, 2]}
IMPS = {"imp_item_id": [3, 5, 1], "imp_cate_id": [6, 7, 4], "imp_ts": [1_500_003_200,
                                                                     1_500_003_300, 1_500_003_300],
        "imp_label": [1.0, 0.0, 1.0], "imp_hist_index": [3, 5, 5]}


def _features(raw):
    f = tf.train.Example.FromString(raw).features.feature
    return {k: list(getattr(v, v.WhichOneof("kind")).value) for k, v in f.items()
            if v.WhichOneof("kind")}


def test_compact_layout_and_exact_decode():
    raw = S.encode_compact_user_record(7, "u7", HIST, IMPS, TABLE, 0.5)
    f = _features(raw)
    # per behavior only item id, timestamp delta, quantised engagement; no category
    # or domain lists, only the rows that differ from the table
    assert "hist_cate_id" not in f and "hist_domain" not in f and "hist_ts" not in f
    assert f["hist_ts_delta"] == [1_500_000_100, 60, 0, 2840, 100]
    assert f["hist_engage_q"] == [1, 8, 7, 2, 1]          # round(engage / 0.5)
    assert f["hist_cate_exc_pos"] == [2, 3] and f["hist_cate_exc_id"] == [8, 9]
    assert f["hist_domain_exc_pos"] == [3, 4] and f["hist_domain_exc_val"] == [2, 2]
    assert f["imp_cate_exc_pos"] == [2] and f["imp_cate_exc_id"] == [4]
    assert f["imp_ts_delta"] == [1_500_003_200, 100, 0]
    assert f["imp_hist_index_delta"] == [3, 2, 0] and f["imp_label_q"] == [1, 0, 1]
    assert f["record_format"] == [S.COMPACT_MARKER]

    got = S.decode_user_record(raw, TABLE)
    want = S.decode_user_record(S.encode_user_record(7, "u7", HIST, IMPS))
    assert set(got) == set(want)
    for k in want:
        if k != "hist_engage":
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
            assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
    # half-star ratings are exact with step 0.5; 0.26 -> round(0.52) * 0.5 = 0.5
    np.testing.assert_array_equal(got["hist_engage"], np.float32([0.5, 4.0, 3.5, 1.0, 0.5]))
    # full_record_bytes gives the full format back (engagement on the grid)
    back = S.decode_user_record(S.full_record_bytes(raw, TABLE))
    np.testing.assert_array_equal(back["hist_cate_id"], HIST["hist_cate_id"])


@pytest.mark.parametrize("step,values,want", [
    (1.0, [1, 2, 3, 4], [1, 2, 3, 4]),                       # Taobao behavior codes: exact
    (0.5, [0.5, 1.5, 2.5, 5.0], [0.5, 1.5, 2.5, 5.0]),       # MovieLens half stars: exact
    (0.0625, [0.0, 0.03, 0.1, 0.97], [0.0, 0.0, 0.125, 1.0]),  # synthetic: nearest 1/16
])
def test_engagement_quantisation(step, values, want):
    hist = dict(HIST, hist_engage=values, **{k: HIST[k][:4] for k in HIST if k != "hist_engage"})
    imps = dict(IMPS, imp_hist_index=[3, 4, 4])
    got = S.decode_user_record(S.encode_compact_user_record(1, "u", hist, imps, TABLE, step),
                               TABLE)["hist_engage"]
    np.testing.assert_array_equal(got, np.float32(want))
    assert np.abs(got - np.float32(values)).max() <= step / 2


def test_graph_decode_equals_python_decode():
    raw = S.encode_compact_user_record(7, "u7", HIST, IMPS, TABLE, 0.0625)
    py = S.decode_user_record(raw, TABLE)
    tf_ = {k: v.numpy() for k, v in D.parse_user_records(tf.constant(raw), item_table=TABLE).items()}
    for k in py:
        np.testing.assert_array_equal(tf_[k], py[k], err_msg=k)
    np.testing.assert_array_equal(tf_["hist_cluster_size"], [1] * 5)   # optional default
    hist_only = D.parse_user_records(tf.constant(raw), with_impressions=False, item_table=TABLE)
    assert "imp_item_id" not in hist_only
    np.testing.assert_array_equal(hist_only["hist_cate_id"].numpy(), HIST["hist_cate_id"])


def test_item_ids_outside_the_table_are_rejected():
    small = S.ItemTable(np.array([0, 1, 5, 6]), np.array([0, 1, 1, 2]), "a 4-row table")
    with pytest.raises(S.CompactRecordError, match="item id 4 outside the item table"):
        S.encode_compact_user_record(7, "u7", HIST, IMPS, small, 0.5)
    raw = S.encode_compact_user_record(7, "u7", HIST, IMPS, TABLE, 0.5)
    with pytest.raises(LifelongError, match=r"item id 4 outside the item table \(a 4-row table"):
        S.decode_user_record(raw, small)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the item table"):
        D.parse_user_records(tf.constant(raw), item_table=small)


def test_bad_engage_step_and_labels():
    with pytest.raises(S.CompactRecordError, match="power of two"):
        S.encode_compact_user_record(7, "u7", HIST, IMPS, TABLE, 0.1)
    with pytest.raises(S.CompactRecordError, match="integer labels"):
        S.encode_compact_user_record(7, "u7", HIST, dict(IMPS, imp_label=[0.5, 0, 1]), TABLE, 1.0)
    with pytest.raises(S.RecordError, match="non-decreasing"):
        S.encode_compact_user_record(7, "u7", dict(HIST, hist_ts=[5, 4, 6, 7, 8]), IMPS,
                                     TABLE, 1.0)


def _write_pair(tmp_path, users=12, seed=0):
    """The same records as a full and a compact prepared dataset (engagement on the
    1/16 grid, so both decode to the same values); OOV rows and category / domain
    exceptions included."""
    rng = np.random.default_rng(seed)
    n_items = len(TABLE)
    dirs = {fmt: str(tmp_path / fmt) for fmt in ("full", "compact")}
    for d in dirs.values():
        os.makedirs(os.path.join(d, "vocab"))
    writers = {fmt: tf.io.TFRecordWriter(os.path.join(d, "train-00000-of-00001.tfrecord.gz"),
                                         options="GZIP") for fmt, d in dirs.items()}
    for u in range(users):
        h = int(rng.integers(0, 12))
        items = rng.integers(S.OOV_ID, n_items, size=h)
        cate = TABLE.cate[items].copy()
        dom = TABLE.domain[items].copy()
        flip = rng.random(h) < 0.2
        cate[flip] = 9
        dom[rng.random(h) < 0.2] = 2
        ts = np.sort(rng.integers(1_500_000_000, 1_500_100_000, size=h))
        hist = {"hist_item_id": items, "hist_cate_id": cate, "hist_ts": ts,
                "hist_engage": np.round(rng.random(h) * 16) / 16, "hist_domain": dom}
        k = 3
        idx = np.sort(rng.integers(0, h + 1, size=k))
        imp_items = rng.integers(S.OOV_ID, n_items, size=k)
        imps = {"imp_item_id": imp_items, "imp_cate_id": TABLE.cate[imp_items],
                "imp_ts": np.array([ts[i - 1] + 30 if i else 1_499_999_000 for i in idx]),
                "imp_label": rng.integers(0, 2, size=k).astype(float), "imp_hist_index": idx}
        writers["full"].write(S.encode_user_record(S.FIRST_ID + u, f"u{u}", hist, imps))
        writers["compact"].write(S.encode_compact_user_record(S.FIRST_ID + u, f"u{u}", hist,
                                                              imps, TABLE, 1 / 16))
    for w in writers.values():
        w.close()
    meta = {"vocab": {"num_items": n_items, "num_categories": 10, "num_users": users + 2,
                      "num_domains": 3}, "format": S.FORMAT_FULL}
    with open(os.path.join(dirs["full"], S.META_FILE), "w") as f:
        json.dump(meta, f)
    meta = dict(meta, format=S.FORMAT_COMPACT, record={"item_table": S.ITEM_TABLE_FILE,
                                                       "engage_step": 1 / 16})
    with open(os.path.join(dirs["compact"], S.META_FILE), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(dirs["compact"], S.ITEM_TABLE_FILE), "w") as f:
        f.write(TABLE.to_tsv())
    return dirs


@pytest.mark.parametrize("cross_domain", [False, True])
def test_model_input_parity(tmp_path, cross_domain):
    dirs = _write_pair(tmp_path)
    assert S.load_item_table(dirs["full"]) is None
    assert len(S.load_item_table(dirs["compact"])) == len(TABLE)
    batches = {fmt: list(D.make_dataset(S.split_pattern(d, "train"), 3, 8, 5,
                                        cross_domain=cross_domain))
               for fmt, d in dirs.items()}
    assert len(batches["full"]) == len(batches["compact"]) > 0
    for a, b in zip(batches["full"], batches["compact"]):
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    # the user tower's windows too
    raws = [r for r in tf.data.TFRecordDataset(S.split_pattern(dirs["compact"], "train")
                                               .replace("*", "00000-of-00001"),
                                               compression_type="GZIP")]
    fulls = [r for r in tf.data.TFRecordDataset(S.split_pattern(dirs["full"], "train")
                                                .replace("*", "00000-of-00001"),
                                                compression_type="GZIP")]
    fs = S.FeatureSchema.from_data_dir(dirs["full"], 3, 8, cross_domain)
    u_full = D.user_history_features(tf.stack(fulls), fs)
    u_comp = D.user_history_features(tf.stack(raws), fs, item_table=TABLE)
    for k in u_full:
        np.testing.assert_array_equal(u_full[k].numpy(), u_comp[k].numpy(), err_msg=k)


def test_compact_dataset_without_its_item_table(tmp_path):
    dirs = _write_pair(tmp_path, users=3)
    os.remove(os.path.join(dirs["compact"], S.ITEM_TABLE_FILE))
    with pytest.raises(S.MissingItemTableError, match="item table .*item_table.tsv is missing"):
        D.make_dataset(S.split_pattern(dirs["compact"], "train"), 3, 8, 5)
    assert issubclass(S.MissingItemTableError, LifelongError)
    raw = next(iter(tf.data.TFRecordDataset(
        os.path.join(dirs["compact"], "train-00000-of-00001.tfrecord.gz"),
        compression_type="GZIP"))).numpy()
    with pytest.raises(LifelongError, match="needs the dataset's item table"):
        S.decode_user_record(raw, None)
    # the records without meta.json (bare files) are read as full: a clear failure
    with pytest.raises(tf.errors.InvalidArgumentError, match="read without its item table"):
        D.parse_user_records(tf.constant(raw))


def test_derive_item_table_most_frequent_with_ties():
    from lifelong.bench.storage import derive_item_table
    recs = [{"hist_item_id": np.array([2, 2, 2, 3, 3]), "hist_cate_id": np.array([4, 5, 5, 7, 6]),
             "hist_domain": np.array([1, 2, 2, 1, 1]),
             "imp_item_id": np.array([4]), "imp_cate_id": np.array([8])}]
    t = derive_item_table(recs, 6)
    np.testing.assert_array_equal(t.cate, [0, 1, 5, 6, 8, 1])     # item 3: tie 6/7 -> 6
    np.testing.assert_array_equal(t.domain, [0, 1, 2, 1, 1, 1])   # item 4: no behavior -> 1


def test_bench_storage_writes_the_same_records_in_both_formats(tmp_path):
    from lifelong.bench.storage import write_formats
    from tfmodels.testing import write_tiny_dataset
    src = write_tiny_dataset(str(tmp_path / "src"), num_users=6, domains=2)
    res = write_formats(src, str(tmp_path / "out"), "train")
    table = S.load_item_table(res["formats"]["compact"]["dir"])
    assert res["engage_step"] == 1.0     # an unknown source: step 1 (bound 0.5)

    def read(fmt):
        files = S.split_pattern(res["formats"][fmt]["dir"], "train")
        return [S.decode_user_record(r.numpy(), table) for r in
                tf.data.TFRecordDataset(tf.io.gfile.glob(files), compression_type="GZIP")]
    full, comp = read("full"), read("compact")
    assert len(full) == len(comp) == res["records"] == 6
    assert res["behaviors"] == sum(len(r["hist_item_id"]) for r in full)
    for a, b in zip(full, comp):
        for k in a:
            if k == "hist_engage":
                assert np.abs(a[k] - b[k]).max(initial=0) <= 0.5
            else:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert res["engage_max_abs_error_measured"] <= 0.5
