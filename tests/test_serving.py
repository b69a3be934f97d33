"""Serving path end to end: export, local gRPC server, thin client, cache store, bad input.

Every registered model is exported once (tiny dims, module-scoped), served by one
in-process :class:`serving.server.LocalServer` on localhost, and checked through
the real gRPC path: ``rank(cached user_tower)`` == in-process ``serving_default``
for >= 50 users. Then a hypothesis fuzz of malformed Predict requests, a version
swap under concurrent load, explicit bad-input cases, path escapes and users
without a cache entry.
"""
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfmodels  # noqa: F401
import tensorflow as tf

from serving import export as E
from serving import protos
from serving.cache_store import SQLiteCacheStore
from serving.client import NoCacheEntryError, RankingClient
from serving.server import Limits, LocalServer
from tfmodels import data as D
from tfmodels import registry
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import TRAINING_LOSS_ONLY_PRESETS, write_tiny_dataset

SHORT, LONG = 5, 24
CFG = dict(emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
NUM_USERS = 60
N_CAND = 6
TS = 1_600_000_000
MAX_CANDIDATES = 500
MAX_BYTES = 4 << 20
CTX_MODEL = "din_l_ctx"   # din_l reading user_id and imp_ts ([1] -> [N] broadcast), softmax DIN
# Every registered base method, plus din_l / avg_pool and the request-context model.
# Ablation presets (registry entries with a preset config: the base's class with other
# constructor values) are not exported here: the export code is generic over long
# modules, and each preset's cached path is checked against its call by
# tests/test_models.py::test_long_module_layer. SERVING_TEST_MODELS=a,b names the
# models instead (any registered name, presets included; `all` = every entry but the
# presets that change only a training loss, whose graphs are their base's op for op).
_ASKED = [m for m in os.environ.get("SERVING_TEST_MODELS", "").split(",") if m]
MODELS = ([n for n in registry.names() if n not in TRAINING_LOSS_ONLY_PRESETS]
          if _ASKED == ["all"] else _ASKED or
          [n for n in registry.names() if not registry.preset_config(n)])
MODELS = sorted(set(MODELS) | {"din_l", "avg_pool"}) + [CTX_MODEL]
Code = grpc.StatusCode


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("serving_data")),
                              num_users=NUM_USERS, seed=3)


@pytest.fixture(scope="module")
def schema(data_dir):
    return S.FeatureSchema.from_data_dir(data_dir, SHORT, LONG)


