"""The server's per-request fast paths (issue 20 item 5, session 8): the request decoder's
one-pass path, the answer's TensorProto fast path and the metrics' cached children give
exactly what the general paths give, and decline (so that the general path words the
refusal) everything those refuse. No TensorFlow session, no gRPC: milliseconds."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving import protos
from serving.errors import ServingError
from serving.metrics import ServerMetrics
from serving.servable import SignatureInfo, TensorSpecInfo
from serving.validation import Limits, _decode_checked, _decode_fast, decode_inputs

F32, I64 = 1, 9
#: a rank-like signature: a cache tensor, a short window and the candidates
INFO = SignatureInfo({"pooled": TensorSpecInfo(F32, (1, 4)),
                      "short_item_id": TensorSpecInfo(I64, (1, 3)),
                      "target_item_id": TensorSpecInfo(I64, (None,)),
                      "target_cate_id": TensorSpecInfo(I64, (None,))},
                     {"ctr": TensorSpecInfo(F32, (None,))})
WHERE = "model 'm' version 1 signature 'rank'"


def _request(n=3, **override):
    m = protos.messages()
    req = m.PredictRequest()
    values = {"pooled": np.array([[0.5, -1.0, 2.0, 0.25]], np.float32),
              "short_item_id": np.array([[4, 5, 0]], np.int64),
              "target_item_id": np.arange(2, 2 + n, dtype=np.int64),
              "target_cate_id": np.arange(7, 7 + n, dtype=np.int64)}
    values.update(override)
    for k, v in values.items():
        if v is not None:
            protos.fill_tensor_proto(req.inputs[k], v)
    return req


def _refusal(fn, *args):
    with pytest.raises(ServingError) as e:
        fn(*args)
    return e.value.code, e.value.message


def test_fast_decode_gives_the_checked_paths_arrays():
    req = _request()
    fast = _decode_fast(req.inputs, INFO, Limits())
    assert fast is not None                                   # the common request: fast path
    ref = _decode_checked(req, INFO, Limits(), WHERE)
    assert list(fast) == list(ref) == sorted(INFO.inputs)
    for k in ref:
        assert fast[k].dtype == ref[k].dtype and fast[k].shape == ref[k].shape
        np.testing.assert_array_equal(fast[k], ref[k])
    np.testing.assert_array_equal(fast["target_item_id"], [2, 3, 4])
    np.testing.assert_array_equal(fast["pooled"], [[0.5, -1.0, 2.0, 0.25]])
    assert decode_inputs(req, INFO, Limits(), WHERE).keys() == ref.keys()
    # typed values instead of tensor_content: declined by the fast path, decoded alike
    typed = _request()
    del typed.inputs["target_item_id"]
    typed.inputs["target_item_id"].dtype = I64
    typed.inputs["target_item_id"].tensor_shape.dim.add().size = 3
    typed.inputs["target_item_id"].int64_val.extend([2, 3, 4])
    assert _decode_fast(typed.inputs, INFO, Limits()) is None
    np.testing.assert_array_equal(decode_inputs(typed, INFO, Limits(), WHERE)["target_item_id"],
                                  [2, 3, 4])


def _mutations():
    """(what, request, limits): each refused by the checked path."""
    out = [("wrong dtype", _request(pooled=np.zeros((1, 4), np.float64)), Limits()),
           ("wrong fixed dim", _request(pooled=np.zeros((1, 5), np.float32)), Limits()),
           ("wrong rank", _request(short_item_id=np.zeros(3, np.int64)), Limits()),
           ("batch disagrees", _request(target_cate_id=np.arange(2, dtype=np.int64)), Limits()),
           ("empty batch", _request(n=0), Limits()),
           ("missing input", _request(pooled=None), Limits()),
           ("unknown input", _request(extra=np.zeros(3, np.int64)), Limits()),
           ("over max_candidates", _request(n=5), Limits(max_candidates=4)),
           ("over max_elements", _request(n=5), Limits(max_elements=15))]
    short = _request()
    short.inputs["target_item_id"].tensor_content = short.inputs["target_item_id"].tensor_content[:-8]
    out.append(("content too short", short, Limits()))
    neg = _request()
    neg.inputs["target_item_id"].tensor_shape.dim[0].size = -1
    out.append(("negative dim", neg, Limits()))
    unknown = _request()
    unknown.inputs["pooled"].tensor_shape.unknown_rank = True
    out.append(("unknown rank", unknown, Limits()))
    return out


@pytest.mark.parametrize("what,req,limits", _mutations(), ids=[m[0] for m in _mutations()])
def test_fast_decode_declines_every_refusal_and_the_message_is_unchanged(what, req, limits):
    names = sorted(req.inputs)
    assert _decode_fast(req.inputs, INFO, limits) is None
    assert sorted(req.inputs) == names          # declining never inserts a missing key
    code, msg = _refusal(decode_inputs, req, INFO, limits, WHERE)
    assert (code, msg) == _refusal(_decode_checked, req, INFO, limits, WHERE)
    assert msg.startswith(WHERE)
    want = {"over max_candidates": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over max_elements": grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert code == want.get(what, grpc.StatusCode.INVALID_ARGUMENT)


def test_signature_plan_is_sorted_with_batch_flags():
    assert [p[0] for p in INFO.plan] == sorted(INFO.inputs)
    plan = {p[0]: p for p in INFO.plan}
    assert plan["target_item_id"][4] and not plan["pooled"][4]
    assert plan["pooled"][2] == np.dtype("<f4") and plan["pooled"][3] == (1, 4)
    strings = SignatureInfo({"records": TensorSpecInfo(7, (None,))}, {})
    assert strings.plan == (("records", 7, None, (None,), True),)   # strings: general path


@pytest.mark.parametrize("arr,enum,content", [
    (np.array([1.0, 2.0], np.float32), 1, b"\x00\x00\x80?\x00\x00\x00@"),
    (np.array([1.0, 2.0], ">f4"), 1, b"\x00\x00\x80?\x00\x00\x00@"),        # big-endian in
    (np.array([[1, 2], [3, 4]], np.int64, order="F"), 9,                     # C order out
     b"".join(int(v).to_bytes(8, "little") for v in (1, 2, 3, 4))),
    (np.arange(6, dtype=np.int32)[::2], 3,                                   # strided view
     b"".join(int(v).to_bytes(4, "little") for v in (0, 2, 4))),
    (np.array([True, False]), 10, b"\x01\x00"),
    (np.array([1.0], np.float16), 19, b"\x00\x3c"),
])
def test_fill_tensor_proto_bytes(arr, enum, content):
    proto = protos.messages().TensorProto()
    protos.fill_tensor_proto(proto, arr)
    assert proto.dtype == enum and proto.tensor_content == content
    assert [d.size for d in proto.tensor_shape.dim] == list(arr.shape)
    np.testing.assert_array_equal(protos.to_ndarray(proto), arr)


def test_metrics_cached_children_count_each_label_set():
    m = ServerMetrics()
    for _ in range(3):
        m.observe_request("grpc", "predict", "m", "1", "rank", "OK", 0.0015)
    m.observe_request("grpc", "predict", "m", "1", "rank", "INVALID_ARGUMENT", 0.2)
    ok = dict(api="grpc", method="predict", model="m", version="1", signature="rank",
              code="OK")
    bad = dict(ok, code="INVALID_ARGUMENT")
    get = m.registry.get_sample_value
    assert get("lifelong_serving_requests_total", ok) == 3.0
    assert get("lifelong_serving_requests_total", bad) == 1.0
    assert get("lifelong_serving_request_latency_seconds_count", ok) == 3.0
    # 0.0015 s falls in the 0.002 bucket, not the 0.001 one; 0.2 s in 0.2
    assert get("lifelong_serving_request_latency_seconds_bucket", dict(ok, le="0.001")) == 0.0
    assert get("lifelong_serving_request_latency_seconds_bucket", dict(ok, le="0.002")) == 3.0
    assert get("lifelong_serving_request_latency_seconds_bucket", dict(bad, le="0.1")) == 0.0
    assert get("lifelong_serving_request_latency_seconds_bucket", dict(bad, le="0.2")) == 1.0
    assert get("lifelong_serving_request_latency_seconds_sum", ok) == pytest.approx(0.0045)
