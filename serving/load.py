"""Load generators for a serving endpoint (issue 20 item 5): throughput at a latency bound.

* :func:`closed_loop` -- ``threads`` clients, each sending its next request as soon as
  the previous one is answered (requests/s at a concurrency);
* :func:`open_loop` -- requests arrive at a fixed ``rate`` whatever the answers do;
  each latency is measured from the request's *scheduled* time, so a server that
  falls behind shows its queueing in p50 / p99 (no "coordinated omission": a closed
  loop would wait and under-report it).

Both call ``call(i)`` (any callable: a gRPC stub call, a REST POST) and return a
:class:`LoadResult` with requests/s, p50, p99 and the errors by kind (the gRPC code
name when the exception has ``code()``, else the exception's type). TF-free and
gRPC-free: the caller brings the request.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import numpy as np

__all__ = ["LoadResult", "closed_loop", "open_loop"]


@dataclasses.dataclass
class LoadResult:
    mode: str                    # closed | open
    threads: int                 # client threads (open loop: the most requests in flight)
    rate: Optional[float]        # open loop: offered requests/s
    requests: int                # answered, successes and errors
    errors: int
    seconds: float               # wall time from the first send to the last answer
    rps: float                   # successful requests / seconds
    p50_ms: float                # successful requests only
    p99_ms: float
    error_kinds: Dict[str, int]

    def row(self) -> Dict:
        return dataclasses.asdict(self)


def _kind(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if callable(code):
        try:
            return str(getattr(code(), "name", code()))
        except Exception:  # noqa: BLE001 -- a code() that fails: fall back to the type
            pass
    return type(e).__name__


class _Tally:
    """Latencies and error kinds of calls made from several threads (one lock): what
    the closed and the open loop both record per request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lat: List[float] = []
        self.kinds: Dict[str, int] = {}

    def call(self, call: Callable[[int], object], i: int, since: float) -> None:
        """``call(i)``; its latency from ``since`` (perf_counter seconds) on success,
        its error kind counted otherwise (never fatal)."""
        try:
            call(i)
        except Exception as e:  # counted, never fatal
            with self.lock:
                self.kinds[_kind(e)] = self.kinds.get(_kind(e), 0) + 1
            return
        dt = time.perf_counter() - since
        with self.lock:
            self.lat.append(dt)


def _result(mode, threads, rate, lat: List[float], kinds: Dict[str, int], seconds: float):
    errors = sum(kinds.values())
    arr = np.asarray(lat) * 1e3
    pct = (lambda q: float(np.percentile(arr, q))) if len(arr) else (lambda q: float("nan"))
    return LoadResult(mode, threads, rate, len(lat) + errors, errors, seconds,
                      len(lat) / seconds if seconds > 0 else 0.0, pct(50), pct(99), kinds)


def closed_loop(call: Callable[[int], object], threads: int, seconds: float,
                max_requests: int = 1_000_000) -> LoadResult:
    """``threads`` threads call ``call(i)`` back to back for ``seconds`` (at most
    ``max_requests`` in all)."""
    if threads < 1 or seconds <= 0:
        raise ValueError(f"threads must be >= 1 and seconds > 0, got {threads}, {seconds}")
    tally = _Tally()
    counter = iter(range(max_requests))
    t0 = time.perf_counter()
    stop = t0 + seconds

    def worker():
        while time.perf_counter() < stop:
            with tally.lock:
                i = next(counter, None)
            if i is None:
                return
            tally.call(call, i, time.perf_counter())

    ths = [threading.Thread(target=worker, name=f"load-{k}") for k in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return _result("closed", threads, None, tally.lat, tally.kinds, time.perf_counter() - t0)


def open_loop(call: Callable[[int], object], rate: float, seconds: float,
              max_in_flight: int = 64) -> LoadResult:
    """``rate`` requests/s for ``seconds`` (``int(rate * seconds)`` requests), sent on
    schedule by up to ``max_in_flight`` threads; latency from the scheduled time."""
    if rate <= 0 or seconds <= 0 or max_in_flight < 1:
        raise ValueError(f"rate, seconds and max_in_flight must be positive, got {rate}, "
                         f"{seconds}, {max_in_flight}")
    n = int(rate * seconds)
    tally = _Tally()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="open-load") as pool:
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(tally.call, call, i, scheduled)  # queued when every thread is busy
    return _result("open", max_in_flight, float(rate), tally.lat, tally.kinds,
                   time.perf_counter() - t0)
