"""``lifelong bench accuracy``: every model on one prepared dataset, trained to its early
stop over several seeds, with its serving cost and the papers' claims (issue 22 item 5).

One resumable command per dataset::

    lifelong bench accuracy --prepared DATA [--clustered CLUSTERED] --work_dir WORK \\
        [--models a,b | default: every registered non-ablation model] [--ablations] \\
        [--seeds 0,1,2] [--config_dir DIR] [--out WORK/accuracy.md] [--docs docs/benchmarks.md]

1. **Training** is ``lifelong compare``'s machinery (:mod:`lifelong.compare`): the
   per-model configs (:mod:`lifelong.model_configs`: optimizer, learning rate, max
   epochs, early stopping with the best epoch kept), one run per model and seed under
   ``WORK/runs/<model>-s<seed>``, always with ``--resume`` semantics
   (:func:`lifelong.compare.train_or_reuse`): a finished run of the same config is
   reused, an interrupted one continues from its checkpoint. Rerunning the command
   after an interruption (or with more models or seeds) trains only what is missing.
2. **Serving cost**, per model, of its lowest seed's trained run (the cost of a forward
   pass does not depend on the weights): export with ``jit_rank`` (XLA, the
   recommended ranking deployment) into ``WORK/serving/saved_models``, one local gRPC
   server process (:func:`lifelong.bench.serving.start_server`), each test user's
   cache through the ``user_tower`` signature over gRPC into a SQLite cache store (as
   ``lifelong bench serving`` does), then ``rank`` p50 / p99 of ``--rank_requests``
   sequential requests of ``--candidates`` (100) candidates each (after 3 untimed
   ones), cycling over ``--rank_users`` users: the client's whole path (cache read,
   request, Predict, decode). Each timed ``rank`` request is followed by the same
   request to the model's identity SavedModel on the same server
   (:func:`lifelong.bench.serving.export_identity_model`: the same inputs, no
   computation), so the table gives ``rank`` / floor as measured under the same load;
   the share of the CPUs other processes used meanwhile is recorded
   (:mod:`lifelong.bench.machine_load`), and a warning printed above
   ``BUSY_OTHERS_CPU_SHARE`` (absolute milliseconds are then not comparable). The users are the test split's users cut at their last
   request (:func:`lifelong.replay.last_requests`); the candidates are items drawn
   from those users' histories with their categories. **Cache bytes per user** is the
   stored cache entry's size (:attr:`serving.cache_store.CacheEntry.nbytes`, the
   "stored bytes/user" of ``lifelong bench precompute``), mean over those users (an
   entry of DIN, which has no long module, holds its header only). Measured once per
   run; ``WORK/serving/<model>.json`` keeps it, reused while the run is unchanged
   (``--remeasure_serving``: measure again, e.g. on a quieter machine).
3. **Outputs**: ``--out`` (default ``WORK/accuracy.md``): the table (AUC, GAUC, logloss
   mean ± sample std over seeds, stop/best epoch per seed, training examples/s, rank
   p50, cache bytes, what each model reads (:mod:`lifelong.reads`)), each paper's
   claimed ordering against it (:mod:`lifelong.reports.claims`: holds / does not hold
   / within noise, the noise rule stated there), and the command line; next to it
   ``<stem>.json``, ``<stem>-auc-vs-rank-latency.png`` (the accuracy / serving-cost
   frontier) and ``<stem>-auc-vs-cache-bytes.png``; with ``--docs FILE`` the same
   text replaces the marked section ``bench-accuracy:<dataset>`` of FILE (appended
   when the markers are missing).

Default models: every registered model that is not an ablation. An ablation is a
registry entry with a preset (``cformer_sum``, ``lrea_count``, ...) or whose class
derives from another registered model's class in the same method file
(``lrea_linear``); ``--ablations`` adds those and every config file that is not a
registered model (the ``*_paper_train`` configs; docs/configs.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfmodels.errors import UsageError

SECTION = "bench-accuracy"


# ---- flags (no TensorFlow: `lifelong bench accuracy --help` answers fast) -----------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong bench accuracy``; the CLI adds the training flags of
    ``compare`` (``--epochs``, ``--set``, ``--config_dir``, ...) after these."""
    p.add_argument("what", choices=["accuracy"], help="which benchmark")
    p.add_argument("--prepared", required=True, help="prepared dataset directory")
    p.add_argument("--clustered", help="a `lifelong cluster` output of the same data, for "
                   "the models that need a clustered history (TWIN V2)")
    p.add_argument("--work_dir", help="runs, exports and results; rerun with the same folder "
                   "to resume (default artifacts/bench-accuracy-<dataset>)")
    p.add_argument("--models", default="",
                   help="comma separated models or config names (default: every registered "
                   "model that is not an ablation)")
    p.add_argument("--ablations", action="store_true",
                   help="add the ablations: registered presets and config-only names")
    p.add_argument("--seeds", default="0,1,2", help="comma separated seeds (default 0,1,2)")
    p.add_argument("--out", help="the Markdown table (default <work_dir>/accuracy.md); the "
                   "PNGs and JSON go next to it")
    p.add_argument("--docs", help="also write the table into the marked section "
                   f"'{SECTION}:<dataset>' of this file (e.g. docs/benchmarks.md)")
    p.add_argument("--candidates", type=int, default=100,
                   help="candidates per rank request (default 100)")
    p.add_argument("--rank_users", type=int, default=8,
                   help="test users whose caches are computed and cycled (default 8)")
    p.add_argument("--rank_requests", type=int, default=200,
                   help="timed sequential rank requests per model (default 200)")
    p.add_argument("--no_serving", action="store_true",
                   help="skip the serving measurement (rank p50 and cache bytes: n/a)")
    p.add_argument("--remeasure_serving", action="store_true",
                   help="measure the serving cost again instead of reusing the figures "
                   "of unchanged runs (e.g. once the machine is quiet)")
    p.add_argument("--no_jit_rank", dest="jit_rank", action="store_false",
                   help="export rank without XLA (default: with)")