@pytest.fixture(scope="module")
def records(data_dir):
    files = sorted(tf.io.gfile.glob(S.split_pattern(data_dir, "test")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


@pytest.fixture(scope="module")
def features(records, schema):
    feats = D.user_history_features(tf.constant(records), schema)
    return {k: v.numpy() for k, v in feats.items()}


def _build(schema, name, seed=0):
    tf.keras.utils.set_random_seed(seed)
    if name == CTX_MODEL:
        return build_model(schema, "din_l", use_user_embedding=True, use_context=True,
                           din_normalize="softmax", **CFG)
    return build_model(schema, name, **CFG)


def export_models(names, data_dir, base):
    """Export each model (seeded by its place in MODELS) to ``base``; return the Keras
    model's in-process CTRs of the parity rows (every test user x its candidates)."""
    schema = S.FeatureSchema.from_data_dir(data_dir, SHORT, LONG)
    files = sorted(tf.io.gfile.glob(S.split_pattern(data_dir, "test")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    feats = {k: v.numpy() for k, v in D.user_history_features(tf.constant(records),
                                                              schema).items()}
    items, cates = _candidates(len(records))
    expected = {}
    for name in names:
        model = _build(schema, name, seed=MODELS.index(name))
        E.export_model(model, base, name, 1)
        rows = _rows(feats, model.feature_names("all"), items, cates)
        expected[name] = model.predict_ctr({k: tf.constant(v) for k, v in rows.items()}).numpy()
    return expected


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    base = str(tmp_path_factory.mktemp("saved_models"))
    return base, export_models(MODELS, data_dir, base)


@pytest.fixture(scope="module")
def server(exported):
    srv = LocalServer(exported[0], port=0, poll_interval_s=0,
                      limits=Limits(max_request_bytes=MAX_BYTES, max_candidates=MAX_CANDIDATES))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = SQLiteCacheStore(str(tmp_path_factory.mktemp("cache") / "cache.db"))
    yield s
    s.close()


def _records_request(client, records, name=None):
    req = client._request("user_tower", None, name)
    protos.fill_tensor_proto(req.inputs["records"], np.array(records, dtype=object))
    return req


def _candidates(n_users, seed=0, n=N_CAND):
    rng = np.random.default_rng(seed)
    return rng.integers(2, 62, size=(n_users, n)), rng.integers(2, 8, size=(n_users, n))


def _rows(features, names, items, cates):
    """serving_default rows: every user tiled to its candidates."""
    n_users, n = items.shape
    batch = {k: np.repeat(features[k], n, axis=0) for k in names
             if k not in ("target_item_id", "target_cate_id", "imp_ts")}
    batch["target_item_id"] = items.reshape(-1).astype(np.int64)
    batch["target_cate_id"] = cates.reshape(-1).astype(np.int64)
    if "imp_ts" in names:
        batch["imp_ts"] = np.full(n_users * n, TS, np.int64)
    return batch


def _cache_users(client, name, records, store):
    out = client.predict(_records_request(client, records), timeout_s=60)
    uids = out.pop("user_id")
    store.put_many((name, int(u), 1, {k: v[i:i + 1] for k, v in out.items()})
                   for i, u in enumerate(uids))
    return uids, out


# ---- parity through gRPC for every registered model ----------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_rank_of_cached_user_tower_equals_serving_default(name, exported, server, store,
                                                          records, features, schema):
    model = _build(schema, name)          # names and class only (weights are in the export)
    client = RankingClient(server.address, name, store, timeout_s=30)
    uids, out = _cache_users(client, name, records, store)
    assert len(uids) >= 50 and list(uids) == list(features["user_id"])
    short_names = [n for n in model.feature_names("rank") if n.startswith("short_")]
    for n in short_names:   # the short window the tower saw is what rank receives
        np.testing.assert_array_equal(out[n], features[n])
    items, cates = _candidates(len(uids))
    got = np.stack([client.rank(int(u), (items[i], cates[i]), imp_ts=TS)
                    for i, u in enumerate(uids)])
    names = model.feature_names("all")
    rows = _rows(features, names, items, cates)
    # in-process serving_default of the exported model (the server's own servable, no gRPC)
    one_shot = server.manager.get(name).run("serving_default", {k: rows[k] for k in names})
    one_shot = one_shot["ctr"].reshape(got.shape)
    keras = exported[1][name]            # the Keras model in the exporting process
    tol = max(1e-5, getattr(model.long_module, "cache_parity_tol", 1e-5))
    assert np.abs(one_shot - keras.reshape(got.shape)).max() <= 1e-5
    gap = float(np.abs(got - one_shot).max())
    assert gap <= tol, f"{name}: rank(cached user_tower) differs from serving_default by {gap}"
    # and serving_default through gRPC (one request, all rows) is the in-process one
    req = client._request("serving_default", None)
    for k in names:
        protos.fill_tensor_proto(req.inputs[k], rows[k])
    via_grpc = client.predict(req)["ctr"].reshape(got.shape)
    assert np.abs(via_grpc - one_shot).max() <= 1e-6


# ---- served CTR == the model on the training pipeline's window of the same impression ----
SNAPSHOT_LAG = 3    # behaviors between the stale cache's snapshot and the impression


def _values(f, name):
    dtype = S.USER_RECORD_FIELDS.get(name, tf.int64)
    return list(f[name].float_list.value if dtype == tf.float32 else f[name].int64_list.value)


def _record_before(raw: bytes, cut: int) -> bytes:
    """The user's record holding only the first ``cut`` behaviors (no impressions): what
    a cache computed just before the impression (or at an older snapshot) sees."""
    f = tf.train.Example.FromString(raw).features.feature
    history = {k: _values(f, k)[:cut] for k in S.HISTORY_FIELDS
               if k in f or k not in S.OPTIONAL_HISTORY_DEFAULTS}
    return S.encode_user_record(int(f["user_id"].int64_list.value[0]), "u", history,
                                {k: [] for k in S.IMPRESSION_FIELDS})


@pytest.fixture(scope="module")
def held_back(data_dir, records):
    """One impression per test user (the one at the middle of its impressions) with
    its window from the TRAINING input pipeline (tf.data, unshuffled), the record cut
    just before it and the record cut SNAPSHOT_LAG behaviors earlier."""
    batch = next(iter(D.make_dataset(S.split_pattern(data_dir, "test"), SHORT, LONG,
                                     batch_size=100_000)))
    windows = {k: v.numpy() for k, v in batch.items()}
    rows_of = {}            # without shuffling a user's impressions come in record order
    for i, u in enumerate(windows["user_id"]):
        rows_of.setdefault(int(u), []).append(i)
    picked, fresh, stale, snap_cuts, offset = [], [], [], [], 0
    for raw in records:
        f = tf.train.Example.FromString(raw).features.feature
        cuts = _values(f, "imp_hist_index")
        j = len(cuts) // 2
        rows = rows_of[int(f["user_id"].int64_list.value[0])]
        offset += len(cuts)
        assert len(rows) == len(cuts)
        row = rows[j]
        np.testing.assert_array_equal(windows["imp_ts"][rows], _values(f, "imp_ts"))
        if cuts[j] < 1:
            continue
        picked.append(row)
        fresh.append(_record_before(raw, cuts[j]))
        snap_cuts.append(max(0, cuts[j] - SNAPSHOT_LAG))
        stale.append(_record_before(raw, snap_cuts[-1]))
    assert offset == len(windows["user_id"]) and len(picked) >= 30
    win = {k: v[picked] for k, v in windows.items()}
    # the window a stale cache stands for: the long window ends at the snapshot, the
    # gaps are still measured to the impression (at request time) and the short window
    # is the request's (fresh)
    hist = [D.parse_user_records(tf.constant(r), with_impressions=False) for r in stale]
    stale_long = {}
    for i, h in enumerate(hist):
        w = D.window_history({k: h[k] for k in S.HISTORY_FIELDS if k in h},
                             tf.constant([snap_cuts[i]], tf.int64),
                             tf.constant([win["imp_ts"][i]], tf.int64), LONG, "long")
        for k, v in w.items():
            stale_long.setdefault(k, []).append(v.numpy()[0])
    stale_win = dict(win, **{k: np.stack(v) for k, v in stale_long.items()})
    return {"window": win, "stale_window": stale_win, "fresh": fresh, "stale": stale}


def _serve_window_case(name, server, records_cut, win, tmp_path, tag, fresh_short):
    store = SQLiteCacheStore(str(tmp_path / f"{tag}.db"))
    try:
        client = RankingClient(server.address, name, store, timeout_s=30)
        uids, _ = _cache_users(client, name, records_cut, store)
        np.testing.assert_array_equal(uids, win["user_id"])
        got = []
        for i, u in enumerate(uids):
            short = ({k: win[k][i] for k in client.signature_inputs("rank")
                      if k.startswith("short_")} if fresh_short else None)
            got.append(client.rank(int(u), ([win["target_item_id"][i]],
                                             [win["target_cate_id"][i]]),
                                   short=short, imp_ts=int(win["imp_ts"][i]))[0])
        return np.asarray(got)
    finally:
        store.close()


@pytest.mark.parametrize("name", MODELS)
def test_served_equals_training_window(name, exported, server, held_back, schema, tmp_path):
    """The CTR served over gRPC from a cache precomputed by ``user_tower`` on the user's
    history before the impression == the model (``serving_default``, the training
    path) on the training pipeline's window of that impression. Nothing may differ:
    time-dependent features (TWIN's gap buckets) are measured to the request time in
    ``rank``, as the pipeline measures them to the impression time.

    A cache computed at an older snapshot (SNAPSHOT_LAG behaviors before the
    impression) with the request's fresh short window serves exactly the model on
    the window whose long part ends at the snapshot (gaps still to the impression):
    the only expected difference is the long window's missing recent rows.

    Where the serving path approximates by design (LREA with LeakyReLU: the absorbed
    path), the served CTR must equal the in-process absorbed path at 1e-5, and its
    measured difference to the training path stays within the module's declared
    ``cache_parity_tol`` (printed)."""
    model = _build(schema, name)
    tol = getattr(model.long_module, "cache_parity_tol", 1e-5)
    names = model.feature_names("all")
    servable = server.manager.get(name)
    for tag, records_cut, win, fresh_short in (
            ("fresh", held_back["fresh"], held_back["window"], False),
            ("stale", held_back["stale"], held_back["stale_window"], True)):
        got = _serve_window_case(name, server, records_cut, win, tmp_path, tag, fresh_short)
        training = servable.run("serving_default", {k: win[k] for k in names})["ctr"]
        gap = float(np.abs(got - training).max())
        print(f"{name} [{tag}]: max |served - training path| = {gap:.3g} "
              f"over {len(got)} impressions")
        if tol <= 1e-5:
            assert gap <= 1e-5, f"{name} [{tag}]: served CTR differs from the training " \
                                f"window's by {gap}"
            continue
        # approximate serving path: served == the absorbed path (the same export's rank
        # of its user_tower, in process) at 1e-5; the gap to the training path is the
        # approximation itself, measured above and bounded by the declared tolerance
        assert gap <= tol, f"{name} [{tag}]: absorbed path off the training path by {gap}"
        tower = servable.run("user_tower", {"records": np.array(records_cut, dtype=object)})
        rank_names = set(model.feature_names("rank"))
        absorbed = []
        for i in range(len(got)):
            req = {k: tower[k][i:i + 1] for k in tower if k != "user_id"}
            if fresh_short:
                req.update({k: win[k][i:i + 1] for k in req if k.startswith("short_")})
            for k in ("target_item_id", "target_cate_id", "imp_ts", "user_id"):
                if k in rank_names:
                    req[k] = win[k][i:i + 1]
            absorbed.append(servable.run("rank", req)["ctr"][0])
        assert np.abs(got - np.asarray(absorbed)).max() <= 1e-5


# XLA parity per method: the base entries (and the request-context model) only. An
# ablation preset runs its base's ops with other constants or one op fewer, so its XLA
# compile adds no coverage; its plain export is still checked by every other test here.
JIT_MODELS = [n for n in MODELS if n == CTX_MODEL or not registry.preset_config(n)]


@pytest.mark.parametrize("name", JIT_MODELS)
def test_jit_rank_export_equals_plain_rank(name, exported, server, records, schema,
                                          tmp_path):
    """`export --jit_rank` (XLA) ranks like the plain export, and rejects the same bad
    inputs with the same messages (its checks are computed inside the XLA cluster,
    which would drop an Assert, and one Assert outside gates the output)."""
    from serving.servable import SavedModelServable
    plain = server.manager.get(name)
    # The same weights as the plain export: rebuilt with its seed, exported with jit_rank.
    jit_model = _build(schema, name, seed=MODELS.index(name))
    # as from a training process that traced the DIN unit's "valid" layout (data-dependent
    # rows, which XLA cannot compile): the export traces "folded" and gives it back
    from tfmodels import layers
    with layers.din_path_scope("valid"):
        out = E.export_model(jit_model, str(tmp_path), name, 1, jit_rank=True)
        assert layers.din_path() == "valid"
    assert E.read_export_meta(out["path"])["jit_rank"] is True
    jit = SavedModelServable(name, 1, out["path"])
    try:
        tower = plain.run("user_tower", {"records": np.array(records[:8], dtype=object)})
        rank_inputs = set(plain.signatures["rank"].inputs)
        items, cates = _candidates(8, seed=5)
        for i in range(8):
            feed = {k: v[i:i + 1] for k, v in tower.items() if k in rank_inputs}
            feed["target_item_id"] = items[i].astype(np.int64)
            feed["target_cate_id"] = cates[i].astype(np.int64)
            for k in ("user_id", "imp_ts"):
                if k in rank_inputs:
                    feed[k] = (tower["user_id"][i:i + 1] if k == "user_id"
                               else np.array([TS], np.int64))
            a = plain.run("rank", feed)["ctr"]
            b = jit.run("rank", feed)["ctr"]
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        for n in (1, 8, 9, 17):          # candidates padded to buckets 8, 8, 16, 24, cut back
            feed = dict(feed, target_item_id=np.resize(items[0], n).astype(np.int64),
                        target_cate_id=np.resize(cates[0], n).astype(np.int64))
            a, b = plain.run("rank", feed)["ctr"], jit.run("rank", feed)["ctr"]
            assert b.shape == (n,)
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        bad = dict(feed, target_item_id=np.array([10 ** 9], np.int64),
                   target_cate_id=np.array([2], np.int64))
        with pytest.raises(tf.errors.InvalidArgumentError, match="target_item_id"):
            jit.run("rank", bad)
        # Every input made bad in turn (ids -1, floats NaN): the XLA checks fail exactly
        # where the plain export's do, with the same message.
        from serving.services import _first_line
        checked = 0
        for k, v in feed.items():
            x = np.array(v)
            if x.dtype.kind == "f":
                x.flat[-1] = np.nan
            else:
                x.flat[-1] = -1
            errors = []
            for servable in (plain, jit):
                try:
                    servable.run("rank", dict(feed, **{k: x}))
                    errors.append(None)
                except tf.errors.InvalidArgumentError as e:
                    errors.append(_first_line(e))
            # (CheckNumerics, the plain export's NaN check, appends "Tensor had NaN values")
            assert (errors[1] is None) == (errors[0] is None), (k, errors)
            assert errors[1] is None or errors[0].startswith(errors[1]), (k, errors)
            checked += errors[0] is not None
            if errors[0] is not None:
                assert f"'{k}'" in errors[0]
        assert checked >= 3      # candidates, short sequence and a cache tensor at least
    finally:
        jit.close()


def test_jit_rank_bakes_small_weights_only(schema):
    """`jit_rank` reads the small weights as constants inside the XLA computation and
    leaves the large ones (embedding tables) as variables; the layers get their
    variables back afterwards, also when tracing fails."""
    model = _build(schema, "avg_pool")
    assert E.ServingSignatures(model, jit_rank=False).const_weights == []   # builds the model
    sizes = {v.name: v.shape.num_elements() for v in model.weights}
    biggest = max(sizes.values())
    limit = biggest - 1
    sigs = E.ServingSignatures(model, jit_rank=True, max_const_elements=limit)
    assert sigs.const_weights, "no weight was baked in"
    assert set(sigs.const_weights) == {k for k, n in sizes.items() if n <= limit}
    assert all(n > limit for k, n in sizes.items() if k not in sigs.const_weights)
    # the layers hold their variables again, and the model's weight list is unchanged
    held = [v for m in [model, *model.submodules] for v in vars(m).values()
            if isinstance(v, tf.Tensor) and not isinstance(v, tf.Variable)]
    assert not held
    assert [v.name for v in model.weights] == list(sizes)
    # the XLA function captures only the weights above the limit
    xla = [f for f in sigs.functions["rank"].graph.as_graph_def().library.function
           if f.attr["_XlaMustCompile"].b]
    assert len(xla) == 1
    resources = [a for a in xla[0].signature.input_arg if a.type == tf.resource.as_datatype_enum]
    assert len(resources) == sum(n > limit for n in sizes.values())
    assert E.ServingSignatures(model, jit_rank=True, max_const_elements=0).const_weights == []
    small = E._small_weights(model, limit)
    with pytest.raises(RuntimeError):
        with E._weights_as_constants(small):
            raise RuntimeError("trace failed")
    assert all(getattr(m, a) is v for m, a, v, _ in small)


def test_export_layout_and_signature_contract(exported, schema):
    base = exported[0]
    config = open(os.path.join(base, E.CONFIG_FILE)).read()
    for name in MODELS:
        assert f'name: "{name}"' in config and f'base_path: "/models/{name}"' in config
        meta = E.read_export_meta(os.path.join(base, name, "1"))
        sig = meta["signatures"]
        model = _build(schema, name)
        assert sorted(sig["serving_default"]["inputs"]) == sorted(model.feature_names("all"))
        assert list(sig["user_tower"]["inputs"]) == ["records"]
        assert sig["user_tower"]["inputs"]["records"] == {"dtype": "string", "shape": [None]}
        tower_out = sig["user_tower"]["outputs"]
        assert tower_out["user_id"] == {"dtype": "int64", "shape": [None]}
        for k in meta["cache_keys"]:
            assert tower_out[k]["shape"][0] is None                        # batch first
            assert sig["rank"]["inputs"][k]["shape"] == [1] + tower_out[k]["shape"][1:]
        assert sig["rank"]["inputs"]["target_item_id"] == {"dtype": "int64", "shape": [None]}
        assert sig["rank"]["outputs"]["ctr"] == {"dtype": "float32", "shape": [None]}
        expect_rank = set(meta["cache_keys"]) | set(model.feature_names("rank"))
        assert set(sig["rank"]["inputs"]) == expect_rank
        assert not any(n.startswith(".tmp") for n in os.listdir(os.path.join(base, name)))
    ctx = E.read_export_meta(os.path.join(base, CTX_MODEL, "1"))["signatures"]["rank"]["inputs"]
    assert ctx["user_id"]["shape"] == [1] and ctx["imp_ts"]["shape"] == [1]


def test_metadata_and_status(server):
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, prediction_service_pb2_grpc)
    with grpc.insecure_channel(server.address) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = "din_l"
        resp = stub.GetModelMetadata(req, timeout=10)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sig_map)
        assert {"user_tower", "rank", "serving_default"} <= set(sig_map.signature_def)
        assert resp.model_spec.version.value == 1
        req.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelMetadata(req, timeout=10)
        assert e.value.code() == Code.NOT_FOUND
        mstub = model_service_pb2_grpc.ModelServiceStub(ch)
        sreq = get_model_status_pb2.GetModelStatusRequest()
        sreq.model_spec.name = "avg_pool"
        st_ = mstub.GetModelStatus(sreq, timeout=10).model_version_status
        assert [(s.version, s.state) for s in st_] == [
            (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
        sreq.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as e:
            mstub.GetModelStatus(sreq, timeout=10)
        assert e.value.code() == Code.NOT_FOUND


# ---- bad input ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_requests(server, store, records, features):
    """A valid rank request (din_l: float cache keys + mask) and serving_default request."""
    client = RankingClient(server.address, "din_l", store, timeout_s=30)
    uids, _ = _cache_users(client, "din_l", records, store)
    entry = store.get("din_l", int(uids[3]))
    items, cates = _candidates(1, seed=5)
    rank = client.rank_request(entry, (items[0], cates[0]))
    default_client = RankingClient(server.address, "avg_pool", store, timeout_s=30)
    user = {k: v[1:2] for k, v in features.items()}
    default = default_client.one_shot_request(int(uids[1]), user, (items[0], cates[0]))
    assert len(client.predict(rank)["ctr"]) == N_CAND
    assert len(default_client.predict(default)["ctr"]) == N_CAND
    return client, rank, default


def _status(client, request):
    try:
        client._predict(request, timeout=30)
        return Code.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def _copy(req):
    return type(req).FromString(req.SerializeToString())


def _set(req, name, value):
    if name in req.inputs:
        del req.inputs[name]
    protos.fill_tensor_proto(req.inputs[name], value)


BAD_CASES = {
    "unknown model": (lambda r: setattr(r.model_spec, "name", "nope"),
                      Code.NOT_FOUND, "model 'nope' not found"),
    "unknown version": (lambda r: r.model_spec.version.__setattr__("value", 7),
                        Code.NOT_FOUND, "version 7 not found"),
    "unknown label": (lambda r: (r.model_spec.ClearField("version"),
                                 setattr(r.model_spec, "version_label", "canary")),
                      Code.NOT_FOUND, "no version label 'canary'"),
    "unknown signature": (lambda r: setattr(r.model_spec, "signature_name", "foo"),
                          Code.NOT_FOUND, "no signature 'foo'"),
    "missing input": (lambda r: r.inputs.pop("target_cate_id"),
                      Code.INVALID_ARGUMENT, "missing input(s) ['target_cate_id']"),
    "unknown input": (lambda r: _set(r, "bogus", np.zeros([1], np.int64)),
                      Code.INVALID_ARGUMENT, "unknown input(s) ['bogus']"),
    "wrong dtype": (lambda r: _set(r, "target_item_id", np.zeros([N_CAND], np.float32)),
                    Code.INVALID_ARGUMENT, "'target_item_id' has dtype DT_FLOAT, expected DT_INT64"),
    "wrong shape": (lambda r: _set(r, "short_item_id", np.full([1, SHORT + 1], 2, np.int64)),
                    Code.INVALID_ARGUMENT, "'short_item_id' has shape [1, 6], expected [1, 5]"),
    "wrong rank": (lambda r: _set(r, "target_item_id", np.full([N_CAND, 1], 2, np.int64)),
                   Code.INVALID_ARGUMENT, "'target_item_id' has shape [6, 1], expected [?]"),
    "candidates disagree": (lambda r: _set(r, "target_cate_id", np.full([3], 2, np.int64)),
                            Code.INVALID_ARGUMENT, "disagree on the batch"),
    "empty candidates": (lambda r: (_set(r, "target_item_id", np.zeros([0], np.int64)),
                                    _set(r, "target_cate_id", np.zeros([0], np.int64))),
                         Code.INVALID_ARGUMENT, "empty batch"),
    "truncated content": (lambda r: setattr(r.inputs["keys"], "tensor_content",
                                            r.inputs["keys"].tensor_content[:-4]),
                          Code.INVALID_ARGUMENT, "tensor_content has"),
    "id out of vocabulary": (lambda r: _set(r, "target_item_id", np.full([N_CAND], 999, np.int64)),
                             Code.INVALID_ARGUMENT,
                             "input 'target_item_id' holds ids outside [0, 62)"),
    "negative id": (lambda r: _set(r, "short_cate_id", np.full([1, SHORT], -3, np.int64)),
                    Code.INVALID_ARGUMENT, "input 'short_cate_id' holds ids outside"),
    "nan in cache": (lambda r: _set(r, "keys", np.full([1, LONG, 8], np.nan, np.float32)),
                     Code.INVALID_ARGUMENT, "input 'keys' holds NaN or Inf"),
    "bad output_filter": (lambda r: r.output_filter.append("logits"),
                          Code.INVALID_ARGUMENT, "output_filter names unknown output(s)"),
    "too many candidates": (lambda r: (_set(r, "target_item_id", np.full([MAX_CANDIDATES + 1], 2,
                                                                         np.int64)),
                                       _set(r, "target_cate_id", np.full([MAX_CANDIDATES + 1], 2,
                                                                         np.int64))),
                            Code.RESOURCE_EXHAUSTED, "the cap is 500"),
    "oversized request": (lambda r: _set(r, "keys", np.zeros([1, LONG, 8 + MAX_BYTES // 96],
                                                              np.float32)),
                          Code.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rank_request_gets_status_naming_the_problem(case, base_requests):
    client, rank, _ = base_requests
    mutate, code, text = BAD_CASES[case]
    req = _copy(rank)
    mutate(req)
    got, details = _status(client, req)
    assert got == code, f"{case}: {got} {details}"
    assert text in details, f"{case}: {details!r}"
    assert _status(client, rank)[0] == Code.OK       # the server stays up


def test_bad_serving_default_rows(base_requests):
    client, _, default = base_requests
    req = _copy(default)
    _set(req, "long_item_id", np.full([N_CAND + 1, LONG], 2, np.int64))
    code, details = _status(client, req)
    assert code == Code.INVALID_ARGUMENT and "disagree on the batch" in details
    req = _copy(default)
    req.inputs["short_item_id"].tensor_shape.unknown_rank = True
    code, details = _status(client, req)
    assert code == Code.INVALID_ARGUMENT and "unknown rank" in details


# ---- fuzz ---------------------------------------------------------------------------------
_INT_NAMES = ("target_item_id", "target_cate_id", "short_item_id", "short_cate_id")


@st.composite
def malformed(draw):
    """(mutation applied to a copy of a valid request, expected status code)."""
    kind = draw(st.sampled_from([
        "model", "version", "signature", "label", "drop", "extra", "dtype", "rank", "dim",
        "disagree", "content", "typed_count", "id_high", "id_negative", "nan", "too_many",
        "oversized", "unknown_rank", "negative_dim", "empty", "output_filter", "bad_dtype_enum"]))
    # NaN/Inf only have a float input to go into in the rank request (the cache keys)
    target = "rank" if kind == "nan" else draw(st.sampled_from(["rank", "default"]))
    name_txt = st.text(st.characters(codec="ascii", categories=("L", "N", "P")),
                       min_size=1, max_size=12)

    def mutate(req):
        names = sorted(req.inputs)
        n_rows = max(len(req.inputs["target_item_id"].tensor_content) // 8, 1)
        if kind == "model":
            req.model_spec.name = draw(name_txt.filter(lambda s: s not in MODELS))
        elif kind == "version":
            req.model_spec.version.value = draw(st.integers(2, 2 ** 40))
        elif kind == "signature":
            req.model_spec.signature_name = draw(name_txt.filter(
                lambda s: s not in ("rank", "serving_default", "user_tower")))
        elif kind == "label":
            req.model_spec.version_label = draw(name_txt)
        elif kind == "drop":
            del req.inputs[draw(st.sampled_from(names))]
        elif kind == "extra":
            _set(req, draw(name_txt.filter(lambda s: s not in names)), np.zeros([1], np.int64))
        elif kind == "dtype":
            name = draw(st.sampled_from(names))
            old = protos.to_ndarray(req.inputs[name])
            new = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.int8]))
            if np.dtype(new) == old.dtype:
                new = np.float64
            _set(req, name, old.astype(new))
        elif kind == "rank":
            name = draw(st.sampled_from(names))
            old = protos.to_ndarray(req.inputs[name])
            _set(req, name, old[None] if old.ndim <= 1 or draw(st.booleans())
                 else old.reshape(-1))
        elif kind == "dim":
            name = draw(st.sampled_from([n for n in names if n not in
                                         ("target_item_id", "target_cate_id")]
                                        if target == "rank" else ["short_item_id", "long_item_id"]))
            old = protos.to_ndarray(req.inputs[name])
            axis = old.ndim - 1
            extra = draw(st.integers(1, 4))
            pad = [(0, 0)] * old.ndim
            pad[axis] = (0, extra)
            _set(req, name, np.pad(old, pad))
        elif kind == "disagree":
            name = draw(st.sampled_from(["target_item_id", "target_cate_id"]))
            _set(req, name, np.full([n_rows + draw(st.integers(1, 9))], 2, np.int64))
        elif kind == "content":
            name = draw(st.sampled_from(names))
            c = req.inputs[name].tensor_content
            cut = draw(st.integers(1, 7))
            req.inputs[name].tensor_content = (c[:-cut] if draw(st.booleans()) and len(c) > cut
                                               else c + b"\x01" * cut)
        elif kind == "typed_count":
            name = draw(st.sampled_from([n for n in names if n in _INT_NAMES]))
            shape = protos.tensor_shape(req.inputs[name])
            req.inputs[name].tensor_content = b""
            count = draw(st.integers(2, 40).filter(lambda c: c != int(np.prod(shape))))
            req.inputs[name].int64_val.extend([2] * count)
        elif kind == "id_high":
            name = draw(st.sampled_from(_INT_NAMES))
            arr = protos.to_ndarray(req.inputs[name]).copy()
            arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(st.integers(62, 2 ** 40))
            _set(req, name, arr)
        elif kind == "id_negative":
            name = draw(st.sampled_from(_INT_NAMES))
            arr = protos.to_ndarray(req.inputs[name]).copy()
            arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(st.integers(-2 ** 40, -1))
            _set(req, name, arr)
        elif kind == "nan":
            arr = protos.to_ndarray(req.inputs["keys"]).copy()
            arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf]))
            _set(req, "keys", arr)
        elif kind == "too_many":
            n = draw(st.integers(MAX_CANDIDATES + 1, 4 * MAX_CANDIDATES))
            if target == "rank":
                for k in ("target_item_id", "target_cate_id"):
                    _set(req, k, np.full([n], 2, np.int64))
            else:
                for k in names:
                    old = protos.to_ndarray(req.inputs[k])
                    _set(req, k, np.broadcast_to(old[:1], (n,) + old.shape[1:]))
        elif kind == "oversized":
            _set(req, "padding_blob", np.zeros([MAX_BYTES // 4 + draw(st.integers(1, 50_000))],
                                               np.float32))
        elif kind == "unknown_rank":
            req.inputs[draw(st.sampled_from(names))].tensor_shape.unknown_rank = True
        elif kind == "negative_dim":
            dims = req.inputs[draw(st.sampled_from(names))].tensor_shape.dim
            dims[draw(st.integers(0, len(dims) - 1))].size = draw(st.integers(-5, -1))
        elif kind == "empty":
            for k in (names if target == "default" else ["target_item_id", "target_cate_id"]):
                old = protos.to_ndarray(req.inputs[k])
                _set(req, k, old[:0])
        elif kind == "output_filter":
            req.output_filter.append(draw(name_txt.filter(lambda s: s != "ctr")))
        elif kind == "bad_dtype_enum":
            req.inputs[draw(st.sampled_from(names))].dtype = draw(
                st.sampled_from([0, 8, 18, 20, 21, 99]))

    expected = {"model": Code.NOT_FOUND, "version": Code.NOT_FOUND,
                "signature": Code.NOT_FOUND, "label": Code.NOT_FOUND,
                "too_many": Code.RESOURCE_EXHAUSTED,
                "oversized": Code.RESOURCE_EXHAUSTED}.get(kind, Code.INVALID_ARGUMENT)
    return target, mutate, expected, kind


def test_fuzz_malformed_predict_requests(base_requests, server):
    client, rank, default = base_requests
    answered = []

    @settings(max_examples=240, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=malformed())
    def one(case):
        target, mutate, expected, kind = case
        req = _copy(rank if target == "rank" else default)
        mutate(req)
        code, details = _status(client, req)
        assert code == expected, f"{kind} on {target}: {code} {details}"
        assert details, f"{kind}: empty status message"
        answered.append(kind)

    one()
    assert len(answered) >= 200
    assert len(set(answered)) >= 20                 # every kind of malformation was tried
    assert _status(client, rank)[0] == Code.OK      # zero crashes: still serving
    assert _status(client, default)[0] == Code.OK


# ---- version swap under load ---------------------------------------------------------------------
def test_version_swap_under_concurrent_load(tmp_path, schema, features):
    base = str(tmp_path / "saved_models")
    name = "swap"
    models = {1: _build(schema, "avg_pool", seed=11)}
    E.export_model(models[1], base, name, 1)
    srv = LocalServer(base, port=0, poll_interval_s=0.1)
    four = {k: v[:4] for k, v in features.items()}
    rows = _rows(four, models[1].feature_names("all"), *_candidates(4, seed=9, n=3))
    rows = {k: v for k, v in rows.items() if k in models[1].feature_names("all")}
    expected = {}

    def expect(v):
        expected[v] = models[v].predict_ctr({k: tf.constant(x) for k, x in rows.items()}).numpy()

    expect(1)
    client = RankingClient(srv.address, name, timeout_s=30)
    req = client._request("serving_default", None)
    for k, v in rows.items():
        protos.fill_tensor_proto(req.inputs[k], v)
    stop = threading.Event()
    seen, failures = [], []

    def worker():
        for _ in range(5000):                     # bounded loop on localhost
            if stop.is_set():
                return
            try:
                resp = client._predict(req, timeout=30)
                seen.append((resp.model_spec.version.value,
                             protos.to_ndarray(resp.outputs["ctr"])))
            except Exception as e:       # any failure fails the test
                failures.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for v in (2, 3):
            time.sleep(0.3)
            models[v] = _build(schema, "avg_pool", seed=11 + v)
            expect(v)
            E.export_model(models[v], base, name)          # next free number: v
            deadline = time.time() + 60
            while time.time() < deadline and v not in {s[0] for s in seen[-50:]}:
                time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        client.close()
        srv.stop()
    assert not failures, failures[:3]
    assert len(seen) >= 100, len(seen)
    versions = [v for v, _ in seen]
    assert {1, 3} <= set(versions), sorted(set(versions))
    assert versions[-1] == 3
    for v, ctr in seen:                              # never a half-loaded version
        assert np.abs(ctr - expected[v]).max() <= 1e-5
    status = srv.manager.status(name)
    assert sorted(status) == [1, 2, 3] and 1 not in srv.manager._models[name]   # policy: 2 kept


# ---- paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".hidden", "", "a\\b", "x" * 200,
                                 "/abs", "a..b", None, 3])
