"""``lifelong bench train``: training examples/s of models at several long-window lengths.

For each model of ``--models`` and each L of ``--long_lens`` it times ``--steps``
training steps on batches materialised beforehand (so the timing is the model's,
not the input pipeline's) and prints the time ratio between the longest and the
shortest L (linear cost in L means a ratio close to L_max / L_min for DIN-L, close
to 1 for short-only DIN), with the command line that produced the table;
``--out`` writes JSON + PNG. Numbers, not timed tests.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from lifelong.bench import record
from lifelong.bench.flags import parse_ints
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import UsageError


def train_throughput(data_dir: str, model: str, long_lens: List[int], steps: int,
                     batch_size: int, short_len: int, emb_dim: int, warmup: int = 3) -> Dict:
    from tfmodels.model import build_model
    rows = []
    for L in long_lens:
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(0)
        fschema = S.FeatureSchema.from_data_dir(data_dir, short_len, L)
        m = build_model(fschema, model, emb_dim=emb_dim)
        m.compile(tf.keras.optimizers.Adam(1e-3))
        ds = D.make_dataset(S.split_pattern(data_dir, "train"), short_len, L, batch_size,
                            shuffle=True, seed=0, repeat=True, drop_remainder=True)
        # Materialise the batches first so the timing is the model's, not the input's.
        batches = list(ds.take(warmup + steps))
        cached = tf.data.Dataset.from_tensor_slices(
            {k: tf.stack([b[k] for b in batches]) for k in batches[0]})
        m.fit(cached.take(warmup), epochs=1, verbose=0)
        t0 = time.perf_counter()
        m.fit(cached.skip(warmup), epochs=1, verbose=0)
        dt = time.perf_counter() - t0
        rows.append({"long_len": L, "steps": steps, "batch_size": batch_size,
                     "seconds": dt, "examples_per_s": steps * batch_size / dt})
        print(f"[bench train] {model} L={L}: {rows[-1]['examples_per_s']:.0f} examples/s",
              file=sys.stderr)
    rows_by_l = sorted(rows, key=lambda r: r["long_len"])
    ratio = rows_by_l[-1]["seconds"] / rows_by_l[0]["seconds"]
    return {"data": data_dir, "model": model, "rows": rows,
            "time_ratio_longest_over_shortest": ratio,
            "length_ratio": rows_by_l[-1]["long_len"] / rows_by_l[0]["long_len"]}


def _plot_train(results: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for res in results:
        ls = [r["long_len"] for r in res["rows"]]
        ax.plot(ls, [r["seconds"] / r["steps"] * 1000 for r in res["rows"]], "o-",
                label=res["model"])
    ax.set_xlabel("long window length L")
    ax.set_ylabel("ms per training step")
    ax.set_title("training step time vs L (batch %d)" % results[0]["rows"][0]["batch_size"],
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_train(results: List[Dict], lens: List[int], command: str) -> None:
    print(f"command: {command}\n")
    print("| model | L | examples/s | ms/step |")
    print("|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            print(f"| {res['model']} | {r['long_len']} | {r['examples_per_s']:.0f} | "
                  f"{r['seconds'] / r['steps'] * 1000:.1f} |")
    for res in results:
        print(f"{res['model']}: time ratio L={max(lens)} / L={min(lens)} = "
              f"{res['time_ratio_longest_over_shortest']:.2f} "
              f"(length ratio {res['length_ratio']:.1f})")


def run(args) -> int:
    if not args.data:
        raise UsageError("--data is required (a prepared dataset directory)")
    lens = parse_ints(args.long_lens, "long_lens")
    command = record.command_line()
    results = [train_throughput(args.data, m, lens, args.steps, args.batch_size,
                                args.short_len, args.emb_dim)
               for m in args.models.split(",")]
    print_train(results, lens, command)
    if args.out:
        record.write_prefixed(args.out, command, results)
        _plot_train(results, args.out + ".png")
    return 0
