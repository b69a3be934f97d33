"""TF Serving warmup records (issue 20 item 3): the export writes them in TF Serving's
format, the local server replays them before the version is AVAILABLE, a broken
record fails the load. One tiny ``din_l`` export with ``--jit_rank``."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from serving import export as E
from serving import protos
from serving import warmup as W
from serving.model_manager import ModelManager, State
from serving.servable import SavedModelServable
from tfmodels import schema as S
from tfmodels.errors import LifelongError
from tfmodels.model import build_model
from tfmodels.testing import write_tiny_dataset

MAX_N = 20                       # buckets 8, 16, 24 ("fine"; "pow2": 8, 16, 32)

# N -> the rows `rank` runs (serving.export.rank_bucket), written out by hand per ladder
BUCKETS = {
    "fine": {1: 8, 7: 8, 8: 8, 9: 16, 16: 16, 17: 24, 33: 40, 57: 64, 64: 64, 65: 80,
             81: 96, 100: 112, 112: 112, 113: 128, 128: 128, 129: 160, 257: 320, 1000: 1024,
             1025: 1280, 5000: 5120, 10_000: 10_240},
    "pow2": {1: 8, 8: 8, 9: 16, 17: 32, 65: 128, 100: 128, 128: 128, 129: 256, 1000: 1024,
             1025: 2048, 10_000: 16_384}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    data = write_tiny_dataset(str(tmp_path_factory.mktemp("warm_data")), num_users=6, seed=2)
    schema = S.FeatureSchema.from_data_dir(data, 5, 24)
    tf.keras.utils.set_random_seed(0)
    return build_model(schema, "din_l", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    base = str(tmp_path_factory.mktemp("warm_models"))
    out = E.export_model(model, base, "din_l", 1, jit_rank=True, warmup_max_candidates=MAX_N)
    return base, out


@pytest.mark.parametrize("ladder", sorted(BUCKETS))
def test_rank_bucket_values(ladder):
    """The export's bucket rule, eager and traced (as in the rank graph), against the
    hand-written table; above 64 the fine ladder pads by at most 25%."""
    for n, bucket in BUCKETS[ladder].items():
        assert int(E.rank_bucket(tf.constant(n, tf.int32), ladder)) == bucket, (ladder, n)
    ns = np.arange(1, 10_001, dtype=np.int32)
    traced = tf.function(lambda n: E.rank_bucket(n, ladder))(tf.constant(ns)).numpy()
    assert {n: int(traced[n - 1]) for n in BUCKETS[ladder]} == BUCKETS[ladder]
    assert (traced >= ns).all() and (np.diff(traced) >= 0).all()
    if ladder == "fine":
        assert (traced[64:] <= 1.25 * ns[64:]).all() and (traced % 8 == 0).all()
    with pytest.raises(E.ExportError, match="unknown rank_buckets 'pow3'"):
        E.rank_bucket(tf.constant(5), "pow3")
    with pytest.raises(E.ExportError, match="unknown rank_buckets 'pow3'"):
        E.ServingSignatures(None, rank_buckets="pow3")


def test_rank_buckets_flags():
    """`lifelong export --rank_buckets` (default fine) and `bench serving --rank_buckets`
    (a ladder or several, comma separated) take the export's ladders only."""
    import argparse
    from lifelong.bench.flags import parse_rank_buckets
    from serving import flags
    p = argparse.ArgumentParser()
    flags.add_export_arguments(p)
    assert p.parse_args([]).rank_buckets == "fine"
    assert p.parse_args(["--rank_buckets", "pow2"]).rank_buckets == "pow2"
    with pytest.raises(SystemExit):
        p.parse_args(["--rank_buckets", "pow3"])
    assert tuple(flags.RANK_BUCKETS) == E.RANK_BUCKETS == ("fine", "pow2")
    assert parse_rank_buckets("pow2,fine") == ["pow2", "fine"]
    for bad in ("", "fine,fine", "fine,pow3"):
        with pytest.raises(LifelongError, match="--rank_buckets must be distinct ladders"):
            parse_rank_buckets(bad)


def test_bucket_sizes():
    """Warmup sends exactly the buckets the export's rule produces for N = 1..cap."""
    assert W.bucket_sizes(1) == [8] and W.bucket_sizes(8) == [8]
    assert W.bucket_sizes(9) == [8, 16] and W.bucket_sizes(MAX_N) == [8, 16, 24]
    assert W.bucket_sizes(MAX_N, "pow2") == [8, 16, 32]
    for ladder, count, last in (("fine", 37, 10_240), ("pow2", 12, 16_384)):
        sizes = W.bucket_sizes(10_000, ladder)
        assert sizes[-1] == last and len(sizes) == count
        every = E.rank_bucket(tf.range(1, 10_001), ladder).numpy()
        assert sizes == sorted(set(every.tolist()))
    assert W.bucket_sizes(100) == [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112]
    with pytest.raises(W.WarmupError, match="max_candidates must be >= 1"):
        W.bucket_sizes(0)
    with pytest.raises(W.WarmupError, match="unknown rank_buckets 'x'"):
        W.bucket_sizes(10, "x")


