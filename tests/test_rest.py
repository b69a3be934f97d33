"""REST API, Prometheus metrics and version labels of the local server (issue 20).

One tiny ``din_l`` export (version 1, copied as version 2) served by one
:class:`serving.server.LocalServer` with gRPC and REST, and a ``models.config`` with
version labels ``stable`` -> 1, ``canary`` -> 2 and ``gone`` -> 7 (not on disk: refused).
Checked: REST == gRPC for the same rows (row and columnar formats; ``rank``,
``serving_default`` and ``user_tower`` with base64 records); status / metadata JSON;
every bad request gets gRPC's message with TF Serving's HTTP code; exact metric
counts; labels in both APIs.
"""
import base64
import http.client
import json
import os
import shutil
import socket
import time

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tfmodels  # noqa: F401
import tensorflow as tf

from serving import export as E
from serving import protos
from serving.cache_store import SQLiteCacheStore
from serving.client import NoCacheEntryError, RankingClient
from serving.errors import ServerError
from serving.metrics import ClientMetrics
from serving.model_manager import ModelManager
from serving.rest import json_to_array
from serving.server import Limits, LocalServer
from serving.servable import Servable
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import write_tiny_dataset

SHORT, LONG = 5, 24
N = 6
MAX_CANDIDATES = 40
MAX_BYTES = 1 << 20
MODEL = "din_l"
Code = grpc.StatusCode

