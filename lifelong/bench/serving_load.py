"""``lifelong bench serving --load closed|open``: throughput under concurrent load (issue 20).

``rank`` of each ``--rank_models`` model at ``--load_candidates`` N (default 100) and
``--load_long_len`` L (default 1,000), next to its identity SavedModel floor
(:func:`lifelong.bench.serving.export_identity_model`: the same request, ``ctr`` =
zeros, one session call and no computation) **on the same server**, driven by
:mod:`serving.load`:

* ``closed``: ``--load_threads`` client threads (default 1, 4, 8, 16), each sending
  its next request as soon as the previous one is answered, ``--load_seconds`` each;
* ``open``: ``--rate`` requests/s on a fixed schedule (latency from the scheduled
  time, so a server that falls behind shows its queue).

What is measured is the server, so the client is kept cheap and identical for both
paths: every request is built once through the real client
(:meth:`serving.client.RankingClient.rank_request` from the cached ``user_tower``
outputs, one per user, ``--users`` users cycled) and sent as serialized bytes; the
answer is not decoded (one answer per path is, before the run, and must hold N
CTRs). Each client thread has its own channel (its own TCP connection: a local
subchannel pool), as separate clients would, which is also what lets
``--processes`` > 1 (``SO_REUSEPORT``, :mod:`serving.server_procs`) spread the load.
Rank and identity rows alternate per thread count so that machine noise hits both.
For each row the server processes' CPU time (``/proc``, all processes) and the
client's are read before and after: CPU ms per request and cores used say what the
time is spent on. ``--processes 1,2`` measures each server size in turn (one server
at a time, same exports and requests).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from lifelong.bench.flags import parse_ints
from lifelong.bench.workload import NUM_ITEMS, item_cate, synthetic_records, untrained_model

PREDICT = "/tensorflow.serving.PredictionService/Predict"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- CPU accounting -------------------------------------------------------------------------
def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (read from ``/proc``; ``[pid]`` where it is absent)."""
    children: Dict[int, List[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid]
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (``/proc/<pid>/stat``; 0 if gone)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)
    return total / _TICK


