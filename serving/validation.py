"""Request checks: a PredictRequest's inputs against a signature, and the size limits.

:func:`decode_inputs` validates names, dtypes, shapes, the batch (candidate)
dimension and :class:`Limits` before any session call, and decodes the tensors to
NumPy; every refusal is a :class:`serving.errors.ServingError` whose message names
the input (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED over a limit).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict

import numpy as np

from serving import protos
from serving.errors import exhausted, invalid
from serving.servable import SignatureInfo

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 * MiB   # gRPC receive limit (RESOURCE_EXHAUSTED above it)
    max_candidates: int = 10_000        # rows (dim 0) of batch-sized inputs per request
    max_elements: int = 32_000_000      # all elements of all inputs of one request


def decode_inputs(request, info: SignatureInfo, limits: Limits, where: str) -> Dict[str, np.ndarray]:
    """Validate a PredictRequest's inputs against a signature and decode them to NumPy."""
    names = set(request.inputs)
    if not info.any_inputs:
        unknown = sorted(names - set(info.inputs))
        if unknown:
            raise invalid(f"{where}: unknown input(s) {unknown}; it takes "
                          f"{sorted(info.inputs)}")
        missing = sorted(set(info.inputs) - names)
        if missing:
            raise invalid(f"{where}: missing input(s) {missing}; it takes {sorted(info.inputs)}")
    rows: Dict[str, int] = {}
    total = 0
    shapes = {}
    for name in sorted(names):
        proto = request.inputs[name]
        try:
            shape = protos.tensor_shape(proto)
        except protos.TensorError as e:
            raise invalid(f"{where}: input '{name}': {e}") from None
        spec = info.inputs.get(name)
        if spec is not None:
            if int(proto.dtype) != spec.dtype:
                raise invalid(f"{where}: input '{name}' has dtype {protos.dtype_name(proto.dtype)}"
                              f", expected {protos.dtype_name(spec.dtype)}")
            if spec.shape is not None:
                if len(shape) != len(spec.shape) or any(
                        w is not None and w != g for w, g in zip(spec.shape, shape)):
                    raise invalid(f"{where}: input '{name}' has shape {list(shape)}, expected "
                                  f"{protos.shape_str(spec.shape)}")
                if spec.shape and spec.shape[0] is None:
                    rows[name] = shape[0]
        elif shape:
            rows[name] = shape[0]
        total += math.prod(shape)
        if total > limits.max_elements:
            raise exhausted(f"{where}: request holds more than {limits.max_elements} elements "
                            f"(input '{name}' has shape {list(shape)})")
        shapes[name] = shape
    if rows:
        sizes = sorted(set(rows.values()))
        if len(sizes) > 1 and not info.any_inputs:
            raise invalid(f"{where}: inputs disagree on the batch (candidate) dimension: "
                          + ", ".join(f"{k}={v}" for k, v in sorted(rows.items())))
        if max(sizes) > limits.max_candidates:
            raise exhausted(f"{where}: {max(sizes)} rows (candidates) in one request; the cap "
                            f"is {limits.max_candidates}")
        if min(sizes) == 0:
            raise invalid(f"{where}: empty batch (an input has 0 rows: "
                          + ", ".join(k for k, v in sorted(rows.items()) if v == 0) + ")")
    out = {}
    for name in sorted(names):
        try:
            out[name] = protos.to_ndarray(request.inputs[name], shapes[name])
        except protos.TensorError as e:
            raise invalid(f"{where}: input '{name}': {e}") from None
    return out
