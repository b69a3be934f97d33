"""TensorFlow-free TF Serving protos and NumPy <-> ``TensorProto`` conversion.

Importing ``tensorflow_serving.apis`` runs TensorFlow's whole import (3.8 s and
628 MB, ``../shared/DESIGN.md`` "Stack"), because the generated ``*_pb2`` modules
import ``tensorflow.core.framework.tensor_pb2`` and so ``tensorflow/__init__``.
A ranking client needs only a handful of messages. This module reads the
serialized ``FileDescriptorProto`` literals out of the generated files that
tensorflow and tensorflow-serving-api install (parsed with :mod:`ast`, never
executed), adds them to a **private** descriptor pool and builds the message
classes from it. The wire format is the protos' own, so these messages talk to
the local server and to a real TensorFlow Serving alike; the private pool never
clashes with TensorFlow's default pool when both are loaded in one process.

If the generated files cannot be found (an unusual install), :func:`messages`
falls back to importing ``tensorflow_serving.apis`` (slow, but correct).

Tensors are built from NumPy bytes (``tensor_content``), about 7x cheaper than
``tf.make_tensor_proto`` (``../shared/ANCHORS.md``).
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
import os
import threading
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

# TensorFlow's DataType enum (tensorflow/core/framework/types.proto; values stable), one
# row per value: its name, the NumPy dtype a tensor of it decodes to and the TensorProto
# field holding its typed values (both None: named in messages, never decoded here).
DT_INVALID = 0
_DTYPES: Dict[int, Tuple[str, Optional[np.dtype], Optional[str]]] = {
    0: ("DT_INVALID", None, None),
    1: ("DT_FLOAT", np.dtype("<f4"), "float_val"),
    2: ("DT_DOUBLE", np.dtype("<f8"), "double_val"),
    3: ("DT_INT32", np.dtype("<i4"), "int_val"),
    4: ("DT_UINT8", np.dtype("u1"), "int_val"),
    5: ("DT_INT16", np.dtype("<i2"), "int_val"),
    6: ("DT_INT8", np.dtype("i1"), "int_val"),
    7: ("DT_STRING", np.dtype(object), "string_val"),
    8: ("DT_COMPLEX64", None, None),
    9: ("DT_INT64", np.dtype("<i8"), "int64_val"),
    10: ("DT_BOOL", np.dtype("?"), "bool_val"),
    17: ("DT_UINT16", np.dtype("<u2"), "int_val"),
    18: ("DT_COMPLEX128", None, None),
    19: ("DT_HALF", np.dtype("<f2"), "half_val"),
    20: ("DT_RESOURCE", None, None),
    21: ("DT_VARIANT", None, None),
    22: ("DT_UINT32", np.dtype("<u4"), "uint32_val"),
    23: ("DT_UINT64", np.dtype("<u8"), "uint64_val"),
}
DTYPE_NAMES: Dict[int, str] = {k: name for k, (name, _, _) in _DTYPES.items()}
DTYPE_TO_NUMPY: Dict[int, np.dtype] = {k: dt for k, (_, dt, _) in _DTYPES.items()
                                       if dt is not None}
_TYPED_FIELD: Dict[int, str] = {k: f for k, (_, _, f) in _DTYPES.items() if f is not None}
_NUMPY_TO_DTYPE = {np.dtype(v).str if v.kind != "O" else "O": k for k, v in DTYPE_TO_NUMPY.items()}

# The proto files the client needs (dependencies are followed automatically).
_ROOTS = ("tensorflow_serving/apis/predict.proto",)
_METADATA_ROOTS = ("tensorflow_serving/apis/get_model_metadata.proto",)


class TensorError(ValueError):
    """A TensorProto that cannot be decoded (bad dtype, shape or content length)."""


def dtype_name(enum: int) -> str:
    return DTYPE_NAMES.get(int(enum), f"DataType({int(enum)})")


def numpy_to_dtype_enum(dtype) -> int:
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return 7
    key = dt.newbyteorder("<").str if dt.itemsize > 1 else dt.str
    if key not in _NUMPY_TO_DTYPE:
        raise TensorError(f"NumPy dtype {dt} has no TensorFlow DataType here")
    return _NUMPY_TO_DTYPE[key]


# ---- descriptor loading ---------------------------------------------------------------
def _package_root(top: str) -> Optional[str]:
    """Directory holding the top-level package ``top``, found without importing it."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def _serialized_from_source(path: str) -> bytes:
    """The bytes literal passed to ``AddSerializedFile`` in a generated ``*_pb2.py``."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, bytes)):
            return node.args[0].value
    raise FileNotFoundError(f"no serialized descriptor in {path}")


def _serialized(proto_file: str) -> bytes:
    if proto_file.startswith("google/protobuf/"):
        mod = importlib.import_module(
            "google.protobuf." + os.path.basename(proto_file)[:-len(".proto")] + "_pb2")
        return mod.DESCRIPTOR.serialized_pb
    top = proto_file.split("/", 1)[0]
    root = _package_root(top)
    if root is None:
        raise FileNotFoundError(f"package {top!r} not installed")
    return _serialized_from_source(os.path.join(root, proto_file[:-len(".proto")] + "_pb2.py"))


class _Pool:
    """A private descriptor pool filled on demand with a proto file and its imports."""

    def __init__(self):
        from google.protobuf import descriptor_pb2, descriptor_pool
        self._fdp = descriptor_pb2.FileDescriptorProto
        self.pool = descriptor_pool.DescriptorPool()
        self._added = set()
        self._lock = threading.Lock()

    def add(self, proto_file: str) -> None:
        with self._lock:
            self._add(proto_file)

    def _add(self, proto_file: str) -> None:
        if proto_file in self._added:
            return
        data = _serialized(proto_file)
        for dep in self._fdp.FromString(data).dependency:
            self._add(dep)
        self.pool.AddSerializedFile(data)
        self._added.add(proto_file)

    def message(self, full_name: str):
        from google.protobuf import message_factory
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))


class Messages:
    """Message classes: ``PredictRequest``, ``PredictResponse``, ``TensorProto`` and,
    after :meth:`with_metadata`, ``GetModelMetadataRequest/Response`` and
    ``SignatureDefMap``. ``source`` says where they came from."""

    def __init__(self, source: str, **classes):
        self.source = source
        self.__dict__.update(classes)


@functools.lru_cache(maxsize=None)
def _private_pool() -> _Pool:
    return _Pool()


@functools.lru_cache(maxsize=None)
def messages(metadata: bool = False) -> Messages:
    """The client's message classes (TF-free when possible; see the module doc)."""
    try:
        pool = _private_pool()
        for root in _ROOTS + (_METADATA_ROOTS if metadata else ()):
            pool.add(root)
        names = {"PredictRequest": "tensorflow.serving.PredictRequest",
                 "PredictResponse": "tensorflow.serving.PredictResponse",
                 "TensorProto": "tensorflow.TensorProto"}
        if metadata:
            names.update({"GetModelMetadataRequest": "tensorflow.serving.GetModelMetadataRequest",
                          "GetModelMetadataResponse":
                              "tensorflow.serving.GetModelMetadataResponse",
                          "SignatureDefMap": "tensorflow.serving.SignatureDefMap"})
        return Messages("private-pool", **{k: pool.message(v) for k, v in names.items()})
    except (FileNotFoundError, ImportError, SyntaxError, KeyError, TypeError) as e:  # pragma: no cover
        from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
        from tensorflow.core.framework import tensor_pb2
        return Messages(f"tensorflow_serving.apis (private pool failed: {e})",
                        PredictRequest=predict_pb2.PredictRequest,
                        PredictResponse=predict_pb2.PredictResponse,
                        TensorProto=tensor_pb2.TensorProto,
                        GetModelMetadataRequest=get_model_metadata_pb2.GetModelMetadataRequest,
                        GetModelMetadataResponse=get_model_metadata_pb2.GetModelMetadataResponse,
                        SignatureDefMap=get_model_metadata_pb2.SignatureDefMap)


