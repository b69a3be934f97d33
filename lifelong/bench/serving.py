"""``lifelong bench serving``: gRPC latency of ``rank`` against its floors; numbers, not timed tests.

All in one run, one server process, one client process:

* ``rank`` of each ``--rank_models`` model through gRPC (the real client:
  cache-store read, request built from NumPy bytes, Predict, decode) for
  ``--candidates`` N in 1, 100, 1,000 at long lengths ``--long_lens`` L in 100,
  1,000, 10,000 (one export per L: the cache shapes of some methods depend on L);
* DIN-L's ``serving_default`` on the same requests (the user's raw windows tiled
  to N rows + the candidates: the one-shot path without a cache);
* an identity servable (no model; decodes the request and returns zeros) sent
  exactly the ``rank`` request: the floor of gRPC + serialization in this server;
* an identity SavedModel (:func:`export_identity_model`: the ``rank`` signature's
  inputs, ``ctr`` = zeros [N], no computation) sent the same request: the floor
  a TensorFlow Serving deployment has, which can only serve SavedModels, so it
  adds one session call with the payload fed in. Both floors are reported; the
  issue's "identity model" target is given against each.

``rank`` is exported with ``jit_rank`` (XLA; ``--no_jit_rank`` to measure without)
and the server runs with ``--inter_op -1`` (its default, TF Serving's
``--tensorflow_inter_op_parallelism=-1``): the recommended ranking deployment.

Models are untrained exports with small dimensions built from a synthetic
vocabulary (the cost of a forward pass does not depend on the weights'
values). The rank and identity configurations of one N are measured in
interleaved rounds so that machine noise hits them alike (ratios from one run
are what to compare; ``../shared/ANCHORS.md``). Prints a Markdown table, the
target ratios and the command line; writes ``results.json``
(:mod:`lifelong.bench.record`) and a PNG. The users and untrained models are
:mod:`lifelong.bench.workload`'s; ``lifelong bench precompute`` is
:mod:`lifelong.bench.precompute`.

``--load closed|open`` replaces the latency table by throughput under concurrent
load (requests/s, p50, p99 and errors of ``rank`` against its identity SavedModel on
the same server, per client-thread count and server ``--processes``):
:mod:`lifelong.bench.serving_load`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lifelong.bench import record
from lifelong.bench.flags import check_serving_flags, parse_ints, parse_rank_buckets
from lifelong.bench.workload import NUM_ITEMS, item_cate, synthetic_records, untrained_model
from tfmodels.errors import UsageError

# the repository root (the server subprocess runs from it)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- timing helpers ----------------------------------------------------------------------------
def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1e3 if len(xs) else float("nan")


def _throughput(fn, threads: int, seconds: float) -> float:
    """Requests/s of ``threads`` threads calling ``fn(i)`` for ``seconds`` (bounded loop)."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    errors: List[BaseException] = []

    def worker(t):
        i = t
        while time.perf_counter() < stop and counts[t] < 100_000:
            try:
                fn(i)
            except BaseException as e:  # surfaced after the run
                errors.append(e)
                return
            counts[t] += 1
            i += threads

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


# ---- server process ------------------------------------------------------------------------------
#: seconds the bench waits for the server's next loaded version (or for it to listen)
START_STALL_S = 300


def start_server(base: str, identity: Sequence[str], log_path: str,
                 extra: Sequence[str] = ()) -> Tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lifelong.bench.identity", "--base", base, "--port", "0",
           "--poll_s", "0", "--max_request_mb", "1024", "--max_elements", "200000000",
           "--identity", ",".join(identity), *extra]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, wait_until_listening(proc, log_path)


def wait_until_listening(proc: subprocess.Popen, log_path: str,
                         stall_s: Optional[float] = None) -> str:
    """The address a starting server process logs (``listening on ADDRESS;``).

    The server loads (and warms up) one version after another before it listens: with
    13 models on a loaded machine that took over 300 s. So the limit is on the time
    WITHOUT progress (no new ``] loaded `` line), ``stall_s`` (default
    :data:`START_STALL_S`), not on the whole start. Raises RuntimeError when the process
    exits or stalls (and terminates it then)."""
    stall_s = START_STALL_S if stall_s is None else stall_s
    deadline, loaded = time.time() + stall_s, 0
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        with open(log_path) as f:
            lines = f.readlines()
        for line in lines:
            if "listening on " in line:
                return line.split("listening on ")[1].split(";")[0].strip()
        now_loaded = sum(1 for line in lines if "] loaded " in line)
        if now_loaded > loaded:
            loaded, deadline = now_loaded, time.time() + stall_s
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"server did not start: no progress for {stall_s:g} s after "
                       f"{loaded} loaded version(s); see {log_path}")


