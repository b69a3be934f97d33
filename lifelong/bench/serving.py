"""``lifelong bench serving`` and ``lifelong bench precompute``: numbers, not timed tests.

``bench serving`` (all in one run, one server process, one client process):

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
target ratios and the command line; writes ``results.json`` and a PNG.

``bench precompute``: users/s of the Beam precompute (``beam_jobs.precompute``,
DirectRunner, in process) at L = ``--precompute_long_len`` for each model, with
the cache bytes per user (the stored entry and the TFRecord).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong bench serving|precompute`` (no TensorFlow import)."""
    p.add_argument("what", choices=["serving", "precompute"], help="which benchmark")
    p.add_argument("--long_lens", default="100,1000,10000", help="L values (default 100,1000,10000)")
    p.add_argument("--candidates", default="1,100,1000", help="N values (default 1,100,1000)")
    p.add_argument("--rank_models", default="avg_pool",
                   help="serving: models whose `rank` is timed (default avg_pool)")
    p.add_argument("--one_shot_model", default="din_l",
                   help="serving: model whose serving_default is timed (default din_l)")
    p.add_argument("--models", default="",
                   help="precompute: comma separated models (default: every registered model)")
    p.add_argument("--short_len", type=int, default=50, help="S (default 50)")
    p.add_argument("--emb_dim", type=int, default=8, help="embedding size per field (default 8)")
    p.add_argument("--din_hidden", default="16,8", help="DIN attention MLP (default 16,8)")
    p.add_argument("--mlp_hidden", default="32,16", help="head MLP (default 32,16)")
    p.add_argument("--users", type=int, default=8, help="serving: users cycled through (default 8)")
    p.add_argument("--requests", type=int, default=300,
                   help="serving: sequential requests per configuration (default 300)")
    p.add_argument("--rounds", type=int, default=6,
                   help="serving: interleaved rounds the requests are split into (default 6)")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="serving: throughput window per configuration (default 1.0)")
    p.add_argument("--threads", type=int, default=4, help="serving: client threads (default 4)")
    p.add_argument("--one_shot_budget_s", type=float, default=10.0,
                   help="serving: time budget per one-shot configuration (default 10)")
    p.add_argument("--precompute_users", type=int, default=1000,
                   help="precompute: users (default 1000)")
    p.add_argument("--precompute_long_len", type=int, default=1000,
                   help="precompute: L (default 1000)")
    p.add_argument("--no_jit_rank", dest="jit_rank", action="store_false",
                   help="serving: export rank WITHOUT XLA (default: `lifelong export --jit_rank`, "
                   "the recommended ranking deployment)")
    p.add_argument("--inter_op", type=int, default=-1,
                   help="serving: the server's --inter_op (default -1, its default)")
    p.add_argument("--intra_op", type=int, default=0,
                   help="serving: the server's --intra_op (default 0, its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default artifacts/bench-<what>-<time>)")


def _ints(text: str) -> List[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


# ---- synthetic users -------------------------------------------------------------------------
NUM_ITEMS, NUM_CATES = 10_000, 100


def _vocab():
    from tfmodels import schema as S
    return S.Vocab(NUM_ITEMS + S.FIRST_ID, NUM_CATES + S.FIRST_ID, 100_000 + S.FIRST_ID)


def _item_cate(seed: int) -> np.ndarray:
    from tfmodels import schema as S
    rng = np.random.default_rng(seed)
    return rng.integers(S.FIRST_ID, S.FIRST_ID + NUM_CATES, size=NUM_ITEMS + S.FIRST_ID)


def synthetic_records(n_users: int, min_hist: int, max_hist: int, seed: int) -> List[bytes]:
    """Per-user records (no impressions) with ``min_hist..max_hist`` behaviors each."""
    from tfmodels import schema as S
    rng = np.random.default_rng(seed + 1)
    cate = _item_cate(seed)
    out = []
    for u in range(n_users):
        h = int(rng.integers(min_hist, max_hist + 1))
        items = rng.integers(S.FIRST_ID, S.FIRST_ID + NUM_ITEMS, size=h)
        ts = 1_500_000_000 + np.cumsum(rng.integers(1, 600, size=h))
        hist = {"hist_item_id": items, "hist_cate_id": cate[items], "hist_ts": ts,
                "hist_engage": rng.random(h), "hist_domain": np.full(h, S.DEFAULT_DOMAIN)}
        imps = {k: [] for k in S.IMPRESSION_FIELDS}
        out.append(S.encode_user_record(S.FIRST_ID + u, f"u{u}", hist, imps))
    return out


def _model(args, name: str, L: int):
    import tensorflow as tf
    from tfmodels import schema as S
    from tfmodels.model import build_model
    from tfmodels.train import TrainConfig
    tf.keras.utils.set_random_seed(args.seed)
    fs = S.FeatureSchema(_vocab(), args.short_len, L)
    return build_model(fs, name, emb_dim=args.emb_dim, mlp_hidden=_ints(args.mlp_hidden),
                       din_hidden=_ints(args.din_hidden),
                       din_normalize=TrainConfig().din_normalize)   # as `lifelong train`


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
def start_server(base: str, identity: Sequence[str], log_path: str,
                 extra: Sequence[str] = ()) -> Tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "serving.server", "--base", base, "--port", "0",
           "--poll_s", "0", "--max_request_mb", "1024", "--max_elements", "200000000",
           "--identity", ",".join(identity), *extra]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        with open(log_path) as f:
            for line in f:
                if "listening on " in line:
                    return proc, line.split("listening on ")[1].split(";")[0].strip()
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server did not start within 300 s; see {log_path}")


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
    from serving.server import _spec_from_tensor_info

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(like, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    sig = sm.meta_graphs[0].signature_def["rank"]
    specs = {}
    for key, info in sig.inputs.items():
        spec = _spec_from_tensor_info(info)    # the server's reading of a signature input
        specs[key] = tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), key)
    if "target_item_id" not in specs:
        raise ValueError(f"{like}: its rank signature has no target_item_id input")

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

    lens, ns = sorted(_ints(args.long_lens)), sorted(_ints(args.candidates))
    rank_models = [m for m in args.rank_models.split(",") if m]
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
            exports[(m, L)] = export_model(_model(args, m, L), base, name, 1,
                                           jit_rank=args.jit_rank)["name"]
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
        cate = _item_cate(args.seed)
        rng = np.random.default_rng(args.seed + 2)
        cands = {}
        for n in ns:
            items = rng.integers(2, NUM_ITEMS + 2, size=(len(user_ids), n))
            cands[n] = [(items[i], cate[items[i]]) for i in range(len(user_ids))]
        # raw per-user features for the one-shot path
        user_feats = {}
        for L in lens:
            fs = _model(args, args.one_shot_model, L).feature_schema
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