# ---- NumPy <-> TensorProto ---------------------------------------------------------------
#: little-endian numeric dtypes -> DataType enum: fill_tensor_proto's fast path (a dict hit
#: instead of numpy_to_dtype_enum's dtype normalisation, ~2 us per tensor); '<' and '|'
#: dtypes hash like the native ones on a little-endian machine, '>' ones miss and take the
#: general path, which converts them
_FAST_ENUM: Dict[np.dtype, int] = {dt: k for k, dt in DTYPE_TO_NUMPY.items()
                                   if dt.kind != "O" and dt.byteorder != ">"}


def fill_tensor_proto(proto, value) -> None:
    """Write ``value`` (array-like) into an empty TensorProto message of any generated class."""
    arr = np.asarray(value)
    enum = _FAST_ENUM.get(arr.dtype) if arr.dtype.isnative else None
    if enum is not None:            # the server's answers: one dict hit, tobytes, the dims
        proto.dtype = enum
        proto.tensor_content = arr.tobytes()   # C order whatever the strides, as below
        dims = proto.tensor_shape.dim
        for size in arr.shape:
            dims.add().size = size
        return
    if arr.dtype.kind in "SUO":
        proto.dtype = 7
        flat = arr.reshape(-1)
        proto.string_val.extend(x if isinstance(x, bytes) else str(x).encode("utf-8")
                                for x in flat)
    else:
        proto.dtype = numpy_to_dtype_enum(arr.dtype)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        proto.tensor_content = np.ascontiguousarray(arr).tobytes()
    dims = proto.tensor_shape.dim
    for size in arr.shape:
        dims.add().size = int(size)