# ---- identity SavedModel ------------------------------------------------------------------------
def export_identity_model(like: str, base: str, name: str, version: int = 1) -> str:
    """Write ``<base>/<name>/<version>/``: a SavedModel whose ``rank`` signature takes
    exactly the inputs of the ``rank`` signature of the export at ``like`` (names,
    dtypes, shapes) and returns ``ctr`` = zeros [N] (N = rows of ``target_item_id``),
    computing nothing from the rest. Timed against ``rank`` it is the floor of a
    TensorFlow Serving deployment: gRPC, (de)serialization, the payload fed into a
    session, one session call. Written to a temporary folder and renamed into place."""
    import uuid
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from serving import export as E
    from serving.servable import spec_from_tensor_info

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(like, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    sig = sm.meta_graphs[0].signature_def["rank"]
    specs = {}
    for key, info in sig.inputs.items():
        spec = spec_from_tensor_info(info)     # the server's reading of a signature input
        specs[key] = tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), key)
    if "target_item_id" not in specs:
        raise UsageError(f"{like}: its rank signature has no target_item_id input")

    def rank(inputs):
        return {"ctr": tf.zeros(tf.shape(inputs["target_item_id"])[:1], tf.float32)}

    fn = tf.function(rank, input_signature=[specs], autograph=False).get_concrete_function()
    mdir = E.model_dir(base, E.validate_model_name(name))
    os.makedirs(mdir, exist_ok=True)
    final = E.version_dir(base, name, version)
    tmp = os.path.join(mdir, f"{E.TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    tf.saved_model.save(tf.Module(), tmp, signatures={"rank": fn})
    os.rename(tmp, final)
    E.write_models_config(base)
    return final


# ---- bench serving -------------------------------------------------------------------------------
def bench_serving(args) -> Dict:
    import tfmodels  # noqa: F401
    import tensorflow as tf
    from tfmodels import data as D
    from serving import protos
    from serving.cache_store import SQLiteCacheStore
    from serving.client import RankingClient
    from serving.export import export_model

    lens = sorted(parse_ints(args.long_lens, "long_lens"))
    ns = sorted(parse_ints(args.candidates, "candidates"))
    rank_models = [m for m in args.rank_models.split(",") if m]
    ladders = parse_rank_buckets(getattr(args, "rank_buckets", "fine"))
    if len(ladders) > 1:                     # one export per ladder, timed as MODEL.LADDER
        rank_models = [f"{m}.{b}" for m in rank_models for b in ladders]
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    t_setup = time.perf_counter()
    records = synthetic_records(args.users, max(lens) + args.short_len,
                                max(lens) + args.short_len + 100, args.seed)
    exports = {}
    for L in lens:
        for m in dict.fromkeys(rank_models + [args.one_shot_model]):
            name = f"{m}_L{L}"
            registered, _, ladder = m.partition(".")
            exports[(m, L)] = export_model(untrained_model(args, registered, L), base, name, 1,
                                           jit_rank=args.jit_rank,
                                           rank_buckets=ladder or ladders[0])["name"]
            print(f"[bench] exported {name}", file=sys.stderr, flush=True)
    for m in rank_models:
        for L in lens:
            export_identity_model(os.path.join(base, exports[(m, L)], "1"), base,
                                  f"identity_sm_{m}_L{L}")
    identity = [f"identity_{m}_L{L}" for m in rank_models for L in lens]
    proc, address = start_server(base, identity, os.path.join(args.out, "server.log"),
                                 ["--inter_op", str(args.inter_op),
                                  "--intra_op", str(args.intra_op)])
    print(f"[bench] server pid {proc.pid} on {address}", file=sys.stderr, flush=True)
    store = SQLiteCacheStore(os.path.join(work, "cache.db"))
    clients: Dict[Tuple[str, str, int], RankingClient] = {}
    results = []
    try:
        # caches through the user_tower signature (gRPC), stored like precompute does
        for m in rank_models:
            for L in lens:
                c = RankingClient(address, exports[(m, L)], store, timeout_s=60)
                req = c._request("user_tower", 1)
                protos.fill_tensor_proto(req.inputs["records"], np.array(records, dtype=object))
                out = c.predict(req, timeout_s=300)
                uids = out.pop("user_id")
                for i, u in enumerate(uids):
                    t = {k: v[i:i + 1] for k, v in out.items()}
                    store.put((exports[(m, L)], int(u), 1, t))
                    store.put((f"identity_{m}_L{L}", int(u), 1, t))
                    store.put((f"identity_sm_{m}_L{L}", int(u), 1, t))
                clients[("rank", m, L)] = c
                for kind in ("identity", "identity_sm"):
                    clients[(kind, m, L)] = RankingClient(address, f"{kind}_{m}_L{L}",
                                                          store, timeout_s=60)
        user_ids = [int(u) for u in uids]
        cate = item_cate(args.seed)
        rng = np.random.default_rng(args.seed + 2)
        cands = {}
        for n in ns:
            items = rng.integers(2, NUM_ITEMS + 2, size=(len(user_ids), n))
            cands[n] = [(items[i], cate[items[i]]) for i in range(len(user_ids))]
        # raw per-user features for the one-shot path
        user_feats = {}
        for L in lens:
            fs = untrained_model(args, args.one_shot_model, L).feature_schema
            feats = D.user_history_features(tf.constant(records), fs)
            user_feats[L] = [{k: v[i:i + 1].numpy() for k, v in feats.items()
                              if k not in ("user_id", "imp_ts")} for i in range(len(records))]
            clients[("one_shot", args.one_shot_model, L)] = RankingClient(
                address, exports[(args.one_shot_model, L)], store, timeout_s=600)
        print(f"[bench] setup {time.perf_counter() - t_setup:.0f}s; measuring", file=sys.stderr,
              flush=True)
        now = 1_600_000_000

        def call(kind, m, L, n, i):
            u = i % len(user_ids)
            c = clients[(kind, m, L)]
            if kind == "one_shot":
                return c.one_shot(user_ids[u], user_feats[L][u], cands[n][u], imp_ts=now)
            return c.rank(user_ids[u], cands[n][u], imp_ts=now)

        for n in ns:
            configs = [(k, m, L) for m in rank_models for L in lens
                       for k in ("rank", "identity", "identity_sm")]
            for cfg in configs:                     # warm-up
                for i in range(5):
                    call(*cfg, n, i)
            lat = {cfg: [] for cfg in configs}
            per_round = max(1, args.requests // max(1, args.rounds))
            for r in range(args.rounds):
                for cfg in configs:
                    for i in range(per_round):
                        t0 = time.perf_counter()
                        call(*cfg, n, r * per_round + i)
                        lat[cfg].append(time.perf_counter() - t0)
            for cfg in configs:
                rps = _throughput(lambda i, cfg=cfg: call(*cfg, n, i), args.threads, args.seconds)
                results.append({"kind": cfg[0], "model": cfg[1], "L": cfg[2], "N": n,
                                "p50_ms": _pct(lat[cfg], 50), "p99_ms": _pct(lat[cfg], 99),
                                "req_per_s": rps, "requests": len(lat[cfg]),
                                "throughput": f"{args.threads} threads"})
                print(f"[bench] {cfg[0]:>8} {cfg[1]} L={cfg[2]} N={n}: p50 "
                      f"{results[-1]['p50_ms']:.2f} ms, {rps:.0f} req/s", file=sys.stderr,
                      flush=True)
            for L in lens:                          # DIN-L one-shot on the same requests
                cfg = ("one_shot", args.one_shot_model, L)
                call(*cfg, n, 0)
                lat_os, t_start = [], time.perf_counter()
                while (len(lat_os) < args.requests and
                       (time.perf_counter() - t_start < args.one_shot_budget_s or len(lat_os) < 3)):
                    t0 = time.perf_counter()
                    call(*cfg, n, len(lat_os))
                    lat_os.append(time.perf_counter() - t0)
                p50 = _pct(lat_os, 50)
                if p50 < 50:
                    rps = _throughput(lambda i, cfg=cfg: call(*cfg, n, i), args.threads,
                                      args.seconds)
                    how = f"{args.threads} threads"
                else:                               # too slow (and too big) for 4 at once
                    rps, how = 1e3 / float(np.mean(lat_os) * 1e3), "sequential"
                results.append({"kind": "one_shot", "model": args.one_shot_model, "L": L, "N": n,
                                "p50_ms": p50, "p99_ms": _pct(lat_os, 99), "req_per_s": rps,
                                "requests": len(lat_os), "throughput": how})
                print(f"[bench] one_shot {args.one_shot_model} L={L} N={n}: p50 {p50:.2f} ms "
                      f"({len(lat_os)} requests)", file=sys.stderr, flush=True)
    finally:
        for c in clients.values():
            c.close()
        store.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"rows": results, "lens": lens, "candidates": ns, "rank_models": rank_models,
            "one_shot_model": args.one_shot_model}


def _find(rows, kind, model, L, n) -> Optional[Dict]:
    for r in rows:
        if (r["kind"], r["model"], r["L"], r["N"]) == (kind, model, L, n):
            return r
    return None


def serving_ratios(res: Dict) -> List[Dict]:
    """The issue's three targets, from one run."""
    rows, lens, ns = res["rows"], res["lens"], res["candidates"]
    out = []
    for m in res["rank_models"]:
        for n in ns:
            a, b = _find(rows, "rank", m, lens[-1], n), _find(rows, "rank", m, lens[0], n)
            if a and b:
                out.append({"target": f"{m} rank p50 L={lens[-1]} / L={lens[0]}, N={n}",
                            "value": a["p50_ms"] / b["p50_ms"], "goal": "<= 1.1"})
        if 100 in ns:
            for floor, label in (("identity", "identity"),
                                 ("identity_sm", "identity SavedModel")):
                for L in lens:
                    a, b = _find(rows, "rank", m, L, 100), _find(rows, floor, m, L, 100)
                    if a and b:
                        out.append({"target": f"{m} rank p50 / {label} p50, N=100, L={L}",
                                    "value": a["p50_ms"] / b["p50_ms"], "goal": "<= 2"})
        for L, goal in ((1000, ">= 10"), (10000, ">= 100")):
            a = _find(rows, "one_shot", res["one_shot_model"], L, 1000)
            b = _find(rows, "rank", m, L, 1000)
            if a and b:
                out.append({"target": f"{res['one_shot_model']} one-shot p50 / {m} rank p50, "
                                      f"N=1000, L={L}",
                            "value": a["p50_ms"] / b["p50_ms"], "goal": goal})
    return out


def _plot(res: Dict, path: str) -> Optional[str]:
    """p50 per configuration. Several long lengths: one panel per N with L on the x
    axis (does ``rank`` stay flat in L?); one long length: a single panel with N on
    the x axis. Each rank model has its colour; with several rank models their
    floors (the payload differs per model) are drawn in the model's colour, dashed
    (identity) and dotted (identity SavedModel)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    by_l = len(res["lens"]) > 1
    panels = res["candidates"] if by_l else res["lens"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) if by_l else 7, 4.6),
                             sharey=True, squeeze=False)
    models = list(res["rank_models"])
    several = len(models) > 1
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
               "tab:cyan", "black"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(models)}

    def style(kind, m):
        if kind == "rank":
            return dict(color=color[m], marker="o", ls="-", label=f"rank ({m})")
        if kind == "one_shot":
            return dict(color="tab:red", marker="^", ls="-", label=f"serving_default ({m}, one-shot)")
        name = {"identity": "identity floor (no model)",
                "identity_sm": "identity SavedModel floor"}[kind]
        if several:      # one legend entry per line style (proxies below), not per model
            return dict(color=color[m], marker=None, ls="--" if kind == "identity" else ":",
                        label=None)
        return dict(color="tab:gray" if kind == "identity" else "tab:olive",
                    marker="s" if kind == "identity" else "D", ls="-", label=name)

    for ax, panel in zip(axes[0], panels):
        for kind in ("rank", "identity", "identity_sm", "one_shot"):
            for m in ([res["one_shot_model"]] if kind == "one_shot" else models):
                pts = [((r["L"] if by_l else r["N"]), r["p50_ms"]) for r in res["rows"]
                       if r["kind"] == kind and r["model"] == m
                       and (r["N"] if by_l else r["L"]) == panel]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, **style(kind, m))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"N = {panel} candidates" if by_l else f"L = {panel} long behaviors")
        ax.set_xlabel("long sequence length L" if by_l else "candidates per request N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("p50 latency per request (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:                       # series missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if several:
        from matplotlib.lines import Line2D
        for ls, name in (("--", "identity floor (no model)"), (":", "identity SavedModel floor")):
            handles.append(Line2D([], [], color="tab:gray", ls=ls))
            labels.append(f"{name}, in each model's colour (its payload)")
    fig.suptitle("lifelong bench serving: gRPC p50, local server")
    if by_l:
        ncol = min(len(labels), 4)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.045 * -(-len(labels) // ncol) + 0.03, 1, 1))
    else:
        fig.set_size_inches(11, 4.6)
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.64, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_serving(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print("| path | model | L | N | p50 ms | p99 ms | req/s | throughput |")
    print("|---|---|---|---|---|---|---|---|")
    order = {"rank": 0, "identity": 1, "identity_sm": 2, "one_shot": 3}
    for r in sorted(res["rows"], key=lambda r: (r["N"], order[r["kind"]], r["model"], r["L"])):
        path = {"rank": "rank", "identity": "identity floor",
                "identity_sm": "identity SavedModel floor",
                "one_shot": "serving_default (one-shot)"}[r["kind"]]
        rps = f"{r['req_per_s']:.0f}" if r["req_per_s"] >= 10 else f"{r['req_per_s']:.2f}"
        print(f"| {path} | {r['model']} | {r['L']:,} | {r['N']:,} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {rps} | {r['throughput']} |")
    print("\n| target | value | goal |")
    print("|---|---|---|")
    for t in res["ratios"]:
        print(f"| {t['target']} | {t['value']:.2f}x | {t['goal']} |")


# ---- entry -----------------------------------------------------------------------------------
def _measure(args) -> Dict:
    if args.load:           # throughput under concurrent load (lifelong/bench/serving_load.py)
        from lifelong.bench import serving_load as SL
        res = SL.bench_load(args)
        res["targets"] = SL.load_targets(res)
        res["plot"] = SL.plot_load(res, os.path.join(args.out, "bench_serving_load.png"))
        return res
    res = bench_serving(args)
    res["ratios"] = serving_ratios(res)
    res["plot"] = _plot(res, os.path.join(args.out, "bench_serving.png"))
    return res


def _show(res: Dict, command: str) -> None:
    if "load_rows" in res:
        from lifelong.bench.serving_load import print_load
        print_load(res, command)
    else:
        print_serving(res, command)
    if res.get("plot"):
        print(f"\nplot: {res['plot']}")


def cacheable_models() -> List[str]:
    """Every registered method whose ``rank`` reads a user cache (it has a long-sequence
    module), once: registry entries with a preset (named ablations and variants such as
    ``din_l_none``, ``encode_no_loss``) run the same ``rank`` code as their method and
    are left out; ``din`` (no long module, nothing cached) too."""
    from tfmodels import registry
    return [m for m in registry.names()
            if registry.long_module_class(m) is not None and not registry.preset_config(m)]


def resolve_rank_models(value: str, load: bool = False) -> str:
    """``--rank_models``: empty (the default) = ``all`` for the latency table, ``avg_pool``
    for ``--load`` (its documented default); ``all`` = :func:`cacheable_models`. Unknown
    names are one :class:`UsageError` before anything is exported."""
    from tfmodels import registry
    names = [m for m in str(value or "").split(",") if m]
    if not names:
        names = ["avg_pool"] if load else ["all"]
    if "all" in names:
        names = [m for m in names if m != "all"] + cacheable_models()
    names = list(dict.fromkeys(names))
    unknown = [m for m in names if m not in registry.names()]
    if unknown:
        raise UsageError(f"--rank_models: unknown model(s) {unknown}; registered: "
                         f"{', '.join(registry.names())} (or all)")
    return ",".join(names)


def run(args) -> int:
    check_serving_flags(args)
    if getattr(args, "what", "serving") == "serving":
        args.rank_models = resolve_rank_models(args.rank_models, bool(getattr(args, "load", "")))
    return record.run_in_folder(args, _measure, _show)
