"""Prometheus metrics of the local server and of the ranking client (prometheus_client).

:class:`ServerMetrics` is what ``GET /monitoring/prometheus/metrics`` on the REST port
exposes (TF Serving's path); :class:`ClientMetrics` counts the client's cache-store
lookups. Each object owns a :class:`prometheus_client.CollectorRegistry` unless one is
passed in, never the process-global default one, so several servers or clients in
one process (the tests, the benchmark) keep separate counts and never collide on a
metric name.

Server series (``api`` is ``grpc`` or ``rest``; ``method`` is ``predict``,
``metadata`` or ``status``; ``code`` is the gRPC status name, e.g. ``OK`` /
``NOT_FOUND``, for ``api="grpc"`` and the HTTP status, e.g. ``200`` / ``404``, for
``api="rest"``; ``model`` / ``version`` / ``signature`` are what the request resolved
to, empty where it did not resolve, so clients cannot grow the series without bound):

* ``lifelong_serving_requests_total{api, method, model, version, signature, code}``
* ``lifelong_serving_request_latency_seconds{...same labels}`` (histogram; the time
  from the handler's start to its answer, JSON work included for REST)
* ``lifelong_serving_model_loads_total{model, version, outcome}`` (``ok`` | ``failed``)
* ``lifelong_serving_model_load_latency_seconds{model, version}`` (histogram; load +
  warm-up, the time until the version is AVAILABLE)

Client series: ``lifelong_client_cache_lookups_total{model, result}`` (``hit`` |
``miss``). No TensorFlow and no gRPC here: the client's import path stays light.
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ClientMetrics", "ServerMetrics", "REQUEST_LABELS"]

REQUEST_LABELS = ("api", "method", "model", "version", "signature", "code")
#: request latency buckets, seconds (a rank call is ~1-10 ms; REST JSON of a large
#: cache can take 100s of ms)
REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0, 10.0)
#: load + warm-up buckets, seconds
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Request and model-load metrics of one server (its own registry)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("lifelong_serving_requests", "Requests answered, by API, "
                                "method, resolved model/version/signature and status code",
                                REQUEST_LABELS, registry=self.registry)
        self._children = {}     # request label values -> (counter, histogram) child
        self.latency = Histogram("lifelong_serving_request_latency_seconds",
                                 "Request latency in the server (handler start to answer)",
                                 REQUEST_LABELS, buckets=REQUEST_BUCKETS,
                                 registry=self.registry)
        self.loads = Counter("lifelong_serving_model_loads", "Model version load attempts",
                             ("model", "version", "outcome"), registry=self.registry)
        self.load_latency = Histogram("lifelong_serving_model_load_latency_seconds",
                                      "Model version load + warm-up time",
                                      ("model", "version"), buckets=LOAD_BUCKETS,
                                      registry=self.registry)

    def observe_request(self, api: str, method: str, model: str, version: str,
                        signature: str, code: str, seconds: float) -> None:
        labels = (api, method, model, version, signature, code)
        children = self._children.get(labels)
        if children is None:
            # labels() checks and stringifies the values and takes the metric's lock on
            # every call; its child for a label set never changes, so it is kept here
            # (bounded like the series: the services pass only names they serve)
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._children[labels] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_load(self, model: str, version: int, seconds: float, ok: bool) -> None:
        self.loads.labels(model, str(version), "ok" if ok else "failed").inc()
        if ok:
            self.load_latency.labels(model, str(version)).observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format (``Content-Type: CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class ClientMetrics:
    """The ranking client's cache-store lookups (:class:`serving.client.RankingClient`
    takes one as ``metrics=``); pass a registry to expose them with your own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.cache_lookups = Counter("lifelong_client_cache_lookups",
                                     "Cache-store lookups of the ranking client",
                                     ("model", "result"), registry=self.registry)

    def cache_lookup(self, model: str, hit: bool) -> None:
        self.cache_lookups.labels(model, "hit" if hit else "miss").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