# ---- which models ------------------------------------------------------------------------------
def is_ablation(name: str) -> bool:
    """A registered model that is a variant of another (see the module doc)."""
    from tfmodels import registry
    m = registry.method(name)
    if m.preset:
        return True
    cls = registry.long_module_class(name)
    if cls is None:
        return False
    for other in registry.MODELS:
        if other == name or registry.preset_config(other):
            continue
        base = registry.long_module_class(other)
        if base is not None and base is not cls and issubclass(cls, base) \
                and base.__module__ == cls.__module__:
            return True
    return False


def default_models(ablations: bool, config_root: Optional[str]) -> List[str]:
    """Every registered non-ablation model (registry order); with ``ablations`` then the
    registered ablations and the config-file names that are not registered models."""
    from lifelong import model_configs
    from tfmodels import registry
    main = [m for m in registry.MODELS if not is_ablation(m)]
    if not ablations:
        return main
    extra = [m for m in registry.MODELS if is_ablation(m)]
    extra += [n for n in model_configs.config_names(config_root) if n not in registry.MODELS]
    return main + extra


# ---- serving cost ------------------------------------------------------------------------------
def _run_key(run_dir: str, args) -> str:
    """What a serving measurement depends on: the run (its run.json) and the flags."""
    h = hashlib.sha1()
    with open(os.path.join(run_dir, "run.json"), "rb") as f:
        h.update(f.read())
    h.update(json.dumps([args.candidates, args.rank_users, args.rank_requests,
                         bool(args.jit_rank)]).encode())
    return h.hexdigest()


#: a measurement during which other processes used more than this share of all CPUs'
#: time is flagged as taken on a busy machine
BUSY_OTHERS_CPU_SHARE = 0.15


def _fmt(x) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def estimate_left_s(rows: Sequence[Dict], left_models: Sequence[str]) -> Optional[float]:
    """Seconds the runs of ``left_models`` (one entry per run left) may take: each at its
    model's mean recorded training wall over the finished ``rows`` (a model's seeds cost
    about the same), a model not finished yet at the mean over every finished run. None
    before any run has a recorded wall time."""
    walls: Dict[str, List[float]] = {}
    for r in rows:
        if r.get("train_wall_s"):
            walls.setdefault(r["model"], []).append(float(r["train_wall_s"]))
    if not walls:
        return None
    overall = float(np.mean([w for ws in walls.values() for w in ws]))
    return float(sum(np.mean(walls[m]) if m in walls else overall for m in left_models))