def test_model_names_escaping_the_base_are_rejected(bad, tmp_path):
    with pytest.raises(E.ExportError, match="invalid model name"):
        E.version_dir(str(tmp_path), bad, 1)


@pytest.mark.parametrize("bad", ["../1", -1, 0, "1.5", "abc", True, 2 ** 63, "1/../../2", 1.0])
def test_bad_versions_are_rejected(bad, tmp_path):
    with pytest.raises(E.ExportError, match="invalid version"):
        E.version_dir(str(tmp_path), "m", bad)


def test_symlink_escaping_the_base_is_rejected(tmp_path, schema):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    os.symlink(outside, base / "linked")
    with pytest.raises(E.ExportError, match="outside the base path"):
        E.export_model(_build(schema, "din"), str(base), "linked", 1)
    assert not os.listdir(outside)


def test_inside_edges(tmp_path):
    """The one containment rule of the exporter and the model manager
    (:func:`serving.paths.inside`): strictly below the base, by whole path components,
    after following symlinks."""
    from serving.paths import inside
    base = tmp_path / "b"
    (base / "m" / "1").mkdir(parents=True)
    (tmp_path / "bc").mkdir()
    os.symlink(tmp_path / "bc", base / "escape")
    os.symlink(base / "m", base / "alias")
    assert inside(str(base), str(base / "m")) and inside(str(base), str(base / "m" / "1"))
    assert inside(str(base), str(base / "alias"))               # a link that stays inside
    assert not inside(str(base), str(base))                      # the base itself
    assert not inside(str(base), str(base) + os.sep)
    assert not inside(str(base), str(base / "m" / ".."))         # resolves to the base
    assert not inside(str(base), str(tmp_path / "bc"))           # /x/b vs sibling /x/bc
    assert not inside(str(base), str(base / "escape"))           # symlink escaping
    assert not inside(str(base), str(base / "escape" / "x"))