def make_tensor_proto(value, proto_class=None):
    """A new TensorProto holding ``value`` (class: the client's, unless given)."""
    proto = (proto_class or messages().TensorProto)()
    fill_tensor_proto(proto, value)
    return proto


def tensor_shape(proto) -> Tuple[int, ...]:
    ts = proto.tensor_shape
    if ts.unknown_rank:
        raise TensorError("tensor has unknown rank; a concrete shape is required")
    shape = tuple([d.size for d in ts.dim])
    if shape and min(shape) < 0:
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    return shape


def to_ndarray(proto, shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    """Decode a TensorProto strictly: content length must match the shape.

    Stricter than TensorFlow (which zero-fills missing values): a tensor holds
    either ``tensor_content`` of exactly prod(shape) * itemsize bytes, or exactly
    prod(shape) typed values, or one typed value (broadcast to the shape).
    ``shape``: the already read :func:`tensor_shape`, if the caller has it.
    """
    dtype = DTYPE_TO_NUMPY.get(proto.dtype)
    if dtype is None:
        raise TensorError(f"unsupported dtype {dtype_name(proto.dtype)}")
    if shape is None:
        shape = tensor_shape(proto)
    n = math.prod(shape)
    content = proto.tensor_content
    if content and dtype.kind != "O":
        want = n * dtype.itemsize
        if len(content) != want:
            raise TensorError(f"tensor_content has {len(content)} bytes, shape "
                              f"{list(shape)} of {dtype_name(proto.dtype)} needs {want}")
        return np.frombuffer(content, dtype=dtype).reshape(shape)
    values = getattr(proto, _TYPED_FIELD[int(proto.dtype)])
    count = len(values)
    if count == n:
        pass
    elif count == 1 and n > 1:
        values = [values[0]] * n
    else:
        raise TensorError(f"tensor holds {count} values, shape {list(shape)} needs {n}")
    if dtype.kind == "O":
        arr = np.empty(n, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    if int(proto.dtype) == 19:   # half_val carries the 16-bit patterns as int32
        return np.asarray(values, np.uint16).view(np.float16).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def shape_str(shape: Iterable[Optional[int]]) -> str:
    return "[" + ", ".join("?" if s is None or s < 0 else str(s) for s in shape) + "]"
