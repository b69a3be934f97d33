"""Where the server's CPU goes for ONE ``rank`` request, next to the identity SavedModel.

Issue 20 item 5 (docs/serving.md, "Load mode, session 8"). Exports the bench's default
``rank`` model (``lifelong bench serving --load``: untrained ``avg_pool``, ``--jit_rank``,
the bench's dims, L = 1,000) and its identity SavedModel floor
(``lifelong.bench.serving.export_identity_model``), builds the same requests the bench
sends (``RankingClient.rank_request`` from the cached ``user_tower`` outputs, N = 100),
then times each part of the server's handling of one request in this process, over
``--requests`` requests per part (after ``--warmup`` untimed), for both paths:

* ``parse``: ``PredictRequest.FromString`` of the serialized request (gRPC's
  deserializer);
* ``resolve``: model / version / signature lookup (``PredictionServicer.servable``);
* ``decode_inputs``: the request checks and the NumPy views of the inputs
  (:func:`serving.validation.decode_inputs`);
* ``session call``: :meth:`serving.servable.SavedModelServable.run`;
* ``response``: the PredictResponse with its ``ctr`` TensorProto;
* ``serialize``: ``SerializeToString`` of the response (gRPC's serializer);
* ``metrics``: ``ServerMetrics.observe_request`` of one request;
* ``whole handler``: ``PredictionServicer.serve_grpc`` (all of the above but
  parse / serialize, as the gRPC handler runs it);
* ``through gRPC`` (unless ``--no_grpc``): a server process (``python -m
  lifelong.bench.identity``, the bench's flags) answering ``--requests`` sequential
  requests from one client thread; its CPU (``/proc``, all its threads) per request.
  ``grpc + rest`` = that minus parse + whole handler + serialize.

CPU ms = ``time.process_time`` (every thread of this process, so TensorFlow's pool
threads too) per request; wall ms = ``perf_counter`` per request. ``--cprofile`` adds
cProfile's top functions of the whole handler for ``rank``. Run it under ``nice`` on
a shared machine; figures move by 10-20% between runs there.

    .venv/bin/python scripts/profile_serving_request.py --intra_op 1 [--cprofile]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def bench_args(L: int, seed: int):
    from lifelong.bench import flags as F
    p = argparse.ArgumentParser()
    F.add_serving_arguments(p)
    a = p.parse_args(["serving", "--seed", str(seed)])
    a.load_long_len = L
    return a


def build(work: str, L: int, n: int, users: int, seed: int, threads):
    """Exports, the manager over them, and per path the serialized requests."""
    from serving import protos
    from serving.export import export_model
    from serving.model_manager import ModelManager
    from lifelong.bench.serving import export_identity_model
    from lifelong.bench.workload import NUM_ITEMS, item_cate, synthetic_records, untrained_model

    args = bench_args(L, seed)
    base = os.path.join(work, "saved_models")
    name, ident = f"avg_pool_L{L}", f"identity_sm_avg_pool_L{L}"
    if not os.path.isdir(os.path.join(base, ident, "1")):   # --work: reuse the exports
        export_model(untrained_model(args, "avg_pool", L), base, name, 1, jit_rank=True)
        export_identity_model(os.path.join(base, name, "1"), base, ident)
    manager = ModelManager(base, poll_interval_s=0, threads=threads)
    manager.start()
    rank = manager.get(name)
    records = synthetic_records(users, L + args.short_len, L + args.short_len + 100, seed)
    out = rank.run("user_tower", {"records": np.array(records, dtype=object)})
    rank_inputs = set(rank.signatures["rank"].inputs)
    rng = np.random.default_rng(seed + 2)
    cate = item_cate(seed)
    m = protos.messages()
    reqs = {"rank": [], "identity": []}
    for i in range(users):    # as RankingClient.rank_request builds it (unpinned version)
        items = rng.integers(2, NUM_ITEMS + 2, size=n)
        req = m.PredictRequest()
        req.model_spec.name = name
        req.model_spec.signature_name = "rank"
        for k, v in out.items():
            if k != "user_id":
                protos.fill_tensor_proto(req.inputs[k], v[i:i + 1])
        protos.fill_tensor_proto(req.inputs["target_item_id"], items)
        protos.fill_tensor_proto(req.inputs["target_cate_id"], cate[items])
        if "imp_ts" in rank_inputs:
            protos.fill_tensor_proto(req.inputs["imp_ts"], np.array([1_600_000_000], np.int64))
        if "user_id" in rank_inputs:
            protos.fill_tensor_proto(req.inputs["user_id"], out["user_id"][i:i + 1])
        reqs["rank"].append(req.SerializeToString())
        req.model_spec.name = ident
        reqs["identity"].append(req.SerializeToString())
    return base, manager, {"rank": name, "identity": ident}, reqs


def timed(fn, items, count: int, warmup: int):
    """CPU and wall ms per call of ``fn(item)`` over ``count`` calls (items cycled)."""
    for i in range(warmup):
        fn(items[i % len(items)])
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(count):
        fn(items[i % len(items)])
    return ((time.process_time() - c0) / count * 1e3,
            (time.perf_counter() - w0) / count * 1e3)


def profile_path(servicer, payloads, count: int, warmup: int):
    """The per-part table of one path: {part: (cpu ms, wall ms)}."""
    from serving import validation
    from tensorflow_serving.apis import predict_pb2
    parsed = [predict_pb2.PredictRequest.FromString(b) for b in payloads]
    spec = parsed[0].model_spec
    servable = servicer.servable(spec)
    info = servable.signatures["rank"]
    where = "profile"
    decoded = [validation.decode_inputs(r, info, servicer.limits, where) for r in parsed]
    outputs = servable.run("rank", decoded[0])
    responses = [servicer.predict(r) for r in parsed]

    def response(outs):
        from serving import protos
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = servable.name
        resp.model_spec.version.value = servable.version
        resp.model_spec.signature_name = "rank"
        for k, v in outs.items():
            protos.fill_tensor_proto(resp.outputs[k], v)
        return resp

    class Ctx:
        def abort(self, code, msg):
            raise RuntimeError(f"{code}: {msg}")

    ctx = Ctx()
    t0 = time.perf_counter()
    parts = {
        "parse": timed(predict_pb2.PredictRequest.FromString, payloads, count, warmup),
        "resolve": timed(lambda r: servicer.servable(r.model_spec, {}).signatures.get(
            r.model_spec.signature_name), parsed, count, warmup),
        "decode_inputs": timed(lambda r: validation.decode_inputs(r, info, servicer.limits,
                                                                   where), parsed, count, warmup),
        "session call": timed(lambda d: servable.run("rank", d), decoded, count, warmup),
        "response": timed(response, [outputs], count, warmup),
        "serialize": timed(lambda r: r.SerializeToString(), responses, count, warmup),
        "metrics": timed(lambda _: servicer.record("grpc", "predict", servable.name,
                                                   {"model": servable.name, "version": 1,
                                                    "signature": "rank"}, "OK", t0),
                         [0], count, warmup),
        "whole handler": timed(lambda r: servicer.Predict(r, ctx), parsed, count, warmup),
    }
    return parts


def through_grpc(base: str, payloads, count: int, warmup: int, extra):
    """Server CPU ms per request (all its threads) for sequential requests per path."""
    from lifelong.bench.serving import start_server
    from lifelong.bench.serving_load import RawSender, cpu_seconds, process_tree
    proc, address = start_server(base, [], os.path.join(base, "..", "server.log"), extra)
    out = {}
    try:
        sender = RawSender(address, 1)
        for kind, reqs in payloads.items():
            for i in range(warmup):
                sender.send(reqs[i % len(reqs)])
        for kind, reqs in payloads.items():
            pids = process_tree(proc.pid)
            s0, c0, w0 = cpu_seconds(pids), time.process_time(), time.perf_counter()
            for i in range(count):
                sender.send(reqs[i % len(reqs)])
            out[kind] = ((cpu_seconds(pids) - s0) / count * 1e3,
                         (time.process_time() - c0) / count * 1e3,
                         (time.perf_counter() - w0) / count * 1e3)
        sender.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="timed calls per part")
    p.add_argument("--warmup", type=int, default=100, help="untimed calls per part first")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--long_len", type=int, default=1000)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--inter_op", type=int, default=-1)
    p.add_argument("--intra_op", type=int, default=1,
                   help="session intra-op threads (default 1, the load runs' setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cprofile", action="store_true", help="cProfile the rank handler too")
    p.add_argument("--no_grpc", action="store_true", help="skip the server-process row")
    p.add_argument("--work", help="folder for the exports (default: a temporary one)")
    a = p.parse_args(argv)

    import tfmodels  # noqa: F401
    from serving.servable import SessionThreads
    from serving.services import PredictionServicer
    from serving.validation import Limits
    from serving.metrics import ServerMetrics

    work = a.work or tempfile.mkdtemp(prefix="profile-serving-")
    base, manager, names, reqs = build(work, a.long_len, a.candidates, a.users, a.seed,
                                       SessionThreads(a.inter_op, a.intra_op))
    servicer = PredictionServicer(manager, Limits(), ServerMetrics())
    table = {k: profile_path(servicer, reqs[k], a.requests, a.warmup) for k in ("rank",
                                                                                 "identity")}
    if not a.no_grpc:
        extra = ["--inter_op", str(a.inter_op), "--intra_op", str(a.intra_op),
                 "--workers", "8"]
        g = through_grpc(base, reqs, a.requests, a.warmup, extra)
        for k in table:
            inproc = sum(table[k][x][0] for x in ("parse", "whole handler", "serialize"))
            table[k]["through gRPC (server process)"] = (g[k][0], g[k][2])
            table[k]["  of which gRPC + rest"] = (g[k][0] - inproc, float("nan"))
            table[k]["client (this process) per request"] = (g[k][1], float("nan"))

    print(f"N = {a.candidates}, L = {a.long_len}, inter_op {a.inter_op}, intra_op "
          f"{a.intra_op}, {a.requests} calls per part after {a.warmup}; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| part of one request | rank CPU ms | rank wall ms | identity CPU ms | "
          "identity wall ms |")
    print("|---|---|---|---|---|")
    fmt = lambda v: "" if v != v else f"{v:.3f}"  # noqa: E731  (nan: not measured)
    for part in table["rank"]:
        r, i = table["rank"][part], table["identity"][part]
        print(f"| {part} | {fmt(r[0])} | {fmt(r[1])} | {fmt(i[0])} | {fmt(i[1])} |")

    if a.cprofile:
        import cProfile
        import pstats
        from tensorflow_serving.apis import predict_pb2
        parsed = [predict_pb2.PredictRequest.FromString(b) for b in reqs["rank"]]
        prof = cProfile.Profile()
        prof.enable()
        for i in range(a.requests):
            servicer.predict(parsed[i % len(parsed)])
        prof.disable()
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    manager.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
