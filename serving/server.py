"""A local server speaking TensorFlow Serving's gRPC API over the same folder layout.

Implements, from tensorflow-serving-api's generated stubs:

* ``PredictionService.Predict`` and ``PredictionService.GetModelMetadata``
  (signature_def), the others answer UNIMPLEMENTED;
* ``ModelService.GetModelStatus``.

It serves ``<base>/<model>/<version>/`` SavedModels (``serving/export.py``), with
the models and version policies of ``<base>/models.config`` when present (else
every model folder, latest ``num_versions``). A poller picks up new versions
without a restart: a new version is loaded and warmed up beside the old one, then
swapped in with one assignment; a request holds a reference to the version it
started on, so in-flight requests finish on it and none fails.

Bad requests never take the server down; each gets a gRPC status whose message
names the problem:

=============================================  ====================
unknown model / version / version label / signature   NOT_FOUND
missing or unknown input, wrong dtype, wrong rank or  INVALID_ARGUMENT
size, inputs disagreeing on the batch size, empty
batch, undecodable tensor, ids outside the
vocabulary, NaN/Inf in a cache tensor, bad
output_filter
more rows (candidates) than ``max_candidates``,       RESOURCE_EXHAUSTED
more elements than ``max_elements``, a message
over ``max_request_bytes`` (gRPC itself)
=============================================  ====================

(Real TF Serving answers an unknown signature with FAILED_PRECONDITION and
zero-fills a TensorProto without values; this server says NOT_FOUND and rejects
such a tensor.) It binds to 127.0.0.1 unless told otherwise: it has no TLS and no
authentication, like TF Serving's plain port.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving import protos

log = logging.getLogger("serving.server")

DEFAULT_PORT = 8500
MiB = 1 << 20
State = get_model_status_pb2.ModelVersionStatus.State
_NUMERIC = re.compile(r"[0-9]{1,18}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(msg):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _not_found(msg):
    return ServingError(grpc.StatusCode.NOT_FOUND, msg)


def _exhausted(msg):
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    dtype: int                          # TF DataType enum
    shape: Optional[Tuple[Optional[int], ...]]   # None = unknown rank; None dims = any size


@dataclasses.dataclass
class SignatureInfo:
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]
    any_inputs: bool = False            # identity servable: accepts whatever it is sent


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 * MiB   # gRPC receive limit (RESOURCE_EXHAUSTED above it)
    max_candidates: int = 10_000        # rows (dim 0) of batch-sized inputs per request
    max_elements: int = 32_000_000      # all elements of all inputs of one request


# ---- servables -----------------------------------------------------------------------------
class Servable:
    name: str
    version: int
    signatures: Dict[str, SignatureInfo]

    def run(self, signature: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def signature_def_map(self):
        return get_model_metadata_pb2.SignatureDefMap()


def _spec_from_tensor_info(info) -> TensorSpecInfo:
    if info.tensor_shape.unknown_rank:
        return TensorSpecInfo(int(info.dtype), None)
    return TensorSpecInfo(int(info.dtype), tuple(None if d.size < 0 else int(d.size)
                                                 for d in info.tensor_shape.dim))


@dataclasses.dataclass(frozen=True)
class SessionThreads:
    """The session's thread settings, named after TF Serving's flags of the same meaning
    (``--tensorflow_inter_op_parallelism``, ``--tensorflow_intra_op_parallelism``).

    ``inter_op = -1`` runs every op in the request's own thread instead of handing
    ops to a shared pool, which saves a thread hand-off per call (expensive on these
    VMs): measured in-process with a 3 ms pause before each call, an identity
    SavedModel call takes 0.11-0.14 ms instead of 0.22-0.24 ms, an XLA ``rank`` call
    at N = 1 0.68-0.80 ms instead of 0.79-0.82 ms (docs/serving.md section 6). The
    gRPC worker threads still run requests in parallel, and ``intra_op`` (0 = one
    per core) still splits large ops. Use ``--inter_op 0`` for the TensorFlow
    default; ``--intra_op 1`` suits a server that only ranks (one-shot requests over
    long sequences then run on one core).
    """
    inter_op: int = -1
    intra_op: int = 0

    def config(self):
        return tf.compat.v1.ConfigProto(inter_op_parallelism_threads=self.inter_op,
                                        intra_op_parallelism_threads=self.intra_op)


class SavedModelServable(Servable):
    """One loaded SavedModel version, run like TF Serving runs it: a session over the
    MetaGraph tagged ``serve``, one session callable per SignatureDef.

    The callable is the session's ``CallableOptions`` one (``TF_SessionRunCallable``:
    feeds and fetches fixed once, NumPy arrays in, NumPy arrays out), not the public
    ``make_callable(fetches, feed_list)``, which with a feed list falls back to
    ``Session.run`` and re-validates every feed in Python on each call (graph-element
    lookups, shape checks, NumPy version checks): measured here, that Python work was
    about a third of an XLA ``rank`` call at N = 100 (docs/serving.md section 6).
    ``_make_callable_from_options`` is private but is what Keras 2's graph functions
    call; where it is missing, the public ``make_callable`` is used. The server has
    checked names, dtypes and shapes before :meth:`run` (``decode_inputs``); ``run``
    still casts each input to its declared dtype, so other callers may pass lists.

    (Measured earlier, a session callable was 25-35% faster per request than calling
    the TF2 ``tf.saved_model.load(...).signatures[...]`` wrapper for small requests.)
    """

    def __init__(self, name: str, version: int, path: str,
                 threads: Optional[SessionThreads] = None):
        self.name, self.version, self.path = name, int(version), path
        self._graph = tf.Graph()
        self._sess = tf.compat.v1.Session(graph=self._graph,
                                          config=(threads or SessionThreads()).config())
        meta = tf.compat.v1.saved_model.loader.load(self._sess, ["serve"], path)
        self._sig_defs = dict(meta.signature_def)
        self._callables = {}
        self.signatures = {}
        for k, d in self._sig_defs.items():
            ins, outs = sorted(d.inputs), sorted(d.outputs)
            feeds = [d.inputs[i].name for i in ins]
            fetches = [d.outputs[o].name for o in outs]
            fast = getattr(self._sess, "_make_callable_from_options", None)
            if fast is not None and all(":" in t for t in feeds + fetches):  # tensors,
                # not ops (``__saved_model_init_op`` names an op)
                options = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
                call = fast(options)
            else:
                call = self._sess.make_callable(fetches, feeds)
            dtypes = [tf.dtypes.as_dtype(d.inputs[i].dtype).as_numpy_dtype for i in ins]
            self._callables[k] = (ins, outs, call, dtypes)
            self.signatures[k] = SignatureInfo(
                {n: _spec_from_tensor_info(i) for n, i in d.inputs.items()},
                {n: _spec_from_tensor_info(i) for n, i in d.outputs.items()})

    def run(self, signature, inputs):
        ins, outs, call, dtypes = self._callables[signature]
        return dict(zip(outs, call(*[np.asarray(inputs[k], dt)
                                     for k, dt in zip(ins, dtypes)])))

    def close(self) -> None:
        self._sess.close()

    def warmup(self) -> None:
        """Run every non-string signature once on zeros (padding ids) of batch 1."""
        for sig, info in self.signatures.items():
            if any(s.dtype == 7 or s.shape is None for s in info.inputs.values()):
                continue
            feed = {n: np.zeros([1 if d is None else d for d in s.shape],
                                protos.DTYPE_TO_NUMPY[s.dtype])
                    for n, s in info.inputs.items()}
            try:
                self.run(sig, feed)
            except Exception as e:  # a model may reject all-padding input; still serve it
                log.warning("warm-up of %s/%d %s failed: %s", self.name, self.version, sig,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)

    def signature_def_map(self):
        m = get_model_metadata_pb2.SignatureDefMap()
        for k, d in self._sig_defs.items():
            m.signature_def[k].CopyFrom(d)
        return m


class IdentityServable(Servable):
    """No model: decodes the request like any other and returns ``ctr`` zeros [N].

    The floor of gRPC + (de)serialization for the benchmark: N is the first
    dimension of ``target_item_id`` (else of the first input).
    """

    def __init__(self, name: str, version: int = 1):
        self.name, self.version = name, int(version)
        any_sig = SignatureInfo({}, {"ctr": TensorSpecInfo(1, (None,))}, any_inputs=True)
        self.signatures = {"rank": any_sig, "serving_default": any_sig, "user_tower": any_sig}

    def run(self, signature, inputs):
        x = inputs.get("target_item_id")
        if x is None:
            x = next(iter(inputs.values())) if inputs else np.zeros([0])
        n = x.shape[0] if x.ndim else 1
        return {"ctr": np.zeros([n], np.float32)}


# ---- model manager ---------------------------------------------------------------------------
@dataclasses.dataclass
class ModelConfig:
    name: str
    path: str
    policy: str = "latest"              # latest | all | specific
    num_versions: int = 2
    versions: Tuple[int, ...] = ()
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)


def _inside(base: str, path: str) -> bool:
    b, p = os.path.realpath(base), os.path.realpath(path)
    return p.startswith(b + os.sep)


class ModelManager:
    """Loads, swaps and unloads versions; thread-safe reads via immutable snapshots."""

    def __init__(self, base: str, poll_interval_s: float = 2.0, num_versions: int = 2,
                 warmup: bool = True, servable_factory: Optional[Callable] = None,
                 threads: Optional[SessionThreads] = None):
        if servable_factory is None:
            servable_factory = functools.partial(SavedModelServable,
                                                 threads=threads or SessionThreads())
        self.base = base
        self.poll_interval_s = poll_interval_s
        self.num_versions = num_versions
        self.warmup = warmup
        self.factory = servable_factory
        self._models: Dict[str, Dict[int, Servable]] = {}
        self._status: Dict[str, Dict[int, Tuple[int, str]]] = {}
        self._labels: Dict[str, Dict[str, int]] = {}
        self._static: Dict[str, Dict[int, Servable]] = {}
        self._failed: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- configuration -------------------------------------------------------------------------
    def add_static(self, servable: Servable) -> None:
        """Serve an in-memory servable (e.g. :class:`IdentityServable`) beside the folder."""
        with self._lock:
            self._static.setdefault(servable.name, {})[servable.version] = servable
            models = dict(self._models)
            models[servable.name] = dict(self._static[servable.name])
            self._models = models
            self._status.setdefault(servable.name, {})[servable.version] = (State.AVAILABLE, "")

    def read_config(self) -> List[ModelConfig]:
        path = os.path.join(self.base, "models.config")
        if os.path.exists(path):
            return self._parse_config(path)
        out = []
        if os.path.isdir(self.base):
            for name in sorted(os.listdir(self.base)):
                p = os.path.join(self.base, name)
                if _NAME.match(name) and os.path.isdir(p) and _inside(self.base, p):
                    out.append(ModelConfig(name, p, num_versions=self.num_versions))
        return out

    def _parse_config(self, path: str) -> List[ModelConfig]:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2 as msc
        config = msc.ModelServerConfig()
        with open(path) as f:
            text_format.Parse(f.read(), config)
        out = []
        for c in config.model_config_list.config:
            if not _NAME.match(c.name):
                log.warning("models.config: skipping model with unsafe name %r", c.name)
                continue
            local = c.base_path if os.path.isdir(c.base_path) else os.path.join(self.base, c.name)
            if not _inside(self.base, local):
                log.warning("models.config: %r resolves outside %s; skipped", c.name, self.base)
                continue
            pol = c.model_version_policy
            which = pol.WhichOneof("policy_choice")
            mc = ModelConfig(c.name, local, labels=dict(c.version_labels))
            if which == "all":
                mc.policy = "all"
            elif which == "specific":
                mc.policy, mc.versions = "specific", tuple(int(v) for v in pol.specific.versions)
            else:
                mc.num_versions = (pol.latest.num_versions if which == "latest"
                                   and pol.latest.num_versions else 1)
            out.append(mc)
        return out

    @staticmethod
    def _wanted(mc: ModelConfig) -> List[int]:
        if not os.path.isdir(mc.path):
            return []
        found = sorted(int(v) for v in os.listdir(mc.path)
                       if _NUMERIC.fullmatch(v) and os.path.isdir(os.path.join(mc.path, v)))
        if mc.policy == "all":
            return found
        if mc.policy == "specific":
            return [v for v in found if v in mc.versions]
        return found[-mc.num_versions:]

    # -- loading -------------------------------------------------------------------------------
    def _set_status(self, name, version, state, msg=""):
        with self._lock:
            status = {k: dict(v) for k, v in self._status.items()}
            status.setdefault(name, {})[version] = (state, msg)
            self._status = status

    def refresh(self) -> None:
        """One poll: load wanted versions that are new, swap, drop unwanted ones."""
        with self._refresh_lock:
            try:
                configs = self.read_config()
            except Exception as e:
                log.error("cannot read the model config under %s: %s", self.base, e)
                return
            seen = set()
            for mc in configs:
                seen.add(mc.name)
                current = self._models.get(mc.name, {})
                wanted = self._wanted(mc)
                new = {v: s for v, s in current.items() if v in wanted}
                for v in wanted:
                    if v in new:
                        continue
                    vpath = os.path.join(mc.path, str(v))
                    key = os.path.realpath(vpath)
                    mtime = os.path.getmtime(vpath)
                    if self._failed.get(key) == mtime:
                        continue
                    self._set_status(mc.name, v, State.LOADING)
                    try:
                        t0 = time.perf_counter()
                        servable = self.factory(mc.name, v, vpath)
                        if self.warmup and hasattr(servable, "warmup"):
                            servable.warmup()
                        new[v] = servable
                        self._set_status(mc.name, v, State.AVAILABLE)
                        log.info("loaded %s version %d in %.1fs", mc.name, v,
                                 time.perf_counter() - t0)
                    except Exception as e:
                        self._failed[key] = mtime
                        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                        self._set_status(mc.name, v, State.END, f"load failed: {msg}")
                        log.error("loading %s version %d failed: %s", mc.name, v, msg)
                new.update(self._static.get(mc.name, {}))
                with self._lock:
                    models = dict(self._models)
                    models[mc.name] = new       # the swap: one assignment of a new dict
                    self._models = models
                    labels = dict(self._labels)
                    labels[mc.name] = dict(mc.labels)
                    self._labels = labels
                for v in set(current) - set(new):
                    self._set_status(mc.name, v, State.END, "unloaded (version policy)")
                    log.info("unloaded %s version %d", mc.name, v)
            with self._lock:
                gone = [n for n in self._models if n not in seen and n not in self._static]
                if gone:
                    models = {k: v for k, v in self._models.items() if k not in gone}
                    self._models = models
            for n in gone:
                for v in list(self._status.get(n, {})):
                    self._set_status(n, v, State.END, "model removed from the config")

    def start(self) -> None:
        self.refresh()
        if self.poll_interval_s > 0:
            self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep polling whatever happens
                log.exception("model refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- lookups -------------------------------------------------------------------------------
    def model_names(self) -> List[str]:
        return sorted(self._models)

    def get(self, name: str, version: Optional[int] = None,
            label: Optional[str] = None) -> Servable:
        versions = self._models.get(name)
        if versions is None:
            raise _not_found(f"model '{name}' not found; serving: "
                             f"{', '.join(self.model_names()) or 'none'}")
        if label:
            v = self._labels.get(name, {}).get(label)
            if v is None:
                raise _not_found(f"model '{name}' has no version label '{label}'")
            version = v
        if not versions:
            raise _not_found(f"model '{name}' has no loaded version")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise _not_found(f"model '{name}' version {version} not found; loaded versions: "
                             f"{sorted(versions)}")
        return versions[version]

    def status(self, name: str) -> Dict[int, Tuple[int, str]]:
        if name not in self._status:
            raise _not_found(f"model '{name}' not found; serving: "
                             f"{', '.join(self.model_names()) or 'none'}")
        return dict(self._status[name])


# ---- request checks ----------------------------------------------------------------------
def decode_inputs(request, info: SignatureInfo, limits: Limits, where: str) -> Dict[str, np.ndarray]:
    """Validate a PredictRequest's inputs against a signature and decode them to NumPy."""
    names = set(request.inputs)
    if not info.any_inputs:
        unknown = sorted(names - set(info.inputs))
        if unknown:
            raise _invalid(f"{where}: unknown input(s) {unknown}; it takes "
                           f"{sorted(info.inputs)}")
        missing = sorted(set(info.inputs) - names)
        if missing:
            raise _invalid(f"{where}: missing input(s) {missing}; it takes {sorted(info.inputs)}")
    rows: Dict[str, int] = {}
    total = 0
    shapes = {}
    for name in sorted(names):
        proto = request.inputs[name]
        try:
            shape = protos.tensor_shape(proto)
        except protos.TensorError as e:
            raise _invalid(f"{where}: input '{name}': {e}") from None
        spec = info.inputs.get(name)
        if spec is not None:
            if int(proto.dtype) != spec.dtype:
                raise _invalid(f"{where}: input '{name}' has dtype {protos.dtype_name(proto.dtype)}"
                               f", expected {protos.dtype_name(spec.dtype)}")
            if spec.shape is not None:
                if len(shape) != len(spec.shape) or any(
                        w is not None and w != g for w, g in zip(spec.shape, shape)):
                    raise _invalid(f"{where}: input '{name}' has shape {list(shape)}, expected "
                                   f"{protos.shape_str(spec.shape)}")
                if spec.shape and spec.shape[0] is None:
                    rows[name] = shape[0]
        elif shape:
            rows[name] = shape[0]
        total += math.prod(shape)
        if total > limits.max_elements:
            raise _exhausted(f"{where}: request holds more than {limits.max_elements} elements "
                             f"(input '{name}' has shape {list(shape)})")
        shapes[name] = shape
    if rows:
        sizes = sorted(set(rows.values()))
        if len(sizes) > 1 and not info.any_inputs:
            raise _invalid(f"{where}: inputs disagree on the batch (candidate) dimension: "
                           + ", ".join(f"{k}={v}" for k, v in sorted(rows.items())))
        if max(sizes) > limits.max_candidates:
            raise _exhausted(f"{where}: {max(sizes)} rows (candidates) in one request; the cap "
                             f"is {limits.max_candidates}")
        if min(sizes) == 0:
            raise _invalid(f"{where}: empty batch (an input has 0 rows: "
                           + ", ".join(k for k, v in sorted(rows.items()) if v == 0) + ")")
    out = {}
    for name in sorted(names):
        try:
            out[name] = protos.to_ndarray(request.inputs[name], shapes[name])
        except protos.TensorError as e:
            raise _invalid(f"{where}: input '{name}': {e}") from None
    return out


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