# ---- bench precompute ----------------------------------------------------------------------------
def bench_precompute(args) -> Dict:
    import tfmodels  # noqa: F401
    import tensorflow as tf
    from tfmodels import registry
    from beam_jobs import precompute as P
    from serving.cache_store import SQLiteCacheStore
    from serving.export import export_model

    L = args.precompute_long_len
    models = [m for m in args.models.split(",") if m] or registry.names()
    work = os.path.join(args.out, "work")
    base = os.path.join(work, "saved_models")
    os.makedirs(base, exist_ok=True)
    rec_path = os.path.join(work, "users-00000-of-00001.tfrecord.gz")
    records = synthetic_records(args.precompute_users, L, L + 200, args.seed)
    with tf.io.TFRecordWriter(rec_path, options="GZIP") as w:
        for r in records:
            w.write(r)
    rows = []
    for m in models:
        out = export_model(_model(args, m, L), base, m, 1)
        ns = argparse.Namespace(records=rec_path, model=m, base=base, version=1, model_dir=None,
                                output=os.path.join(work, f"cache_{m}"), num_shards=1,
                                no_reshuffle=False, store=None)
        store = SQLiteCacheStore(os.path.join(work, f"cache_{m}.db"))
        rep = P.run(ns, ["--direct_num_workers=1"], store=store)
        entry = store.get(m, 2)
        store.close()
        rows.append({"model": m, "L": L, "users": rep["users"], "wall_s": rep["wall_s"],
                     "users_per_s": rep["users_per_s"],
                     "store_bytes_per_user": entry.nbytes if entry else None,
                     "record_bytes_per_user": rep.get("record_bytes_per_user"),
                     "cache_tensors": {k: list(v.shape) for k, v in entry.tensors.items()}
                     if entry else {}, "export_s": out["wall_s"]})
        print(f"[bench] precompute {m}: {rep['users_per_s']:.0f} users/s, "
              f"{rows[-1]['store_bytes_per_user']} B/user", file=sys.stderr, flush=True)
    return {"rows": rows, "L": L, "users": args.precompute_users}


def print_precompute(res: Dict, command: str) -> None:
    print(f"command: {command}\n")
    print(f"| model | L | users | wall s | users/s | stored bytes/user | record bytes/user | "
          f"cache tensors (per user) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        tensors = ", ".join(f"{k} {v}" for k, v in r["cache_tensors"].items())
        print(f"| {r['model']} | {r['L']:,} | {r['users']} | {r['wall_s']:.1f} | "
              f"{r['users_per_s']:.0f} | {r['store_bytes_per_user']:,} | "
              f"{r['record_bytes_per_user']:,.0f} | {tensors} |")


# ---- entry -----------------------------------------------------------------------------------
def run(args) -> int:
    command = "lifelong bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    args.out = args.out or os.path.join("artifacts",
                                        f"bench-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(args.out, exist_ok=True)
    env = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    if args.what == "serving":
        res = bench_serving(args)
        res["ratios"] = serving_ratios(res)
        res["plot"] = _plot(res, os.path.join(args.out, "bench_serving.png"))
    else:
        res = bench_precompute(args)
    env.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    res.update(command=command, env=env)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    if args.what == "serving":
        print_serving(res, command)
        if res.get("plot"):
            print(f"\nplot: {res['plot']}")
    else:
        print_precompute(res, command)
    print(f"results: {os.path.join(args.out, 'results.json')} (wall {env['wall_s']:.0f}s, load "
          f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f})")
    return 0
