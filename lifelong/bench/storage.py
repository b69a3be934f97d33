"""``lifelong bench storage``: bytes on disk of a prepared dataset vs materialised windows.

The per-user records store each history once, so their size does not depend on L
(L is a read-time parameter); materialising every impression's windows as examples
costs about L times more. For the same impressions of a split this prints both at
each ``--long_lens`` L, gzip and raw (gzip hides the duplication: a user's windows
repeat the same history), with the command line that produced the table; ``--out``
writes JSON. Numbers, not timed tests.

``--record_formats`` instead compares the per-user record formats (issue 19 item 5,
docs/data.md "Record formats") on the SAME records of the train split: every record is
decoded and written again as ``full`` (``per_user_record``), ``compact``
(``per_user_record_compact_v1``) and ``compact2`` (``per_user_record_compact_v2``,
exact timestamps; with ``--format_ts_step N`` also ``compact2_tsN``, history timestamps
rounded to N s) by one writer (GZIP TFRecords), giving bytes per behavior (gzip and
serialized) of each; then the input pipeline alone and the training examples/s of one
model (``--models``' first, din_l by default) at ``--format_long_len`` on each copy,
measured by :func:`lifelong.bench.train.measure_cell` in its own process per cell, the
cells in the order A, B, ..., ..., B, A (``--format_repeats`` 2, so a drift of the
machine's load hits every format alike).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
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


# ---- full vs compact per-user records ------------------------------------------------------


def derive_item_table(records: List[Dict[str, np.ndarray]], num_items: int) -> S.ItemTable:
    """An item table from full records (the bench's copy of a full-format dataset has
    none): each item's most frequent category / domain over the records' behaviors and
    impressions (ties: the smaller id). Rows that disagree are kept exactly by the compact
    record's exceptions, so any table gives the same decoded records; this one keeps the
    exceptions few, like prepare's."""
    def most_frequent(ids, vals, default):
        out = np.full(num_items, default, np.int64)
        out[0] = S.PAD_ID
        if ids.size:
            pairs, counts = np.unique(np.stack([ids, vals], 1), axis=0, return_counts=True)
            # sort by (item, -count, value): the first row of each item wins
            order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
            pairs = pairs[order]
            first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]])
            out[pairs[first, 0]] = pairs[first, 1]
        return out
    items = np.concatenate([r["hist_item_id"] for r in records] + [r["imp_item_id"] for r in records])
    cates = np.concatenate([r["hist_cate_id"] for r in records] + [r["imp_cate_id"] for r in records])
    h_items = np.concatenate([r["hist_item_id"] for r in records])
    h_doms = np.concatenate([r["hist_domain"] for r in records])
    cate = most_frequent(items, cates, S.OOV_ID)
    domain = most_frequent(h_items, h_doms, S.DEFAULT_DOMAIN)
    cate[S.OOV_ID], domain[S.OOV_ID] = S.OOV_ID, S.DEFAULT_DOMAIN
    return S.ItemTable(cate, domain, "derived by lifelong bench storage")


def _engage_step(meta: Dict) -> float:
    if meta.get("record"):
        return float(meta["record"]["engage_step"])
    from beam_jobs.prepare import DEFAULT_ENGAGE_STEP   # lazy: Beam is heavy
    return float(DEFAULT_ENGAGE_STEP.get(meta.get("source"), 1.0))


def _abba(formats: List[str], repeats: int) -> List[str]:
    """``repeats`` cells per format, in the order A B .. B A A B ..."""
    seq = list(formats) + list(formats)[::-1]
    return (seq * repeats)[:len(formats) * repeats]


def _format_label(fmt: str) -> str:
    """A copy's name -> its format (``compact2_ts60`` -> per_user_record_compact_v2 ts 60s)."""
    if fmt.startswith("compact2_ts"):
        return f"{S.FORMAT_COMPACT_V2} (ts_step {fmt[len('compact2_ts'):]} s)"
    return S.RECORD_FORMATS[fmt]


