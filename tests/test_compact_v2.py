"""Compact per-user records v2 (issue 19 item 5, session 8; docs/data.md "Record formats").

``per_user_record_compact_v2`` = v1 with the item id stored as its item-table address
(group = the item's category among the table's categories, rank = its place in that
category in id order) and optional lossy history timestamps (``ts_step``). Decoded it
must equal the full record exactly (engagement up to ``engage_step / 2``, history
timestamps up to ``ts_step / 2``), in NumPy and in-graph, and v1 records keep decoding.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import LifelongError

# item id -> category / domain: ids 0 (pad), 1 (OOV), 2..5. Categories present: 0, 1,
# 5, 6, 7 -> groups 0..4; group of category 5 (index 2) holds items 2, 4 (ranks 0, 1).
TABLE = S.ItemTable(np.array([0, 1, 5, 6, 5, 7]), np.array([0, 1, 1, 2, 1, 2]))
HIST = {"hist_item_id": [2, 3, 4, 1, 2], "hist_cate_id": [5, 6, 8, 9, 5],
        "hist_ts": [1_500_000_100, 1_500_000_160, 1_500_000_160, 1_500_003_000, 1_500_003_100],
        "hist_engage": [0.5, 4.0, 3.5, 1.0, 0.26], "hist_domain": [1, 2, 1, 2, 2]}
# impression timestamps and history indexes go back and forth: negative deltas
IMPS = {"imp_item_id": [3, 5, 1], "imp_cate_id": [6, 7, 4],
        "imp_ts": [1_500_003_200, 1_500_000_150, 1_500_003_300],
        "imp_label": [1.0, 0.0, 1.0], "imp_hist_index": [5, 1, 5]}


def _features(raw):
    f = tf.train.Example.FromString(raw).features.feature
    return {k: list(getattr(v, v.WhichOneof("kind")).value) for k, v in f.items()
            if v.WhichOneof("kind")}


def _full(hist, imps, uid=7, key="u7"):
    return S.decode_user_record(S.encode_user_record(uid, key, hist, imps))


def _graph(raw, table=TABLE, with_impressions=True):
    return {k: v.numpy() for k, v in D.parse_user_records(
        tf.constant(raw), with_impressions=with_impressions, item_table=table).items()}


def _assert_same(got, want, skip=()):
    assert set(got) >= set(want) - set(skip)
    for k in want:
        if k in skip:
            continue
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k


def test_item_table_address_by_hand():
    g = TABLE.groups
    np.testing.assert_array_equal(g["categories"], [0, 1, 5, 6, 7])
    np.testing.assert_array_equal(g["group"], [0, 1, 2, 3, 2, 4])
    np.testing.assert_array_equal(g["rank"], [0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(g["order"], [0, 1, 2, 4, 3, 5])
    np.testing.assert_array_equal(g["start"], [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(g["size"], [1, 1, 2, 1, 1])


def test_v2_layout_and_exact_decode():
    raw = S.encode_compact_v2_user_record(7, "u7", HIST, IMPS, TABLE, 0.5)
    f = _features(raw)
    assert f["record_format"] == [S.COMPACT_V2_MARKER] and S.is_compact_record(raw)
    assert "hist_item_id" not in f and "imp_item_id" not in f and "hist_cate_id" not in f
    # items 2, 3, 4, 1, 2 -> (group, rank) (2, 0), (3, 0), (2, 1), (1, 0), (2, 0)
    assert f["hist_item_group"] == [2, 3, 2, 1, 2] and f["hist_item_rank"] == [0, 0, 1, 0, 0]
    assert f["imp_item_group"] == [3, 4, 1] and f["imp_item_rank"] == [0, 0, 0]
    assert f["ts_step"] == [1]
    assert f["hist_ts_delta"] == [1_500_000_100, 60, 0, 2840, 100]
    assert f["hist_engage_q"] == [1, 8, 7, 2, 1]
    assert f["hist_cate_exc_pos"] == [2, 3] and f["hist_cate_exc_id"] == [8, 9]
    assert f["hist_domain_exc_pos"] == [3, 4] and f["hist_domain_exc_val"] == [2, 2]
    assert f["imp_cate_exc_pos"] == [2] and f["imp_cate_exc_id"] == [4]
    assert f["imp_ts_delta"] == [1_500_003_200, -3050, 3150]          # signed
    assert f["imp_hist_index_delta"] == [5, -4, 4] and f["imp_label_q"] == [1, 0, 1]

    want = _full(HIST, IMPS)
    got = S.decode_user_record(raw, TABLE)
    _assert_same(got, want, skip=("hist_engage",))
    np.testing.assert_array_equal(got["hist_engage"], np.float32([0.5, 4.0, 3.5, 1.0, 0.5]))
    _assert_same(_graph(raw), got)
    back = S.decode_user_record(S.full_record_bytes(raw, TABLE))
    _assert_same(back, got)


def test_ts_step_rounds_history_timestamps_only():
    raw = S.encode_compact_v2_user_record(7, "u7", HIST, IMPS, TABLE, 0.5, ts_step=60)
    f = _features(raw)
    # round(ts / 60): 25000001.67 -> 25000002, 25000002.67 -> 25000003 (twice),
    # 25000050 exactly, 25000051.67 -> 25000052
    assert f["ts_step"] == [60] and f["hist_ts_delta"] == [25_000_002, 1, 0, 47, 2]
    got = S.decode_user_record(raw, TABLE)
    np.testing.assert_array_equal(got["hist_ts"], [1_500_000_120, 1_500_000_180, 1_500_000_180,
                                                   1_500_003_000, 1_500_003_120])
    assert np.abs(got["hist_ts"] - np.array(HIST["hist_ts"])).max() <= 30
    np.testing.assert_array_equal(got["imp_ts"], IMPS["imp_ts"])          # exact
    _assert_same(_graph(raw), got)
    # a half step rounds up: |error| = ts_step / 2 at most
    hist = dict(HIST, hist_ts=[30, 89, 90, 91, 150])
    imps = dict(IMPS, imp_ts=[200, 200, 200])
    got = S.decode_user_record(S.encode_compact_v2_user_record(
        7, "u7", hist, imps, TABLE, 0.5, ts_step=60), TABLE)["hist_ts"]
    np.testing.assert_array_equal(got, [60, 60, 120, 120, 180])


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_one_behavior(n):
    hist = {k: v[:n] for k, v in HIST.items()}
    imps = dict(IMPS, imp_hist_index=[0, n, n])
    raw = S.encode_compact_v2_user_record(3, "u3", hist, imps, TABLE, 0.5, ts_step=10)
    got = S.decode_user_record(raw, TABLE)
    want = _full(dict(hist, hist_ts=[1_500_000_100][:n]), imps, 3, "u3")
    _assert_same(got, want)
    assert got["hist_item_id"].shape == (n,)
    _assert_same(_graph(raw), got)
    hist_only = _graph(raw, with_impressions=False)
    assert "imp_item_id" not in hist_only
    np.testing.assert_array_equal(hist_only["hist_cluster_size"], [1] * n)


def test_values_needing_1_2_4_and_8_bytes():
    # one category holding 70,000 items: ranks past 2**8 and 2**16; a sparse category
    # id past 2**32 (its group index stays small); timestamp deltas past 2**32, up to
    # ~2**62; engagement quantised past 2**16 (step 1)
    n = 70_002
    cate = np.full(n, 3, np.int64)
    cate[:2] = [0, 1]
    cate[-1] = 2 ** 40
    table = S.ItemTable(cate, np.ones(n, np.int64), "a 70,002-row table")
    items = [2, 257, 65_537, 70_000, n - 1, 1]
    hist = {"hist_item_id": items, "hist_cate_id": cate[items],
            "hist_ts": [0, 255, 65_791, 2 ** 33, 2 ** 62, 2 ** 62 + 1],
            "hist_engage": [0.0, 1.0, 255.0, 256.0, 70_000.0, 3.0],
            "hist_domain": [1] * 6}
    imps = {"imp_item_id": [n - 1, 65_537], "imp_cate_id": [2 ** 40, 3],
            "imp_ts": [2 ** 62 + 5, 10], "imp_label": [0.0, 1.0], "imp_hist_index": [6, 2]}
    raw = S.encode_compact_v2_user_record(9, "u9", hist, imps, table, 1.0)
    f = _features(raw)
    assert f["hist_item_rank"] == [0, 255, 65_535, 69_998, 0, 0]
    assert f["hist_item_group"] == [2, 2, 2, 2, 3, 1]
    assert f["hist_ts_delta"] == [0, 255, 65_536, 2 ** 33 - 65_791, 2 ** 62 - 2 ** 33, 1]
    got = S.decode_user_record(raw, table)
    _assert_same(got, _full(hist, imps, 9, "u9"))
    _assert_same(_graph(raw, table), got)


def _v2_batch_equals_full(hist_imps, table):
    """user_history_features (the batched reader: serving's user tower, precompute) on
    v1 and v2 records mixed in one batch equals the full records'."""
    full, mixed = [], []
    for i, (h, m) in enumerate(hist_imps):
        full.append(S.encode_user_record(i + 2, f"u{i}", h, m))
        enc = S.encode_compact_v2_user_record if i % 2 else S.encode_compact_user_record
        mixed.append(enc(i + 2, f"u{i}", h, m, table, 0.5))
    fs = S.FeatureSchema(S.Vocab(num_items=len(table), num_categories=10, num_users=20,
                                 num_domains=3), 3, 8)
    a = D.user_history_features(tf.constant(full), fs)
    b = D.user_history_features(tf.constant(mixed), fs, item_table=table)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def test_batched_reader_on_v1_and_v2_records_in_one_batch():
    hist2 = {k: v[:2] for k, v in HIST.items()}
    hist0 = {k: v[:0] for k, v in HIST.items()}
    engage = dict(HIST, hist_engage=[0.5, 4.0, 3.5, 1.0, 0.5])
    _v2_batch_equals_full([(engage, IMPS), (engage, IMPS), (hist2, dict(IMPS, imp_hist_index=[2, 2, 2])),
                           (hist0, dict(IMPS, imp_hist_index=[0, 0, 0]))], TABLE)


def _corrupt(raw, **fields):
    ex = tf.train.Example.FromString(raw)
    for k, v in fields.items():
        if v is None:
            del ex.features.feature[k]
        elif isinstance(v, bytes):
            ex.features.feature[k].CopyFrom(S._bytes_feature([v]))
        else:
            ex.features.feature[k].CopyFrom(S._int_feature(v))
    return ex.SerializeToString()


@pytest.mark.parametrize("fields,numpy_msg,graph_msg", [
    ({"hist_item_rank": [0, 0, 1, 0]}, "5 item groups but 4 item ranks",
     "group and rank lists differ"),
    ({"hist_item_rank": [0, 0, 2, 0, 0]}, r"item address \(group 2, rank 2\) that is not in",
     "not in the item table"),
    ({"hist_item_group": [2, 3, 9, 1, 2]}, r"item address \(group 9, rank 1\)",
     "not in the item table"),
    ({"hist_ts_delta": [1, 2, 3]}, "hist_ts_delta holds 3 values", "differ in length"),
    ({"imp_label_q": [1]}, "imp_label_q holds 1 values", "differ in length"),
    ({"hist_item_id": [2, 3]}, "both item ids and item addresses", "differ in length"),
])
def test_corrupt_v2_records_are_rejected(fields, numpy_msg, graph_msg):
    raw = S.encode_compact_v2_user_record(7, "u7", HIST, IMPS, TABLE, 0.5)
    bad = _corrupt(raw, **fields)
    if numpy_msg:
        with pytest.raises(S.CompactRecordError, match=numpy_msg):
            S.decode_user_record(bad, TABLE)
        assert issubclass(S.CompactRecordError, LifelongError)
    with pytest.raises(tf.errors.InvalidArgumentError, match=graph_msg):
        _graph(bad)


def test_unknown_marker_and_missing_table():
    raw = S.encode_compact_v2_user_record(7, "u7", HIST, IMPS, TABLE, 0.5)
    with pytest.raises(S.CompactRecordError, match="unknown per-user record format marker"):
        S.decode_user_record(_corrupt(raw, record_format=b"compact_v9"), TABLE)
    with pytest.raises(LifelongError, match=r"compact_v2\) needs the dataset's item table"):
        S.decode_user_record(raw, None)
    with pytest.raises(tf.errors.InvalidArgumentError, match="read without its item table"):
        D.parse_user_records(tf.constant(raw))
    fs = S.FeatureSchema(S.Vocab(num_items=6, num_categories=10, num_users=9, num_domains=3), 3, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="read without its item table"):
        D.user_history_features(tf.constant([raw]), fs)


@pytest.mark.parametrize("step", [0, -60, 1.5, 86_401, "x"])
def test_bad_ts_step(step):
    with pytest.raises(S.CompactRecordError, match="ts step must be a whole number"):
        S.encode_compact_v2_user_record(7, "u7", HIST, IMPS, TABLE, 0.5, ts_step=step)


def _write(tmp_path, fmt, users=10, seed=0, ts_step=1):
    """The same random records (OOV rows, category / domain exceptions, engagement on
    the 1/16 grid) as one prepared dataset in ``fmt``."""
    rng = np.random.default_rng(seed)
    d = str(tmp_path / f"{fmt}-{ts_step}")
    os.makedirs(os.path.join(d, "vocab"))
    with tf.io.TFRecordWriter(os.path.join(d, "train-00000-of-00001.tfrecord.gz"),
                              options="GZIP") as w:
        for u in range(users):
            h = int(rng.integers(0, 12))
            items = rng.integers(S.OOV_ID, len(TABLE), size=h)
            cate, dom = TABLE.cate[items].copy(), TABLE.domain[items].copy()
            cate[rng.random(h) < 0.2] = 9
            dom[rng.random(h) < 0.2] = 2
            ts = np.sort(rng.integers(1_500_000_000, 1_500_100_000, size=h))
            hist = {"hist_item_id": items, "hist_cate_id": cate, "hist_ts": ts,
                    "hist_engage": np.round(rng.random(h) * 16) / 16, "hist_domain": dom}
            idx = np.sort(rng.integers(0, h + 1, size=3))
            imp_items = rng.integers(S.OOV_ID, len(TABLE), size=3)
            imps = {"imp_item_id": imp_items, "imp_cate_id": TABLE.cate[imp_items],
                    "imp_ts": np.array([ts[i - 1] + 30 if i else 1_499_999_000 for i in idx]),
                    "imp_label": rng.integers(0, 2, size=3).astype(float), "imp_hist_index": idx}
            args = (S.FIRST_ID + u, f"u{u}", hist, imps)
            w.write(S.encode_user_record(*args) if fmt == S.FORMAT_FULL else
                    S.encode_compact_v2_user_record(*args, TABLE, 1 / 16, ts_step))
    meta = {"vocab": {"num_items": len(TABLE), "num_categories": 10, "num_users": users + 2,
                      "num_domains": 3}, "format": fmt}
    if fmt != S.FORMAT_FULL:
        meta["record"] = {"item_table": S.ITEM_TABLE_FILE, "engage_step": 1 / 16,
                          "ts_step": ts_step}
        with open(os.path.join(d, S.ITEM_TABLE_FILE), "w") as f:
            f.write(TABLE.to_tsv())
    with open(os.path.join(d, S.META_FILE), "w") as f:
        json.dump(meta, f)
    return d


def test_make_dataset_parity_full_vs_v2(tmp_path):
    full = _write(tmp_path, S.FORMAT_FULL)
    v2 = _write(tmp_path, S.FORMAT_COMPACT_V2)
    assert S.record_format(v2) == S.FORMAT_COMPACT_V2 and len(S.load_item_table(v2)) == len(TABLE)
    a = list(D.make_dataset(S.split_pattern(full, "train"), 3, 8, 5))
    b = list(D.make_dataset(S.split_pattern(v2, "train"), 3, 8, 5))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy(), err_msg=k)
    os.remove(os.path.join(v2, S.ITEM_TABLE_FILE))
    with pytest.raises(S.MissingItemTableError, match=r"\(per_user_record_compact_v2\)"):
        D.make_dataset(S.split_pattern(v2, "train"), 3, 8, 5)


