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

from lifelong import model_configs
from tfmodels.errors import MissingInputError, UsageError

METRICS = ("auc", "gauc", "logloss")
#: epoch numbers of a run (run.json, 1-based over the whole run): the last epoch trained
#: and the epoch whose weights final/ holds (None without early stopping)
EPOCHS = ("stopped_epoch", "best_epoch")


def detect_source(path: str) -> str:
    """``--data``'s input kind: a MovieLens folder (the ratings file of any of its layouts:
    ratings.csv, ratings.dat, u.data), a Tianchi 56 display-ad folder (raw_sample.csv:
    ``taobao_ad``, two domains), else a Taobao UserBehavior file."""
    from beam_jobs.adapters import MOVIELENS_LAYOUTS
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, lay.ratings)) for lay in MOVIELENS_LAYOUTS):
            return "movielens"
        if os.path.exists(os.path.join(path, "raw_sample.csv")):
            return "taobao_ad"
        raise UsageError(f"{path!r} is a folder without a MovieLens ratings file (ratings.csv, "
                         f"ratings.dat or u.data) or raw_sample.csv (taobao_ad); pass --source")
    if os.path.exists(path):
        return "taobao"
    raise MissingInputError(f"--data {path!r} does not exist")


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
    """Mean and sample std (ddof=1) over seeds per model. Seeds where a metric is undefined (None/NaN,
    e.g. GAUC when no group has both labels) are left out; when no seed has it, mean
    and std are None and ``"undefined"`` holds the reason (strict JSON, no NaN)."""
    from tfmodels import metrics as M
    out: Dict[str, Dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        agg: Dict = {"seeds": [r["seed"] for r in rs]}
        for k in METRICS + ("train_examples_per_s", "train_wall_s") + EPOCHS:
            vals = np.array([r[k] for r in rs if M.is_defined(r.get(k))], dtype=float)
            if vals.size:
                # sample std (ddof=1): with 3 seeds the population std understates the
                # spread by sqrt(2/3); a single seed has std 0
                std = float(np.std(vals, ddof=1)) if vals.size > 1 else 0.0
                agg[k] = {"mean": float(np.mean(vals)), "std": std}
                if vals.size < len(rs):
                    agg[k]["seeds_defined"] = int(vals.size)
            else:
                reasons = [r.get(f"{k}_undefined") for r in rs if r.get(f"{k}_undefined")]
                agg[k] = {"mean": None, "std": None,
                          "undefined": reasons[0] if reasons else "no value"}
        for k in EPOCHS:
            agg[k]["per_seed"] = [r.get(k) for r in rs]
        out[model] = agg
    return out


def _cell(agg: Dict, fmt: str = ".4f") -> str:
    from tfmodels import metrics as M
    if agg["mean"] is None:
        return M.format_metric(None, agg.get("undefined"))
    return f"{agg['mean']:{fmt}} ± {agg['std']:{fmt}}"


def format_table(summary: Dict[str, Dict], command: str,
                 reads: Optional[Dict[str, str]] = None) -> str:
    """The results table; ``reads`` (model -> :func:`lifelong.reads.reads_cell`) adds a
    "reads" column: which windows and per-behavior side features each model sees."""
    lines = [f"command: {command}", "",
             "| model | AUC | GAUC | logloss | train ex/s | stop / best epoch | seeds |"
             + (" reads |" if reads else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if reads else "")]
    for model, agg in summary.items():
        cells = [_cell(agg[k]) for k in METRICS]
        speed = agg["train_examples_per_s"]["mean"]
        lines.append(f"| {model} | " + " | ".join(cells) +
                     f" | {'n/a' if speed is None else f'{speed:.0f}'} | {_epochs_cell(agg)} "
                     f"| {len(agg['seeds'])} |" + (f" {reads.get(model, '?')} |" if reads else ""))
    return "\n".join(lines)


def _epochs_cell(agg: Dict) -> str:
    """``stop/best`` per seed, e.g. ``7/5, 6/4`` (``-`` where run.json has no value:
    no early stopping, or a run recorded before these fields existed)."""
    stops = (agg.get("stopped_epoch") or {}).get("per_seed") or []
    bests = (agg.get("best_epoch") or {}).get("per_seed") or []
    cells = [f"{'-' if s is None else s}/{'-' if b is None else b}"
             for s, b in zip(stops, bests)]
    return ", ".join(cells) if cells else "n/a"


def split_warnings(rows: List[Dict], split: str = "test") -> List[str]:
    """One warning per distinct evaluation set (same data, same counts) whose size makes
    its AUC meaningless (:func:`tfmodels.metrics.small_sample_warning`)."""
    from tfmodels import metrics as M
    out: List[str] = []
    for r in rows:
        samples = r.get("samples")
        pos = r.get("positives")
        if samples is None or pos is None:
            continue
        w = M.small_sample_warning(int(samples), int(pos), f"the {split} split")
        if w and w not in out:
            out.append(w)
    return out


def plot(summary: Dict[str, Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in summary if summary[m]["auc"]["mean"] is not None]
    if not models:  # no model has a defined AUC: nothing to draw
        return
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


def learning_curves(rows: List[Dict]) -> Dict[str, Dict[str, Dict[int, List[float]]]]:
    """Train and validation AUC per epoch from each run's run.json: {model: {"auc" |
    "val_auc": {epoch: [one value per seed]}}}. A run's history covers the whole run
    across --resume (``epochs.jsonl``), numbered by its ``history_epochs``; a run.json
    without them (an older run) holds the epochs of its last ``train`` call, numbered so
    that the last is its ``stopped_epoch``."""
    out: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    for r in rows:
        path = os.path.join(r.get("run_dir") or "", "run.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            run = json.load(f)
        history = run.get("history") or {}
        for key in ("auc", "val_auc"):
            values = history.get(key) or []
            epochs = run.get("history_epochs")
            if not epochs or len(epochs) != len(values):
                last = run.get("stopped_epoch") or len(values)
                epochs = range(last - len(values) + 1, last + 1)
            for epoch, v in zip(epochs, values):
                out.setdefault(r["model"], {}).setdefault(key, {}).setdefault(
                    int(epoch), []).append(float(v))
    return out


def plot_learning_curves(rows: List[Dict], path: str, title: str) -> Optional[str]:
    """PNG of train (left) and validation (right) AUC per epoch, one colour per model:
    the mean over seeds as a line, each seed as a faint line. Returns the path, or None
    when no run has a history (nothing is written)."""
    curves = learning_curves(rows)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(curves) > len(colors):            # more models than the default cycle's 10
        colors = [plt.get_cmap("tab20")(i % 20) for i in range(len(curves))]
    for i, (model, series) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for ax, key in zip(axes, ("auc", "val_auc")):
            points = series.get(key) or {}
            if not points:
                continue
            epochs = sorted(points)
            seeds = max(len(v) for v in points.values())
            for s in range(seeds):
                xs = [e for e in epochs if len(points[e]) > s]
                ax.plot(xs, [points[e][s] for e in xs], color=color, alpha=0.25, lw=0.8)
            ax.plot(epochs, [float(np.mean(points[e])) for e in epochs], color=color,
                    marker="o", ms=3, label=model)
    for ax, name in zip(axes, ("train AUC (running, per epoch)", "validation AUC")):
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("AUC (line: mean over seeds; faint: each seed)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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
    finished run copied or moved into another work directory is still reused. The
    speed-only fields (``TrainConfig.SPEED_ONLY``: XLA, the DIN unit's layout, the input
    pipeline) are not compared either: they change how fast the same function trains."""
    if a is None:
        return False
    from tfmodels.train import TrainConfig
    # A field added to TrainConfig after a run was recorded is missing from its config;
    # at its default value it is the same training (the code before the field did that).
    defaults = json.loads(json.dumps(model_configs.train_defaults(), default=str))
    missing = object()
    for k in (set(a) | set(b)) - {"out_dir", *TrainConfig.SPEED_ONLY}:
        va, vb = a.get(k, defaults.get(k, missing)), b.get(k, defaults.get(k, missing))
        if va is missing or vb is missing or va != vb:
            return False
    return True


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
    from tfmodels import metrics as M
    rates = summary["train_examples_per_s"]
    samples = int(result["samples"])
    positives = result.get("positives")
    if positives is None and result.get("positive_rate") is not None:  # an older metrics file
        positives = int(round(float(result["positive_rate"]) * samples))
    row = {"model": model, "seed": seed,
           **{k: result.get(k) if M.is_defined(result.get(k)) else None for k in METRICS},
           "samples": samples, "positives": positives,
           "train_wall_s": summary["train_wall_s"],
           "train_examples_per_s": float(np.median(rates)) if rates else None,
           **{k: summary.get(k) for k in EPOCHS},
           "run_dir": run_dir}
    for k in METRICS:
        if row[k] is None:
            row[f"{k}_undefined"] = result.get(f"{k}_undefined") or "not a number"
    return row


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
    """Dataset per model: a model whose registry entry needs a clustered history
    (:data:`tfmodels.registry.CLUSTERED_HISTORY`, e.g. TWIN V2) trains on ``clustered``,
    every other model on ``data_dir``, so one compare call covers raw baselines and
    cluster-aware methods on the same impressions. Raises a ValueError naming the fix
    when such a model has no clustered dataset (on a raw history every n = 1 and TWIN V2
    silently equals TWIN). Any other declared need is refused with the registry's
    description of how to make it: compare has no flag for it yet."""
    from tfmodels import registry
    if clustered is not None:
        if not os.path.isdir(clustered):
            raise UsageError(f"--clustered {clustered!r} is not a directory")
        if not is_clustered(clustered):
            raise UsageError(f"--clustered {clustered!r} is not a `lifelong cluster` output "
                             f"(its meta.json has no 'clustering' section)")
    out = {}
    for m in models:
        needs = registry.needs(m)
        unsupported = [n for n in needs if n != registry.CLUSTERED_HISTORY]
        if unsupported:
            raise UsageError(f"model {m!r} needs " + "; ".join(
                registry.INPUTS.get(n, n).format(data=data_dir) for n in unsupported)
                + ", which `lifelong compare` cannot pass yet")
        if registry.CLUSTERED_HISTORY in needs:
            if clustered is not None:
                out[m] = clustered
            elif is_clustered(data_dir):
                out[m] = data_dir
            else:
                raise UsageError(f"model {m!r} needs " + registry.INPUTS[
                    registry.CLUSTERED_HISTORY].format(data=data_dir))
        else:
            out[m] = data_dir
    return out


def run(args, extra: List[str], make_cfg: Callable) -> int:
    from tfmodels import metrics as M
    from tfmodels import registry
    import tensorflow as tf

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    # a name is a registered model or a per-model config file (lifelong/model_configs.py)
    model_configs.check_names(models, args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma separated integers, got {args.seeds!r}") \
            from None
    if args.prepared:
        from tfmodels import schema as S
        try:
            S.read_meta(args.prepared)
        except FileNotFoundError as e:  # the one meaning of this call's FileNotFoundError
            raise MissingInputError(f"--prepared: {e}") from e
    elif args.data and not args.source:
        detect_source(args.data)   # a missing --data fails before any folder is created
    work = args.work_dir or os.path.join("artifacts", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(work, exist_ok=True)
    data_dir = args.prepared or prepare_data(args, extra, os.path.join(work, "data"))
    configs = {m: model_configs.load(m, model_configs.dataset_of(data_dir),
                                     model_configs.config_root(getattr(args, "config_dir", None)))
               for m in models}
    by_model = data_for_models(list(dict.fromkeys(c.model for c in configs.values())), data_dir,
                               getattr(args, "clustered", None))
    model_data = {m: by_model[configs[m].model] for m in models}
    for m in models:
        print(f"[compare] config of {m}: " + (" <- ".join(reversed(configs[m].files))
              or "built-in (no config file)"), file=sys.stderr)
    command = "lifelong " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("lifelong") else "lifelong compare ..."

    resume = bool(getattr(args, "resume", False))
    rows = []
    eval_split = "test"
    total = len(models) * len(seeds)
    # every run's config is resolved (and checked) before the first one trains
    run_cfgs = {(model, seed): make_cfg(args, data=model_data[model], model=model, seed=seed,
                                        out_dir=os.path.join(work, "runs", f"{model}-s{seed}"))
                for model in models for seed in seeds}
    for cfg in run_cfgs.values():
        cfg.validate()
    for i, model in enumerate(models):
        for j, seed in enumerate(seeds):
            n = i * len(seeds) + j + 1
            print(f"[compare] ({n}/{total}) model={model} seed={seed}", file=sys.stderr)
            tf.keras.backend.clear_session()
            cfg = run_cfgs[(model, seed)]
            eval_split = cfg.eval_split
            summary, result, _ = train_or_reuse(cfg, resume)
            rows.append(result_row(model, seed, summary, result, cfg.out_dir))
            row = rows[-1]
            print(f"[compare] {model} seed={seed}: " + " ".join(
                f"{name} {M.format_metric(row[k], row.get(f'{k}_undefined'))}"
                for name, k in (("AUC", "auc"), ("GAUC", "gauc"), ("logloss", "logloss"))),
                file=sys.stderr)
    summary = summarize(rows)
    from lifelong.reads import reads_cell     # like for like: what each model reads
    reads = {m: reads_cell(run_cfgs[(m, seeds[0])]) for m in models}
    table = format_table(summary, command, reads)
    split_notes = split_warnings(rows, eval_split)
    if split_notes:
        table += "\n\n" + "\n".join(f"**{w}**" for w in split_notes)
    print(table)
    for w in split_notes:
        print(f"[compare] {w}", file=sys.stderr)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(table + "\n")
    results = M.json_safe({"command": command, "data": data_dir, "data_per_model": model_data,
                           "rows": rows, "summary": summary, "warnings": split_notes,
                           "config": {k: v for k, v in vars(args).items() if k != "func"},
                           # per model: the registered model, the config files read (base
                           # first) and the resolved training config (out_dir, seed per run)
                           "model_configs": {
                               m: {"model": configs[m].model, "files": configs[m].files,
                                   "reads": reads[m],
                                   "resolved": {k: v for k, v in _config_dict(
                                       run_cfgs[(m, seeds[0])]).items()
                                       if k not in ("out_dir", "seed")}}
                               for m in models}})
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str, allow_nan=False)
    plot(summary, os.path.join(work, "results.png"), os.path.basename(os.path.abspath(data_dir)))
    plot_learning_curves(rows, os.path.join(work, "learning_curves.png"),
                         f"{model_configs.dataset_of(data_dir) or 'data'}: {data_dir}")
    print(f"[compare] results in {work}/results.{{md,json,png}} and learning_curves.png",
          file=sys.stderr)
    return 0
