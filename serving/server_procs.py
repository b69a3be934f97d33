"""``lifelong serve --processes N``: N server processes on one port (``SO_REUSEPORT``).

Why: a Python gRPC server runs every request's Python work (HTTP/2 framing in
grpcio's C core aside: protobuf parsing, the request checks, NumPy conversion,
building the response) under one interpreter lock, so one process uses at most one
core for that work however many ``--workers`` threads it has; only the TensorFlow
session call runs beside it. TF Serving is C++ and has no such lock; the way the
gRPC project itself shows for Python servers is several processes bound to the same
port with ``SO_REUSEPORT`` (grpc's ``examples/python/multiprocessing``: the option
``grpc.so_reuseport`` = 1 in every process), the kernel spreading *connections*
(not requests) over them. A client that sends everything over one channel (one
HTTP/2 connection) therefore reaches one process: load spreads over processes only
across several client connections (``lifelong bench serving --load`` opens one per
client thread).

The parent process serves too (process 0); it binds first (``--port 0`` resolves to
a free port here), then starts ``N - 1`` children with ``python -m
serving.server_procs`` on that port and reports ``listening`` once every child has
bound. Each process loads and polls the model folder on its own (N times the model
memory; a new version becomes AVAILABLE in each process at its own poll). Children
end when the parent ends (SIGTERM from the parent; and each child polls that its
parent is still alive). ``--rest_api_port`` is refused with ``--processes`` > 1: the
REST port and its Prometheus page would count only the parent's requests.

(An ``[interp]`` choice of this package: TF Serving has no such flag, being one
multi-threaded C++ process; ``--processes`` is the nearest equivalent for this
Python server, like gunicorn's ``--workers`` for WSGI.)
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

from serving.errors import ServerError

log = logging.getLogger("serving.server")

#: the line a child prints on stdout once it has bound its port
READY = "serving.server_procs: ready"


def check_processes(args) -> int:
    """``args.processes`` validated (a :class:`ServerError`, one line from the CLI)."""
    n = int(getattr(args, "processes", 1))
    if n < 1:
        raise ServerError(f"--processes must be >= 1, got {n}")
    if n > 1:
        if getattr(args, "rest_api_port", 0):
            raise ServerError("--rest_api_port cannot be combined with --processes > 1: the "
                              "REST port and its Prometheus metrics would see only one "
                              "process's requests; run one process per REST port instead")
    return n


def load_static(spec: Optional[Sequence]) -> list:
    """The in-memory servables named by ``spec`` = ``[module, function, argument]``
    (``function(argument)`` returns them), imported by name so that this package does
    not import the caller's (the benchmark's identity servables live in ``lifelong``)."""
    if not spec:
        return []
    module, fn, arg = spec
    return list(getattr(importlib.import_module(module), fn)(arg))


def free_port(host: str) -> int:
    """A port free on ``host`` now, for ``--port 0`` with several processes: the children
    are started with it before the parent loads its models, so that the processes
    start side by side (another program could take it in between: the parent's bind
    then fails with ``cannot bind``)."""
    import socket
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def spawn_children(args, port: int, n: int, static_spec: Optional[Sequence]
                   ) -> List[subprocess.Popen]:
    """Start ``n`` child servers on ``port`` (same flags as ``args``; stderr inherited:
    one log); :func:`wait_ready` waits until each has bound it."""
    conf = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool,
                                                                   type(None)))}
    conf.update(port=int(port), processes=1)
    payload = json.dumps({"args": conf, "static": list(static_spec) if static_spec else None})
    children: List[subprocess.Popen] = []
    try:
        for k in range(n):
            children.append(subprocess.Popen(
                [sys.executable, "-m", "serving.server_procs", "--child", payload,
                 "--index", str(k + 1)],
                stdout=subprocess.PIPE, text=True, env=dict(os.environ)))
    except BaseException:
        stop_children(children)
        raise
    return children


def wait_ready(children: Sequence[subprocess.Popen], timeout_s: float = 300.0) -> None:
    """Wait until every child has bound its port; one that fails or is slow ends all
    (a :class:`ServerError`)."""
    try:
        deadline = time.time() + timeout_s
        for k, c in enumerate(children):
            line = _read_line(c, deadline - time.time())
            if line is None or not line.startswith(READY):
                raise ServerError(f"server process {k + 1} did not start (exit code "
                                  f"{c.poll()}); see its log above")
    except BaseException:
        stop_children(children)
        raise


def _read_line(proc: subprocess.Popen, timeout_s: float) -> Optional[str]:
    out: List[str] = []
    th = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    th.start()
    th.join(max(0.0, timeout_s))
    return out[0].strip() if out and out[0] else None


def stop_children(children: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    for c in children:
        if c.poll() is None:
            c.terminate()
    for c in children:
        try:
            c.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def _child(payload: str, index: int) -> int:
    from serving import server
    from serving.servable import SessionThreads
    from serving.validation import MiB, Limits
    logging.basicConfig(level=logging.INFO, format=f"[serve {index}] %(message)s",
                        stream=sys.stderr)
    data = json.loads(payload)
    args = argparse.Namespace(**data["args"])
    parent = os.getppid()
    limits = Limits(int(args.max_request_mb * MiB), args.max_candidates, args.max_elements)
    srv = server.LocalServer(args.base, args.host, args.port, limits, args.poll_s,
                             args.workers, args.num_versions, load_static(data["static"]),
                             threads=SessionThreads(args.inter_op, args.intra_op),
                             reuseport=True)
    print(f"{READY} pid {os.getpid()} on {srv.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if os.getppid() != parent:          # the parent died without stopping us
            break
    srv.stop()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m serving.server_procs")
    p.add_argument("--child", required=True, help="JSON: the parent's flags (internal)")
    p.add_argument("--index", type=int, default=1)
    a = p.parse_args()
    sys.exit(_child(a.child, a.index))