def test_folders_resolving_to_the_base_itself_are_rejected(tmp_path):
    """A model or version folder that is a link to the base itself is rejected by the
    exporter (model and version alike) and skipped by the server's model manager, with
    or without models.config; a sibling sharing the base's name prefix is skipped too."""
    from serving.model_manager import ModelManager
    base = tmp_path / "b"
    (base / "m").mkdir(parents=True)
    (tmp_path / "bc" / "1").mkdir(parents=True)
    os.symlink(base, base / "self")
    os.symlink(base, base / "m" / "7")
    os.symlink(tmp_path / "bc", base / "prefix")
    with pytest.raises(E.ExportError, match="model folder .* outside the base path"):
        E.version_dir(str(base), "self", 1)
    with pytest.raises(E.ExportError, match="version folder .* outside the base path"):
        E.version_dir(str(base), "m", 7)
    assert E.version_dir(str(base), "m", 8) == os.path.join(str(base), "m", "8")
    manager = ModelManager(str(base), poll_interval_s=0)
    assert [c.name for c in manager.read_config()] == ["m"]
    (base / "models.config").write_text(
        "model_config_list { config { name: 'self' base_path: '%s' } "
        "config { name: 'prefix' base_path: '%s' } config { name: 'm' base_path: '%s' } }"
        % (base, tmp_path / "bc", base / "m"))
    assert [c.name for c in manager.read_config()] == ["m"]


