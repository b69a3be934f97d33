"""Foundation benchmarks (``lifelong bench storage|train``): numbers, not timed tests.

* ``storage``: bytes on disk of a prepared dataset (independent of L by
  construction: L is a read-time parameter) next to what materialising every
  impression's windows as examples would cost at each L.
* ``train``: training examples/s of a model at several long-window lengths and
  the time ratio between the longest and the shortest (linear cost in L means a
  ratio close to L_max / L_min for DIN-L, close to 1 for short-only DIN).

Each prints a table and the command line that produced it; ``--out`` writes
JSON (+ PNG for ``train``).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S


def _dir_bytes(pattern: str) -> int:
    return sum(os.path.getsize(f) for f in tf.io.gfile.glob(pattern))


def _example(features: Dict[str, np.ndarray]) -> bytes:
    feats = {}
    for k, v in features.items():
        v = np.asarray(v).ravel()
        if v.dtype.kind == "f":
            feats[k] = tf.train.Feature(float_list=tf.train.FloatList(value=v))
        else:
            feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=v))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def storage(data_dir: str, long_lens: List[int], split: str = "test", short_len: int = 50,
            max_users: int = 0) -> Dict:
    """Per-user storage vs materialised windows for the same impressions of a split."""
    pattern = S.split_pattern(data_dir, split)
    stored = _dir_bytes(pattern)
    # gzip hides duplication (a user's windows repeat the same history), so also
    # compare serialized (uncompressed) bytes
    stored_raw = sum(len(r.numpy()) for r in
                     tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), compression_type="GZIP"))
    rows = []
    for L in long_lens:
        tmp = tempfile.mkdtemp(prefix="bench_storage_")
        path = os.path.join(tmp, "windows.tfrecord.gz")
        n, raw = 0, 0
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            ds = D.make_dataset(pattern, short_len, L, 256)
            for batch in ds:
                arrays = {k: v.numpy() for k, v in batch.items()}
                for i in range(len(arrays[S.LABEL])):
                    # a materialised example keeps only the real rows (like a
                    # VarLen feature), so padding does not inflate it
                    ex = {}
                    for k, v in arrays.items():
                        row = v[i]
                        if row.ndim == 1 and k.startswith(("long_", "short_")):
                            row = row[:int(arrays[k.split("_")[0] + "_len"][i])]
                        ex[k] = row
                    serialized = _example(ex)
                    raw += len(serialized)
                    w.write(serialized)
                    n += 1
        rows.append({"long_len": L, "impressions": n, "per_user_bytes": stored,
                     "per_user_raw_bytes": stored_raw, "materialised_raw_bytes": raw,
                     "materialised_bytes": os.path.getsize(path)})
        os.remove(path)
    base = rows[0]["per_user_bytes"]
    for r in rows:
        r["per_user_ratio_vs_first"] = r["per_user_bytes"] / base
        r["materialised_over_per_user"] = r["materialised_bytes"] / r["per_user_bytes"]
        r["materialised_over_per_user_raw"] = (r["materialised_raw_bytes"]
                                               / r["per_user_raw_bytes"])
    return {"data": data_dir, "split": split, "rows": rows}


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


def run(args) -> int:
    if not args.data:
        raise ValueError("--data is required (a prepared dataset directory)")
    lens = [int(x) for x in args.long_lens.split(",") if x.strip()]
    command = "lifelong bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if args.what == "storage":
        res = storage(args.data, lens, args.split, args.short_len)
        print(f"command: {command}\n")
        print("| L | impressions | per-user records gzip (raw) bytes | ratio vs first L | "
              "materialised windows gzip (raw) bytes | materialised / per-user gzip (raw) |")
        print("|---|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['long_len']} | {r['impressions']} | {r['per_user_bytes']:,} "
                  f"({r['per_user_raw_bytes']:,}) | {r['per_user_ratio_vs_first']:.3f} | "
                  f"{r['materialised_bytes']:,} ({r['materialised_raw_bytes']:,}) | "
                  f"{r['materialised_over_per_user']:.1f}x "
                  f"({r['materialised_over_per_user_raw']:.1f}x) |")
        results = [res]
    else:
        results = [train_throughput(args.data, m, lens, args.steps, args.batch_size,
                                    args.short_len, args.emb_dim)
                   for m in args.models.split(",")]
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
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "results": results}, f, indent=2)
        if args.what == "train":
            _plot_train(results, args.out + ".png")
    return 0
