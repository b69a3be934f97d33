"""Throughput under load (issue 20 item 5): serving/load.py's closed- and open-loop
generators on a fake call whose cost and failures are known, then through the bench's
RawSender against a stub gRPC server (no model), the bench's CPU accounting, a
``--processes 2`` server (SO_REUSEPORT) answering from both processes with the CTRs of
the version in process, and the load / processes flags refused as one line."""
import os
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


# ---- against a real gRPC server (a stub: no model) -------------------------------------------
def _stub_server(fail_every: int):
    """A gRPC server answering TF Serving's Predict method path with the request bytes
    echoed back, and RESOURCE_EXHAUSTED for every request whose number (the payload)
    is a multiple of ``fail_every``; it records each call's peer (its connection)."""
    from concurrent import futures
    seen = []
    lock = threading.Lock()

    def predict(payload, context):
        i = int(payload)
        with lock:
            seen.append((i, context.peer()))
        if i % fail_every == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {i} refused")
        return payload

    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {"Predict": grpc.unary_unary_rpc_method_handler(predict)})   # bytes in, bytes out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", seen


def test_load_counts_grpc_errors_and_spreads_threads_over_connections():
    """closed_loop through the bench's RawSender against a stub gRPC server: every
    request reaches the server once, errors are counted by gRPC code, answers are
    the server's, and each client thread has its own connection (3 threads, 3 peers)."""
    from lifelong.bench.serving_load import RawSender
    server, address, seen = _stub_server(fail_every=4)
    sender = RawSender(address, channels=3)
    answers = {}
    try:
        def call(i):
            answers[i] = sender.send(str(i).encode())

        r = closed_loop(call, threads=3, seconds=30.0, max_requests=40)
        assert r.requests == 40 and r.errors == 10
        assert r.error_kinds == {"RESOURCE_EXHAUSTED": 10}
        assert sorted(i for i, _ in seen) == list(range(40))
        assert answers == {i: str(i).encode() for i in range(40) if i % 4}
        assert len({peer for _, peer in seen}) == 3
        o = open_loop(lambda i: sender.send(str(i + 1).encode()), rate=200, seconds=0.1,
                      max_in_flight=2)
        assert o.requests == 20 and o.errors == 5 and o.error_kinds == {"RESOURCE_EXHAUSTED": 5}
    finally:
        sender.close()
        server.stop(0)


def test_process_cpu_accounting_reads_the_process_tree(tmp_path):
    """The bench's server CPU figures: a child's CPU time is found under its parent."""
    import subprocess
    import sys
    from lifelong.bench.serving_load import cpu_seconds, process_tree
    busy = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass\\n"
            "time.sleep(30)'])\n"
            "time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", busy])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            tree = process_tree(p.pid)
            if len(tree) == 2 and cpu_seconds(tree[1:]) >= 0.3:
                break
            time.sleep(0.1)
        assert tree[0] == p.pid and len(tree) == 2
        assert cpu_seconds(tree) >= 0.3 > cpu_seconds([p.pid])
    finally:
        for pid in process_tree(p.pid)[::-1]:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        p.wait()


