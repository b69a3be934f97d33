"""User-cache precompute (Beam + tfx-bsl RunInference) and the serving CLI, end to end.

train (2 steps) -> ``lifelong export --run`` -> ``lifelong precompute --store sqlite:``
-> local gRPC server -> ``RankingClient.rank`` == the trained model in process.
"""
import argparse
import glob
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from beam_jobs import precompute as P
from serving import export as E
from serving.cache_store import SQLiteCacheStore
from serving.client import RankingClient
from serving.server import LocalServer
from lifelong import cli
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.testing import write_tiny_dataset
from tfmodels.train import load_run

TINY = ["--short_len", "5", "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
        "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("pre_data")), num_users=30, seed=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = str(tmp_path_factory.mktemp("runs") / "din_l")
    assert cli.main(["train", "--data", data_dir, "--model", "din_l", "--out_dir", run,
                     "--epochs", "1", "--steps_per_epoch", "2", "--no_eval", *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("saved_models"))


def _records(data_dir):
    files = sorted(glob.glob(S.split_pattern(data_dir, "test")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def test_cli_export_precompute_and_rank(trained, data_dir, base, tmp_path, capsys):
    assert cli.main(["export", "--run", trained, "--base", base]) == 0
    assert os.path.exists(os.path.join(base, "din_l", "1", "saved_model.pb"))
    assert 'name: "din_l"' in open(os.path.join(base, "models.config")).read()
    db = str(tmp_path / "cache.db")
    out = str(tmp_path / "cache")
    pattern = S.split_pattern(data_dir, "test")
    capsys.readouterr()
    assert cli.main(["precompute", "--records", pattern, "--model", "din_l", "--base", base,
                     "--output", out, "--store", f"sqlite:{db}"]) == 0
    assert '"users": 30' in capsys.readouterr().out

    # the cache equals the trained model's user tower in process
    _, model = load_run(trained)
    records = _records(data_dir)
    feats = D.user_history_features(tf.constant(records), model.feature_schema)
    cache = model.user_tower(feats)
    store = SQLiteCacheStore(db)
    assert store.count("din_l") == 30
    for i, u in enumerate(feats["user_id"].numpy()):
        e = store.get("din_l", int(u))
        assert (e.model_name, e.model_version, e.user_id) == ("din_l", 1, int(u))
        assert sorted(e.tensors) == ["keys", "mask", "short_cate_id", "short_item_id"]
        for k, v in cache.items():
            np.testing.assert_allclose(e.tensors[k], v[i:i + 1].numpy(), atol=1e-6)
        np.testing.assert_array_equal(e.tensors["short_item_id"], feats["short_item_id"][i:i + 1])

    # the TFRecords carry the documented fields
    rec = next(P.read_cache_records(out))
    ex = tf.train.Example.FromString(rec).features.feature
    assert ex["model_name"].bytes_list.value == [b"din_l"]
    assert ex["model_version"].int64_list.value == [1]
    assert list(ex["t/keys/shape"].int64_list.value) == [1, 24, 8]
    assert ex["t/keys/dtype"].bytes_list.value == [b"<f4"]
    assert set(n.decode() for n in ex["tensor_names"].bytes_list.value) == {
        "keys", "mask", "short_item_id", "short_cate_id"}

    # rank through gRPC with the precomputed cache == the trained model in process
    srv = LocalServer(base, port=0, poll_interval_s=0)
    try:
        client = RankingClient(srv.address, "din_l", store, timeout_s=30)
        rng = np.random.default_rng(1)
        worst = 0.0
        for i, u in enumerate(feats["user_id"].numpy()):
            items, cates = rng.integers(2, 62, size=5), rng.integers(2, 8, size=5)
            got = client.rank(int(u), (items, cates))
            rows = {k: tf.repeat(v[i:i + 1], 5, axis=0) for k, v in feats.items()}
            rows.update(target_item_id=tf.constant(items), target_cate_id=tf.constant(cates))
            worst = max(worst, float(np.abs(got - model.predict_ctr(rows).numpy()).max()))
        assert worst <= 1e-5
        client.close()
    finally:
        srv.stop()
        store.close()


def test_precompute_model_without_cache_tensors(data_dir, base, tmp_path):
    """DIN has no long module: its cache is the short window only."""
    batching = tmp_path / "batching.pbtxt"
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\n")
    assert cli.main(["export", "--model", "din", "--data", data_dir, "--base", base,
                     "--short_len", "5", "--long_len", "24", "--emb_dim", "4",
                     "--batching_params", str(batching)]) == 0
    assert open(os.path.join(base, "din", "1", E.BATCHING_FILE)).read() == batching.read_text()
    store = SQLiteCacheStore(str(tmp_path / "din.db"))
    args = argparse.Namespace(records=S.split_pattern(data_dir, "test"), model="din",
                                base=base, version=None, model_dir=None,
                                output=str(tmp_path / "cache"), num_shards=2,
                                no_reshuffle=True, store=None, engine="runinference")
    report = P.run(args, [], store=store)   # the earlier engine: gzip, one element per user
    assert report["users"] == 30 and report["loaded"] == 30 and report["version"] == 1
    assert len(glob.glob(str(tmp_path / "cache" / "cache-*.tfrecord.gz"))) == 2
    entry = store.get("din", 2)
    assert sorted(entry.tensors) == ["short_cate_id", "short_item_id"]
    assert entry.tensors["short_item_id"].shape == (1, 5)
    store.close()


def test_cache_record_roundtrip():
    tensors = {"f": np.float32([[1.5, -2.0]]), "i": np.int64([[3, 4, 5]]),
               "i32": np.int32([[7]]), "b": np.array([[True, False]])}
    name, uid, version, back = P.decode_cache_record(
        P.encode_cache_record("m", 9, 42, tensors))
    assert (name, uid, version) == ("m", 42, 9)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_user_key_skips_records_without_user_id():
    ok = S.encode_user_record(5, "u5", {k: [] for k in S.HISTORY_FIELDS},
                              {k: [] for k in S.IMPRESSION_FIELDS})
    assert list(P.user_key(ok)) == [(b"5", ok)]
    assert list(P.user_key(b"\x00garbage")) == []
    assert list(P.user_key(tf.train.Example().SerializeToString())) == []


def test_precompute_bad_arguments_give_one_line(base, data_dir, tmp_path, capsys):
    pattern = S.split_pattern(data_dir, "test")
    assert cli.main(["precompute", "--records", pattern, "--model", "nope", "--base", base,
                     "--output", str(tmp_path)]) == 2
    assert "no exported versions" in capsys.readouterr().err
    assert cli.main(["precompute", "--records", pattern, "--model", "../x", "--base", base,
                     "--output", str(tmp_path)]) == 2
    assert "valid --model" in capsys.readouterr().err
    assert cli.main(["precompute", "--records", str(tmp_path / "none-*"), "--model_dir",
                     os.path.join(base, "din", "1"), "--output", str(tmp_path)]) == 2
    assert "no record files match" in capsys.readouterr().err
    assert cli.main(["export", "--base", base]) == 2
    assert "give --run" in capsys.readouterr().err
    assert cli.main(["export", "--model", "din", "--data", data_dir, "--base", base,
                     "--version", "../2"]) == 2
    assert "invalid version" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["export"], ["precompute"], ["serve"], ["bench", "serving"],
                                  ["bench", "precompute"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: lifelong " + argv[0] in capsys.readouterr().out