def test_prepare_settings_for_compact2():
    import argparse
    from beam_jobs.prepare import PrepareError, _validate_args, add_arguments

    def settings(*flags):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return _validate_args(parser.parse_args(["--output", "/nonexistent/x", *flags]))
    s = settings("--record_format", "compact2", "--ts_step", "60")
    assert (s["record_format"], s["ts_step"], s["engage_step"]) == ("compact2", 60, 1 / 16)
    assert settings("--record_format", "compact2")["ts_step"] == 1
    assert settings("--record_format", "compact2", "--engage_step", "0.5")["engage_step"] == 0.5
    with pytest.raises(PrepareError, match="--ts_step applies to --record_format compact2 only"):
        settings("--record_format", "compact", "--ts_step", "60")
    with pytest.raises(PrepareError, match="--ts_step: ts step must be a whole number"):
        settings("--record_format", "compact2", "--ts_step", "0")


def test_bench_storage_writes_v2_next_to_full_and_v1(tmp_path):
    from lifelong.bench.storage import write_formats
    from tfmodels.testing import write_tiny_dataset
    src = write_tiny_dataset(str(tmp_path / "src"), num_users=6, domains=2)
    res = write_formats(src, str(tmp_path / "out"), "train", ts_step=60)
    assert list(res["formats"]) == ["full", "compact", "compact2", "compact2_ts60"]

    def read(fmt):
        d = res["formats"][fmt]["dir"]
        table = S.load_item_table(d)
        return [S.decode_user_record(r.numpy(), table) for r in tf.data.TFRecordDataset(
            tf.io.gfile.glob(S.split_pattern(d, "train")), compression_type="GZIP")]
    full, v2, v2ts = read("full"), read("compact2"), read("compact2_ts60")
    assert S.record_format(res["formats"]["compact2"]["dir"]) == S.FORMAT_COMPACT_V2
    assert len(full) == len(v2) == len(v2ts) == 6
    for a, b, c in zip(full, v2, v2ts):
        for k in a:
            if k == "hist_engage":
                assert np.abs(a[k] - b[k]).max(initial=0) <= 0.5
            else:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert np.abs(a["hist_ts"] - c["hist_ts"]).max(initial=0) <= 30
        np.testing.assert_array_equal(a["imp_ts"], c["imp_ts"])
    assert res["ts_max_abs_error_measured"] <= 30
    assert res["over_full_gzip"]["compact2"] == pytest.approx(
        res["formats"]["compact2"]["gzip_bytes"] / res["formats"]["full"]["gzip_bytes"])