# ---- lifelong serve --processes ----------------------------------------------------------------
def _socket_owners(port: int, pids):
    """Which of ``pids`` hold an established TCP socket on local ``port`` (/proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":   # ESTABLISHED
                inodes.add(f[9])
    owners = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                owners.add(pid)
    return owners


def test_processes_server_answers_from_two_processes_with_the_same_ctrs(tmp_path):
    """`lifelong serve --processes 2`: two processes bound to one port (SO_REUSEPORT);
    16 client connections reach both, and every answer holds the CTRs computed here by
    hand for the served SavedModel (a small tf.Module: ctr = sigmoid(sum(0.01 * item *
    pooled * w)), so the test times the servers, not an export)."""
    import subprocess
    import sys
    import numpy as np
    import tfmodels  # noqa: F401
    import tensorflow as tf
    from serving import protos
    from lifelong.bench.serving_load import RawSender, process_tree

    w = np.array([0.5, -1.0, 2.0, 0.25], np.float32)

    class Rank(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(w)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, "target_item_id"),
                                      tf.TensorSpec([1, 4], tf.float32, "pooled")])
        def rank(self, target_item_id, pooled):
            x = 0.01 * tf.cast(target_item_id, tf.float32)[:, None] * pooled * self.w
            return {"ctr": tf.sigmoid(tf.reduce_sum(x, -1))}

    base = str(tmp_path / "models")
    module = Rank()
    tf.saved_model.save(module, os.path.join(base, "m", "1"), signatures={"rank": module.rank})
    items = np.arange(3, 10, dtype=np.int64)
    pooled = np.array([[1.0, 2.0, -1.0, 4.0]], np.float32)
    want = 1 / (1 + np.exp(-(0.01 * items[:, None] * pooled * w).sum(-1)))
    m = protos.messages()
    req = m.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = "m", "rank"
    protos.fill_tensor_proto(req.inputs["target_item_id"], items)
    protos.fill_tensor_proto(req.inputs["pooled"], pooled)

    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lifelong.bench.identity", "--base", base,
                             "--port", "0", "--poll_s", "0", "--processes", "2",
                             "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    sender, pids = None, []
    try:
        address = None
        deadline = time.time() + 240
        while address is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            for line in open(tmp_path / "serve.log"):
                if "listening on " in line:
                    assert "2 processes (SO_REUSEPORT)" in line
                    address = line.split("listening on ")[1].split(";")[0].strip()
        assert address, open(tmp_path / "serve.log").read()
        sender = RawSender(address, channels=16)
        for call in sender.calls:
            out = m.PredictResponse.FromString(call(req.SerializeToString(), timeout=60))
            np.testing.assert_allclose(protos.to_ndarray(out.outputs["ctr"]), want, rtol=1e-5)
        pids = process_tree(proc.pid)
        assert len(pids) == 2                          # the parent and one child
        assert _socket_owners(int(address.rsplit(":", 1)[1]), pids) == set(pids)
    finally:
        if sender is not None:
            sender.close()
        proc.terminate()
        proc.wait(timeout=60)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]   # the child ended too


# ---- bad flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["bench", "serving", "--load", "sideways"], "--load must be closed, open or closed,open"),
    (["bench", "serving", "--load", "open"], "--load open needs --rate > 0"),
    (["bench", "serving", "--load", "closed", "--load_threads", "4,0"],
     "--load_threads must all be >= 1"),
    (["bench", "serving", "--load", "closed", "--processes", "1,x"],
     "--processes must be comma separated integers"),
    (["bench", "serving", "--load", "closed", "--processes", "0"],
     "--processes must all be >= 1"),
    (["bench", "serving", "--load", "closed", "--load_seconds", "0"],
     "--load_seconds must be > 0"),
    (["serve", "--processes", "0", "--port", "0"], "--processes must be >= 1"),
    (["serve", "--processes", "2", "--rest_api_port", "8501", "--port", "0"],
     "--rest_api_port cannot be combined with --processes > 1"),
])
def test_bad_load_and_processes_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    from lifelong import cli
    out = tmp_path / "out"
    if argv[0] == "bench":
        argv = argv + ["--out", str(out)]
    else:
        argv = argv + ["--base", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lifelong {argv[0]}: error: {message}") and err.count("\n") == 1
    assert not out.exists()              # refused before any folder or export


def test_aggregate_takes_medians_and_the_paired_ratio_per_round():
    """Rounds -> one row: medians of req/s and latency, sums of requests and errors, and
    rank / identity paired within each round (median 0.5 of 0.5, 0.25, 0.9; the ratio of
    the medians, 90 / 200 = 0.45, would mix rounds run under different machine load)."""
    from lifelong.bench.serving_load import aggregate, load_targets

    def row(kind, rnd, rps, p50, errors=0):
        return dict(mode="closed", kind=kind, model="m", processes=1, threads=8, rate=None,
                    round=rnd, rps=rps, p50_ms=p50, p99_ms=3 * p50, seconds=2.0,
                    requests=int(rps * 2) + errors, errors=errors,
                    error_kinds={"UNAVAILABLE": errors} if errors else {},
                    server_cpu_ms_per_req=(1.0 if kind == "rank" else 0.5) + rnd,
                    client_cpu_ms_per_req=0.3,
                    server_cores=0.5, loadavg=4.0)

    rows = [row("rank", 0, 100, 5.0), row("identity_sm", 0, 200, 2.0),
            row("rank", 1, 50, 9.0, errors=2), row("identity_sm", 1, 200, 2.5),
            row("rank", 2, 90, 6.0), row("identity_sm", 2, 100, 4.0)]
    agg = {r["kind"]: r for r in aggregate(rows)}
    rank = agg["rank"]
    assert rank["rounds"] == 3 and rank["rps"] == 90 and rank["p50_ms"] == 6.0
    assert rank["ratio"] == pytest.approx(0.5)
    assert (rank["ratio_min"], rank["ratio_max"]) == (pytest.approx(0.25), pytest.approx(0.9))
    assert rank["requests"] == 200 + 102 + 180 and rank["errors"] == 2
    assert rank["error_kinds"] == {"UNAVAILABLE": 2} and rank["server_cpu_ms_per_req"] == 2.0
    assert "ratio" not in agg["identity_sm"] and agg["identity_sm"]["rps"] == 200
    t = load_targets({"rank_models": ["m"], "processes": [1], "load_rows": list(agg.values())})
    # the paired ratio; the CPU-bound estimate from the medians of CPU ms per request,
    # server + client: identity (1.5 + 0.3) / rank (2.0 + 0.3); p99 / p50
    assert [x["value"] for x in t] == [pytest.approx(0.5), pytest.approx(1.8 / 2.3),
                                       pytest.approx(3.0)]
