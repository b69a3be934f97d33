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
authentication, like TF Serving's plain port; a port already taken is a
:class:`serving.errors.ServerError` (one line from ``lifelong serve``).

The server's parts, one module each: :mod:`serving.servable` (a loaded SavedModel
version and its session callables), :mod:`serving.model_manager` (versions,
``models.config``, polling), :mod:`serving.validation` (request checks and
:class:`Limits`), :mod:`serving.services` (the gRPC handlers) and this module (the
server process: :class:`LocalServer`, ``lifelong serve``), with :mod:`serving.rest`
(TF Serving's REST API and the Prometheus page on a second port, ``--rest_api_port``)
and :mod:`serving.metrics` (the server's own metrics registry); ``--processes N``
runs N such processes on one port with ``SO_REUSEPORT`` (:mod:`serving.server_procs`).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures
from typing import Optional, Sequence

import grpc

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import flags, server_procs
from serving.errors import ServerError
from serving.metrics import ServerMetrics
from serving.model_manager import ModelManager
from serving.rest import RestApi, RestServer
from serving.servable import Servable, SessionThreads
from serving.services import ModelServicer, PredictionServicer
from serving.validation import MiB, Limits

__all__ = ["DEFAULT_PORT", "Limits", "LocalServer", "ServerError", "SessionThreads",
           "add_arguments", "run"]

log = logging.getLogger("serving.server")

DEFAULT_PORT = flags.DEFAULT_PORT


class LocalServer:
    """A running server: ``address``, ``port``, ``manager``; ``stop()`` ends it.

    ``rest_port``: also serve TF Serving's REST API and ``/monitoring/prometheus/metrics``
    on this port (0 = any free port; ``None``, the default, = no REST port, as TF
    Serving's ``--rest_api_port=0``); then ``rest_address`` / ``rest_port`` say where.
    ``metrics``: the server's :class:`ServerMetrics` (its own registry; one is made
    when not given), collected whether or not a REST port exposes it.
    ``reuseport``: bind with ``SO_REUSEPORT`` so that other processes can serve the same
    port (``--processes``, :mod:`serving.server_procs`); off, a taken port is an error.
    """

    def __init__(self, base: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 limits: Limits = Limits(), poll_interval_s: float = 2.0, workers: int = 8,
                 num_versions: int = 2, static: Sequence[Servable] = (), warmup: bool = True,
                 threads: Optional[SessionThreads] = None, rest_port: Optional[int] = None,
                 metrics: Optional[ServerMetrics] = None, reuseport: bool = False):
        self.limits = limits
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.manager = ModelManager(base, poll_interval_s, num_versions, warmup,
                                    threads=threads, on_load=self.metrics.observe_load)
        for servable in static:     # in-memory servables (the benchmark's identity floor)
            self.manager.add_static(servable)
        self.manager.start()
        options = [("grpc.max_receive_message_length", limits.max_request_bytes),
                   ("grpc.max_send_message_length", max(limits.max_request_bytes, 64 * MiB)),
                   # 0: a port already taken is an error; 1 only for --processes
                   # (serving/server_procs.py: several processes share the port)
                   ("grpc.so_reuseport", 1 if reuseport else 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="predict"),
                                  options=options, maximum_concurrent_rpcs=workers * 16)
        self.predictions = PredictionServicer(self.manager, limits, self.metrics)
        self.models = ModelServicer(self.manager, self.metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            self.predictions, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.models, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:   # grpcio >= 1.5x raises where older ones returned 0
            self.manager.stop()
            raise ServerError(f"cannot bind {host}:{port}") from e
        if not self.port:
            self.manager.stop()
            raise ServerError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.rest: Optional[RestServer] = None
        self.rest_port: Optional[int] = None
        self.rest_address: Optional[str] = None
        if rest_port is not None:
            try:
                self.rest = RestServer(RestApi(self.predictions, self.models, limits,
                                               self.metrics), host, rest_port)
            except ServerError:
                self.manager.stop()
                raise
            self.rest_port, self.rest_address = self.rest.port, self.rest.address
        self.server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        if self.rest is not None:
            self.rest.stop()
        self.server.stop(grace_s).wait()
        self.manager.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()


# The flags live in serving/flags.py (no TensorFlow, no gRPC there): `lifelong serve --help`
# is fast.
add_arguments = flags.add_server_arguments


def run(args, static: Sequence[Servable] = (), static_spec: Optional[Sequence] = None) -> int:
    """``lifelong serve``: serve ``args.base`` until SIGINT / SIGTERM. ``static``: in-memory
    servables served beside the folder (``lifelong.bench.identity`` passes its no-model
    servables for ``--identity``; that flag is the benchmark's, not the deployment's).
    ``static_spec``: how a ``--processes`` child makes the same servables
    (``[module, function, argument]``, :func:`serving.server_procs.load_static`)."""
    processes = server_procs.check_processes(args)
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s", stream=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning("binding %s: reachable from other hosts, without TLS or authentication",
                    args.host)
    limits = Limits(int(args.max_request_mb * MiB), args.max_candidates, args.max_elements)
    rest_port = getattr(args, "rest_api_port", 0) or None    # 0 = off, as TF Serving
    port, children = args.port, []
    if processes > 1:       # the children load their models while this process loads its own
        port = port or server_procs.free_port(args.host)
        children = server_procs.spawn_children(args, port, processes - 1, static_spec)
    try:
        server = LocalServer(args.base, args.host, port, limits, args.poll_s, args.workers,
                             args.num_versions, static,
                             threads=SessionThreads(args.inter_op, args.intra_op),
                             rest_port=rest_port, reuseport=processes > 1)
    except BaseException:
        server_procs.stop_children(children)
        raise
    try:
        server_procs.wait_ready(children)
    except BaseException:
        server.stop()
        raise
    rest = (f"; REST + /monitoring/prometheus/metrics on {server.rest_address}"
            if server.rest_address else "")
    procs = f"; {processes} processes (SO_REUSEPORT)" if processes > 1 else ""
    print(f"[serve] listening on {server.address}{rest}{procs}; models: "
          f"{', '.join(server.manager.model_names()) or 'none yet'}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server_procs.stop_children(children)
    server.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m serving.server")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