def test_port_taken_is_a_one_line_server_error(tmp_path, capsys):
    """A taken port: ServerError (still an OSError, and a LifelongError), which
    `lifelong serve` reports as one line with exit code 2."""
    from lifelong import cli
    from serving.server import ServerError
    from tfmodels.errors import LifelongError
    busy = LocalServer(str(tmp_path), port=0, poll_interval_s=0)
    try:
        with pytest.raises(ServerError, match=f"^cannot bind 127.0.0.1:{busy.port}$") as e:
            LocalServer(str(tmp_path), port=busy.port, poll_interval_s=0)
        assert isinstance(e.value, OSError) and isinstance(e.value, LifelongError)
        capsys.readouterr()
        assert cli.main(["serve", "--base", str(tmp_path), "--port", str(busy.port),
                         "--poll_s", "0"]) == 2
        err = capsys.readouterr().err
        assert err == f"lifelong serve: error: cannot bind 127.0.0.1:{busy.port}\n"
    finally:
        busy.stop()


# ---- users without a cache entry ------------------------------------------------------------------
def test_user_without_cache_entry(server, store, features):
    client = RankingClient(server.address, "avg_pool", store, timeout_s=30)
    items, cates = _candidates(1, seed=4)
    with pytest.raises(NoCacheEntryError, match="no cache entry for user 987654 of model "
                                                "'avg_pool'.*precompute.*fallback"):
        client.rank(987654, (items[0], cates[0]))
    names = [n for n in server.manager.get("avg_pool").signatures["serving_default"].inputs
             if not n.startswith("target_")]
    user = {k: features[k][7:8] for k in names}
    fallback_client = RankingClient(server.address, "avg_pool", store, timeout_s=30,
                                    fallback=lambda uid: user if uid == 987654 else None)
    got = fallback_client.rank(987654, (items[0], cates[0]))
    rows = {k: np.repeat(v, N_CAND, axis=0) for k, v in user.items()}
    rows.update(target_item_id=items[0].astype(np.int64), target_cate_id=cates[0].astype(np.int64))
    want = server.manager.get("avg_pool").run("serving_default", rows)["ctr"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(NoCacheEntryError):
        fallback_client.rank(123456, (items[0], cates[0]))


# ---- cache store: tests/test_cache_store.py (SQLite and Redis, against a real redis-server) ----


def test_client_import_path_has_no_tensorflow():
    code = ("import sys; import serving.client, serving.cache_store; "
            "from serving import protos; m = protos.messages(); protos.messages(metadata=True); "
            "print(m.source, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         timeout=120)
    assert out.stdout.split() == ["private-pool", "False"], out.stderr[-2000:]


def test_tensor_proto_roundtrip_matches_tensorflow():
    from tensorflow.core.framework import tensor_pb2
    for arr in (np.arange(6, dtype=np.int64).reshape(2, 3), np.float32([[1.5, -2]]),
                np.array([b"a", b"bc"], dtype=object), np.float16([1, 2]), np.array([True])):
        p = protos.make_tensor_proto(arr, tensor_pb2.TensorProto)
        np.testing.assert_array_equal(tf.make_ndarray(p), arr)
        np.testing.assert_array_equal(protos.to_ndarray(p), arr)
        np.testing.assert_array_equal(protos.to_ndarray(tf.make_tensor_proto(arr)), arr)


def test_tf_serving_script_dry_run(tmp_path):
    """The production command: the real image on saved_models/ with models.config and
    per-model batching (rank deployments are not batched)."""
    (tmp_path / "models.config").write_text("model_config_list {}\n")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "serving", "tf_serving.sh")
    out = subprocess.run(["bash", script, "--dry_run", "--rest_api_timeout_in_ms=5000"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, BASE=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    cmd = out.stdout
    for part in ("docker run", f"{tmp_path}:/models:ro", "tensorflow/serving:2.19.1",
                 "--model_config_file=/models/models.config", "--enable_batching=true",
                 "--enable_per_model_batching_parameters=true", "-p 127.0.0.1:8500:8500",
                 "--rest_api_timeout_in_ms=5000"):
        assert part in cmd, part


def test_identity_savedmodel_floor_takes_the_rank_request(exported, server, base_requests,
                                                          tmp_path):
    """The bench's identity SavedModel: the same rank inputs (names, dtypes, shapes) as the
    model it mirrors, ctr = zeros [N]; it answers the model's own rank request unchanged
    and rejects what rank rejects (a missing input) before any session call."""
    from lifelong.bench.serving import export_identity_model
    from serving.servable import SavedModelServable
    from serving.validation import decode_inputs
    base, _ = exported
    like = os.path.join(base, "din_l", "1")
    path = export_identity_model(like, str(tmp_path), "identity_sm_din_l")
    assert path == os.path.join(str(tmp_path), "identity_sm_din_l", "1")
    assert "identity_sm_din_l" in open(tmp_path / "models.config").read()
    ident = SavedModelServable("identity_sm_din_l", 1, path)
    try:
        model = server.manager.get("din_l")
        assert ident.signatures["rank"].inputs == model.signatures["rank"].inputs
        assert set(ident.signatures["rank"].outputs) == {"ctr"}
        rank_req = base_requests[1]
        for n in (1, 7):
            req = type(rank_req)()
            req.CopyFrom(rank_req)
            items = np.arange(2, 2 + n, dtype=np.int64)
            del req.inputs["target_item_id"], req.inputs["target_cate_id"]
            protos.fill_tensor_proto(req.inputs["target_item_id"], items)
            protos.fill_tensor_proto(req.inputs["target_cate_id"], items % 5 + 2)
            feed = decode_inputs(req, ident.signatures["rank"], Limits(), "identity")
            out = ident.run("rank", feed)["ctr"]
            assert out.dtype == np.float32 and out.shape == (n,) and not out.any()
        del req.inputs["keys"]
        with pytest.raises(Exception, match="missing input"):
            decode_inputs(req, ident.signatures["rank"], Limits(), "identity")
    finally:
        ident.close()
    with pytest.raises(ValueError, match="target_item_id"):
        bad = tmp_path / "bad"
        # a "model" whose rank takes no candidates cannot be mirrored
        tf.saved_model.save(tf.Module(), str(bad), signatures={"rank": tf.function(
            lambda x: {"ctr": x}, input_signature=[tf.TensorSpec([None], tf.float32, "x")]
        ).get_concrete_function()})
        export_identity_model(str(bad), str(tmp_path), "identity_sm_bad")


@pytest.mark.parametrize("lens,models", [((100, 1000), ("avg_pool",)),
                                         ((1000,), ("din_l", "cformer"))])
def test_bench_serving_plot_layouts(tmp_path, lens, models):
    """The bench plot: panels per N over L when several L are timed, one panel over N
    when a single L is (several rank models, each with its floors)."""
    from lifelong.bench.serving import _plot
    rows = [dict(kind=kind, model=m, L=L, N=n, p50_ms=1.0 + n / 100)
            for L in lens for n in (1, 100)
            for kind, ms in (("rank", models), ("identity", models), ("identity_sm", models),
                             ("one_shot", ("din_l",)))
            for m in ms]
    res = dict(rows=rows, lens=list(lens), candidates=[1, 100], rank_models=list(models),
               one_shot_model="din_l")
    path = _plot(res, str(tmp_path / "p.png"))
    assert path and os.path.getsize(path) > 10_000


def test_servable_run_casts_inputs_to_the_signature_dtypes(exported):
    """`SavedModelServable.run` feeds through the session's callable, which takes exact
    dtypes: Python lists and int32 ids are cast to the signature's dtypes first."""
    from serving.servable import SavedModelServable
    base, _ = exported
    sv = SavedModelServable("avg_pool", 1, os.path.join(base, "avg_pool", "1"))
    try:
        info = sv.signatures["serving_default"]
        feed = {k: np.ones([2 if d is None else d for d in s.shape], np.int32).tolist()
                for k, s in info.inputs.items()}
        typed = {k: np.asarray(v, protos.DTYPE_TO_NUMPY[info.inputs[k].dtype])
                 for k, v in feed.items()}
        a = sv.run("serving_default", feed)["ctr"]
        b = sv.run("serving_default", typed)["ctr"]
        assert a.shape == (2,)
        np.testing.assert_array_equal(a, b)
    finally:
        sv.close()
