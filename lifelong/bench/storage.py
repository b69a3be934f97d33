"""``lifelong bench storage``: bytes on disk of a prepared dataset vs materialised windows.

The per-user records store each history once, so their size does not depend on L
(L is a read-time parameter); materialising every impression's windows as examples
costs about L times more. For the same impressions of a split this prints both at
each ``--long_lens`` L, gzip and raw (gzip hides the duplication: a user's windows
repeat the same history), with the command line that produced the table; ``--out``
writes JSON. Numbers, not timed tests.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from lifelong.bench import record
from lifelong.bench.flags import parse_ints
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import UsageError


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


def print_storage(res: Dict, command: str) -> None:
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


def run(args) -> int:
    if not args.data:
        raise UsageError("--data is required (a prepared dataset directory)")
    lens = parse_ints(args.long_lens, "long_lens")
    command = record.command_line()
    res = storage(args.data, lens, args.split, args.short_len)
    print_storage(res, command)
    if args.out:
        record.write_prefixed(args.out, command, [res])
    return 0