def test_export_writes_tf_serving_warmup_records(exported):
    base, out = exported
    path = os.path.join(out["path"], "assets.extra", "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(r)
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]   # plain TFRecord
    assert [x.WhichOneof("log_type") for x in logs] == ["predict_log"] * 5
    reqs = [x.predict_log.request for x in logs]
    assert [r.model_spec.signature_name for r in reqs] == (
        ["rank"] * 3 + ["user_tower", "serving_default"])
    assert all(r.model_spec.name == "din_l" for r in reqs)
    meta = E.read_export_meta(out["path"])
    assert meta["warmup"] == {"records": 5, "rank_candidates": [8, 16, 24]}
    assert meta["rank_buckets"] == "fine"
    sig_inputs = {k: set(v["inputs"]) for k, v in meta["signatures"].items()}
    for r in reqs:
        assert set(r.inputs) == sig_inputs[r.model_spec.signature_name]
    ranks = [{k: protos.to_ndarray(t) for k, t in r.inputs.items()} for r in reqs[:3]]
    assert [len(x["target_item_id"]) for x in ranks] == [8, 16, 24]     # every bucket
    # the cache is the export's own user_tower output for the record it also sends
    servable = SavedModelServable("din_l", 1, out["path"])
    record = protos.to_ndarray(reqs[3].inputs["records"])
    tower = servable.run("user_tower", {"records": record})
    for k in ("keys", "mask", "short_item_id", "short_cate_id"):
        np.testing.assert_array_equal(ranks[0][k], tower[k])
    assert np.abs(ranks[0]["keys"]).max() > 0 and ranks[0]["mask"].sum() == 24   # full history
    servable.close()


def test_server_replays_records_before_available(exported):
    base, _ = exported
    seen = []
    holder = {}

    class Counting(SavedModelServable):
        def run(self, signature, inputs):
            mgr = holder["manager"]
            state = mgr.status("din_l")[self.version][0]
            seen.append((signature, len(inputs.get("target_item_id", [])), state,
                         "din_l" in mgr.model_names()))
            return super().run(signature, inputs)

    mgr = ModelManager(base, poll_interval_s=0, servable_factory=Counting)
    holder["manager"] = mgr
    mgr.refresh()
    assert [(s, n) for s, n, _, _ in seen] == [("rank", 8), ("rank", 16), ("rank", 24),
                                              ("user_tower", 0), ("serving_default", 1)]
    assert all(state == State.LOADING and not served for _, _, state, served in seen)
    assert mgr.status("din_l")[1][0] == State.AVAILABLE
    assert mgr.get("din_l").warmup_records == 5


def test_broken_warmup_record_fails_the_load(exported, tmp_path):
    base, out = exported
    bad_base = tmp_path / "models"
    shutil.copytree(os.path.join(base, "din_l", "1"), bad_base / "din_l" / "1")
    reqs = W.read_warmup_requests(str(bad_base / "din_l" / "1"))
    del reqs[1].inputs["target_cate_id"]
    W.write_warmup_file(str(bad_base / "din_l" / "1"), reqs)
    mgr = ModelManager(str(bad_base), poll_interval_s=0)
    mgr.refresh()
    state, msg = mgr.status("din_l")[1]
    assert state == State.END
    assert msg.startswith("load failed: warmup record 1 (rank) failed"), msg
    with pytest.raises(Exception, match="has no loaded version"):
        mgr.get("din_l")


def test_pow2_and_fine_ladders_rank_like_the_unpadded_model(model, exported, tmp_path):
    """N = 17 and 100 (not bucket sizes: padded to 24 / 112 rows by the default fine
    ladder, 32 / 128 by pow2, the earlier ladder kept for before/after measurements)
    give the CTRs of the in-process model run on exactly N candidates; the export
    records its ladder."""
    _, fine = exported
    pow2 = E.export_model(model, str(tmp_path), "din_l", 1, jit_rank=True, rank_buckets="pow2")
    assert E.read_export_meta(pow2["path"])["rank_buckets"] == "pow2"
    assert E.read_export_meta(fine["path"])["rank_buckets"] == "fine"
    reqs = W.read_warmup_requests(fine["path"])
    user = {k: protos.to_ndarray(t) for k, t in reqs[0].inputs.items()
            if k not in ("target_item_id", "target_cate_id")}
    cache_keys = E.read_export_meta(fine["path"])["cache_keys"]
    rng = np.random.default_rng(4)
    servables = [SavedModelServable("din_l", 1, out["path"]) for out in (fine, pow2)]
    try:
        for n in (17, 100):
            cands = {"target_item_id": rng.integers(2, 60, n).astype(np.int64),
                     "target_cate_id": rng.integers(2, 8, n).astype(np.int64)}
            cache = {k: tf.constant(user[k]) for k in cache_keys}
            feats = {k: tf.constant(v) for k, v in {**user, **cands}.items() if k not in cache}
            want = tf.sigmoid(model.rank(cache, feats, training=False)).numpy()
            assert want.shape == (n,) and np.ptp(want) > 0        # candidates differ
            for s in servables:
                got = s.run("rank", {**user, **cands})["ctr"]
                assert got.shape == (n,)
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    finally:
        for s in servables:
            s.close()