def write_formats(data_dir: str, out_dir: str, split: str = "train", ts_step: int = 0) -> Dict:
    """Decode every record of ``split`` and write it again as a full, a compact v1 and a
    compact v2 prepared dataset (``<out_dir>/full``, ``/compact``, ``/compact2``; with
    ``ts_step`` > 1 also ``/compact2_ts<ts_step>``, lossy history timestamps): one shard,
    meta.json, the compact ones with their item table. Returns the bytes of each."""
    meta = S.read_meta(data_dir)
    table = S.load_item_table(data_dir)
    files = sorted(tf.io.gfile.glob(S.split_pattern(data_dir, split)))
    if not files:
        raise UsageError(f"{data_dir} has no {split} records")
    recs = [S.decode_user_record(r.numpy(), table)
            for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    if table is None:
        table = derive_item_table(recs, int(meta["vocab"]["num_items"]))
    step = _engage_step(meta)
    res = {"data": data_dir, "split": split, "records": len(recs),
           "behaviors": int(sum(len(r["hist_item_id"]) for r in recs)),
           "impressions": int(sum(len(r["imp_item_id"]) for r in recs)),
           "prepared_bytes": sum(os.path.getsize(f) for f in files),
           "prepared_format": meta.get("format", S.FORMAT_FULL), "engage_step": step,
           "formats": {}}
    max_err = ts_err = 0.0
    fmts = {"full": 1, "compact": 1, "compact2": 1}
    if ts_step and int(ts_step) > 1:
        fmts[f"compact2_ts{int(ts_step)}"] = S.check_ts_step(ts_step)
    for fmt, fmt_ts in fmts.items():
        kind = "compact2" if fmt.startswith("compact2") else fmt
        d = os.path.join(out_dir, fmt)
        os.makedirs(os.path.join(d, "vocab"), exist_ok=True)
        m = dict(meta, format=S.RECORD_FORMATS[kind])
        m.pop("record", None)
        if kind != "full":
            m["record"] = {"item_table": S.ITEM_TABLE_FILE, "engage_step": step,
                           "engage_max_abs_error": step / 2}
            if kind == "compact2":
                m["record"].update(ts_step=fmt_ts, hist_ts_max_abs_error=fmt_ts // 2)
            with open(os.path.join(d, S.ITEM_TABLE_FILE), "w") as f:
                f.write(table.to_tsv())
        with open(os.path.join(d, S.META_FILE), "w") as f:
            json.dump(m, f)
        raw = 0
        path = os.path.join(d, f"{split}-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for r in recs:
                hist = {k: r[k] for k in S.HISTORY_FIELDS if k in r}
                imps = {k: r[k] for k in S.IMPRESSION_FIELDS}
                key = r["user_key"].decode("utf-8")
                if kind == "full":
                    b = S.encode_user_record(int(r["user_id"]), key, hist, imps)
                elif kind == "compact":
                    b = S.encode_compact_user_record(int(r["user_id"]), key, hist, imps,
                                                     table, step)
                else:
                    b = S.encode_compact_v2_user_record(int(r["user_id"]), key, hist, imps,
                                                        table, step, fmt_ts)
                if kind != "full":
                    back = S.decode_user_record(b, table)
                    if back["hist_engage"].size:
                        max_err = max(max_err, float(np.abs(back["hist_engage"]
                                                            - r["hist_engage"]).max()))
                        ts_err = max(ts_err, float(np.abs(back["hist_ts"] - r["hist_ts"]).max()))
                raw += len(b)
                w.write(b)
        size = os.path.getsize(path)
        res["formats"][fmt] = {"dir": d, "gzip_bytes": size, "raw_bytes": raw,
                               "gzip_bytes_per_behavior": size / max(res["behaviors"], 1),
                               "raw_bytes_per_behavior": raw / max(res["behaviors"], 1)}
    res["compact_field_cost"] = field_costs(os.path.join(out_dir, "compact"), split,
                                            res["behaviors"])
    res["compact2_field_cost"] = field_costs(os.path.join(out_dir, "compact2"), split,
                                             res["behaviors"])
    f, c = res["formats"]["full"], res["formats"]["compact"]
    res["compact_over_full_gzip"] = c["gzip_bytes"] / f["gzip_bytes"]
    res["compact_over_full_raw"] = c["raw_bytes"] / f["raw_bytes"]
    res["over_full_gzip"] = {k: v["gzip_bytes"] / f["gzip_bytes"]
                             for k, v in res["formats"].items() if k != "full"}
    res["over_full_raw"] = {k: v["raw_bytes"] / f["raw_bytes"]
                            for k, v in res["formats"].items() if k != "full"}
    res["engage_max_abs_error_measured"] = max_err
    res["ts_max_abs_error_measured"] = ts_err
    res["item_table_rows"] = len(table)
    return res


def field_costs(data_dir: str, split: str, behaviors: int) -> Dict[str, float]:
    """gzip bytes per behavior each field of the records costs: the split's records
    gzipped in one stream (zlib level 6, as the TFRecord writer) minus the same without
    that field. An estimate (deflate is not additive), to see where the bytes go."""
    import zlib
    raws = [r.numpy() for r in tf.data.TFRecordDataset(
        tf.io.gfile.glob(S.split_pattern(data_dir, split)), compression_type="GZIP")]
    exs = [tf.train.Example.FromString(r) for r in raws]

    def size(rs):
        return len(zlib.compress(b"".join(rs), 6))

    total = size(raws)
    names = sorted({k for e in exs for k in e.features.feature})
    out = {"all": total / max(behaviors, 1)}
    for name in names:
        rs = []
        for e in exs:
            e2 = tf.train.Example()
            e2.CopyFrom(e)
            if name in e2.features.feature:
                del e2.features.feature[name]
            rs.append(e2.SerializeToString(deterministic=True))
        out[name] = (total - size(rs)) / max(behaviors, 1)
    return out


def train_formats(res: Dict, model: str, long_len: int, args) -> List[Dict]:
    """Training examples/s of ``model`` on the full and the compact copy (ABBA order)."""
    from lifelong.bench.train import PATHS, _run_cell
    spec = PATHS["new"]
    order = _abba(list(res["formats"]), args.format_repeats)
    rows = []
    for fmt in order:
        cell = {"data": res["formats"][fmt]["dir"], "model": model, "long_len": long_len,
                "path": "new", "batch_size": args.batch_size, "steps": args.steps,
                "warmup": args.warmup, "short_len": args.short_len, "emb_dim": args.emb_dim,
                "shuffle_buffer": args.shuffle_buffer, "input": "pipeline",
                "din_path": spec["din_path"], "input_pipeline": spec["input_pipeline"],
                "jit_compile": spec["jit_compile"] or args.jit_compile}
        r = _run_cell(cell)
        r["format"] = fmt
        rows.append(r)
    return rows


def input_formats(res: Dict, long_len: int, batches: int, repeats: int,
                  short_len: int = 50, batch_size: int = 256) -> List[Dict]:
    """The input pipeline alone (no model): ``batches`` batches of the training pipeline
    (make_dataset, shuffled, as training reads it) on each format, ABBA order, in this
    process; wall and CPU time (all threads) per 1,000 examples. This is where decoding
    the compact record costs, if anywhere."""
    order = _abba(list(res["formats"]), repeats)
    rows = []
    for fmt in order:
        ds = D.make_dataset(S.split_pattern(res["formats"][fmt]["dir"], "train"), short_len,
                            long_len, batch_size, shuffle=True, seed=0, shuffle_buffer=2000,
                            repeat=True, drop_remainder=True)
        it = iter(ds)
        next(it)   # start-up and the shuffle buffer's fill are not timed
        n = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            n += int(next(it)[S.LABEL].shape[0])
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rows.append({"format": fmt, "long_len": long_len, "examples": n,
                     "examples_per_s": n / wall, "cpu_ms_per_1000": 1000.0 * cpu / n * 1000.0})
        del it, ds
    return rows


def print_formats(res: Dict, train_rows: List[Dict], command: str) -> None:
    print(f"command: {command}\n")
    print(f"{res['data']} {res['split']}: {res['records']:,} records, {res['behaviors']:,} "
          f"behaviors, {res['impressions']:,} impressions; as prepared "
          f"({res['prepared_format']}): {res['prepared_bytes']:,} bytes gzip\n")
    print("| format | gzip bytes | bytes / behavior gzip | serialized bytes | "
          "bytes / behavior serialized |")
    print("|---|---|---|---|---|")
    for fmt, r in res["formats"].items():
        print(f"| {_format_label(fmt)} | {r['gzip_bytes']:,} | "
              f"{r['gzip_bytes_per_behavior']:.3f} | {r['raw_bytes']:,} | "
              f"{r['raw_bytes_per_behavior']:.3f} |")
    print()
    for fmt, ratio in res.get("over_full_gzip", {"compact": res["compact_over_full_gzip"]}).items():
        raw = res.get("over_full_raw", {}).get(fmt, res["compact_over_full_raw"])
        print(f"{fmt} / full: {ratio:.3f} gzip, {raw:.3f} serialized")
    print(f"\nengagement step {res['engage_step']:g} (max |error| measured "
          f"{res['engage_max_abs_error_measured']:.4g}, bound {res['engage_step'] / 2:g}); "
          f"history timestamps max |error| measured {res.get('ts_max_abs_error_measured', 0):g} s "
          f"(compact2_tsN: bound N / 2); item table {res['item_table_rows']:,} rows\n")
    for fmt in ("compact", "compact2"):
        costs = res.get(f"{fmt}_field_cost", {})
        if not costs:
            continue
        print(f"gzip bytes per behavior that each field of the {fmt} record costs (all "
              "records in one stream minus the same without the field; deflate is not "
              "additive):\n")
        print("| field | bytes / behavior |")
        print("|---|---|")
        for k, v in sorted(costs.items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v:.3f} |")
        print()
    inp = res.get("input", [])
    if inp:
        print("The input pipeline alone (make_dataset, shuffled, no model):\n")
        print("| format | L | examples | examples/s (wall) | CPU ms / 1,000 examples |")
        print("|---|---|---|---|---|")
        for r in inp:
            print(f"| {r['format']} | {r['long_len']} | {r['examples']:,} | "
                  f"{r['examples_per_s']:.0f} | {r['cpu_ms_per_1000']:.0f} |")
        for fmt in res["formats"]:
            ok = [r for r in inp if r["format"] == fmt]
            if not ok:
                continue
            print(f"\n{fmt}: mean {np.mean([r['examples_per_s'] for r in ok]):.0f} examples/s, "
                  f"{np.mean([r['cpu_ms_per_1000'] for r in ok]):.0f} CPU ms / 1,000", end="")
        print("\n")
    if not train_rows:
        return
    print("| format | model | L | live-pipeline examples/s | held-batch examples/s | "
          "input share (wall) | CPU ms / step live (held) |")
    print("|---|---|---|---|---|---|---|")
    for r in train_rows:
        if "error" in r:
            print(f"| {r['format']} | {r['model']} | {r['long_len']} | failed: {r['error']} "
                  f"| | | |")
            continue
        print(f"| {r['format']} | {r['model']} | {r['long_len']} | "
              f"{r['pipeline_examples_per_s']:.0f} | {r['examples_per_s']:.0f} | "
              f"{r['input_share_wall']:.0%} | {r['pipeline_cpu_s_per_step'] * 1000:.0f} "
              f"({r['cpu_s_per_step'] * 1000:.0f}) |")
    for fmt in res["formats"]:
        ok = [r for r in train_rows if r.get("format") == fmt and "error" not in r]
        if ok:
            print(f"\n{fmt}: mean live-pipeline examples/s "
                  f"{np.mean([r['pipeline_examples_per_s'] for r in ok]):.1f}, CPU ms / step "
                  f"{np.mean([r['pipeline_cpu_s_per_step'] for r in ok]) * 1000:.0f} over "
                  f"{len(ok)} cells", end="")
    print()


def run(args) -> int:
    if not args.data:
        raise UsageError("--data is required (a prepared dataset directory)")
    command = record.command_line()
    if getattr(args, "record_formats", False):
        tmp = tempfile.mkdtemp(prefix="bench_formats_")
        try:
            res = write_formats(args.data, tmp, "train",
                                getattr(args, "format_ts_step", 0) or 0)
            in_repeats = getattr(args, "format_input_repeats", None)
            in_repeats = max(args.format_repeats if in_repeats is None else in_repeats, 1)
            res["input"] = (input_formats(res, args.format_long_len, args.format_input_batches,
                                          in_repeats, args.short_len, args.batch_size)
                            if args.format_input_batches > 0 else [])
            rows = []
            if args.format_repeats > 0:
                model = args.models.split(",")[0].strip()
                rows = train_formats(res, model, args.format_long_len, args)
            res["train"] = rows
            print_formats(res, rows, command)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.out:
            record.write_prefixed(args.out, command, [res])
        return 0
    lens = parse_ints(args.long_lens, "long_lens")
    res = storage(args.data, lens, args.split, args.short_len)
    print_storage(res, command)
    if args.out:
        record.write_prefixed(args.out, command, [res])
    return 0