# ---- gRPC services -------------------------------------------------------------------------
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
            raise _not_found(f"model '{servable.name}' version {servable.version} has no "
                             f"signature '{sig}'; signatures: {sorted(servable.signatures)}")
        wanted = list(request.output_filter)
        if wanted and not info.any_inputs:
            bad = sorted(set(wanted) - set(info.outputs))
            if bad:
                raise _invalid(f"{where}: output_filter names unknown output(s) {bad}; outputs "
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
                raise _invalid("metadata_field must include 'signature_def' (the only "
                               "metadata this server provides)")
            bad = sorted(set(fields) - {"signature_def"})
            if bad:
                raise _invalid(f"unsupported metadata_field(s) {bad}")
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
                    raise _not_found(f"model '{spec.name}' version {v} not found")
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


# ---- server --------------------------------------------------------------------------------
class LocalServer:
    """A running server: ``address``, ``port``, ``manager``; ``stop()`` ends it."""

    def __init__(self, base: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 limits: Limits = Limits(), poll_interval_s: float = 2.0, workers: int = 8,
                 num_versions: int = 2, identity: Sequence[str] = (), warmup: bool = True,
                 threads: Optional[SessionThreads] = None):
        self.limits = limits
        self.manager = ModelManager(base, poll_interval_s, num_versions, warmup,
                                    threads=threads)
        for name in identity:
            self.manager.add_static(IdentityServable(name))
        self.manager.start()
        options = [("grpc.max_receive_message_length", limits.max_request_bytes),
                   ("grpc.max_send_message_length", max(limits.max_request_bytes, 64 * MiB)),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="predict"),
                                  options=options, maximum_concurrent_rpcs=workers * 16)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager, limits), self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            self.manager.stop()
            raise OSError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        self.manager.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="saved_models", help="model base path (default saved_models)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; the server has no TLS/auth)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (default 8500; 0 = any)")
    p.add_argument("--poll_s", type=float, default=2.0,
                   help="seconds between checks for new versions (default 2; 0 = never)")
    p.add_argument("--num_versions", type=int, default=2,
                   help="versions kept without models.config (default 2)")
    p.add_argument("--max_request_mb", type=float, default=64.0,
                   help="largest request accepted, MiB (default 64)")
    p.add_argument("--max_candidates", type=int, default=10_000,
                   help="most rows (candidates) per request (default 10000)")
    p.add_argument("--max_elements", type=int, default=32_000_000,
                   help="most tensor elements per request (default 32M)")
    p.add_argument("--workers", type=int, default=8, help="request threads (default 8)")
    p.add_argument("--inter_op", type=int, default=-1,
                   help="TF session inter-op threads, as TF Serving's "
                   "--tensorflow_inter_op_parallelism (default -1: ops run in the request's "
                   "thread, the lowest latency for small ranking graphs; 0 = TF's default)")
    p.add_argument("--intra_op", type=int, default=0,
                   help="TF session intra-op threads (default 0 = one per core)")
    p.add_argument("--identity", default="",
                   help="comma separated names of no-model servables returning zeros "
                        "(the gRPC floor for `lifelong bench serving`)")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s", stream=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning("binding %s: reachable from other hosts, without TLS or authentication",
                    args.host)
    limits = Limits(int(args.max_request_mb * MiB), args.max_candidates, args.max_elements)
    server = LocalServer(args.base, args.host, args.port, limits, args.poll_s, args.workers,
                         args.num_versions, [n for n in args.identity.split(",") if n],
                         threads=SessionThreads(args.inter_op, args.intra_op))
    print(f"[serve] listening on {server.address}; models: "
          f"{', '.join(server.manager.model_names()) or 'none yet'}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m serving.server")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
