"""The staleness curve (``lifelong staleness``, issue 19 item 3) on tiny data.

* age 0 through the cached ``user_tower`` / ``rank`` path gives the one-shot
  (``serving_default``) CTRs and so exactly its AUC;
* older caches really exclude the recent behaviors: checked on the windows the
  cache is computed from and on the short window the cache stores, against
  hand-computed cuts.
"""
import glob
import json
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from lifelong import cli
from lifelong.replay import last_requests
from lifelong.reports import staleness as ST
from serving.export import ServingSignatures
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import write_tiny_dataset

HOUR = 3600


def test_truncate_history_hand_values():
    ts = np.array([100, 200, 300, 400])
    assert ST.truncate_history(ts, 450, 0) == 4
    assert ST.truncate_history(ts, 450, 100) == 3       # ts <= 350
    assert ST.truncate_history(ts, 450, 150) == 3       # ts <= 300: 300 is kept
    assert ST.truncate_history(ts, 450, 250) == 2       # ts <= 200
    assert ST.truncate_history(ts, 450, 1000) == 0
    assert ST.truncate_history(np.array([], np.int64), 450, 10) == 0


def test_paired_auc_deltas_hand_values():
    labels = np.array([1, 0, 1, 0], np.float32)
    groups = np.array([7, 7, 8, 8])
    fresh = np.array([0.9, 0.1, 0.8, 0.2])          # AUC 1
    stale = np.array([0.1, 0.9, 0.8, 0.2])          # 1 of 4 pairs ordered: AUC 0.25
    (d0, s0), (d1, s1) = ST.paired_auc_deltas(labels, groups, [fresh, stale], resamples=50)
    assert (d0, s0) == (0.0, 0.0)
    assert d1 == pytest.approx(-0.75)
    assert s1 > 0                      # resamples of one user or both users differ


def _user(uid=5, n=20, short_len=4):
    items = np.arange(S.FIRST_ID, S.FIRST_ID + n)          # item id i+2 <-> hour i
    ts = 1_600_000_000 + np.arange(n) * HOUR
    hist = {"hist_item_id": items, "hist_cate_id": items % 3 + S.FIRST_ID, "hist_ts": ts,
            "hist_engage": np.ones(n, np.float32), "hist_domain": np.full(n, S.DEFAULT_DOMAIN)}
    req_ts = int(ts[-1]) + 60
    imps = {"imp_item_id": [S.FIRST_ID, S.FIRST_ID + 1], "imp_cate_id": [S.FIRST_ID] * 2,
            "imp_ts": [req_ts] * 2, "imp_label": [1.0, 0.0], "imp_hist_index": [n, n]}
    return S.encode_user_record(uid, f"u{uid}", hist, imps), items, ts, req_ts


def test_older_caches_exclude_recent_behaviors():
    raw, items, ts, req_ts = _user()
    records, requests = last_requests([raw])
    assert requests[0]["ts"] == req_ts
    fs = S.FeatureSchema(S.Vocab(40, 8, 10), 4, 6)
    tf.keras.utils.set_random_seed(0)
    sigs = ServingSignatures(build_model(fs, "din_l", emb_dim=4, mlp_hidden=[8],
                                         din_hidden=[4]))
    for age_h, kept in ((0, 20), (1, 19), (3, 17), (7, 13), (14, 6), (30, 0)):
        recs, lost = ST.truncated_records(records, requests, age_h * HOUR)
        assert lost.tolist() == [20 - kept]
        # the windows the cache is computed from: the newest `kept` behaviors, newest first
        w = D.user_history_features(tf.constant(recs), fs)
        want_long = items[:kept][::-1][:6]
        assert w["long_len"].numpy().tolist() == [len(want_long)]
        np.testing.assert_array_equal(w["long_item_id"].numpy()[0, :len(want_long)], want_long)
        np.testing.assert_array_equal(w["long_item_id"].numpy()[0, len(want_long):], 0)
        if kept:
            assert ts[kept - 1] <= req_ts - age_h * HOUR < (ts[kept] if kept < 20 else np.inf)
        # the short window the served cache stores (user_tower output), too
        cache = ST.user_caches(sigs, recs, 8)
        want_short = items[:kept][::-1][:4]
        np.testing.assert_array_equal(cache["short_item_id"][0, :len(want_short)], want_short)
        np.testing.assert_array_equal(cache["short_item_id"][0, len(want_short):], 0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("stale_data")), num_users=40,
                              max_history=40, impressions_per_user=6, seed=11)


