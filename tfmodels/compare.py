"""``lifelong compare``: prepare once, train and evaluate models x seeds, report mean and std.

Writes ``<work_dir>/results.json``, ``results.md`` (the printed table with the
command line) and ``results.png`` (AUC per model with std error bars).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

METRICS = ("auc", "gauc", "logloss")


def detect_source(path: str) -> str:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "ratings.csv")):
            return "movielens"
        raise ValueError(f"{path!r} is a folder without ratings.csv; pass --source")
    if os.path.exists(path):
        return "taobao"
    raise FileNotFoundError(f"--data {path!r} does not exist")


def prepare_data(args, extra: List[str], data_dir: str) -> str:
    from tfmodels import schema as S
    if os.path.exists(os.path.join(data_dir, S.META_FILE)):
        print(f"[compare] reusing prepared data in {data_dir}", file=sys.stderr)
        return data_dir
    from beam_jobs import prepare
    source = args.source or (detect_source(args.data) if args.data else "synthetic")
    argv = ["--source", source, "--output", data_dir]
    if args.data:
        argv += ["--input", args.data]
    parser = argparse.ArgumentParser(prog="lifelong compare (prepare step)")
    prepare.add_arguments(parser)
    pargs, beam_args = parser.parse_known_args(argv + list(extra))
    print(f"[compare] preparing {source} data into {data_dir}", file=sys.stderr)
    prepare.run(pargs, beam_args)
    return data_dir


def summarize(rows: List[Dict]) -> Dict[str, Dict]:
    out: Dict[str, Dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        agg = {"seeds": [r["seed"] for r in rs]}
        for k in METRICS + ("train_examples_per_s", "train_wall_s"):
            vals = np.array([r[k] for r in rs if r.get(k) is not None], dtype=float)
            agg[k] = {"mean": float(np.mean(vals)) if vals.size else float("nan"),
                      "std": float(np.std(vals)) if vals.size else float("nan")}
        out[model] = agg
    return out


def format_table(summary: Dict[str, Dict], command: str) -> str:
    lines = [f"command: {command}", "",
             "| model | AUC | GAUC | logloss | train ex/s | seeds |",
             "|---|---|---|---|---|---|"]
    for model, agg in summary.items():
        cells = [f"{agg[k]['mean']:.4f} ± {agg[k]['std']:.4f}" for k in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) +
                     f" | {agg['train_examples_per_s']['mean']:.0f} | {len(agg['seeds'])} |")
    return "\n".join(lines)


def plot(summary: Dict[str, Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(summary)
    means = [summary[m]["auc"]["mean"] for m in models]
    stds = [summary[m]["auc"]["std"] for m in models]
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 2, 3.2))
    ax.bar(models, means, yerr=stds, capsize=4, color="#4C72B0")
    lo = min(means) - 3 * max(max(stds), 0.005)
    ax.set_ylim(max(0.0, lo), min(1.0, max(means) + 3 * max(max(stds), 0.005)))
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    for i, m in enumerate(means):
        ax.text(i, m, f"{m:.4f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finished_run(cfg) -> Optional[Tuple[Dict, Dict]]:
    """(run summary, metrics) of a run directory that already holds a finished run of
    exactly this configuration, else None (``compare --resume`` skips those, so an
    interrupted comparison, or a second one sharing baselines, does not retrain)."""
    run_path = os.path.join(cfg.out_dir, "run.json")
    metrics_path = os.path.join(cfg.out_dir, f"metrics-{cfg.eval_split}.json")
    if not (os.path.exists(run_path) and os.path.exists(metrics_path)):
        return None
    with open(run_path) as f:
        summary = json.load(f)
    with open(metrics_path) as f:
        result = json.load(f)
    if not _same_training(summary.get("config"), _config_dict(cfg)):
        return None
    return summary, result


def _same_training(a: Optional[Dict], b: Dict) -> bool:
    """Equal configs up to ``out_dir``: where a run lives is not what was trained, so a
    finished run copied or moved into another work directory is still reused."""
    if a is None:
        return False
    return {k: v for k, v in a.items() if k != "out_dir"} == \
        {k: v for k, v in b.items() if k != "out_dir"}


def train_or_reuse(cfg, resume: bool, tag: str = "compare") -> Tuple[Dict, Dict, bool]:
    """Train and evaluate one run, or with ``resume`` reuse a finished run of the same
    config in ``cfg.out_dir`` (an unfinished one continues from its checkpoint).
    Returns (run summary, metrics, reused) and logs one line per run."""
    from tfmodels import train as T
    done = finished_run(cfg) if resume else None
    if done is not None:
        print(f"[{tag}] reusing finished run {cfg.out_dir} (same config)", file=sys.stderr)
        return done[0], done[1], True
    summary = T.train(cfg, resume=resume and same_config(cfg))
    return summary, T.evaluate(cfg.out_dir, cfg.eval_split), False


def result_row(model: str, seed: int, summary: Dict, result: Dict, run_dir: str) -> Dict:
    """One row of a comparison table: metrics, samples, training time and speed."""
    rates = summary["train_examples_per_s"]
    return {"model": model, "seed": seed, **{k: result.get(k) for k in METRICS},
            "samples": result["samples"], "train_wall_s": summary["train_wall_s"],
            "train_examples_per_s": float(np.median(rates)) if rates else None,
            "run_dir": run_dir}


def _config_dict(cfg) -> Dict:
    import dataclasses
    # Round-trip through JSON so tuples and lists compare equal.
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def same_config(cfg) -> bool:
    """Whether the run directory was started with exactly this config (so its
    checkpoint may be continued); a different config there is trained afresh."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return _same_training(json.load(f), _config_dict(cfg))


