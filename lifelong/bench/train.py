"""``lifelong bench train``: training speed of models at several long-window lengths,
today's training path next to the faster one (issue 22 item 6).

Every (model, L, path) cell runs in its own Python process (``python -m
lifelong.bench.train --cell JSON``), so that

* the process-wide settings of a path apply from the start (the CPU allocator is
  chosen when TensorFlow starts),
* the cell's peak resident memory (``VmHWM``) is its own: the input pipeline with the
  run's shuffle buffer (``--shuffle_buffer``, TrainConfig's 20,000 by default), the
  model, the optimizer and the training step -- what a training run at that L holds.

A cell builds the training pipeline, takes ``--warmup + --steps`` batches and holds them
in memory, traces the training step on ``--warmup`` of them, then times ``--steps``
steps on the held batches (the model's time, without input) and, with ``--input
pipeline|both``, ``--steps`` steps fed by the live pipeline (the difference is the share
of a step that is input). Wall time and CPU time (all threads of the process) are both
recorded: on a shared machine wall time depends on the other jobs, CPU time much less.

Paths (:data:`PATHS`):

* ``today`` -- the training path before issue 22 item 6: malloc-based CPU allocator
  (``TF_CPU_ALLOCATOR_USE_BFC=false``), the DIN unit's per-candidate layout, the legacy
  input pipeline, no XLA;
* ``new`` -- TensorFlow's BFC allocator for CPU memory (``tfmodels/_env.py`` makes it the
  default), the DIN unit's "valid" layout (its MLP over the non-padded positions only
  when fewer than half are valid, its folded form otherwise, "folded" under XLA; the
  attention MLP without elementwise PReLU passes, session 9), the parallel input
  pipeline, ``--jit_compile`` (auto = :data:`tfmodels.train.JIT_AUTO`);
* ``new_s8`` -- ``new`` as it was in session 8 (the "valid_prelu" layout: the PReLU
  layers over every row, the folded layout above 80% valid);
* ``new_folded`` -- ``new`` as it was before session 8 (the "folded" layout over every
  position, TensorFlow's default kernels); ``new``, ``new_s8`` and ``new_xla`` run with
  oneDNN (``TF_ENABLE_ONEDNN_OPTS=1``, what training commands choose,
  :func:`tfmodels._env.prefer_onednn_for_training`), ``today`` and ``today_bfc`` without;
* ``new_xla`` -- ``new`` with XLA on (how ``auto`` was decided);
* ``today_bfc`` (today + the BFC allocator) and ``new_rows`` (new with the DIN unit's
  "rows" layout): one change at a time, to see what each gives.

The table reports examples/s, the speed-up of each path over ``today`` and the L-ratio
time per example at the longest / shortest L (linear cost in L: ratio = length ratio;
the issue's target <= 4.4 for L 2,000 / 500), with the command line. ``--out`` writes
JSON + PNG. Numbers, not timed tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

#: the environments of the paths: allocator, oneDNN kernels
_MALLOC = {"TF_CPU_ALLOCATOR_USE_BFC": "false", "TF_ENABLE_ONEDNN_OPTS": "0"}
_BFC = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_ENABLE_ONEDNN_OPTS": "0"}
_BFC_ONEDNN = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_ENABLE_ONEDNN_OPTS": "1"}

#: path -> (environment of the cell's process, TrainConfig-like settings)
PATHS: Dict[str, Dict] = {
    "today": {"env": _MALLOC, "din_path": "per_candidate", "input_pipeline": "legacy",
              "jit_compile": "off"},
    "new": {"env": _BFC_ONEDNN, "din_path": "valid", "input_pipeline": "parallel",
            "jit_compile": None},   # None: --jit_compile
    "new_xla": {"env": _BFC_ONEDNN, "din_path": "valid", "input_pipeline": "parallel",
                "jit_compile": "on"},
    # single changes against today, to see what each one gives
    "today_bfc": {"env": _BFC, "din_path": "per_candidate", "input_pipeline": "legacy",
                  "jit_compile": "off"},
    "new_rows": {"env": _BFC_ONEDNN, "din_path": "rows", "input_pipeline": "parallel",
                 "jit_compile": None},
    # "new" as it was in session 8 (PReLU layers over the rows, folded above 80% valid)
    "new_s8": {"env": _BFC_ONEDNN, "din_path": "valid_prelu", "input_pipeline": "parallel",
               "jit_compile": None},
    # "new" as it was before session 8 (the DIN unit over every position, TF's own kernels)
    "new_folded": {"env": _BFC, "din_path": "folded", "input_pipeline": "parallel",
                   "jit_compile": None},
}
INPUTS = ("materialised", "pipeline", "both")


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_cell(cell: Dict) -> Dict:
    """One (model, L, path) measurement in THIS process (see the module docstring)."""
    import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    import tensorflow as tf
    from tfmodels import data as D
    from tfmodels import layers
    from tfmodels import schema as S
    from tfmodels.model import build_model
    from tfmodels.train import resolve_jit_compile

    L, batch, steps, warmup = cell["long_len"], cell["batch_size"], cell["steps"], cell["warmup"]
    jit = resolve_jit_compile(cell["jit_compile"])
    layers.set_din_path(layers.din_path_for_jit(cell["din_path"], jit))
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    fschema = S.FeatureSchema.from_data_dir(cell["data"], cell["short_len"], L)
    out = {k: cell[k] for k in ("model", "long_len", "path", "batch_size", "steps",
                                "din_path", "input_pipeline", "jit_compile")}
    t0 = time.perf_counter()
    ds = D.make_dataset(S.split_pattern(cell["data"], "train"), cell["short_len"], L, batch,
                        shuffle=True, seed=0, shuffle_buffer=cell["shuffle_buffer"],
                        repeat=True, drop_remainder=True, pipeline=cell["input_pipeline"])
    it = iter(ds)
    first = next(it)
    out["first_batch_s"] = time.perf_counter() - t0   # includes the shuffle buffer's fill
    batches = [first] + [next(it) for _ in range(warmup + steps - 1)]
    # the share of the long window's positions that hold a behavior (the "valid" DIN
    # layout skips the others, so its speed-up depends on it)
    lens = tf.concat([tf.reshape(b[f"{S.LONG}_len"], [-1]) for b in batches], 0)
    out["long_valid_share"] = float(tf.reduce_mean(tf.cast(lens, tf.float64))) / L
    held = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}).repeat()
    del batches, first
    m = build_model(fschema, cell["model"], emb_dim=cell["emb_dim"])
    m.compile(tf.keras.optimizers.Adam(1e-3), jit_compile=jit)
    out["jit_compile_resolved"] = jit
    step = m.make_train_function()
    held_it = iter(held)
    t0 = time.perf_counter()
    for _ in range(warmup):
        float(step(held_it)["loss"])
    out["trace_and_warmup_s"] = time.perf_counter() - t0
    time.sleep(1.0)   # let the pipeline's background refill finish before timing

    def timed(iterator):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            float(step(iterator)["loss"])
        return (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps

    out["wall_s_per_step"], out["cpu_s_per_step"] = timed(held_it)
    out["examples_per_s"] = batch / out["wall_s_per_step"]
    if cell["input"] in ("pipeline", "both"):
        pw, pc = timed(it)
        out["pipeline_wall_s_per_step"], out["pipeline_cpu_s_per_step"] = pw, pc
        out["pipeline_examples_per_s"] = batch / pw
        out["input_share_wall"] = max(0.0, 1.0 - out["wall_s_per_step"] / pw)
        out["input_share_cpu"] = max(0.0, 1.0 - out["cpu_s_per_step"] / pc)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _run_cell(cell: Dict) -> Dict:
    """:func:`measure_cell` in a fresh process with the path's environment."""
    env = dict(os.environ, **PATHS[cell["path"]]["env"])
    proc = subprocess.run([sys.executable, "-m", "lifelong.bench.train", "--cell",
                           json.dumps(cell)], env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {k: cell[k] for k in ("model", "long_len", "path")} | {
        "error": f"exit {proc.returncode}: {err}"}


def _cells(args, models, lens, paths) -> List[Dict]:
    cells = []
    for model in models:
        for L in lens:
            for path in paths:   # paths of one (model, L) back to back: similar load
                spec = PATHS[path]
                cells.append({"data": args.data, "model": model, "long_len": L, "path": path,
                              "batch_size": args.batch_size, "steps": args.steps,
                              "warmup": args.warmup, "short_len": args.short_len,
                              "emb_dim": args.emb_dim, "shuffle_buffer": args.shuffle_buffer,
                              "input": args.input, "din_path": spec["din_path"],
                              "input_pipeline": spec["input_pipeline"],
                              "jit_compile": spec["jit_compile"] or args.jit_compile})
    return cells


def summarise(rows: List[Dict], lens: List[int]) -> List[Dict]:
    """Per (model, path): speed-up over ``today`` at each L and the L-ratio."""
    ok = {(r["model"], r["long_len"], r["path"]): r for r in rows if "error" not in r}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for path in dict.fromkeys(r["path"] for r in rows):
            s = {"model": model, "path": path}
            lo, hi = ok.get((model, min(lens), path)), ok.get((model, max(lens), path))
            if lo and hi and len(lens) > 1:
                s["l_ratio_wall"] = hi["wall_s_per_step"] / lo["wall_s_per_step"]
                s["l_ratio_cpu"] = hi["cpu_s_per_step"] / lo["cpu_s_per_step"]
                s["length_ratio"] = max(lens) / min(lens)
            for L in lens:
                base, r = ok.get((model, L, "today")), ok.get((model, L, path))
                if base and r and path != "today":
                    s[f"speedup_wall_L{L}"] = base["wall_s_per_step"] / r["wall_s_per_step"]
                    s[f"speedup_cpu_L{L}"] = base["cpu_s_per_step"] / r["cpu_s_per_step"]
            out.append(s)
    return out


def print_train(rows: List[Dict], summary: List[Dict], lens: List[int], command: str) -> None:
    print(f"command: {command}\n")
    print("| model | L | path | examples/s | wall ms/step | CPU ms/step | input share "
          "(wall / CPU) | first batch s | trace s | peak RSS MiB | long window valid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['long_len']} | {r['path']} | failed: {r['error']} "
                  f"| | | | | | | |")
            continue
        share = (f"{r['input_share_wall']:.0%} / {r['input_share_cpu']:.0%}"
                 if "input_share_wall" in r else "")
        print(f"| {r['model']} | {r['long_len']} | {r['path']} | {r['examples_per_s']:.0f} | "
              f"{r['wall_s_per_step'] * 1000:.0f} | {r['cpu_s_per_step'] * 1000:.0f} | "
              f"{share} | {r['first_batch_s']:.1f} | {r['trace_and_warmup_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r.get('long_valid_share', float('nan')):.0%} |")
    print()
    print("| model | path | " + " | ".join(f"speed-up L={L} (wall / CPU)" for L in lens)
          + f" | time ratio L={max(lens)} / L={min(lens)} (wall / CPU) |")
    print("|---|---|" + "---|" * (len(lens) + 1))
    for s in summary:
        sp = " | ".join(f"{s[f'speedup_wall_L{L}']:.2f}x / {s[f'speedup_cpu_L{L}']:.2f}x"
                        if f"speedup_wall_L{L}" in s else "" for L in lens)
        lr = (f"{s['l_ratio_wall']:.2f} / {s['l_ratio_cpu']:.2f}" if "l_ratio_wall" in s
              else "")
        print(f"| {s['model']} | {s['path']} | {sp} | {lr} |")


def _plot_train(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    keys = dict.fromkeys((r["model"], r["path"]) for r in rows if "error" not in r)
    for model, p in keys:
        rs = sorted((r for r in rows if r["model"] == model and r["path"] == p
                     and "error" not in r), key=lambda r: r["long_len"])
        ax.plot([r["long_len"] for r in rs], [r["cpu_s_per_step"] * 1000 for r in rs],
                "o-" if p != "today" else "o--", label=f"{model} ({p})")
    ax.set_xlabel("long window length L")
    ax.set_ylabel("CPU ms per training step")
    ax.set_yscale("log")
    ax.set_title("training step CPU time vs L (batch %d)" % rows[0]["batch_size"], fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from lifelong.bench import record
    from lifelong.bench.flags import parse_ints
    from tfmodels.errors import UsageError
    from tfmodels import registry
    if not args.data:
        raise UsageError("--data is required (a prepared dataset directory)")
    lens = parse_ints(args.long_lens, "long_lens")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in registry.MODELS]
    if unknown:
        raise UsageError(f"unknown models {unknown}; registered: {', '.join(registry.names())}")
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise UsageError(f"--paths must be comma separated names of {', '.join(PATHS)}, "
                         f"got {args.paths!r}")
    if args.input not in INPUTS:
        raise UsageError(f"--input must be one of {', '.join(INPUTS)}, got {args.input!r}")
    if args.jit_compile not in ("auto", "on", "off"):
        raise UsageError(f"--jit_compile must be auto, on or off, got {args.jit_compile!r}")
    if args.steps < 1 or args.warmup < 1:
        raise UsageError("--steps and --warmup must be >= 1")
    command = record.command_line()
    rows = []
    for cell in _cells(args, models, lens, paths):
        r = _run_cell(cell)
        rows.append(r)
        msg = (f"failed: {r['error']}" if "error" in r else
               f"{r['examples_per_s']:.0f} examples/s, CPU {r['cpu_s_per_step'] * 1000:.0f} "
               f"ms/step, peak RSS {r['peak_rss_mb']:.0f} MiB")
        print(f"[bench train] {r['model']} L={r['long_len']} {r['path']}: {msg}",
              file=sys.stderr, flush=True)
        if args.out:   # partial results survive an interrupted run
            record.write_prefixed(args.out, command, rows)
    summary = summarise(rows, lens)
    print_train(rows, summary, lens, command)
    if args.out:
        record.write_prefixed(args.out, command, rows + [{"summary": summary}])
        if any("error" not in r for r in rows):
            _plot_train(rows, args.out + ".png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        result = measure_cell(json.loads(sys.argv[2]))
        print(json.dumps(result), flush=True)
    else:
        sys.exit("usage: python -m lifelong.bench.train --cell JSON (used by lifelong bench "
                 "train)")