def test_prepare_writes_compact2_records_equal_to_full(tmp_path):
    """``lifelong prepare --record_format compact2 --ts_step 60`` on a tiny synthetic
    source: the records decode to the full prepare's (engagement within 1/32, history
    timestamps within 30 s, everything else exact) and meta.json states the steps."""
    import argparse
    import glob
    from beam_jobs import prepare as P

    def prepare(out, *flags):
        parser = argparse.ArgumentParser()
        P.add_arguments(parser)
        args, beam_args = parser.parse_known_args(
            ["--source", "synthetic", "--synthetic_users", "6", "--num_shards", "1",
             "--output", out, *flags])
        return P.run(args, beam_args)

    def records(out):
        table = S.load_item_table(out)
        files = sorted(glob.glob(S.split_pattern(out, "train")))
        return {d["user_key"]: d for d in (S.decode_user_record(r.numpy(), table) for r in
                tf.data.TFRecordDataset(files, compression_type="GZIP"))}
    full, v2 = str(tmp_path / "full"), str(tmp_path / "v2")
    prepare(full)
    report = prepare(v2, "--record_format", "compact2", "--ts_step", "60")
    assert report["format"] == S.FORMAT_COMPACT_V2 == S.record_format(v2)
    assert report["record"]["ts_step"] == 60 and report["record"]["hist_ts_max_abs_error"] == 30
    a, b = records(full), records(v2)
    assert a.keys() == b.keys() and len(a) > 0
    raw = next(iter(tf.data.TFRecordDataset(glob.glob(S.split_pattern(v2, "train")),
                                            compression_type="GZIP"))).numpy()
    assert tf.train.Example.FromString(raw).features.feature["ts_step"].int64_list.value == [60]
    for key, rec in a.items():
        for k in rec:
            if k == "hist_engage":
                assert np.abs(rec[k] - b[key][k]).max(initial=0) <= 1 / 32
            elif k == "hist_ts":
                assert np.abs(rec[k] - b[key][k]).max(initial=0) <= 30
                np.testing.assert_array_equal(b[key][k] % 60, 0)
            else:
                np.testing.assert_array_equal(rec[k], b[key][k], err_msg=f"{key} {k}")