def _records(data_dir):
    files = sorted(glob.glob(S.split_pattern(data_dir, "test")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


@pytest.mark.parametrize("name", ["din_l", "twin"])
def test_age_zero_equals_one_shot(name, data_dir, tmp_path):
    records, requests = last_requests(_records(data_dir))
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    fs = S.FeatureSchema(S.Vocab.from_meta(meta), 5, 24)
    tf.keras.utils.set_random_seed(1)
    model = build_model(fs, name, emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4])
    day = 86400
    res = ST.staleness_of_model(model, records, requests, [0, 1, 7], day, str(tmp_path), 16)
    rows = {r["age"]: r for r in res["rows"]}
    assert rows[0]["auc"] == res["one_shot"]["auc"]
    assert rows[0]["gauc"] == res["one_shot"]["gauc"]
    assert rows[0]["max_abs_diff_vs_one_shot"] <= 1e-5
    assert rows[0]["behaviors_excluded_mean"] == 0.0
    assert rows[0]["auc_delta_vs_youngest"] == 0.0
    assert rows[7]["auc_delta_vs_youngest"] == pytest.approx(rows[7]["auc"] - rows[0]["auc"])
    # the behaviors each older cache lost, counted here from the raw histories
    for age in (1, 7):
        lost = []
        for raw, req in zip(records, requests):
            f = tf.train.Example.FromString(raw).features.feature
            t = np.asarray(f["hist_ts"].int64_list.value)
            lost.append(int((t > req["ts"] - age * day).sum()))
        assert rows[age]["behaviors_excluded_mean"] == pytest.approx(np.mean(lost))
        assert rows[age]["requests_with_excluded"] == sum(x > 0 for x in lost)
    assert rows[7]["behaviors_excluded_mean"] > rows[1]["behaviors_excluded_mean"] > 0


def test_all_requests_cover_the_split(data_dir, tmp_path):
    raw = _records(data_dir)
    records, requests = ST.all_requests(raw)
    total = 0
    for r in raw:
        idx = tf.train.Example.FromString(r).features.feature["imp_hist_index"].int64_list.value
        total += len(idx)
    assert sum(q["items"].size for q in requests) == total
    assert len(requests) > len(last_requests(raw)[1])      # several requests per user
    for rec, req in zip(records, requests):
        f = tf.train.Example.FromString(rec).features.feature
        p = len(f["hist_ts"].int64_list.value)
        assert set(f["imp_hist_index"].int64_list.value) == {p}
        assert all(t <= req["ts"] for t in f["hist_ts"].int64_list.value)
    sub_records, sub = ST.all_requests(raw, max_requests=7)
    assert len(sub) == 7 and len(sub_records) == 7
    # age 0 over these requests is the one-shot path too
    with open(os.path.join(data_dir, "meta.json")) as f:
        fs = S.FeatureSchema(S.Vocab.from_meta(json.load(f)), 5, 24)
    tf.keras.utils.set_random_seed(2)
    model = build_model(fs, "din_l", emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4])
    res = ST.staleness_of_model(model, records, requests, [0], 86400, str(tmp_path), 32,
                                bootstrap=5)
    assert res["rows"][0]["auc"] == res["one_shot"]["auc"]
    assert res["rows"][0]["max_abs_diff_vs_one_shot"] <= 1e-5


def test_cli_staleness_on_a_trained_run(data_dir, tmp_path, capsys):
    run = str(tmp_path / "din_l")
    assert cli.main(["train", "--data", data_dir, "--model", "din_l", "--out_dir", run,
                     "--epochs", "1", "--steps_per_epoch", "2", "--no_eval", "--short_len", "5",
                     "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
                     "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]) == 0
    out = str(tmp_path / "st")
    capsys.readouterr()
    assert cli.main(["staleness", "--runs", run, "--ages", "0,3", "--out", out]) == 0
    table = capsys.readouterr().out
    assert "| din_l | one-shot |" in table and "| din_l | 3 |" in table
    res = json.load(open(os.path.join(out, "staleness.json")))
    m = res["models"][0]
    assert m["rows"][0]["auc"] == m["one_shot"]["auc"]
    assert os.path.getsize(os.path.join(out, "staleness.png")) > 1000


@pytest.mark.parametrize("argv,msg", [
    (["--runs", "x", "--ages", "0,x"], "--ages must be"),
    (["--runs", "x", "--ages", "0,-1"], "--ages must be"),
    (["--ages", "0,1"], "give --runs"),
    (["--runs", "/nonexistent/run"], "not a run directory"),
])
def test_bad_arguments_one_line(argv, msg, capsys, tmp_path):
    assert cli.main(["staleness", *argv, "--out", str(tmp_path / "o")]) == 2
    assert msg in capsys.readouterr().err