def is_busy(figures: Dict) -> bool:
    """Whether a serving measurement was taken while other processes used more than
    ``BUSY_OTHERS_CPU_SHARE`` of the CPUs (False when not recorded)."""
    share = figures.get("others_cpu_share")
    return share is not None and share > BUSY_OTHERS_CPU_SHARE


def _floor_name(model: str) -> str:
    return f"identity_sm_{model}"


def measure_serving(runs: Dict[str, str], out: str, args) -> Dict[str, Dict]:
    """``{model: {"rank_p50_ms", "rank_p99_ms", "cache_bytes_per_user", ...}}`` of each
    model's run (see the module doc); reuses ``out/<model>.json`` of an unchanged run."""
    results: Dict[str, Dict] = {}
    todo = []
    os.makedirs(out, exist_ok=True)
    for m, run_dir in runs.items():
        path = os.path.join(out, f"{m}.json")
        key = _run_key(run_dir, args)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("key") == key and not getattr(args, "remeasure_serving", False):
                print(f"[bench accuracy] reusing serving figures of {m} ({path})",
                      file=sys.stderr)
                results[m] = old
                continue
        todo.append((m, run_dir, key))
    if not todo:
        return results

    import shutil
    import tensorflow as tf
    from lifelong.bench.machine_load import OthersCpu
    from lifelong.bench.serving import _pct, export_identity_model, start_server
    from lifelong.replay import _read_records, last_requests
    from serving import protos
    from serving.cache_store import SQLiteCacheStore
    from serving.client import RankingClient
    from serving.export import export_model
    from tfmodels import schema as S
    from tfmodels.train import load_run

    base = os.path.join(out, "saved_models")
    jobs = []
    for m, run_dir, key in todo:
        tf.keras.backend.clear_session()
        cfg, model = load_run(run_dir)
        records, requests = last_requests(_read_records(S.split_pattern(cfg.data, "test")),
                                          args.rank_users)
        if not requests:
            raise UsageError(f"{cfg.data}: the test split has no impressions to time rank on")
        shutil.rmtree(os.path.join(base, m), ignore_errors=True)     # a fresh version 1
        export_model(model, base, m, 1, jit_rank=args.jit_rank,
                     item_table=S.load_item_table(cfg.data))
        shutil.rmtree(os.path.join(base, _floor_name(m)), ignore_errors=True)
        export_identity_model(os.path.join(base, m, "1"), base, _floor_name(m))
        print(f"[bench accuracy] exported {m} from {run_dir}", file=sys.stderr, flush=True)
        jobs.append((m, run_dir, key, records, requests))
    db = os.path.join(out, "cache.db")
    if os.path.exists(db):
        os.remove(db)
    proc, address = start_server(base, [], os.path.join(out, "server.log"))
    store = SQLiteCacheStore(db)
    rng = np.random.default_rng(0)
    try:
        for m, run_dir, key, records, requests in jobs:
            client = RankingClient(address, m, store, timeout_s=120)
            floor = RankingClient(address, _floor_name(m), store, timeout_s=120)
            others = OthersCpu([proc.pid])
            try:
                req = client._request("user_tower", 1)
                protos.fill_tensor_proto(req.inputs["records"], np.array(records, dtype=object))
                caches = client.predict(req, timeout_s=600)
                uids = [int(u) for u in caches.pop("user_id")]
                sizes = []
                for i, u in enumerate(uids):
                    entry = {k: v[i:i + 1] for k, v in caches.items()}
                    store.put((m, u, 1, entry))
                    store.put((_floor_name(m), u, 1, entry))
                    sizes.append(store.get(m, u).nbytes)
                # candidates: (item, category) pairs seen in these users' histories
                pairs = {}
                for raw in records:
                    f = tf.train.Example.FromString(raw).features.feature
                    pairs.update(zip(f["hist_item_id"].int64_list.value,
                                     f["hist_cate_id"].int64_list.value))
                for r in requests:
                    pairs.update(zip(r["items"].tolist(), r["cates"].tolist()))
                items = np.array(sorted(pairs), np.int64)
                cates = np.array([pairs[i] for i in items], np.int64)
                picks = [rng.integers(0, len(items), size=args.candidates)
                         for _ in requests]

                def call(c, i):
                    j = i % len(requests)
                    return c.rank(requests[j]["user_id"], (items[picks[j]], cates[picks[j]]),
                                  imp_ts=requests[j]["ts"])

                for i in range(3):                   # untimed: XLA compiles on the first
                    call(client, i)
                    call(floor, i)
                lat, lat_floor = [], []
                others.start()
                for i in range(args.rank_requests):  # interleaved: the same load on both
                    for c, into in ((client, lat), (floor, lat_floor)):
                        t0 = time.perf_counter()
                        call(c, i)
                        into.append(time.perf_counter() - t0)
                others_share = others.stop()
            finally:
                client.close()
                floor.close()
            res = {"model": m, "run_dir": run_dir, "key": key, "candidates": args.candidates,
                   "users": len(uids), "requests": len(lat),
                   "rank_p50_ms": _pct(lat, 50), "rank_p99_ms": _pct(lat, 99),
                   "floor_p50_ms": _pct(lat_floor, 50),
                   "rank_over_floor": _pct(lat, 50) / _pct(lat_floor, 50),
                   "others_cpu_share": others_share, "cpus": os.cpu_count(),
                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "cache_bytes_per_user": float(np.mean(sizes)), "jit_rank": args.jit_rank}
            if others_share is not None and others_share > BUSY_OTHERS_CPU_SHARE:
                print(f"[bench accuracy] warning: {m}'s rank was timed on a busy machine "
                      f"(other processes used {others_share:.0%} of the {os.cpu_count()} "
                      f"CPUs meanwhile): read the rank / floor ratio, not the "
                      f"milliseconds; --remeasure_serving on a quiet machine",
                      file=sys.stderr, flush=True)
            with open(os.path.join(out, f"{m}.json"), "w") as f:
                json.dump(res, f, indent=2)
            results[m] = res
            print(f"[bench accuracy] {m}: rank p50 {res['rank_p50_ms']:.2f} ms at "
                  f"N={args.candidates} ({res['rank_over_floor']:.2f}x its identity "
                  f"SavedModel floor, {res['floor_p50_ms']:.2f} ms), cache "
                  f"{res['cache_bytes_per_user']:.0f} B/user",
                  file=sys.stderr, flush=True)
    finally:
        store.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:            # noqa: BLE001 -- still running: end it
            proc.kill()
    return results


