"""TensorFlow Serving's REST API beside the gRPC one (``lifelong serve --rest_api_port``).

Endpoints (TF Serving's, https://www.tensorflow.org/tfx/serving/api_rest):

* ``GET  /v1/models/{model}[/versions/{v} | /labels/{label}]`` -- model status
  (``GetModelStatusResponse`` as JSON: ``{"model_version_status": [{"version": "1",
  "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}``);
* ``GET  /v1/models/{model}[...]/metadata`` -- ``{"model_spec": {...}, "metadata":
  {"signature_def": {"signature_def": {...}}}}``;
* ``POST /v1/models/{model}[...]:predict`` -- row format ``{"signature_name": ...,
  "instances": [...]}`` -> ``{"predictions": [...]}`` or columnar format ``{"inputs":
  ...}`` -> ``{"outputs": ...}``; bytes as ``{"b64": "..."}`` (the ``user_tower``'s
  ``records``); ``:classify`` / ``:regress`` answer 501 (UNIMPLEMENTED, as in gRPC);
* ``GET  /monitoring/prometheus/metrics`` -- :class:`serving.metrics.ServerMetrics`.

One code path with gRPC: a request becomes the same ``PredictRequest`` /
``GetModelMetadataRequest`` / ``GetModelStatusRequest`` and goes through the same
servicer method (:mod:`serving.services`), so the checks, the limits
(``max_candidates``, ``max_elements``) and the messages are gRPC's; a refused request
gets ``{"error": "<the gRPC message>"}`` with TF Serving's HTTP code for the gRPC code
(its ``ToHTTPStatusCode``: INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE 400,
NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNIMPLEMENTED 501, INTERNAL 500, ...). A body
over ``max_request_bytes`` is refused before it is read (429, gRPC's message). A path
under ``/v1/`` that does not parse, or a wrong method for it, is 400 ``Malformed
request: <METHOD> <path>`` (TF Serving's answer); any other path is 404.

JSON values take the signature's dtype where they fit it (JSON integers for an
integer or float input, numbers for a float input, strings / ``{"b64"}`` for a string
input); a value that does not fit keeps its own type (a JSON float is DT_FLOAT, a
string DT_STRING, ``true`` DT_BOOL) and the shared check then refuses it with gRPC's
message (``input 'target_item_id' has dtype DT_FLOAT, expected DT_INT64``). Ragged
lists, nulls, bad base64 and mixed value types are 400 with a message naming the input.
Output floats are written as the exact float32 values (``ndarray.tolist``), so a REST
answer parses back to the gRPC answer bit for bit. A string output is ``{"b64"}``
when its name ends in ``_bytes`` (TF Serving's rule) or it is not UTF-8.

The HTTP server is the standard library's :class:`http.server.ThreadingHTTPServer`
(one thread per connection, HTTP/1.1 keep-alive): no new dependency, and enough for
a local and test server whose cost per request is the model and the JSON, not the
HTTP parsing (TF Serving's own REST server is a C++ libevent server; this one is not
meant to front the public internet either: no TLS, no auth, bound to 127.0.0.1 by
default like the gRPC port).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     predict_pb2)

from serving import protos
from serving.errors import ServerError, ServingError, exhausted, invalid
from serving.metrics import CONTENT_TYPE_LATEST
from serving.services import ModelServicer, PredictionServicer, Seen, status_of

log = logging.getLogger("serving.server")

METRICS_PATH = "/monitoring/prometheus/metrics"
Code = grpc.StatusCode

#: gRPC code -> HTTP status, TF Serving's ToHTTPStatusCode (model_servers/http_server.cc)
HTTP_STATUS = {
    Code.OK: 200, Code.CANCELLED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400, Code.ABORTED: 409, Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500, Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}

# TF Serving's path patterns (http_rest_api_handler.cc), case-insensitive like its
# (?i); a version is digits, a label any segment without '/' or ':'.
_SPEC = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
_STATUS_PATH = re.compile(_SPEC + r"(?P<metadata>/metadata)?", re.IGNORECASE)
_PREDICT_PATH = re.compile(_SPEC + r":(?P<method>classify|regress|predict)", re.IGNORECASE)
_MAX_DIMS = 32
_INT64 = (-(1 << 63), (1 << 63) - 1)
_JSON_OPTS = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class _Answer(Exception):
    """An HTTP answer decided before the shared path (bad JSON, bad path): code + message."""

    def __init__(self, http: int, message: str):
        super().__init__(message)
        self.http, self.message = http, message


# ---- JSON <-> NumPy ------------------------------------------------------------------------
def _is_b64(x) -> bool:
    return isinstance(x, dict) and len(x) == 1 and "b64" in x


def _shape_of(value, name: str):
    """Shape of a nested JSON list (rectangular) and its leaves in row-major order."""
    shape = []
    v = value
    while isinstance(v, list):
        shape.append(len(v))
        if len(shape) > _MAX_DIMS:
            raise invalid(f"input '{name}': more than {_MAX_DIMS} nested lists")
        if not v:
            break
        v = v[0]
    flat = []
    stack = [(value, 0)]
    while stack:   # iterative (a deep list cannot exhaust the recursion limit)
        x, depth = stack.pop()
        if depth == len(shape):
            if isinstance(x, list):
                raise invalid(f"input '{name}': ragged nested list (a list where a value "
                              f"was expected at depth {depth})")
            flat.append(x)
            continue
        if not isinstance(x, list) or len(x) != shape[depth]:
            got = f"{len(x)} elements" if isinstance(x, list) else "a value"
            raise invalid(f"input '{name}': ragged nested list (dimension {depth} has "
                          f"{shape[depth]} elements in its first entry, {got} elsewhere)")
        stack.extend((y, depth + 1) for y in reversed(x))
    return tuple(shape), flat


def _numeric(value) -> Optional[np.ndarray]:
    """NumPy's own conversion of a rectangular list of JSON numbers (C speed: 1.3 ms
    against 20 ms for the checked walk over a [1, 1000, 32] cache); ``None`` for
    anything else (ragged, strings, nulls, objects, integers beyond int64), which the
    checked walk then handles. [interp] ``true`` / ``false`` mixed into numbers are
    read as 1 / 0 here (NumPy's rule) instead of being refused."""
    if not isinstance(value, list):
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return arr if arr.dtype.kind in "if" and arr.size and arr.ndim <= _MAX_DIMS else None


def json_to_array(value, name: str, dtype_enum: Optional[int]) -> np.ndarray:
    """One input's JSON value -> ndarray, in the signature's dtype where the values fit
    it, else in their own JSON type (the shared dtype check refuses it then)."""
    want = protos.DTYPE_TO_NUMPY.get(dtype_enum) if dtype_enum is not None else None
    arr = _numeric(value)
    if arr is not None:
        shape, flat, kind = arr.shape, arr, ("i" if arr.dtype.kind == "i" else "f")
    else:
        shape, flat = _shape_of(value, name)
        kinds = set()
        for x in flat:
            if isinstance(x, bool):
                kinds.add("b")
            elif isinstance(x, int):
                kinds.add("i")
            elif isinstance(x, float):
                kinds.add("f")
            elif isinstance(x, str) or _is_b64(x):
                kinds.add("s")
            elif x is None:
                raise invalid(f"input '{name}': null is not a tensor value")
            else:
                raise invalid(f"input '{name}': {type(x).__name__} is not a tensor value "
                              "(numbers, strings, booleans or {\"b64\": ...})")
        if len(kinds) > 1 and kinds != {"i", "f"}:
            raise invalid(f"input '{name}': mixed JSON value types {sorted(kinds)} in one "
                          "tensor")
        kind = kinds.pop() if len(kinds) == 1 else ("f" if kinds else None)
    if kind is None:                   # no values: an empty tensor of the signature's dtype
        dt = want if want is not None else np.dtype(np.float32)
        return np.zeros(shape, dt)
    if kind == "s":
        out = np.empty(len(flat), dtype=object)
        for i, x in enumerate(flat):
            if isinstance(x, str):
                out[i] = x.encode("utf-8")
                continue
            try:
                out[i] = base64.b64decode(x["b64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise invalid(f"input '{name}': bad base64 in {{\"b64\": ...}}: {e}") from None
        return out.reshape(shape)
    if kind == "b":
        return np.asarray(flat, bool).reshape(shape)
    if kind == "i":
        ints = np.asarray(flat, object) if arr is None else flat
        lo, hi = ((np.iinfo(want).min, np.iinfo(want).max) if want is not None
                  and want.kind in "iu" else _INT64)
        if ints.size and (ints.min() < lo or ints.max() > hi):
            bad = next(x for x in np.ravel(ints) if not lo <= x <= hi)
            target = (protos.dtype_name(dtype_enum) if want is not None and want.kind in "iu"
                      else "DT_INT64")
            raise invalid(f"input '{name}': value {bad} is out of range for {target}")
        if want is not None and want.kind in "iuf":   # integers fit an int or float input
            return np.asarray(ints, want).reshape(shape)
        return np.asarray(ints, np.int64).reshape(shape)
    if want is not None and want.kind == "f":     # floats fit a float input
        return np.asarray(flat, want).reshape(shape)
    return np.asarray(flat, np.float32).reshape(shape)


def _json_value(arr: np.ndarray, name: str):
    if arr.dtype.kind == "O" or arr.dtype.kind == "S":
        def one(b):
            b = bytes(b)
            if not name.endswith("_bytes"):
                try:
                    return b.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(b).decode("ascii")}
        flat = [one(b) for b in arr.reshape(-1)]
        return np.array(flat, dtype=object).reshape(arr.shape).tolist() if arr.ndim else flat[0]
    return arr.tolist()     # exact float32 values as Python floats


def _only_input(info, sig: str, fmt: str) -> str:
    if info is None or len(info.inputs) != 1:
        n = "several" if info is None else len(info.inputs)
        raise invalid(f"signature '{sig}' takes {n} inputs "
                      f"({sorted(info.inputs) if info else '?'}): {fmt} must name them "
                      "in a JSON object")
    return next(iter(info.inputs))


def columns_from_json(body: Dict[str, Any], info, sig: str) -> Tuple[Dict[str, Any], str]:
    """The JSON values of each input, and the format (``row`` | ``columnar``)."""
    if ("instances" in body) == ("inputs" in body):
        raise invalid("the request must hold exactly one of 'instances' (row format) or "
                      "'inputs' (columnar format)")
    if "inputs" in body:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            return dict(inputs), "columnar"
        return {_only_input(info, sig, "'inputs'"): inputs}, "columnar"
    instances = body["instances"]
    if not isinstance(instances, list):
        raise invalid("'instances' must be a list (one entry per row)")
    if not instances:
        raise invalid("empty batch ('instances' is an empty list)")
    first = instances[0]
    if not (isinstance(first, dict) and not _is_b64(first)):
        return {_only_input(info, sig, "each instance"): instances}, "row"
    keys = sorted(first)
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or _is_b64(inst) or sorted(inst) != keys:
            got = sorted(inst) if isinstance(inst, dict) else type(inst).__name__
            raise invalid(f"instance {i} has inputs {got}; instance 0 has {keys} (every "
                          "instance must name the same inputs)")
    return {k: [inst[k] for inst in instances] for k in keys}, "row"


def outputs_to_json(outputs: Dict[str, np.ndarray], fmt: str) -> Dict[str, Any]:
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _json_value(outputs[names[0]], names[0])}
        return {"outputs": {k: _json_value(outputs[k], k) for k in names}}
    sizes = {k: (outputs[k].shape[0] if outputs[k].ndim else None) for k in names}
    batch = sizes[names[0]] if names else 0
    bad = {k: s for k, s in sizes.items() if s != batch}
    if bad or batch is None:
        raise invalid("the row format needs every output to have the same 0th dimension; "
                      f"outputs have {sizes} (use the columnar format, 'inputs')")
    if len(names) == 1:
        return {"predictions": _json_value(outputs[names[0]], names[0])}
    cols = {k: _json_value(outputs[k], k) for k in names}
    return {"predictions": [{k: cols[k][i] for k in names} for i in range(batch)]}


def _spec(spec, name: str, version: Optional[str], label: Optional[str]) -> None:
    spec.name = name
    if version is not None:
        v = int(version)
        if v > _INT64[1]:
            raise invalid(f"version {version} is out of range")
        spec.version.value = v
    elif label is not None:
        spec.version_label = label


# ---- the API ---------------------------------------------------------------------------------
class RestApi:
    """The handlers (path + body -> HTTP code + JSON), over the gRPC servicers."""

    def __init__(self, predictions: PredictionServicer, models: ModelServicer, limits,
                 metrics=None):
        self.predictions, self.models, self.limits, self.metrics = (predictions, models,
                                                                     limits, metrics)

    def handle(self, method: str, raw_path: str, body_fn, length: Optional[int]
               ) -> Tuple[int, str, bytes]:
        """-> (HTTP status, content type, body bytes)."""
        path = urlsplit(raw_path).path
        if path == METRICS_PATH:
            if method != "GET":
                return self._error(405, f"{method} {path}: the metrics page answers GET")
            if self.metrics is None:
                return self._error(404, "metrics are not collected by this server")
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if not path.lower().startswith("/v1/"):
            return self._error(404, f"no such path: {path} (the API is under /v1/models/ "
                               f"and {METRICS_PATH})")
        t0, seen, what, name = time.perf_counter(), {}, "predict", ""
        try:
            m = (_PREDICT_PATH if method == "POST" else _STATUS_PATH).fullmatch(path)
            if method not in ("GET", "POST") or m is None:
                raise _Answer(400, f"Malformed request: {method} {path}")
            name = m.group("name")
            if method == "GET":
                what = "metadata" if m.group("metadata") else "status"
                out = (self._metadata if m.group("metadata") else self._status)(m, seen)
            else:
                if m.group("method").lower() != "predict":
                    raise ServingError(Code.UNIMPLEMENTED, f"{m.group('method')} is not "
                                       "implemented by this server (predict is)")
                if length is None:
                    raise _Answer(411, "a POST needs a Content-Length header")
                if length > self.limits.max_request_bytes:
                    raise exhausted(f"Received message larger than max ({length} vs. "
                                    f"{self.limits.max_request_bytes})")
                out = self._predict(m, body_fn(), seen)
            http = 200
            payload = out
        except _Answer as a:
            http, payload = a.http, {"error": a.message}
        except Exception as e:
            code, msg = status_of(e, "REST " + what)
            http, payload = HTTP_STATUS.get(code, 500), {"error": msg}
        self.predictions.record("rest", what, name, seen, str(http), t0)
        return self._json(http, payload)

    @staticmethod
    def _json(http: int, payload) -> Tuple[int, str, bytes]:
        return http, "application/json", json.dumps(payload, indent=None).encode("utf-8")

    def _error(self, http: int, message: str) -> Tuple[int, str, bytes]:
        return self._json(http, {"error": message})

    def _status(self, m, seen: Seen):
        req = get_model_status_pb2.GetModelStatusRequest()
        _spec(req.model_spec, m.group("name"), m.group("version"), m.group("label"))
        resp = self.models.status(req, seen)
        return json_format.MessageToDict(resp, **_JSON_OPTS)

    def _metadata(self, m, seen: Seen):
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        _spec(req.model_spec, m.group("name"), m.group("version"), m.group("label"))
        resp = self.predictions.metadata(req, seen)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sig_map)
        return {"model_spec": json_format.MessageToDict(resp.model_spec, **_JSON_OPTS),
                "metadata": {"signature_def": json_format.MessageToDict(sig_map,
                                                                        **_JSON_OPTS)}}

    def _predict(self, m, raw: bytes, seen: Seen):
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:    # UnicodeDecodeError is a ValueError
            raise invalid(f"JSON parse error: {e}") from None
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        sig = body.get("signature_name", "") or "serving_default"
        if not isinstance(sig, str):
            raise invalid("'signature_name' must be a string")
        req = predict_pb2.PredictRequest()
        _spec(req.model_spec, m.group("name"), m.group("version"), m.group("label"))
        req.model_spec.signature_name = sig
        # The signature's dtypes (TF Serving reads them the same way, GetInfoMap); an
        # unknown model / version / label / signature is left to the shared path, which
        # answers it with gRPC's message.
        servable = self.predictions.servable(req.model_spec, seen)
        info = servable.signatures.get(sig)
        if info is not None:
            seen["signature"] = sig
            columns, fmt = columns_from_json(body, info, sig)
            for k, v in columns.items():
                spec = info.inputs.get(k)
                arr = json_to_array(v, k, spec.dtype if spec is not None else None)
                protos.fill_tensor_proto(req.inputs[k], arr)
        else:
            fmt = "columnar"
        resp = self.predictions.predict(req, seen)
        return outputs_to_json({k: protos.to_ndarray(v) for k, v in resp.outputs.items()}, fmt)


# ---- the HTTP server ------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # keep-alive; every answer has a Content-Length
    server_version = "lifelong-serving"
    timeout = 120                        # an idle or stalled connection frees its thread
    # TCP_NODELAY: the headers and the body leave in two writes; with Nagle's algorithm
    # the second waits for the client's delayed ACK (measured: +40 ms per keep-alive
    # request, 46.9 ms against 5.6 ms for gRPC at N = 100)
    disable_nagle_algorithm = True

    def _serve(self):
        api: RestApi = self.server.api
        length = self.headers.get("Content-Length")
        try:
            length = int(length) if length is not None else None
            if length is not None and length < 0:
                raise ValueError
        except ValueError:
            self._send(*api._error(400, f"bad Content-Length {length!r}"), close=True)
            return
        read = {"done": False}

        def body() -> bytes:
            read["done"] = True
            return self.rfile.read(length) if length else b""
        http, ctype, payload = api.handle(self.command, self.path, body, length)
        # an unread body would be taken for the next request: drop the connection then
        self._send(http, ctype, payload, close=bool(length) and not read["done"])

    def _send(self, http: int, ctype: str, payload: bytes, close: bool = False):
        self.send_response(http)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, fmt, *args):   # not one stderr line per request
        log.debug("rest %s " + fmt, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class RestServer:
    """The REST API on ``host:port`` (0 = any free port) in a background thread."""

    def __init__(self, api: RestApi, host: str = "127.0.0.1", port: int = 0):
        cls = _Server
        if ":" in host.strip("[]"):
            cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self.httpd = cls((host.strip("[]"), port), _Handler)
        except OSError as e:
            raise ServerError(f"cannot bind the REST port {host}:{port}: {e.strerror or e}") \
                from e
        self.httpd.api = api
        self.port = self.httpd.server_address[1]
        self.address = f"{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest-api",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
