"""serving/load.py: closed- and open-loop load generators, on a fake call whose cost
and failures are known (no server: the generators' bookkeeping is what is tested)."""
import threading
import time

import grpc
import pytest

from serving.load import closed_loop, open_loop


class _Rpc(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED


def test_closed_loop_counts_successes_errors_and_latency():
    calls = []
    lock = threading.Lock()

    def call(i):
        with lock:
            calls.append(i)
        time.sleep(0.004)
        if i % 3 == 0:
            raise _Rpc()
        if i % 3 == 1 and i % 2 == 0:
            raise KeyError(i)

    r = closed_loop(call, threads=4, seconds=5.0, max_requests=60)
    assert sorted(calls) == list(range(60))             # every index once, then stop
    assert r.requests == 60 and r.errors == 20 + 10
    assert r.error_kinds == {"RESOURCE_EXHAUSTED": 20, "KeyError": 10}
    assert r.p50_ms >= 4.0 and r.p99_ms >= r.p50_ms        # the sleep is a lower bound
    assert r.rps == pytest.approx(30 / r.seconds)


def test_open_loop_sends_on_schedule_and_measures_queueing():
    # 1 thread, 20 ms per call, offered 100/s: the backlog grows by 10 ms per request,
    # and latency from the scheduled time shows it (a closed loop would not)
    r = open_loop(lambda i: time.sleep(0.02), rate=100, seconds=0.4, max_in_flight=1)
    assert r.requests == 40 and r.errors == 0
    assert r.p99_ms > 0.3 * 1e3                 # the last request waited ~39 x 10 ms
    assert r.seconds >= 40 * 0.02
    fast = open_loop(lambda i: None, rate=200, seconds=0.25, max_in_flight=4)
    assert fast.requests == 50 and fast.rps == pytest.approx(50 / fast.seconds)


def test_bad_arguments():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        closed_loop(lambda i: None, threads=0, seconds=1)
    with pytest.raises(ValueError, match="must be positive"):
        open_loop(lambda i: None, rate=0, seconds=1)
