"""The gRPC services of TensorFlow Serving's API, over a :class:`ModelManager`.

* ``PredictionService``: ``Predict`` and ``GetModelMetadata`` (signature_def); the
  others answer UNIMPLEMENTED;
* ``ModelService``: ``GetModelStatus``.

Each handler is a thin gRPC wrapper around a method that takes the request message
and returns the response or raises (:meth:`PredictionServicer.predict`,
:meth:`PredictionServicer.metadata`, :meth:`ModelServicer.status`); the REST API
(:mod:`serving.rest`) builds the same request messages and calls the same methods,
so both APIs share one validation path and one set of limits. :func:`status_of`
turns whatever they raise into ``(grpc.StatusCode, message)``: a refused request
gets the status of its :class:`serving.errors.ServingError`; TensorFlow's own
InvalidArgument / ResourceExhausted errors (the graph's id range and finiteness
asserts) keep their code with the informative line of the message; anything else is
INTERNAL and logged. No request takes the server down.

With a :class:`serving.metrics.ServerMetrics`, every request is counted and timed
(labels: api, method, model, version, signature, code).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional, Tuple

import grpc

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving import protos
from serving.errors import ServingError, invalid, not_found
from serving.model_manager import ModelManager, State
from serving.servable import Servable
from serving.validation import Limits, decode_inputs

log = logging.getLogger("serving.server")


def _first_line(e: BaseException) -> str:
    """The informative line of an error (TF's graph errors start with boilerplate)."""
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    for line in str(msg).splitlines():
        line = line.strip()
        if (not line or line.startswith(("Graph execution error", "Detected at node", "[[",
                                         "File ", "Traceback"))):
            continue
        if line.startswith("assertion failed: [") and line.endswith("]"):
            line = line[len("assertion failed: ["):-1]
        return line.replace("\\'", "'")
    return type(e).__name__


def status_of(e: BaseException, what: str = "request") -> Tuple[grpc.StatusCode, str]:
    """The gRPC status (code, message) a request that raised ``e`` is answered with."""
    if isinstance(e, ServingError):
        return e.code, e.message
    if isinstance(e, tf.errors.InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, _first_line(e)
    if isinstance(e, tf.errors.ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _first_line(e)
    log.error("%s failed", what, exc_info=e)   # never let a request take the server down
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {_first_line(e)}"


#: what a request resolved to, filled as it goes (metrics labels); empty = not resolved
Seen = Dict[str, object]


class _Metered:
    """Shared by both servicers: the metrics labels of one request."""
    manager: ModelManager
    metrics = None

    def record(self, api: str, method: str, spec_name: str, seen: Seen, code: str,
               t0: float) -> None:
        """Count and time one request. Label values a client could invent (model and
        signature names) are kept only when they name something served, else empty:
        the number of series stays bounded whatever clients send."""
        if self.metrics is None:
            return
        model = seen.get("model")
        if model is None:
            model = spec_name if spec_name in self.manager.model_names() else ""
        self.metrics.observe_request(api, method, str(model), str(seen.get("version", "")),
                                     str(seen.get("signature", "")), code,
                                     time.perf_counter() - t0)

    def serve_grpc(self, rpc: str, method: str, handler, request, context):
        """One gRPC call: ``handler(request, seen)``, counted and timed under ``method``;
        an exception aborts the call with :func:`status_of`'s code and message."""
        t0, seen = time.perf_counter(), {}
        try:
            response = handler(request, seen)
        except Exception as e:
            code, msg = status_of(e, rpc)
            self.record("grpc", method, request.model_spec.name, seen, code.name, t0)
            context.abort(code, msg)
        self.record("grpc", method, request.model_spec.name, seen, "OK", t0)
        return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer, _Metered):
    def __init__(self, manager: ModelManager, limits: Limits, metrics=None):
        self.manager, self.limits, self.metrics = manager, limits, metrics

    def servable(self, spec, seen: Optional[Seen] = None) -> Servable:
        """The version a ModelSpec names (NOT_FOUND naming what is missing)."""
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label or None
        servable = self.manager.get(spec.name, version, label)
        if seen is not None:
            seen["model"], seen["version"] = servable.name, servable.version
        return servable


    def Predict(self, request, context):
        return self.serve_grpc("Predict", "predict", self.predict, request, context)

    def predict(self, request, seen: Optional[Seen] = None):
        """PredictRequest -> PredictResponse, or raise (see :func:`status_of`)."""
        seen = {} if seen is None else seen
        servable = self.servable(request.model_spec, seen)
        sig = request.model_spec.signature_name or "serving_default"
        info = servable.signatures.get(sig)
        where = f"model '{servable.name}' version {servable.version} signature '{sig}'"
        if info is None:
            raise not_found(f"model '{servable.name}' version {servable.version} has no "
                            f"signature '{sig}'; signatures: {sorted(servable.signatures)}")
        seen["signature"] = sig
        wanted = list(request.output_filter)
        if wanted and not info.any_inputs:
            bad = sorted(set(wanted) - set(info.outputs))
            if bad:
                raise invalid(f"{where}: output_filter names unknown output(s) {bad}; outputs "
                              f"are {sorted(info.outputs)}")
        inputs = decode_inputs(request, info, self.limits, where)
        outputs = servable.run(sig, inputs)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = sig
        for k, v in outputs.items():
            if not wanted or k in wanted:
                protos.fill_tensor_proto(response.outputs[k], v)
        return response


    def GetModelMetadata(self, request, context):
        return self.serve_grpc("GetModelMetadata", "metadata", self.metadata, request, context)

    def metadata(self, request, seen: Optional[Seen] = None):
        """GetModelMetadataRequest -> GetModelMetadataResponse, or raise."""
        fields = list(request.metadata_field)
        if "signature_def" not in fields:
            raise invalid("metadata_field must include 'signature_def' (the only "
                          "metadata this server provides)")
        bad = sorted(set(fields) - {"signature_def"})
        if bad:
            raise invalid(f"unsupported metadata_field(s) {bad}")
        servable = self.servable(request.model_spec, seen)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signature_def_map())
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer, _Metered):
    def __init__(self, manager: ModelManager, metrics=None):
        self.manager, self.metrics = manager, metrics

    def GetModelStatus(self, request, context):
        return self.serve_grpc("GetModelStatus", "status", self.status, request, context)

    def status(self, request, seen: Optional[Seen] = None):
        """GetModelStatusRequest -> GetModelStatusResponse, or raise."""
        seen = {} if seen is None else seen
        spec = request.model_spec
        status = self.manager.status(spec.name)
        seen["model"] = spec.name
        if spec.HasField("version"):
            v = spec.version.value
            if v not in status:
                raise not_found(f"model '{spec.name}' version {v} not found")
            status = {v: status[v]}
            seen["version"] = v
        elif spec.version_label:
            servable = self.manager.get(spec.name, label=spec.version_label)
            status = {servable.version: status.get(servable.version,
                                                   (State.AVAILABLE, ""))}
            seen["version"] = servable.version
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(status):
            state, msg = status[v]
            s = response.model_version_status.add()
            s.version, s.state = v, state
            if msg and state == State.END and msg.startswith("load failed"):
                s.status.error_code = 13  # INTERNAL
            s.status.error_message = msg
        return response
