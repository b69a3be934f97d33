"""LREA experiment helpers: the paper's r x lambda sensitivity grid and the serving-path gap.

* :func:`add_arguments` / :func:`run`: the grid of the paper's Table 3 (r in 32 / 64 /
  128, lambda in 0.05 / 0.1 / 0.3 / 0.5 / 0.8) as one command. ``--design paper`` (the
  default) runs the cells Table 3 reports: r swept at lambda = 0.3 and lambda swept at
  r = 128 (7 cells); ``--design full`` every r x lambda pair (15). For every cell and seed
  it trains the registered ``lrea`` model with ``long_module_config`` {"rank": r,
  "lam": lambda} through :func:`tfmodels.train.train` / :func:`~tfmodels.train.evaluate`
  (data prepared once with :func:`lifelong.compare.prepare_data`), prints AUC / GAUC /
  logloss per cell (mean +- std over seeds, :func:`lifelong.compare.format_table`) and
  an AUC matrix, and writes ``results.{md,json}`` and the heatmap ``grid.png`` into
  the work directory. ``--absorbed_gap`` also measures :func:`absorbed_gap` per run.
* :func:`absorbed_gap`: a trained LREA run evaluated with the training path
  (``model(x)``, R3-R4) and with the absorbed serving path
  (``model.rank(model.user_tower(x), x)``, R7): mean / max absolute CTR difference
  and the AUC of each path (:func:`tfmodels.metrics.auc`).

``lifelong lrea-grid`` (the report the ``lrea`` registry entry declares) calls
``add_arguments(parser)`` and ``run(args, extra)``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tfmodels.errors import UsageError

PAPER_RANKS = (32, 64, 128)
PAPER_LAMS = (0.05, 0.1, 0.3, 0.5, 0.8)
PAPER_ANCHOR = (128, 0.3)   # Table 3: r swept at lambda = 0.3, lambda swept at r = 128
DESIGNS = ("paper", "full")
BASELINES = ("din", "avg_pool", "din_l")
REFERENCE = "din_l"          # the paper's claim: LREA within about 0.1% AUC of DIN-L
#: `lifelong lrea-grid` passes unknown flags on to the data-prep step (like compare)
ALLOW_EXTRA = True


# ---- serving-path gap ----------------------------------------------------------------------
def absorbed_gap(run_dir: str, split: str = "test", data: Optional[str] = None,
                 batch_size: Optional[int] = None, write: bool = True) -> Dict[str, object]:
    """Training path vs absorbed serving path of a trained run on ``split``.

    Returns ``mean_abs_ctr_diff``, ``max_abs_ctr_diff`` (|sigmoid(call) -
    sigmoid(rank(user_tower))| over the split), ``auc_train_path``,
    ``auc_absorbed_path``, ``logloss_*`` and ``samples``; also written to
    ``<run_dir>/absorbed-gap-<split>.json`` unless ``write=False``.
    """
    import tfmodels  # noqa: F401
    import tensorflow as tf
    from tfmodels import metrics as M
    from tfmodels import schema as S
    from tfmodels import train as T

    cfg, model = T.load_run(run_dir, data)
    if batch_size:
        cfg.batch_size = batch_size
    if split not in S.SPLITS:
        raise T.ConfigError(f"split must be one of {S.SPLITS}, got {split!r}")
    if model.long_module is None:
        raise T.ConfigError(f"run {run_dir!r} (model {cfg.model!r}) has no long module")

    @tf.function(reduce_retracing=True)
    def both(batch):
        train_path = tf.sigmoid(model(batch, training=False))
        cache = model.user_tower(batch, training=False)
        served = tf.sigmoid(model.rank(cache, batch, training=False))
        return train_path, served

    labels, p_train, p_abs = [], [], []
    for batch in T.dataset(cfg, split, training=False):
        a, b = both(batch)
        p_train.append(a.numpy())
        p_abs.append(b.numpy())
        labels.append(batch[S.LABEL].numpy())
    if not labels:
        raise T.ConfigError(f"the {split} split is empty")
    y, pt, pa = np.concatenate(labels), np.concatenate(p_train), np.concatenate(p_abs)
    diff = np.abs(pt.astype(np.float64) - pa.astype(np.float64))
    out = {"run_dir": run_dir, "model": cfg.model, "split": split, "samples": int(y.size),
           "long_module_config": cfg.long_module_config,
           "mean_abs_ctr_diff": float(diff.mean()), "max_abs_ctr_diff": float(diff.max()),
           "auc_train_path": M.auc(y, pt), "auc_absorbed_path": M.auc(y, pa),
           "logloss_train_path": M.logloss(y, pt), "logloss_absorbed_path": M.logloss(y, pa)}
    if write:
        with open(os.path.join(run_dir, f"absorbed-gap-{split}.json"), "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


# ---- the r x lambda grid ---------------------------------------------------------------------
def add_arguments(parser) -> None:
    """Flags of the grid command: data as in ``lifelong compare``, the grid, train flags."""
    from lifelong.cli import _add_train_flags
    parser.add_argument("--data", help="raw input: a MovieLens folder or a Taobao "
                        "UserBehavior.csv; default: the synthetic generator")
    parser.add_argument("--source", choices=["synthetic", "movielens", "taobao"],
                        help="input kind (default: detected from --data)")
    parser.add_argument("--prepared", help="use an already prepared dataset directory")
    parser.add_argument("--ranks", default=",".join(map(str, PAPER_RANKS)),
                        help="comma separated ranks r (default 32,64,128, the paper's)")
    parser.add_argument("--lams", default=",".join(map(str, PAPER_LAMS)),
                        help="comma separated lambdas (default 0.05,0.1,0.3,0.5,0.8, "
                        "the paper's)")
    parser.add_argument("--design", choices=DESIGNS, default="paper",
                        help="paper: the cells of the paper's Table 3, r swept at "
                        "--anchor_lam and lambda swept at --anchor_rank; full: every "
                        "r x lambda pair (default paper)")
    parser.add_argument("--anchor_rank", type=int,
                        help="r at which lambda is swept in --design paper (default: the "
                        "largest of --ranks, 128 as in the paper)")
    parser.add_argument("--anchor_lam", type=float,
                        help="lambda at which r is swept in --design paper (default 0.3, "
                        "the paper's, when in --lams, else the middle of --lams)")
    parser.add_argument("--seeds", default="0", help="comma separated seeds (default 0)")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="models trained beside the grid, same data, flags and seeds, "
                        "so one command gives the paper's comparison too (default "
                        "din,avg_pool,din_l; '' for none); every cell is read against "
                        "din_l when it is listed")
    parser.add_argument("--resume", action="store_true",
                        help="reuse every run directory under WORK_DIR/runs that already "
                        "holds a finished run of the same configuration (also one copied "
                        "there from another work directory)")
    parser.add_argument("--work_dir", help="where data, runs and results go "
                        "(default artifacts/lrea-grid-<time>)")
    parser.add_argument("--absorbed_gap", action="store_true",
                        help="also evaluate each run's absorbed serving path (R7) and "
                        "report the CTR gap to the training path")
    _add_train_flags(parser)   # --model (default lrea), --epochs, --long_len, ...


def _parse_list(text: str, typ, flag: str) -> List:
    try:
        values = [typ(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{flag} must be comma separated {typ.__name__}s, got {text!r}") \
            from None
    if not values:
        raise UsageError(f"--{flag} is empty")
    return values


def cell_name(rank: int, lam: float) -> str:
    return f"r={rank} lam={lam:g}"


def resolve_anchor(ranks: Sequence[int], lams: Sequence[float],
                   anchor_rank: Optional[int] = None,
                   anchor_lam: Optional[float] = None) -> tuple:
    """The (r, lambda) the paper design sweeps around: given values win; else the largest
    r and lambda = 0.3 (the paper's Table 3) when listed, else the middle lambda."""
    if anchor_rank is None:
        anchor_rank = max(ranks)
    if anchor_lam is None:
        anchor_lam = PAPER_ANCHOR[1] if PAPER_ANCHOR[1] in lams else \
            sorted(lams)[len(lams) // 2]
    if anchor_rank <= 0 or anchor_lam < 0:
        raise UsageError(f"anchors must be r > 0 and lambda >= 0, got "
                         f"({anchor_rank}, {anchor_lam})")
    return int(anchor_rank), float(anchor_lam)


def grid_cells(ranks: Sequence[int], lams: Sequence[float], design: str = "paper",
               anchor: Sequence = PAPER_ANCHOR) -> List[tuple]:
    """(r, lambda) cells to train, in order. ``paper``: every r at the anchor lambda, then
    every other lambda at the anchor r (the layout of the paper's Table 3, the anchor cell
    once); ``full``: the whole r x lambda product."""
    if design == "full":
        return [(r, lam) for r in ranks for lam in lams]
    if design != "paper":
        raise UsageError(f"--design must be one of {DESIGNS}, got {design!r}")
    a_rank, a_lam = int(anchor[0]), float(anchor[1])
    cells = [(r, a_lam) for r in ranks]
    cells += [(a_rank, lam) for lam in lams if (a_rank, lam) not in cells]
    return cells


def _mean_std(agg: Dict) -> str:
    """``0.7312 ± 0.0010`` of a summary cell; ``n/a (<reason>)`` when no seed has the
    metric (mean None, :func:`lifelong.compare.summarize`)."""
    from tfmodels import metrics as M     # here: it loads SciPy (slow --help otherwise)
    if agg.get("mean") is None:
        return M.format_metric(None, agg.get("undefined"))
    return f"{agg['mean']:.4f} ± {agg['std']:.4f}"


def _defined_mean(values) -> Optional[float]:
    """Mean of the defined values (None / NaN left out); None when there is none."""
    from tfmodels import metrics as M
    vals = [float(v) for v in values if M.is_defined(v)]
    return float(np.mean(vals)) if vals else None


def format_matrix(summary: Dict[str, Dict], ranks: Sequence[int], lams: Sequence[float],
                  metric: str = "auc") -> str:
    lines = [f"{metric.upper()} (mean ± std over seeds), rows r, columns lambda", "",
             "| r \\ λ | " + " | ".join(f"{lam:g}" for lam in lams) + " |",
             "|---|" + "---|" * len(lams)]
    for r in ranks:
        cells = []
        for lam in lams:
            agg = summary.get(cell_name(r, lam), {}).get(metric)
            cells.append(_mean_std(agg) if agg else "–")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_vs_reference(summary: Dict[str, Dict], cells: Sequence[tuple],
                        reference: str = REFERENCE, tol: float = 0.001) -> str:
    """Each cell's AUC minus the reference model's (DIN-L), with the paper's reading:
    'within' when the cell is at most ``tol`` (0.1 AUC point) below it or above it."""
    ref = summary[reference]["auc"]
    lines = [f"AUC of each cell minus {reference} ({_mean_std(ref)}, "
             f"{len(summary[reference].get('seeds', []))} seeds); the paper's claim is 'within "
             f"about 0.1%' (here: Δ ≥ −{tol:g})", "",
             f"| cell | AUC | Δ vs {reference} | within |", "|---|---|---|---|"]
    for r, lam in cells:
        agg = summary.get(cell_name(r, lam), {}).get("auc")
        if not agg:
            continue
        if agg["mean"] is None or ref["mean"] is None:     # an undefined AUC: no delta
            lines.append(f"| {cell_name(r, lam)} | {_mean_std(agg)} | n/a | n/a |")
            continue
        delta = agg["mean"] - ref["mean"]
        lines.append(f"| {cell_name(r, lam)} | {_mean_std(agg)} | "
                     f"{delta:+.4f} | {'yes' if delta >= -tol else 'no'} |")
    return "\n".join(lines)


def plot_heatmap(summary: Dict[str, Dict], ranks: Sequence[int], lams: Sequence[float],
                 path: str, title: str, metric: str = "auc") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.full((len(ranks), len(lams)), np.nan)
    std = np.full_like(grid, np.nan)
    for i, r in enumerate(ranks):
        for j, lam in enumerate(lams):
            agg = summary.get(cell_name(r, lam), {}).get(metric)
            if agg and agg["mean"] is not None:
                grid[i, j], std[i, j] = agg["mean"], agg["std"]
    fig, ax = plt.subplots(figsize=(1.3 * len(lams) + 2, 0.8 * len(ranks) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("λ (non-negativity loss weight)")
    ax.set_ylabel("rank r")
    finite = grid[np.isfinite(grid)]
    mid = float(np.mean(finite)) if finite.size else 0.0
    for i in range(len(ranks)):
        for j in range(len(lams)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.4f}\n±{std[i, j]:.4f}", ha="center",
                        va="center", fontsize=7, color="white" if grid[i, j] < mid else "black")
    fig.colorbar(im, ax=ax, label=f"test {metric.upper()}")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, extra: Optional[List[str]] = None, make_cfg: Optional[Callable] = None) -> int:
    """Train and evaluate every (r, lambda) cell x seed; print and save the grid.

    ``make_cfg(args, **overrides) -> TrainConfig`` defaults to the CLI's builder
    (flags > --config file > defaults); ``extra`` goes to the data-prep step.
    """
    from lifelong import compare as C
    from tfmodels import metrics as M
    from tfmodels import registry
    import tensorflow as tf

    if make_cfg is None:
        from lifelong.cli import _train_config as make_cfg
    extra = list(extra or [])
    model = getattr(args, "model", None) or "lrea"
    baselines = [b.strip() for b in str(getattr(args, "baselines", "") or "").split(",")
                 if b.strip()]
    for m in [model] + baselines:
        if m not in registry.MODELS:
            raise UsageError(f"unknown model {m!r}; registered: {', '.join(registry.names())}")
    ranks = _parse_list(args.ranks, int, "ranks")
    lams = _parse_list(args.lams, float, "lams")
    seeds = _parse_list(args.seeds, int, "seeds")
    base_cfg = getattr(args, "long_module_config", None)
    try:
        base_cfg = json.loads(base_cfg) if isinstance(base_cfg, str) else dict(base_cfg or {})
    except json.JSONDecodeError as e:
        raise UsageError(f"--long_module_config is not valid JSON: {e}") from None
    # every flag mistake is reported before the work folder is created
    design = getattr(args, "design", "full")
    anchor = resolve_anchor(ranks, lams, getattr(args, "anchor_rank", None),
                            getattr(args, "anchor_lam", None))
    cells = grid_cells(ranks, lams, design, anchor)
    work = args.work_dir or os.path.join("artifacts", f"lrea-grid-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(work, exist_ok=True)
    data_dir = args.prepared or C.prepare_data(args, extra, os.path.join(work, "data"))
    command = "lifelong " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("lifelong") else "lrea grid ..."

    rows = []
    # the matrix shows every rank / lambda that has a cell (the anchors included)
    ranks = sorted({r for r, _ in cells})
    lams = sorted({lam for _, lam in cells})
    resume = bool(getattr(args, "resume", False))
    total = (len(cells) + len(baselines)) * len(seeds)
    n = 0
    for b in baselines:
        for seed in seeds:
            n += 1
            print(f"[lrea-grid] ({n}/{total}) baseline {b} seed={seed}", file=sys.stderr)
            tf.keras.backend.clear_session()
            cfg = make_cfg(args, data=data_dir, model=b, seed=seed, long_module_config={},
                           out_dir=os.path.join(work, "runs", f"{b}-s{seed}"))
            summary, result, _ = C.train_or_reuse(cfg, resume, "lrea-grid")
            rows.append({**C.result_row(b, seed, summary, result, cfg.out_dir),
                         "rank": None, "lam": None})
    for r, lam in cells:
        for seed in seeds:
            n += 1
            name = cell_name(r, lam)
            print(f"[lrea-grid] ({n}/{total}) {name} seed={seed}", file=sys.stderr)
            tf.keras.backend.clear_session()
            lmc = {**base_cfg, "rank": r, "lam": lam}
            cfg = make_cfg(args, data=data_dir, model=model, seed=seed, long_module_config=lmc,
                           out_dir=os.path.join(work, "runs", f"{model}-r{r}-lam{lam:g}-s{seed}"))
            summary, result, reused = C.train_or_reuse(cfg, resume, "lrea-grid")
            row = {**C.result_row(name, seed, summary, result, cfg.out_dir),
                   "rank": r, "lam": lam}
            if getattr(args, "absorbed_gap", False):
                gap_path = os.path.join(cfg.out_dir, f"absorbed-gap-{cfg.eval_split}.json")
                if reused and os.path.exists(gap_path):
                    with open(gap_path) as f:
                        gap = json.load(f)
                else:
                    gap = absorbed_gap(cfg.out_dir, cfg.eval_split)
                row.update({k: gap[k] for k in ("mean_abs_ctr_diff", "max_abs_ctr_diff",
                                                "auc_train_path", "auc_absorbed_path")})
            rows.append(row)
            print(f"[lrea-grid] {name} seed={seed}: " + " ".join(
                f"{label} {M.format_metric(result.get(k), result.get(f'{k}_undefined'))}"
                for label, k in (("AUC", "auc"), ("GAUC", "gauc"), ("logloss", "logloss"))),
                file=sys.stderr)

    summary = C.summarize(rows)
    text = [C.format_table(summary, command), "", format_matrix(summary, ranks, lams, "auc")]
    if any("gauc" in r and r["gauc"] is not None for r in rows):
        text += ["", format_matrix(summary, ranks, lams, "gauc")]
    if REFERENCE in summary:
        text += ["", format_vs_reference(summary, cells)]
    if getattr(args, "absorbed_gap", False):
        text += ["", "| cell | mean \\|CTR diff\\| absorbed vs train | AUC train path | "
                 "AUC absorbed path |", "|---|---|---|---|"]
        for name in summary:
            rs = [r for r in rows if r["model"] == name and "mean_abs_ctr_diff" in r]
            if not rs:          # a baseline
                continue
            text.append(f"| {name} | {np.mean([r['mean_abs_ctr_diff'] for r in rs]):.2e} | "
                        + " | ".join(M.format_metric(_defined_mean(r[k] for r in rs))
                                     for k in ("auc_train_path", "auc_absorbed_path")) + " |")
    table = "\n".join(text)
    print(table)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"command": command, "data": data_dir, "model": model, "ranks": ranks,
                   "lams": lams, "design": design, "anchor": list(anchor), "seeds": seeds, "rows": rows, "summary": summary,
                   "config": {k: v for k, v in vars(args).items() if k != "func"}},
                  f, indent=2, default=str)
    parts = os.path.abspath(data_dir).split(os.sep)
    title = f"{model} on {os.sep.join(parts[-2:])}"      # e.g. foundation-ml/data
    ref = summary.get(REFERENCE, {}).get("auc")
    if ref and ref["mean"] is not None:
        title += f"; {REFERENCE} AUC {_mean_std(ref)}"
    plot_heatmap(summary, ranks, lams, os.path.join(work, "grid.png"), title)
    print(f"[lrea-grid] results in {work}/results.{{md,json}} and grid.png", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m lifelong.reports.lrea_grid [grid flags]`` runs the grid;
    ``python -m lifelong.reports.lrea_grid gap --run RUN_DIR [--split test]`` prints
    :func:`absorbed_gap` of a trained run (until the ``lifelong`` CLI wires both)."""
    import argparse
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gap"]:
        p = argparse.ArgumentParser(prog="lrea_grid gap",
                                    description="training path vs absorbed serving path")
        p.add_argument("--run", required=True, help="run directory of a trained LREA model")
        p.add_argument("--split", default="test")
        p.add_argument("--data", help="evaluate on another prepared dataset")
        a = p.parse_args(argv[1:])
        print(json.dumps(absorbed_gap(a.run, a.split, data=a.data), indent=2, default=str))
        return 0
    p = argparse.ArgumentParser(prog="lrea_grid", description="LREA r x lambda grid "
                                "(paper Table 3); extra flags go to the data-prep step")
    add_arguments(p)
    args, extra = p.parse_known_args(argv)
    return run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