# ---- the client side --------------------------------------------------------------------------
class RawSender:
    """Sends pre-serialized PredictRequests; one channel per client thread (round robin
    over ``channels`` connections, each its own TCP connection), answers left as bytes."""

    def __init__(self, address: str, channels: int, timeout_s: float = 30.0):
        import grpc
        opts = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
                # without it, channels with equal arguments share one connection
                ("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(address, options=opts) for _ in range(channels)]
        self.calls = [c.unary_unary(PREDICT) for c in self.channels]   # bytes in, bytes out
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._next = 0
        self._lock = threading.Lock()

    def _call(self):
        call = getattr(self._local, "call", None)
        if call is None:
            with self._lock:
                call = self.calls[self._next % len(self.calls)]
                self._next += 1
            self._local.call = call
        return call

    def send(self, payload: bytes) -> bytes:
        return self._call()(payload, timeout=self.timeout_s)

    def close(self) -> None:
        for c in self.channels:
            c.close()


def _row(res, kind: str, model: str, processes: int, server_cpu: float, client_cpu: float,
         loadavg: float) -> Dict:
    r = res.row()
    n = max(1, r["requests"])
    r.update(kind=kind, model=model, processes=processes,
             server_cpu_ms_per_req=server_cpu / n * 1e3,
             client_cpu_ms_per_req=client_cpu / n * 1e3,
             server_cores=server_cpu / r["seconds"] if r["seconds"] else 0.0,
             loadavg=loadavg)
    return r


def measure_load(args, address: str, pids_of, payloads: Dict, processes: int,
                 n: int) -> List[Dict]:
    """The closed / open loop rows of one server (``pids_of()``: its processes now)."""
    from serving import load
    from serving import protos
    modes = [m for m in args.load.split(",") if m]
    threads = parse_ints(args.load_threads, "load_threads")
    sender = RawSender(address, max(threads + [args.load_open_threads]))
    rows: List[Dict] = []
    try:
        # one decoded answer per path: N CTRs, or the run is meaningless
        m = protos.messages()
        for (kind, model), reqs in payloads.items():
            out = m.PredictResponse.FromString(sender.send(reqs[0]))
            ctr = protos.to_ndarray(out.outputs["ctr"])
            if ctr.shape != (n,):
                raise RuntimeError(f"{kind} {model}: ctr of shape {ctr.shape}, expected ({n},)")
        for (kind, model), reqs in payloads.items():          # warm-up: every connection
            load.closed_loop(lambda i, r=reqs: sender.send(r[i % len(r)]), max(threads), 0.5)

        def one(kind, model, rnd, fn):
            reqs = payloads[(kind, model)]
            pids = pids_of()
            s0, c0 = cpu_seconds(pids), time.process_time()
            res = fn(lambda i: sender.send(reqs[i % len(reqs)]))
            s1, c1 = cpu_seconds(pids), time.process_time()
            row = _row(res, kind, model, processes, s1 - s0, c1 - c0, os.getloadavg()[0])
            row["round"] = rnd
            rows.append(row)
            print(f"[bench] load r{rnd} {row['mode']} {kind:>11} {model} procs={processes} "
                  f"threads={row['threads']} rate={row['rate']}: {row['rps']:.0f} req/s, p50 "
                  f"{row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms, errors {row['errors']}, "
                  f"server {row['server_cpu_ms_per_req']:.2f} CPU ms/req "
                  f"({row['server_cores']:.2f} cores)", file=sys.stderr, flush=True)

        keys = list(payloads)
        for rnd in range(args.load_rounds):     # rank and identity alternate, order flipped
            if "closed" in modes:
                for j, t in enumerate(threads):
                    for kind, model in (keys if (j + rnd) % 2 == 0 else keys[::-1]):
                        one(kind, model, rnd, lambda call, t=t: load.closed_loop(
                            call, t, args.load_seconds))
            if "open" in modes:
                for kind, model in (keys if rnd % 2 == 0 else keys[::-1]):
                    one(kind, model, rnd, lambda call: load.open_loop(
                        call, args.rate, args.load_seconds, args.load_open_threads))
    finally:
        sender.close()
    return rows


def bench_load(args) -> Dict:
    """Export, cache, build the requests once; then per ``--processes`` value start a
    server, run :func:`measure_load`, stop it."""
    from serving import protos
    from serving.cache_store import SQLiteCacheStore
    from serving.client import RankingClient
    from serving.export import export_model
    from lifelong.bench.serving import export_identity_model, start_server

    L, n = args.load_long_len, args.load_candidates
    rank_models = [m for m in args.rank_models.split(",") if m]
    procs_list = parse_ints(str(args.processes), "processes")
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    records = synthetic_records(args.users, L + args.short_len, L + args.short_len + 100,
                                args.seed)
    names = {}
    for m in rank_models:
        names[m] = export_model(untrained_model(args, m, L), base, f"{m}_L{L}", 1,
                                jit_rank=args.jit_rank)["name"]
        export_identity_model(os.path.join(base, names[m], "1"), base, f"identity_sm_{m}_L{L}")
        print(f"[bench] exported {names[m]} and its identity SavedModel", file=sys.stderr,
              flush=True)
    extra = ["--inter_op", str(args.inter_op), "--intra_op", str(args.intra_op),
             "--workers", str(args.server_workers)]
    store = SQLiteCacheStore(os.path.join(work, "cache.db"))
    payloads: Dict = {}
    rows: List[Dict] = []
    try:
        for k, procs in enumerate(procs_list):
            proc, address = start_server(base, [], os.path.join(args.out, f"server-p{procs}.log"),
                                         extra + ["--processes", str(procs)])
            print(f"[bench] server pid {proc.pid} ({procs} processes) on {address}",
                  file=sys.stderr, flush=True)
            try:
                if not payloads:        # caches via user_tower, then the requests, once
                    rng = np.random.default_rng(args.seed + 2)
                    cate = item_cate(args.seed)
                    for m in rank_models:
                        with RankingClient(address, names[m], store, timeout_s=300) as c:
                            req = c._request("user_tower", 1)
                            protos.fill_tensor_proto(req.inputs["records"],
                                                     np.array(records, dtype=object))
                            out = c.predict(req)
                            uids = [int(u) for u in out.pop("user_id")]
                            reqs, ident = [], []
                            for i, u in enumerate(uids):
                                store.put((names[m], u, 1, {k2: v[i:i + 1]
                                                            for k2, v in out.items()}))
                                items = rng.integers(2, NUM_ITEMS + 2, size=n)
                                r = c.rank_request(store.get(names[m], u),
                                                   (items, cate[items]), imp_ts=1_600_000_000)
                                reqs.append(r.SerializeToString())
                                r.model_spec.name = f"identity_sm_{m}_L{L}"
                                ident.append(r.SerializeToString())
                        payloads[("rank", m)] = reqs
                        payloads[("identity_sm", m)] = ident
                rows += measure_load(args, address, lambda: process_tree(proc.pid), payloads,
                                     procs, n)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except Exception:  # noqa: BLE001
                    proc.kill()
    finally:
        store.close()
    return {"load_rows": aggregate(rows), "load_rounds": rows, "L": L, "N": n,
            "rank_models": rank_models, "rounds": args.load_rounds,
            "processes": procs_list, "load": args.load, "rate": args.rate,
            "load_threads": parse_ints(args.load_threads, "load_threads"),
            "load_seconds": args.load_seconds, "server_workers": args.server_workers}


# ---- report ------------------------------------------------------------------------------------
def aggregate(rows: List[Dict]) -> List[Dict]:
    """One row per (processes, mode, path, model, threads / rate) over the rounds: the
    median of req/s, p50, p99 and the CPU figures, errors and requests summed; on each
    ``rank`` row, ``ratio`` = the median over rounds of rank req/s / identity
    SavedModel req/s *of the same round* (paired, measured back to back: what machine
    load does to both cancels more than in the medians' ratio), with its min and max."""
    def key(r):
        return (r["processes"], r["mode"], r["kind"], r["model"], r["threads"], r["rate"])

    groups: Dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
        a = dict(rs[0])
        a.pop("round", None)
        a.update(rounds=len(rs), rps=med("rps"), p50_ms=med("p50_ms"), p99_ms=med("p99_ms"),
                 seconds=sum(r["seconds"] for r in rs),
                 requests=sum(r["requests"] for r in rs), errors=sum(r["errors"] for r in rs),
                 server_cpu_ms_per_req=med("server_cpu_ms_per_req"),
                 client_cpu_ms_per_req=med("client_cpu_ms_per_req"),
                 server_cores=med("server_cores"), loadavg=med("loadavg"))
        kinds: Dict[str, int] = {}
        for r in rs:
            for e, c in r["error_kinds"].items():
                kinds[e] = kinds.get(e, 0) + c
        a["error_kinds"] = kinds
        if a["kind"] == "rank":
            floor = {r["round"]: r for r in groups.get(
                (k[0], k[1], "identity_sm", k[3], k[4], k[5]), [])}
            ratios = [r["rps"] / floor[r["round"]]["rps"] for r in rs
                      if r["round"] in floor and floor[r["round"]]["rps"] > 0]
            if ratios:
                a.update(ratio=float(np.median(ratios)), ratio_min=min(ratios),
                         ratio_max=max(ratios))
        out.append(a)
    return out


def _find(rows, mode, kind, model, procs, threads=None) -> Optional[Dict]:
    for r in rows:
        if (r["mode"], r["kind"], r["model"], r["processes"]) == (mode, kind, model, procs) \
                and (threads is None or r["threads"] == threads):
            return r
    return None


def load_targets(res: Dict, at_threads: int = 8) -> List[Dict]:
    """Issue 20's targets per model and server size: rank req/s / identity SavedModel
    req/s at ``at_threads`` client threads (goal >= 70%; the paired median over rounds,
    :func:`aggregate`), rank p99 / its p50 (<= 3)."""
    out = []
    for m in res["rank_models"]:
        for p in res["processes"]:
            a = _find(res["load_rows"], "closed", "rank", m, p, at_threads)
            if a and "ratio" in a:
                out.append({"target": f"{m} rank req/s / identity SavedModel req/s, "
                                      f"{at_threads} threads, {p} process(es)",
                            "value": a["ratio"], "range": (a["ratio_min"], a["ratio_max"]),
                            "goal": ">= 70%", "unit": ""})
            b = _find(res["load_rows"], "closed", "identity_sm", m, p, at_threads)
            if a and b:
                # what the req/s ratio tends to when the CPUs are the limit (every core busy,
                # server and client on one machine): CPU per request, server + client
                cost = lambda r: r["server_cpu_ms_per_req"] + r["client_cpu_ms_per_req"]  # noqa
                if cost(a) > 0:
                    out.append({"target": f"{m} rank / identity SavedModel expected when "
                                          f"CPU-bound (CPU ms per request, server + client: "
                                          f"{cost(b):.2f} / {cost(a):.2f}), {at_threads} "
                                          f"threads, {p} process(es)",
                                "value": cost(b) / cost(a), "range": None,
                                "goal": "(>= 70%)", "unit": ""})
            if a and a["p50_ms"] > 0:
                out.append({"target": f"{m} rank p99 / p50, {at_threads} threads, "
                                      f"{p} process(es)",
                            "value": a["p99_ms"] / a["p50_ms"], "goal": "<= 3", "unit": "x"})
    return out


def print_load(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print(f"rank at N = {res['N']}, L = {res['L']:,}; server --workers {res['server_workers']}; "
          f"{res['rounds']} rounds x {res['load_seconds']} s per row (medians over rounds; "
          f"rank / identity = paired per round)\n")
    print("| processes | load | path | model | req/s | rank / identity | p50 ms | p99 ms | "
          "errors | server CPU ms/req | server cores | client CPU ms/req |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"rank": 0, "identity_sm": 1}
    for r in sorted(res["load_rows"], key=lambda r: (r["processes"], r["mode"],
                                                     r["threads"] if r["mode"] == "closed"
                                                     else 0, order[r["kind"]], r["model"])):
        how = (f"{r['threads']} threads" if r["mode"] == "closed"
               else f"open {r['rate']:g}/s")
        path = "rank" if r["kind"] == "rank" else "identity SavedModel"
        err = r["errors"] if not r["errors"] else f"{r['errors']} {r['error_kinds']}"
        ratio = f"{r['ratio'] * 100:.0f}%" if "ratio" in r else ""
        print(f"| {r['processes']} | {how} | {path} | {r['model']} | {r['rps']:.0f} | {ratio} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {err} | "
              f"{r['server_cpu_ms_per_req']:.2f} | {r['server_cores']:.2f} | "
              f"{r['client_cpu_ms_per_req']:.2f} |")
    if res.get("targets"):
        print("\n| target | value | goal |")
        print("|---|---|---|")
        for t in res["targets"]:
            if t["unit"] == "x":
                v = f"{t['value']:.2f}x"
            elif t.get("range"):
                v = (f"{t['value'] * 100:.0f}% (rounds {t['range'][0] * 100:.0f}-"
                     f"{t['range'][1] * 100:.0f}%)")
            else:
                v = f"{t['value'] * 100:.0f}%"
            print(f"| {t['target']} | {v} | {t['goal']} |")


def plot_load(res: Dict, path: str) -> Optional[str]:
    """Two panels over client threads (closed loop): requests/s, and p50 / p99 latency;
    rank solid, identity SavedModel dashed, one colour per (model, processes)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    rows = [r for r in res["load_rows"] if r["mode"] == "closed"]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    series = sorted({(r["model"], r["processes"]) for r in rows})
    for i, (m, p) in enumerate(series):
        c = palette[i % len(palette)]
        for kind, ls, name in (("rank", "-", "rank"), ("identity_sm", "--", "identity SM")):
            pts = sorted((r["threads"], r) for r in rows
                         if (r["kind"], r["model"], r["processes"]) == (kind, m, p))
            if not pts:
                continue
            xs = [t for t, _ in pts]
            label = f"{name} ({m}, {p} proc)"
            a1.plot(xs, [r["rps"] for _, r in pts], ls=ls, marker="o", color=c, label=label)
            a2.plot(xs, [r["p99_ms"] for _, r in pts], ls=ls, marker="o", color=c,
                    label=f"p99 {label}")
            a2.plot(xs, [r["p50_ms"] for _, r in pts], ls=ls, marker="x", color=c, alpha=0.45,
                    label=f"p50 {label}")
    ticks = sorted({r["threads"] for r in rows})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("client threads (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
    a1.set_ylabel("requests/s")
    a2.set_ylabel("latency (ms)")
    a2.set_yscale("log")
    a1.legend(fontsize=7)
    a2.legend(fontsize=6, ncol=2)
    fig.suptitle(f"lifelong bench serving --load: rank N={res['N']}, L={res['L']:,} vs its "
                 "identity SavedModel, same server")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