def is_clustered(data_dir: str) -> bool:
    """Whether a prepared dataset is the output of ``lifelong cluster`` (meta.json says so)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return "clustering" in json.load(f)


def data_for_models(models: List[str], data_dir: str, clustered: Optional[str]) -> Dict[str, str]:
    """Dataset per model: cluster-aware methods (TWIN V2) train on ``clustered``, every
    other model on ``data_dir``, so one compare call covers raw baselines and TWIN V2 on
    the same impressions. Raises a ValueError naming the fix when a TWIN V2 model has no
    clustered dataset (on a raw history every n = 1 and TWIN V2 silently equals TWIN)."""
    from tfmodels import registry
    if clustered is not None:
        if not os.path.isdir(clustered):
            raise ValueError(f"--clustered {clustered!r} is not a directory")
        if not is_clustered(clustered):
            raise ValueError(f"--clustered {clustered!r} is not a `lifelong cluster` output "
                             f"(its meta.json has no 'clustering' section)")
    out = {}
    for m in models:
        cls = registry.long_module_class(m)
        if cls is not None and getattr(cls, "needs_clustered_data", False):
            if clustered is not None:
                out[m] = clustered
            elif is_clustered(data_dir):
                out[m] = data_dir
            else:
                raise ValueError(
                    f"model {m!r} needs a clustered history: run `lifelong cluster --data "
                    f"{data_dir} --output CLUSTERED` and pass --clustered CLUSTERED "
                    f"(or --prepared CLUSTERED)")
        else:
            out[m] = data_dir
    return out


def run(args, extra: List[str], make_cfg: Callable) -> int:
    from tfmodels import registry
    import tensorflow as tf

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in registry.MODELS:
            raise ValueError(f"unknown model {m!r}; registered: {', '.join(registry.names())}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma separated integers, got {args.seeds!r}")
    work = args.work_dir or os.path.join("artifacts", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(work, exist_ok=True)
    data_dir = args.prepared or prepare_data(args, extra, os.path.join(work, "data"))
    model_data = data_for_models(models, data_dir, getattr(args, "clustered", None))
    command = "lifelong " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("lifelong") else "lifelong compare ..."

    resume = bool(getattr(args, "resume", False))
    rows = []
    total = len(models) * len(seeds)
    for i, model in enumerate(models):
        for j, seed in enumerate(seeds):
            n = i * len(seeds) + j + 1
            print(f"[compare] ({n}/{total}) model={model} seed={seed}", file=sys.stderr)
            tf.keras.backend.clear_session()
            cfg = make_cfg(args, data=model_data[model], model=model, seed=seed,
                           out_dir=os.path.join(work, "runs", f"{model}-s{seed}"))
            summary, result, _ = train_or_reuse(cfg, resume)
            rows.append(result_row(model, seed, summary, result, cfg.out_dir))
            print(f"[compare] {model} seed={seed}: AUC {result['auc']:.4f} "
                  f"GAUC {result.get('gauc', float('nan')):.4f} "
                  f"logloss {result['logloss']:.4f}", file=sys.stderr)
    summary = summarize(rows)
    table = format_table(summary, command)
    print(table)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"command": command, "data": data_dir, "data_per_model": model_data,
                   "rows": rows, "summary": summary,
                   "config": {k: v for k, v in vars(args).items() if k != "func"}},
                  f, indent=2, default=str)
    plot(summary, os.path.join(work, "results.png"), os.path.basename(os.path.abspath(data_dir)))
    print(f"[compare] results in {work}/results.{{md,json,png}}", file=sys.stderr)
    return 0