CONFIG = """model_config_list {
  config {
    name: "din_l"
    base_path: "%s"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
    version_labels { key: "gone" value: 7 }
  }
}
"""


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = write_tiny_dataset(str(tmp_path_factory.mktemp("rest_data")), num_users=8, seed=5)
    schema = S.FeatureSchema.from_data_dir(data, SHORT, LONG)
    files = sorted(tf.io.gfile.glob(S.split_pattern(data, "test")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    feats = {k: v.numpy() for k, v in D.user_history_features(tf.constant(records),
                                                              schema).items()}
    tf.keras.utils.set_random_seed(0)
    model = build_model(schema, MODEL, emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    base = str(tmp_path_factory.mktemp("rest_models"))
    E.export_model(model, base, MODEL, 1)
    # version 2: the same SavedModel (a SavedModel folder is relocatable); what differs
    # between versions here is only the number, which is what labels resolve
    shutil.copytree(os.path.join(base, MODEL, "1"), os.path.join(base, MODEL, "2"))
    with open(os.path.join(base, "models.config"), "w") as f:
        f.write(CONFIG % os.path.join(base, MODEL))
    srv = LocalServer(base, port=0, poll_interval_s=0, rest_port=0,
                      limits=Limits(max_request_bytes=MAX_BYTES, max_candidates=MAX_CANDIDATES))
    store = SQLiteCacheStore(str(tmp_path_factory.mktemp("rest_cache") / "c.db"))
    client = RankingClient(srv.address, MODEL, store, timeout_s=30)
    yield dict(server=srv, records=records, feats=feats, model=model, client=client,
               store=store)
    client.close()
    store.close()
    srv.stop()


def rest(srv, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.rest_port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    ctype = r.getheader("Content-Type")
    return r.status, (json.loads(payload) if ctype == "application/json" else payload)


def grpc_predict(client, inputs, signature, version=None, label=None, model=MODEL):
    """(code, message, outputs) of a PredictRequest holding ``inputs`` (NumPy)."""
    req = client._request(signature, version, model)
    if label:
        req.model_spec.version_label = label
    for k, v in inputs.items():
        protos.fill_tensor_proto(req.inputs[k], v)
    try:
        resp = client._predict(req, timeout=60)
    except grpc.RpcError as e:
        return e.code(), e.details(), None
    return Code.OK, "", {k: protos.to_ndarray(v) for k, v in resp.outputs.items()}


def rest_columnar(inputs, signature):
    return {"signature_name": signature, "inputs": {k: np.asarray(v).tolist()
                                                    for k, v in inputs.items()}}


@pytest.fixture(scope="module")
def cached(setup):
    """The user_tower outputs of the test users (gRPC) and one user's rank inputs."""
    recs = np.array(setup["records"], dtype=object)
    code, msg, out = grpc_predict(setup["client"], {"records": recs}, "user_tower")
    assert code == Code.OK, msg
    rng = np.random.default_rng(1)
    rank = {k: v[2:3] for k, v in out.items() if k != "user_id"}
    rank["target_item_id"] = rng.integers(2, 60, N).astype(np.int64)
    rank["target_cate_id"] = rng.integers(2, 6, N).astype(np.int64)
    return out, rank


# ---- predict parity ------------------------------------------------------------------------
def test_rest_rank_equals_grpc_columnar_and_row(setup, cached):
    srv, client = setup["server"], setup["client"]
    _, rank = cached
    code, msg, want = grpc_predict(client, rank, "rank")
    assert code == Code.OK, msg
    status, body = rest(srv, "POST", f"/v1/models/{MODEL}:predict", rest_columnar(rank, "rank"))
    assert status == 200, body
    assert list(body) == ["outputs"]              # one output: the value itself
    np.testing.assert_array_equal(np.float32(body["outputs"]), want["ctr"])   # bit for bit
    # row format: every input shares the 0th dimension only at N = 1
    one = {k: (v[:1] if k.startswith("target_") else v) for k, v in rank.items()}
    code, msg, want1 = grpc_predict(client, one, "rank")
    assert code == Code.OK, msg
    status, body = rest(srv, "POST", f"/v1/models/{MODEL}/versions/1:predict",
                        {"signature_name": "rank",
                         "instances": [{k: v[0].tolist() for k, v in one.items()}]})
    assert status == 200, body
    assert list(body) == ["predictions"] and len(body["predictions"]) == 1
    np.testing.assert_array_equal(np.float32(body["predictions"]), want1["ctr"])
    assert want1["ctr"][0] == want["ctr"][0]      # same user, same first candidate


def test_rest_serving_default_rows_equal_grpc_and_keras(setup):
    srv, client, feats, model = (setup[k] for k in ("server", "client", "feats", "model"))
    names = [k for k in model.feature_names("all")]
    rows = {k: feats[k][:4] for k in names if k in feats}
    rows["target_item_id"] = np.array([3, 9, 17, 30], np.int64)
    rows["target_cate_id"] = np.array([2, 3, 4, 5], np.int64)
    code, msg, want = grpc_predict(client, rows, "serving_default")
    assert code == Code.OK, msg
    instances = [{k: v[i].tolist() for k, v in rows.items()} for i in range(4)]
    status, body = rest(srv, "POST", f"/v1/models/{MODEL}/labels/stable:predict",
                        {"instances": instances})          # no signature_name: default
    assert status == 200, body
    np.testing.assert_array_equal(np.float32(body["predictions"]), want["ctr"])
    keras = model.predict_ctr({k: tf.constant(v) for k, v in rows.items()}).numpy()
    np.testing.assert_allclose(want["ctr"], keras, atol=1e-5)


def test_rest_user_tower_b64_records_row_and_columnar(setup, cached):
    srv = setup["server"]
    out, _ = cached
    recs = setup["records"][:3]
    b64 = [{"b64": base64.b64encode(r).decode()} for r in recs]
    status, body = rest(srv, "POST", f"/v1/models/{MODEL}:predict",
                        {"signature_name": "user_tower", "instances": b64})
    assert status == 200, body
    preds = body["predictions"]                   # several outputs: one object per row
    assert len(preds) == 3 and sorted(preds[0]) == sorted(out)
    for i in range(3):
        for k in out:
            np.testing.assert_array_equal(np.asarray(preds[i][k], out[k].dtype), out[k][i])
    status, body = rest(srv, "POST", f"/v1/models/{MODEL}:predict",
                        {"signature_name": "user_tower", "inputs": {"records": b64}})
    assert status == 200, body
    assert sorted(body["outputs"]) == sorted(out)
    for k in out:
        np.testing.assert_array_equal(np.asarray(body["outputs"][k], out[k].dtype), out[k][:3])


# ---- status and metadata ---------------------------------------------------------------------
def test_status_and_metadata_json(setup):
    srv = setup["server"]
    ok = {"error_code": "OK", "error_message": ""}
    status, body = rest(srv, "GET", f"/v1/models/{MODEL}")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": ok},
        {"version": "2", "state": "AVAILABLE", "status": ok}]}
    assert rest(srv, "GET", f"/v1/models/{MODEL}/versions/2")[1] == {
        "model_version_status": [{"version": "2", "state": "AVAILABLE", "status": ok}]}
    assert rest(srv, "GET", f"/v1/models/{MODEL}/labels/stable")[1] == {
        "model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}
    status, body = rest(srv, "GET", f"/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200 and sorted(body) == ["metadata", "model_spec"]
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"user_tower", "rank", "serving_default"} <= set(sigs)
    assert sigs["rank"]["outputs"]["ctr"]["dtype"] == "DT_FLOAT"
    assert sigs["user_tower"]["inputs"]["records"]["dtype"] == "DT_STRING"
    assert sigs["rank"]["method_name"] == "tensorflow/serving/predict"
    assert rest(srv, "GET", f"/v1/models/{MODEL}/labels/canary/metadata")[1][
        "model_spec"]["version"] == "2"


# ---- bad requests: gRPC's message, TF Serving's HTTP code ------------------------------------
def _set(key, value):
    return lambda r: r.__setitem__(key, value)


SHARED_CASES = {   # name: (mutation of the rank inputs, gRPC code, HTTP code, text)
    "missing input": (lambda r: r.pop("target_cate_id"), Code.INVALID_ARGUMENT, 400,
                      "missing input(s) ['target_cate_id']"),
    "unknown input": (_set("bogus", np.zeros([1], np.int64)), Code.INVALID_ARGUMENT, 400,
                      "unknown input(s) ['bogus']"),
    "wrong dtype": (_set("target_item_id", np.full([N], 2.5, np.float32)),
                    Code.INVALID_ARGUMENT, 400,
                    "'target_item_id' has dtype DT_FLOAT, expected DT_INT64"),
    "string for an id": (_set("target_cate_id", np.array([b"x"] * N, dtype=object)),
                         Code.INVALID_ARGUMENT, 400,
                         "'target_cate_id' has dtype DT_STRING, expected DT_INT64"),
    "wrong shape": (_set("short_item_id", np.full([1, SHORT + 1], 2, np.int64)),
                    Code.INVALID_ARGUMENT, 400, "'short_item_id' has shape [1, 6], expected"),
    "candidates disagree": (_set("target_cate_id", np.full([3], 2, np.int64)),
                            Code.INVALID_ARGUMENT, 400, "disagree on the batch"),
    "empty candidates": (lambda r: (r.__setitem__("target_item_id", np.zeros([0], np.int64)),
                                    r.__setitem__("target_cate_id", np.zeros([0], np.int64))),
                         Code.INVALID_ARGUMENT, 400, "empty batch"),
    "id out of vocabulary": (_set("target_item_id", np.full([N], 999, np.int64)),
                             Code.INVALID_ARGUMENT, 400, "holds ids outside"),
    "nan in cache": (lambda r: r.__setitem__("keys", np.full_like(r["keys"], np.nan)),
                     Code.INVALID_ARGUMENT, 400, "holds NaN or Inf"),
    "too many candidates": (lambda r: (
        r.__setitem__("target_item_id", np.full([MAX_CANDIDATES + 1], 2, np.int64)),
        r.__setitem__("target_cate_id", np.full([MAX_CANDIDATES + 1], 2, np.int64))),
        Code.RESOURCE_EXHAUSTED, 429, "the cap is 40"),
}
SPEC_CASES = {     # name: (path, (version, label, signature), gRPC code, HTTP code, text)
    "unknown model": ("/v1/models/nope:predict", ("nope", None, None, "rank"),
                      Code.NOT_FOUND, 404, "model 'nope' not found"),
    "unknown version": (f"/v1/models/{MODEL}/versions/9:predict", (MODEL, 9, None, "rank"),
                        Code.NOT_FOUND, 404, "version 9 not found"),
    "unknown label": (f"/v1/models/{MODEL}/labels/beta:predict", (MODEL, None, "beta", "rank"),
                      Code.NOT_FOUND, 404, "no version label 'beta'"),
    "unknown signature": (f"/v1/models/{MODEL}:predict", (MODEL, None, None, "foo"),
                          Code.NOT_FOUND, 404, "no signature 'foo'"),
}


@pytest.mark.parametrize("case", sorted(SHARED_CASES))
def test_bad_inputs_same_message_in_both_apis(case, setup, cached):
    srv, client = setup["server"], setup["client"]
    mutate, code, http_code, text = SHARED_CASES[case]
    inputs = dict(cached[1])
    mutate(inputs)
    got, msg, _ = grpc_predict(client, inputs, "rank")
    assert got == code and text in msg, (got, msg)
    body = rest_columnar({k: (v.astype(str) if v.dtype == object else v)
                          for k, v in inputs.items()}, "rank")
    status, answer = rest(srv, "POST", f"/v1/models/{MODEL}:predict", body)
    assert (status, answer) == (http_code, {"error": msg})
    assert rest(srv, "POST", f"/v1/models/{MODEL}:predict",
                rest_columnar(cached[1], "rank"))[0] == 200          # still serving


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_unknown_model_version_label_signature(case, setup, cached):
    srv, client = setup["server"], setup["client"]
    path, (model, version, label, sig), code, http_code, text = SPEC_CASES[case]
    got, msg, _ = grpc_predict(client, cached[1], sig, version, label, model)
    assert got == code and text in msg, (got, msg)
    status, answer = rest(srv, "POST", path, rest_columnar(cached[1], sig))
    assert (status, answer) == (http_code, {"error": msg})


REST_CASES = {   # malformed HTTP / JSON: name: (method, path, raw body, HTTP code, text)
    "malformed JSON": ("POST", f"/v1/models/{MODEL}:predict", b'{"inputs": [1,', 400,
                       "JSON parse error"),
    "not an object": ("POST", f"/v1/models/{MODEL}:predict", b"[1, 2]", 400,
                      "must be a JSON object"),
    "both formats": ("POST", f"/v1/models/{MODEL}:predict",
                     b'{"instances": [1], "inputs": [1]}', 400, "exactly one of 'instances'"),
    "no format": ("POST", f"/v1/models/{MODEL}:predict", b'{"signature_name": "rank"}', 400,
                  "exactly one of 'instances'"),
    "ragged list": ("POST", f"/v1/models/{MODEL}:predict",
                    b'{"signature_name": "rank", "inputs": {"short_item_id": [[1, 2], [3]]}}',
                    400, "input 'short_item_id': ragged nested list"),
    "null value": ("POST", f"/v1/models/{MODEL}:predict",
                   b'{"signature_name": "rank", "inputs": {"target_item_id": [1, null]}}', 400,
                   "input 'target_item_id': null is not a tensor value"),
    "bad base64": ("POST", f"/v1/models/{MODEL}:predict",
                   b'{"signature_name": "user_tower", "instances": [{"b64": "@@@"}]}', 400,
                   "input 'records': bad base64"),
    "several inputs unnamed": ("POST", f"/v1/models/{MODEL}:predict",
                               b'{"signature_name": "rank", "instances": [1, 2]}', 400,
                               "each instance must name them"),
    "instances differ": ("POST", f"/v1/models/{MODEL}:predict",
                         b'{"instances": [{"a": 1}, {"b": 1}]}', 400,
                         "instance 1 has inputs ['b']; instance 0 has ['a']"),
    "GET predict": ("GET", f"/v1/models/{MODEL}:predict", None, 400,
                    f"Malformed request: GET /v1/models/{MODEL}:predict"),
    "POST status": ("POST", f"/v1/models/{MODEL}", b"{}", 400,
                    f"Malformed request: POST /v1/models/{MODEL}"),
    "DELETE": ("DELETE", f"/v1/models/{MODEL}", None, 400, "Malformed request: DELETE"),
    "bad version": ("GET", f"/v1/models/{MODEL}/versions/x", None, 400, "Malformed request"),
    "classify": ("POST", f"/v1/models/{MODEL}:classify", b"{}", 501, "classify is not "
                 "implemented"),
    "unknown path": ("GET", "/v2/models/x", None, 404, "no such path: /v2/models/x"),
    "POST metrics": ("POST", "/monitoring/prometheus/metrics", b"", 405, "answers GET"),
}


@pytest.mark.parametrize("case", sorted(REST_CASES))
def test_malformed_rest_requests(case, setup, cached):
    srv = setup["server"]
    method, path, raw, http_code, text = REST_CASES[case]
    status, answer = rest(srv, method, path, raw=raw)
    assert status == http_code, (status, answer)
    assert list(answer) == ["error"] and text in answer["error"], answer
    assert rest(srv, "POST", f"/v1/models/{MODEL}:predict",
                rest_columnar(cached[1], "rank"))[0] == 200          # still serving


def test_oversized_body_is_refused_before_it_is_read(setup, cached):
    srv = setup["server"]
    # the header announces more than max_request_bytes; the server answers without
    # reading the body (and closes the connection), like gRPC's receive limit
    status, answer = rest(srv, "POST", f"/v1/models/{MODEL}:predict", raw=b"{}",
                          headers={"Content-Length": str(MAX_BYTES + 1)})
    assert (status, answer) == (429, {"error": "Received message larger than max "
                                               f"({MAX_BYTES + 1} vs. {MAX_BYTES})"})
    # a body of exactly the limit is read and parsed (and is not JSON here)
    status, answer = rest(srv, "POST", f"/v1/models/{MODEL}:predict", raw=b" " * MAX_BYTES)
    assert status == 400 and "JSON parse error" in answer["error"]
    assert rest(srv, "POST", f"/v1/models/{MODEL}:predict",
                rest_columnar(cached[1], "rank"))[0] == 200


def test_json_values_take_the_signature_dtype_where_they_fit():
    assert json_to_array([[1, 2]], "x", 1).dtype == np.float32        # ints for a float input
    assert json_to_array([1.5], "x", 2).dtype == np.float64
    assert json_to_array([1, 2], "x", 3).dtype == np.int32
    assert json_to_array([1.0], "x", 9).dtype == np.float32           # a float stays a float
    assert json_to_array(["a", {"b64": "Yg=="}], "x", 7).tolist() == [b"a", b"b"]
    assert json_to_array([], "x", 9).shape == (0,)
    for value, dtype, text in (([2 ** 40], 3, "out of range for DT_INT32"),
                               ([2 ** 64], 9, "out of range for DT_INT64"),
                               ([1, "a"], 9, "mixed JSON value types"),
                               ([[1], 2], 9, "ragged"), ([{"a": 1}], 9, "dict is not")):
        with pytest.raises(Exception, match=text):
            json_to_array(value, "x", dtype)


# ---- metrics ---------------------------------------------------------------------------------
def _samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _req(api, model, version, sig, code, method="predict"):
    return tuple(sorted(dict(api=api, method=method, model=model, version=version,
                             signature=sig, code=code).items()))


def test_metrics_count_every_request_by_label(setup, cached):
    srv, client = setup["server"], setup["client"]
    status, page = rest(srv, "GET", "/monitoring/prometheus/metrics")
    assert status == 200
    before = _samples(page.decode())
    for _ in range(3):
        assert rest(srv, "POST", f"/v1/models/{MODEL}/labels/canary:predict",
                    rest_columnar(cached[1], "rank"))[0] == 200
    assert rest(srv, "POST", "/v1/models/nope:predict", {"inputs": {}})[0] == 404
    assert rest(srv, "POST", f"/v1/models/{MODEL}/versions/1:predict",
                rest_columnar({**cached[1], "target_item_id": np.full([N], 2.5)}, "rank")
                )[0] == 400
    for _ in range(2):
        assert grpc_predict(client, cached[1], "rank", version=1)[0] == Code.OK
    assert grpc_predict(client, cached[1], "rank", version=9)[0] == Code.NOT_FOUND
    assert rest(srv, "GET", f"/v1/models/{MODEL}/versions/2")[0] == 200
    after = _samples(rest(srv, "GET", "/monitoring/prometheus/metrics")[1].decode())

    def delta(name, labels):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    expected = {_req("rest", MODEL, "2", "rank", "200"): 3,
                _req("rest", "", "", "", "404"): 1,       # unknown names are not labels
                _req("rest", MODEL, "1", "rank", "400"): 1,
                _req("grpc", MODEL, "1", "rank", "OK"): 2,
                _req("grpc", MODEL, "", "", "NOT_FOUND"): 1,
                _req("rest", MODEL, "2", "", "200", "status"): 1}
    for labels, n in expected.items():
        assert delta("lifelong_serving_requests_total", labels) == n, labels
        assert delta("lifelong_serving_request_latency_seconds_count", labels) == n, labels
        assert delta("lifelong_serving_request_latency_seconds_sum", labels) > 0, labels
    moved = {k for k in after if k[0] == "lifelong_serving_requests_total"
             and after[k] != before.get(k, 0)}
    assert moved == {("lifelong_serving_requests_total", k) for k in expected}
    # model loads: one per version, with its load + warm-up time
    for v in ("1", "2"):
        key = tuple(sorted(dict(model=MODEL, version=v, outcome="ok").items()))
        assert after[("lifelong_serving_model_loads_total", key)] == 1
        key = tuple(sorted(dict(model=MODEL, version=v).items()))
        assert after[("lifelong_serving_model_load_latency_seconds_count", key)] == 1
        assert after[("lifelong_serving_model_load_latency_seconds_sum", key)] > 0


def test_client_counts_cache_hits_and_misses(setup, cached):
    out, rank = cached
    store = setup["store"]
    uid = int(out["user_id"][2])
    store.put_many([(MODEL, uid, 1, {k: v for k, v in rank.items()
                                     if not k.startswith("target_")})])
    metrics = ClientMetrics()
    with RankingClient(setup["server"].address, MODEL, store, timeout_s=30,
                       metrics=metrics) as c:
        cands = (rank["target_item_id"], rank["target_cate_id"])
        for _ in range(2):
            assert c.rank(uid, cands).shape == (N,)
        with pytest.raises(NoCacheEntryError):
            c.rank(uid + 10_000, cands)
    got = _samples(metrics.exposition().decode())
    assert got[("lifelong_client_cache_lookups_total", (("model", MODEL), ("result", "hit")))] == 2
    assert got[("lifelong_client_cache_lookups_total",
                (("model", MODEL), ("result", "miss")))] == 1


# ---- version labels --------------------------------------------------------------------------
def test_labels_resolve_in_both_apis_and_unloaded_label_is_refused(setup, cached):
    srv, client = setup["server"], setup["client"]
    for label, version in (("stable", 1), ("canary", 2)):
        req = client._request("rank", None)
        req.model_spec.version_label = label
        for k, v in cached[1].items():
            protos.fill_tensor_proto(req.inputs[k], v)
        assert client._predict(req, timeout=30).model_spec.version.value == version
        assert rest(srv, "GET", f"/v1/models/{MODEL}/labels/{label}")[1][
            "model_version_status"][0]["version"] == str(version)
    assert srv.manager.labels(MODEL) == {"stable": 1, "canary": 2}      # 'gone' refused
    code, msg, _ = grpc_predict(client, cached[1], "rank", label="gone")
    assert code == Code.NOT_FOUND
    assert "no version label 'gone'" in msg and "version 7, which is not loaded" in msg
    status, answer = rest(srv, "POST", f"/v1/models/{MODEL}/labels/gone:predict",
                          rest_columnar(cached[1], "rank"))
    assert (status, answer) == (404, {"error": msg})


class _Fake(Servable):
    def __init__(self, name, version, path):
        self.name, self.version, self.signatures = name, int(version), {}


def test_label_of_unloaded_version_keeps_last_good_assignment(tmp_path):
    for v in (1, 2):
        os.makedirs(tmp_path / "m" / str(v))
    cfg = tmp_path / "models.config"

    def config(versions, canary):
        spec = " ".join(f"versions: {v}" for v in versions)
        cfg.write_text('model_config_list { config { name: "m" base_path: "%s" '
                       'model_version_policy { specific { %s } } '
                       'version_labels { key: "canary" value: %d } } }'
                       % (tmp_path / "m", spec, canary))

    config([1, 2], 2)
    mgr = ModelManager(str(tmp_path), poll_interval_s=0, servable_factory=_Fake)
    mgr.refresh()
    assert mgr.labels("m") == {"canary": 2} and mgr.get("m", label="canary").version == 2
    config([1, 2], 3)                       # version 3 does not exist: refused, 2 kept
    mgr.refresh()
    assert mgr.labels("m") == {"canary": 2}
    config([1], 3)                          # 2 unloaded: the label has nowhere to point
    mgr.refresh()
    assert mgr.labels("m") == {}
    with pytest.raises(Exception, match="version 3, which is not loaded"):
        mgr.get("m", label="canary")


def test_rest_port_taken_is_a_server_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(ServerError, match="cannot bind the REST port"):
            LocalServer(str(tmp_path), port=0, poll_interval_s=0, rest_port=s.getsockname()[1])


def test_keep_alive_answers_do_not_wait_for_delayed_acks(setup):
    """Headers and body leave in two writes: without TCP_NODELAY each keep-alive answer
    waited ~40 ms for the client's delayed ACK (Nagle). 20 status requests on one
    connection must take far less than 20 x 40 ms."""
    srv = setup["server"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.rest_port, timeout=60)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        conn.request("GET", f"/v1/models/{MODEL}/versions/1")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["model_version_status"]
        times.append(time.perf_counter() - t0)
    conn.close()
    assert sorted(times)[10] < 0.02, times          # median well under one delayed ACK
