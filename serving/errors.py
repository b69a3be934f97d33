"""The local server's errors: a gRPC status to answer a request with, and a server that
cannot start.

* :class:`ServingError` -- a request the server refuses; the gRPC services turn it into
  the status ``code`` with ``message`` (:mod:`serving.services`). Never leaves the
  server.
* :class:`ServerError` -- the server itself cannot run (its port is taken). Still an
  ``OSError``, as before, and a :class:`tfmodels.errors.LifelongError`, so
  ``lifelong serve`` prints one line instead of a traceback.
"""
from __future__ import annotations

import grpc

from tfmodels.errors import LifelongError


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ServerError(OSError, LifelongError):
    """The server cannot start (e.g. ``cannot bind 127.0.0.1:8500``: the port is taken)."""


def invalid(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, msg)


def exhausted(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