# ---- table, plots, docs ------------------------------------------------------------------------
def format_table(summary: Dict[str, Dict], serving: Dict[str, Dict], reads: Dict[str, str],
                 candidates: int) -> str:
    from lifelong.compare import _cell, _epochs_cell
    lines = [f"| model | AUC | GAUC | logloss | stop / best epoch | train ex/s | "
             f"rank p50 ms (N={candidates}) | rank / floor | cache bytes/user | reads | "
             f"seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, agg in summary.items():
        s = serving.get(m) or {}
        speed = agg["train_examples_per_s"]["mean"]
        p50, cache = s.get("rank_p50_ms"), s.get("cache_bytes_per_user")
        ratio, busy = s.get("rank_over_floor"), is_busy(s)
        lines.append(
            f"| {m} | " + " | ".join(_cell(agg[k]) for k in ("auc", "gauc", "logloss"))
            + f" | {_epochs_cell(agg)} | {'n/a' if speed is None else f'{speed:.0f}'} | "
            f"{'n/a' if p50 is None else f'{p50:.2f}'}{' (busy)' if busy else ''} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | "
            f"{'n/a' if cache is None else f'{cache:,.0f}'} | {reads.get(m, '?')} | "
            f"{len(agg['seeds'])} |")
    return "\n".join(lines)


def pareto(points: Sequence[Tuple[str, float, float]]) -> List[str]:
    """Names on the frontier of (cost, AUC) points: no other point is at most as costly
    and strictly more accurate, or strictly cheaper and at least as accurate."""
    out = []
    for name, x, y in points:
        if not any((x2 <= x and y2 > y) or (x2 < x and y2 >= y) for n2, x2, y2 in points
                   if n2 != name):
            out.append(name)
    return out


def plot_frontier(summary: Dict[str, Dict], cost: Dict[str, Optional[float]], path: str,
                  xlabel: str, title: str) -> Optional[str]:
    """AUC (mean ± std over seeds) against a serving cost per model, log x; the frontier
    (:func:`pareto`) joined by a line. None (nothing written) when no model has both."""
    pts = [(m, float(cost[m]), summary[m]["auc"]["mean"], summary[m]["auc"]["std"] or 0.0)
           for m in summary if cost.get(m) is not None and cost[m] > 0
           and summary[m]["auc"]["mean"] is not None]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    front = set(pareto([(m, x, y) for m, x, y, _ in pts]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m, x, y, s in pts:
        on = m in front
        ax.errorbar([x], [y], yerr=[s], fmt="o", color="tab:red" if on else "tab:blue",
                    capsize=3, ms=5)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fp = sorted((x, y) for m, x, y, _ in pts if m in front)
    if len(fp) > 1:
        ax.plot(*zip(*fp), color="tab:red", lw=1, alpha=0.6, label="frontier")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:,.4g}")        # 20, not 2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def update_docs(path: str, dataset: str, text: str) -> None:
    """Replace the marked section ``bench-accuracy:<dataset>`` of ``path`` with ``text``
    (appended with a heading when the markers are not there)."""
    begin = f"<!-- {SECTION}:{dataset} begin (written by lifelong bench accuracy) -->"
    end = f"<!-- {SECTION}:{dataset} end -->"
    with open(path) as f:
        doc = f.read()
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + f"\n\n### `lifelong bench accuracy`: {dataset}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(doc)


# ---- the command -------------------------------------------------------------------------------
def run(args, extra: Sequence[str], make_cfg) -> int:
    from lifelong import compare as C
    from lifelong import model_configs
    from lifelong.reads import reads_cell
    from lifelong.reports import claims as CL
    from tfmodels import metrics as M
    from tfmodels import schema as S
    from tfmodels.errors import MissingInputError
    import tensorflow as tf

    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    if args.candidates < 1 or args.rank_users < 1 or args.rank_requests < 1:
        raise UsageError("--candidates, --rank_users and --rank_requests must be >= 1")
    try:
        S.read_meta(args.prepared)
    except FileNotFoundError as e:
        raise MissingInputError(f"--prepared: {e}") from e
    dataset = model_configs.dataset_of(args.prepared) or "data"
    root = model_configs.config_root(getattr(args, "config_dir", None))
    models = [m.strip() for m in args.models.split(",") if m.strip()] \
        or default_models(args.ablations, root)
    if args.models and args.ablations:
        models += [m for m in default_models(True, root) if is_ablation_name(m)]
    models = list(dict.fromkeys(models))
    model_configs.check_names(models, args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma separated integers, got {args.seeds!r}") \
            from None
    if not seeds:
        raise UsageError("--seeds is empty")
    work = args.work_dir or os.path.join("artifacts", f"bench-accuracy-{dataset}")
    os.makedirs(work, exist_ok=True)
    out = args.out or os.path.join(work, "accuracy.md")
    stem = out[:-3] if out.endswith(".md") else out
    command = "lifelong " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("lifelong") else "lifelong bench accuracy ..."

    # training: compare's machinery, always resumable
    configs = {m: model_configs.load(m, model_configs.dataset_of(args.prepared), root)
               for m in models}
    by_model = C.data_for_models(list(dict.fromkeys(c.model for c in configs.values())),
                                 args.prepared, args.clustered)
    run_cfgs = {(m, s): make_cfg(args, data=by_model[configs[m].model], model=m, seed=s,
                                 out_dir=os.path.join(work, "runs", f"{m}-s{s}"))
                for m in models for s in seeds}
    for cfg in run_cfgs.values():
        cfg.validate()
    rows = []
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        print(f"[bench accuracy] config of {m}: " + (" <- ".join(reversed(configs[m].files))
              or "built-in (no config file)"), file=sys.stderr)
        for j, s in enumerate(seeds):
            print(f"[bench accuracy] ({i * len(seeds) + j + 1}/{len(models) * len(seeds)}) "
                  f"model={m} seed={s}", file=sys.stderr, flush=True)
            tf.keras.backend.clear_session()
            cfg = run_cfgs[(m, s)]
            summary, result, reused = C.train_or_reuse(cfg, resume=True,
                                                       tag="bench accuracy")
            rows.append(C.result_row(m, s, summary, result, cfg.out_dir))
            if not reused:
                left = [(mm, ss) for mm in models for ss in seeds][len(rows):]
                eta = estimate_left_s(rows, [mm for mm, _ in left])
                print(f"[bench accuracy] {m} seed {s}: test AUC "
                      f"{_fmt(rows[-1].get('auc'))}, trained in "
                      f"{float(rows[-1].get('train_wall_s') or 0) / 60:.1f} min; "
                      f"{len(left)} runs left" + ("" if eta is None or not left else
                                                  f", about {eta / 3600:.1f} h at the "
                                                  f"recorded training times"),
                      file=sys.stderr, flush=True)
    train_wall = time.perf_counter() - t0
    summary = C.summarize(rows)
    reads = {m: reads_cell(run_cfgs[(m, seeds[0])]) for m in models}

    # serving cost of each model's lowest seed
    serving: Dict[str, Dict] = {}
    if not args.no_serving:
        runs = {m: run_cfgs[(m, min(seeds))].out_dir for m in models}
        serving = measure_serving(runs, os.path.join(work, "serving"), args)

    checked = CL.check_all(summary)
    table = format_table(summary, serving, reads, args.candidates)
    latency_png = plot_frontier(
        summary, {m: (serving.get(m) or {}).get("rank_p50_ms") for m in summary},
        stem + "-auc-vs-rank-latency.png",
        f"rank p50 ms, N = {args.candidates} candidates (local gRPC server, log scale)",
        f"{dataset}: AUC vs rank latency (red: the frontier)")
    cache_png = plot_frontier(
        summary, {m: (serving.get(m) or {}).get("cache_bytes_per_user") for m in summary},
        stem + "-auc-vs-cache-bytes.png", "cache bytes per user (log scale)",
        f"{dataset}: AUC vs cache bytes per user (red: the frontier)")
    curves_png = C.plot_learning_curves(rows, stem + "-learning-curves.png",
                                        f"{dataset}: {args.prepared}")
    notes = C.split_warnings(rows)
    run_wall = sum(float(r.get("train_wall_s") or 0.0) for r in rows)
    pngs = [p for p in (latency_png, cache_png, curves_png) if p]
    text = "\n".join([
        f"command: `{command}`", "",
        f"Data: `{args.prepared}` ({dataset}); seeds {','.join(map(str, seeds))}; "
        f"mean ± sample std over seeds; stop / best epoch per seed. rank p50: the lowest "
        f"seed's run exported with{'' if args.jit_rank else 'out'} XLA rank, through the "
        f"local gRPC server; rank / floor: its p50 over that of an identity SavedModel "
        f"with the same inputs, timed interleaved on the same server (robust to load); "
        f"(busy): other processes used more than {BUSY_OTHERS_CPU_SHARE:.0%} of the CPUs "
        f"while it was timed, so its milliseconds are inflated (--remeasure_serving). "
        f"cache bytes: the stored cache entry per user. reads: the "
        f"windows and per-behavior side features each model sees (lifelong/reads.py). "
        f"Training wall, summed over the {len(rows)} runs (each run's epochs across "
        f"--resume, from its epochs.jsonl; a run started before that file existed counts "
        f"its last call only): {run_wall / 3600:.2f} h.", "",
        table, *(["", *[f"**{w}**" for w in notes]] if notes else []), "",
        "Paper claims against this table (AUC):", "", CL.format_claims(checked), "",
        "Figures: " + (", ".join(f"`{os.path.basename(p)}`" for p in pngs) or "none"),
    ])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(M.json_safe({"command": command, "data": args.prepared, "dataset": dataset,
                               "models": models, "seeds": seeds, "rows": rows,
                               "summary": summary, "serving": serving, "reads": reads,
                               "claims": checked, "train_wall_s": train_wall,
                               "run_wall_s": run_wall, "figures": pngs}),
                  f, indent=2, default=str, allow_nan=False)
    if args.docs:
        update_docs(args.docs, dataset, text)
    print(text)
    print(f"[bench accuracy] wrote {out}, {stem}.json and the PNGs", file=sys.stderr)
    return 0


def is_ablation_name(name: str) -> bool:
    """A registered ablation, or a config name that is not a registered model."""
    from tfmodels import registry
    return is_ablation(name) if name in registry.MODELS else True
