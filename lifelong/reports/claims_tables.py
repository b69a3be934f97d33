"""``lifelong claims``: the papers' claims checked against several ``bench accuracy`` tables.

``lifelong bench accuracy`` checks the claims (:mod:`lifelong.reports.claims`) against
the models of its own run. A benchmark that is run in parts (some models on one machine
or day, the others later, or a table kept only in ``docs/benchmarks.md``) has its
per-model figures in several files; this command reads them and checks every claim
against the union, so that a relation between models of different parts is tested.

Inputs, one or more of:

* an ``accuracy.json`` written by ``lifelong bench accuracy`` (its ``summary``);
* a Markdown file holding the table ``bench accuracy`` writes (``accuracy.md``, or a
  page such as ``docs/benchmarks.md``): every table whose header has ``model``, the
  metric (``AUC``) and ``seeds`` columns, cells ``mean ± std``. ``--section TEXT``
  reads only the first such table after the first line containing TEXT (a page holds
  several tables of other runs).

A model found in two inputs is taken from the LAST one and the output says so (the
later part is the re-run). Only the mean, sample std and seed count per model are read,
which is all the verdict uses (claims.py: two standard errors of the difference of
the means); the table printed first lists what was read from where.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from lifelong.reports import claims as C
from tfmodels.errors import LifelongError

_CELL = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)\s*$")


class ClaimsInputError(ValueError, LifelongError):
    """An input file that holds no readable per-model table."""


def _split_row(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def stats_from_markdown(text: str, metric: str = "auc", section: Optional[str] = None
                        ) -> Dict[str, Dict]:
    """``{model: {"mean", "std", "n"}}`` from the ``bench accuracy`` tables in ``text``.

    A table counts when its header names ``model``, ``metric`` (case-insensitive) and
    ``seeds``; rows whose metric cell is not ``mean ± std`` are skipped (e.g. ``n/a``).
    With ``section``, only the first such table after the first line containing it is
    read (a page may hold tables of other runs further down)."""
    lines = text.splitlines()
    if section is not None:
        start = next((i for i, l in enumerate(lines) if section in l), None)
        if start is None:
            raise ClaimsInputError(f"--section {section!r}: no line contains it")
        lines = lines[start + 1:]
    out: Dict[str, Dict] = {}
    i = 0
    while i < len(lines):
        head = lines[i]
        if head.lstrip().startswith("|"):
            cols = [c.lower() for c in _split_row(head)]
            if "model" in cols and metric.lower() in cols and "seeds" in cols:
                c_model, c_metric = cols.index("model"), cols.index(metric.lower())
                c_seeds = cols.index("seeds")
                i += 2                                      # the |---| line
                while i < len(lines) and lines[i].lstrip().startswith("|"):
                    row = _split_row(lines[i])
                    i += 1
                    if len(row) != len(cols):
                        continue
                    m = _CELL.match(row[c_metric])
                    if not m or not row[c_seeds].isdigit():
                        continue
                    out[row[c_model]] = {"mean": float(m.group(1)), "std": float(m.group(2)),
                                         "n": int(row[c_seeds])}
                if section is not None:
                    break
                continue
        i += 1
    return out


def stats_from_file(path: str, metric: str = "auc", section: Optional[str] = None
                    ) -> Dict[str, Dict]:
    """Per-model stats of one input (``accuracy.json`` or Markdown); refuses a file that
    yields none, naming what was looked for."""
    if not os.path.isfile(path):
        raise ClaimsInputError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            summary = json.loads(text)["summary"]
        except (ValueError, KeyError, TypeError) as e:
            raise ClaimsInputError(f"{path}: not a `bench accuracy` accuracy.json "
                                   f"(no 'summary': {e})") from None
        stats = {m: s for m, s in C.stats_from_summary(summary, metric).items()
                 if s["mean"] is not None}
    else:
        stats = stats_from_markdown(text, metric, section)
    if not stats:
        raise ClaimsInputError(
            f"{path}: no per-model table found (a Markdown table with 'model', "
            f"{metric.upper()!r} cells 'mean ± std' and 'seeds' columns"
            + (f", first after the line containing {section!r}" if section else "") + ")")
    return stats


def merge(parts: Sequence[Tuple[str, Dict[str, Dict]]]
          ) -> Tuple[Dict[str, Dict], Dict[str, str], List[str]]:
    """Union of the inputs' stats; a model in several inputs comes from the last one.
    Returns (stats, model -> source, notes on the replaced rows)."""
    stats: Dict[str, Dict] = {}
    source: Dict[str, str] = {}
    notes: List[str] = []
    for path, part in parts:
        for model, s in part.items():
            if model in stats:
                notes.append(f"{model}: taken from {path} (also in {source[model]})")
            stats[model], source[model] = s, path
    return stats, source, notes


#: Markdown tables print means and stds with 4 decimals: a relation whose |diff| is
#: this close to its margin may change verdict with the unrounded figures
ROUNDING_TOLERANCE = 2e-4


def near_boundary(results: Sequence[Dict], tol: float = ROUNDING_TOLERANCE) -> List[str]:
    """The tested relations whose |diff| is within ``tol`` of their noise margin."""
    return [f"{r['paper']}: {x['relation']} ({x['why']})" for r in results
            for x in r["relations"]
            if x.get("margin") is not None and abs(abs(x["diff"]) - x["margin"]) <= tol]


def format_report(stats: Dict[str, Dict], source: Dict[str, str], notes: List[str],
                  results: Sequence[Dict], metric: str) -> str:
    lines = [f"| model | {metric.upper()} mean | std | seeds | from |", "|---|---|---|---|---|"]
    for model, s in stats.items():
        lines.append(f"| {model} | {s['mean']:.4f} | {s['std']:.4f} | {s['n']} | {source[model]} |")
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    rounded = [p for p in dict.fromkeys(source.values()) if not p.endswith(".json")]
    close = near_boundary(results) if rounded else []
    if close:
        lines += ["", f"At the boundary: the Markdown inputs ({', '.join(rounded)}) carry 4 "
                  f"decimals, and these relations' |diff| is within {ROUNDING_TOLERANCE:g} of "
                  "their margin, so their verdict could change with unrounded figures:"]
        lines += [f"* {c}" for c in close]
    return "\n".join(lines + ["", C.format_claims(results)])


def plot(stats: Dict[str, Dict], source: Dict[str, str], path: str, metric: str = "auc",
         title: str = "") -> List[str]:
    """Horizontal bars of the metric's mean ± std per model, best on top, coloured by the
    input each model was read from; returns the models in plotted order (top first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = sorted(stats, key=lambda m: -stats[m]["mean"])
    inputs = list(dict.fromkeys(source[m] for m in order))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(order) + 1.6))
    for y, m in enumerate(reversed(order)):
        s = stats[m]
        ax.barh(y, s["mean"], xerr=s["std"], capsize=3,
                color=colours(inputs.index(source[m]) % 10))
        ax.text(s["mean"] + s["std"], y, f" {s['mean']:.4f} (n={s['n']})", va="center",
                fontsize=8)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(list(reversed(order)))
    means = [stats[m]["mean"] for m in order]
    spread = max([stats[m]["std"] for m in order] + [0.005])
    ax.set_xlim(max(0.0, min(means) - 4 * spread), min(1.0, max(means) + 8 * spread))
    ax.set_xlabel(f"test {metric.upper()} (mean ± sample std over seeds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(inputs))]
    ax.legend(handles, [os.path.basename(p) or p for p in inputs], fontsize=7,
              loc="lower right", title="read from", title_fontsize=7)
    ax.set_title(title or f"{metric.upper()} per model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return order


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="+", help="accuracy.json or Markdown files holding "
                   "`bench accuracy` tables (a model in several: the last one wins)")
    p.add_argument("--metric", default="auc", help="the metric column (default auc)")
    p.add_argument("--section", help="Markdown inputs: read only the first table after "
                   "the first line containing this text")
    p.add_argument("--out", help="also write the report here (Markdown)")
    p.add_argument("--plot", help="also draw the metric per model (mean ± std, coloured by "
                   "input) as a PNG here")
    p.add_argument("--title", default="", help="--plot: the figure's title")


def command_line(args) -> str:
    """The command that reproduces this report (from the parsed flags, not sys.argv: the
    CLI may be called in process)."""
    import shlex
    parts = ["lifelong", "claims", *args.tables]
    for flag in ("metric", "section", "plot", "title"):
        value = getattr(args, flag, None)
        if value and not (flag == "metric" and value == "auc"):
            parts += [f"--{flag}", value]
    return " ".join(shlex.quote(p) for p in parts)


def run(args, extra=()) -> int:
    parts = [(path, stats_from_file(path, args.metric, args.section)) for path in args.tables]
    stats, source, notes = merge(parts)
    # every claim is an ordering of the papers' AUC; --metric checks the same ordering
    # on another column (e.g. gauc)
    results = [{**C.check_claim(c, stats), "metric": args.metric} for c in C.CLAIMS]
    text = format_report(stats, source, notes, results, args.metric)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"command: {command_line(args)}\n\n{text}\n")
        print(f"report: {args.out}", file=sys.stderr)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(stats, source, args.plot, args.metric, args.title)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
