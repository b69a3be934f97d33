"""The gRPC services of TensorFlow Serving's API, over a :class:`ModelManager`.

* ``PredictionService``: ``Predict`` and ``GetModelMetadata`` (signature_def); the
  others answer UNIMPLEMENTED;
* ``ModelService``: ``GetModelStatus``.

A refused request gets the status of its :class:`serving.errors.ServingError`;
TensorFlow's own InvalidArgument / ResourceExhausted errors (the graph's id range
and finiteness asserts) keep their code with the informative line of the message;
anything else is INTERNAL and logged. No request takes the server down.
"""
from __future__ import annotations

import logging

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


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager, limits: Limits):
        self.manager, self.limits = manager, limits

    def _servable(self, spec) -> Servable:
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label or None
        return self.manager.get(spec.name, version, label)

    def Predict(self, request, context):
        try:
            return self._predict(request)
        except ServingError as e:
            context.abort(e.code, e.message)
        except tf.errors.InvalidArgumentError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _first_line(e))
        except tf.errors.ResourceExhaustedError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _first_line(e))
        except Exception as e:  # never let a request take the server down
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {_first_line(e)}")

    def _predict(self, request):
        servable = self._servable(request.model_spec)
        sig = request.model_spec.signature_name or "serving_default"
        info = servable.signatures.get(sig)
        where = f"model '{servable.name}' version {servable.version} signature '{sig}'"
        if info is None:
            raise not_found(f"model '{servable.name}' version {servable.version} has no "
                            f"signature '{sig}'; signatures: {sorted(servable.signatures)}")
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
        try:
            fields = list(request.metadata_field)
            if "signature_def" not in fields:
                raise invalid("metadata_field must include 'signature_def' (the only "
                              "metadata this server provides)")
            bad = sorted(set(fields) - {"signature_def"})
            if bad:
                raise invalid(f"unsupported metadata_field(s) {bad}")
            servable = self._servable(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(servable.signature_def_map())
            return response
        except ServingError as e:
            context.abort(e.code, e.message)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            spec = request.model_spec
            status = self.manager.status(spec.name)
            if spec.HasField("version"):
                v = spec.version.value
                if v not in status:
                    raise not_found(f"model '{spec.name}' version {v} not found")
                status = {v: status[v]}
            elif spec.version_label:
                servable = self.manager.get(spec.name, label=spec.version_label)
                status = {servable.version: status.get(servable.version,
                                                       (State.AVAILABLE, ""))}
            response = get_model_status_pb2.GetModelStatusResponse()
            for v in sorted(status):
                state, msg = status[v]
                s = response.model_version_status.add()
                s.version, s.state = v, state
                if msg and state == State.END and msg.startswith("load failed"):
                    s.status.error_code = 13  # INTERNAL
                s.status.error_message = msg
            return response
        except ServingError as e:
            context.abort(e.code, e.message)
