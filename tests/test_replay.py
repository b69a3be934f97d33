"""`lifelong replay`: a compare's test requests through export, Beam precompute and the
local gRPC server (the main job's last stage)."""
import json
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from lifelong import replay as R
from lifelong import cli
from tfmodels import data as D
from tfmodels import metrics as M
from tfmodels import schema as S
from tfmodels.train import load_run
from tfmodels.testing import write_tiny_dataset

TINY = ["--short_len", "5", "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
        "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]


def _record(hist_n, imp_index, labels):
    history = {"hist_item_id": list(range(2, 2 + hist_n)), "hist_cate_id": [2] * hist_n,
               "hist_ts": list(range(100, 100 + hist_n)), "hist_engage": [1.0] * hist_n,
               "hist_domain": [0] * hist_n}
    n = len(imp_index)
    imps = {"imp_item_id": list(range(50, 50 + n)), "imp_cate_id": [3] * n,
            "imp_ts": [100 + i for i in imp_index], "imp_label": labels,
            "imp_hist_index": imp_index}
    return S.encode_user_record(7, "u7", history, imps)


def test_last_requests_cut_the_history_at_the_last_request():
    rec = _record(6, [2, 2, 5, 5, 5], [1.0, 0.0, 0.0, 1.0, 0.0])
    empty = _record(3, [], [])
    records, requests = R.last_requests([empty, rec])
    assert len(records) == len(requests) == 1           # a user without impressions: none
    req = requests[0]
    assert req["user_id"] == 7 and req["ts"] == 105
    np.testing.assert_array_equal(req["items"], [52, 53, 54])
    np.testing.assert_array_equal(req["labels"], [0.0, 1.0, 0.0])
    f = tf.train.Example.FromString(records[0]).features.feature
    assert list(f["hist_item_id"].int64_list.value) == [2, 3, 4, 5, 6]   # rows before index 5
    assert list(f["imp_hist_index"].int64_list.value) == [5, 5, 5]
    assert R.last_requests([rec, rec, rec], max_users=2)[1].__len__() == 2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    data = write_tiny_dataset(str(root / "data"), num_users=30, seed=3)
    work = str(root / "cmp")
    assert cli.main(["compare", "--prepared", data, "--models", "din_l,avg_pool", "--seeds",
                     "0", "--work_dir", work, "--epochs", "1", "--steps_per_epoch", "2",
                     *TINY]) == 0
    return work


def test_replay_ranks_through_grpc_like_the_model_in_process(work, tmp_path, capsys):
    base = str(tmp_path / "saved_models")
    capsys.readouterr()
    assert cli.main(["replay", "--work_dir", work, "--base", base, "--users", "6"]) == 0
    out = capsys.readouterr().out
    assert "| din_l | 1 | 6 |" in out and "| avg_pool | 1 | 6 |" in out
    res = json.load(open(os.path.join(work, "serving", "replay.json")))
    assert [r["model"] for r in res["rows"]] == ["din_l", "avg_pool"]
    data = json.load(open(os.path.join(work, "results.json")))["data"]
    _, want = R.last_requests(R._read_records(S.split_pattern(data, "test")), 6)
    for r in res["rows"]:
        assert r["users"] == 6 and r["impressions"] >= 6
        assert r["max_abs_diff_vs_in_process"] <= 1e-5
        assert r["rank_p50_ms"] > 0 and r["cache_bytes_per_user"] > 0
        p = np.load(os.path.join(work, "serving", f"predictions-{r['model']}.npz"))
        # the replayed impressions are the test users' last requests, labels included
        np.testing.assert_array_equal(p["user_id"], np.concatenate(
            [np.full(q["items"].size, q["user_id"]) for q in want]))
        np.testing.assert_array_equal(p["item_id"], np.concatenate([q["items"] for q in want]))
        np.testing.assert_array_equal(p["label"], np.concatenate([q["labels"] for q in want]))
        assert r["impressions"] == p["label"].size
        # the reported metrics are those of the served CTRs
        assert r["auc"] == M.auc(p["label"], p["ctr"])
        assert r["logloss"] == M.logloss(p["label"], p["ctr"])
        ref = M.all_metrics(p["label"], p["ctr"], p["user_id"])   # GAUC: None + reason if
        assert (r["gauc"], r.get("gauc_undefined")) == (ref["gauc"], ref.get("gauc_undefined"))
        # the served CTRs equal the trained model's on the same records through the
        # evaluation input pipeline (impression windows), matched per (user, item, label)
        cfg, model = load_run(r["run_dir"])
        ds = D.make_dataset(os.path.join(work, "serving", f"records-{r['model']}", "*.gz"),
                            cfg.short_len, cfg.long_len, 64, shuffle=False)
        got = {}
        for batch in ds:
            ctr = model.predict_ctr(batch, training=False).numpy().ravel()
            for u, it, y, c in zip(batch["user_id"].numpy().ravel(),
                                   batch["target_item_id"].numpy().ravel(),
                                   batch[S.LABEL].numpy().ravel(), ctr):
                got[(int(u), int(it), float(y))] = float(c)
        served = {(int(u), int(it), float(y)): float(c) for u, it, y, c in
                  zip(p["user_id"], p["item_id"], p["label"], p["ctr"])}
        assert set(got) == set(served)
        assert max(abs(got[k] - served[k]) for k in got) <= 1e-5
    assert os.path.exists(os.path.join(base, "din_l", "1", "saved_model.pb"))
    # a rerun exports a new version and replays against it
    assert cli.main(["replay", "--work_dir", work, "--base", base, "--users", "3",
                     "--models", "avg_pool"]) == 0
    res = json.load(open(os.path.join(work, "serving", "replay.json")))
    assert [(r["model"], r["version"]) for r in res["rows"]] == [("avg_pool", 2)]


def test_replay_bad_arguments_give_one_line(work, tmp_path, capsys):
    assert cli.main(["replay", "--work_dir", str(tmp_path)]) == 2
    assert "holds no results.json" in capsys.readouterr().err
    assert cli.main(["replay", "--work_dir", work, "--models", "twin"]) == 2
    assert "no finished run of ['twin']" in capsys.readouterr().err
    assert cli.main(["replay", "--work_dir", work, "--users", "-1"]) == 2
    assert "--users must be >= 0" in capsys.readouterr().err
