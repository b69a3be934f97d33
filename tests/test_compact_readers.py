"""Every reader of prepared per-user records handles the compact format (issue 19 item 5
follow-up): the serving export's ``user_tower``, the clustering job, the replay /
staleness / bench-accuracy record reader and the precompute job give on a compact
dataset what they give on the full copy of the same records."""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import schema as S

STEP = 1 / 16


def _read(pattern):
    return [r.numpy() for r in tf.data.TFRecordDataset(sorted(glob.glob(pattern)),
                                                         compression_type="GZIP")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny prepared dataset written twice, full and compact, with the same values
    (engagement rounded to the 1/16 grid first, so the compact copy is exact)."""
    from lifelong.bench.storage import derive_item_table
    from tfmodels.testing import write_tiny_dataset
    root = tmp_path_factory.mktemp("compact_readers")
    src = write_tiny_dataset(str(root / "src"), num_users=8, max_history=60,
                             impressions_per_user=4, seed=5, num_shards=1)
    meta = S.read_meta(src)
    recs = {split: [S.decode_user_record(r) for r in _read(S.split_pattern(src, split))]
            for split in S.SPLITS}
    table = derive_item_table([r for rs in recs.values() for r in rs],
                              int(meta["vocab"]["num_items"]))
    dirs = {fmt: str(root / fmt) for fmt in ("full", "compact")}
    for fmt, d in dirs.items():
        os.makedirs(os.path.join(d, "vocab"))
        m = dict(meta, format=S.RECORD_FORMATS[fmt])
        if fmt == "compact":
            m["record"] = {"item_table": S.ITEM_TABLE_FILE, "engage_step": STEP}
            with open(os.path.join(d, S.ITEM_TABLE_FILE), "w") as f:
                f.write(table.to_tsv())
        with open(os.path.join(d, S.META_FILE), "w") as f:
            json.dump(m, f)
        for split, rs in recs.items():
            with tf.io.TFRecordWriter(os.path.join(d, f"{split}-00000-of-00001.tfrecord.gz"),
                                      options="GZIP") as w:
                for r in rs:
                    hist = {k: r[k] for k in S.HISTORY_FIELDS if k in r}
                    hist["hist_engage"] = np.round(hist["hist_engage"] / STEP) * STEP
                    imps = {k: r[k] for k in S.IMPRESSION_FIELDS}
                    key = r["user_key"].decode("utf-8")
                    w.write(S.encode_user_record(int(r["user_id"]), key, hist, imps)
                            if fmt == "full" else
                            S.encode_compact_user_record(int(r["user_id"]), key, hist, imps,
                                                         table, STEP))
    assert S.is_compact_record(_read(S.split_pattern(dirs["compact"], "test"))[0])
    return {"dirs": dirs, "table": table, "root": root}


def _model(data_dir, name="din_l", L=16):
    from tfmodels.model import build_model
    tf.keras.utils.set_random_seed(1)
    fs = S.FeatureSchema.from_data_dir(data_dir, 4, L)
    return build_model(fs, name, emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4])


@pytest.fixture(scope="module")
def exported(pair):
    from serving import export as E
    base = str(pair["root"] / "saved_models")
    model = _model(pair["dirs"]["full"])
    table = S.load_item_table(pair["dirs"]["compact"])
    assert len(table) == len(pair["table"])
    assert S.load_item_table(pair["dirs"]["full"]) is None
    with_table = E.export_model(model, base, "din_l", 1, item_table=table)
    without = E.export_model(model, base, "din_l_full", 1)
    return {"model": model, "base": base, "with": with_table, "without": without}


def test_user_tower_on_compact_records(pair, exported):
    """Export: compact records through the SavedModel's user_tower == the same users'
    full records (same cache tensors) == the training path in process; a mixed batch and
    a compact record sent to a full-only export fail with INVALID_ARGUMENT naming it."""
    from serving import export as E
    from tfmodels import data as D
    dirs = pair["dirs"]
    full = _read(S.split_pattern(dirs["full"], "train"))
    comp = _read(S.split_pattern(dirs["compact"], "train"))
    assert full != comp
    meta = E.read_export_meta(exported["with"]["path"])
    assert meta["record_formats"] == [S.FORMAT_COMPACT, S.FORMAT_FULL]
    assert meta["item_table_rows"] == len(pair["table"])
    fn = tf.saved_model.load(exported["with"]["path"]).signatures["user_tower"]
    out_c = fn(records=tf.constant(comp))
    out_f = fn(records=tf.constant(full))
    model = exported["model"]
    feats = D.user_history_features(tf.constant(full), model.feature_schema)
    ref = model.user_tower({k: v for k, v in feats.items()}, training=False)
    assert set(ref) <= set(out_c) and "user_id" in out_c
    for k in out_c:
        np.testing.assert_array_equal(out_c[k].numpy(), out_f[k].numpy(), err_msg=k)
    for k, v in ref.items():
        np.testing.assert_allclose(out_c[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    # compact v2 records of the same users (items as item-table addresses), alone and
    # in one batch with v1 records: the same cache tensors
    v2 = []
    for raw in full:
        r = S.decode_user_record(raw)
        v2.append(S.encode_compact_v2_user_record(
            int(r["user_id"]), r["user_key"].decode("utf-8"),
            {k: r[k] for k in S.HISTORY_FIELDS if k in r},
            {k: r[k] for k in S.IMPRESSION_FIELDS}, pair["table"], STEP))
    half = len(comp) // 2
    for batch in (v2, comp[:half] + v2[half:]):
        out = fn(records=tf.constant(batch))
        for k in out_c:
            np.testing.assert_array_equal(out[k].numpy(), out_f[k].numpy(), err_msg=k)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mixes compact"):
        fn(records=tf.constant([comp[0], full[1]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="mixes compact"):
        fn(records=tf.constant([v2[0], full[1]]))
    plain = tf.saved_model.load(exported["without"]["path"]).signatures["user_tower"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="read without its item table"):
        plain(records=tf.constant(comp[:2]))
    # the baked table: two int64 columns of the table in saved_model.pb
    size = {k: os.path.getsize(os.path.join(exported[k]["path"], "saved_model.pb"))
            for k in ("with", "without")}
    print(f"saved_model.pb bytes: {size}, table rows {len(pair['table'])}")
    assert size["with"] - size["without"] >= 16 * len(pair["table"])


def test_export_of_a_compact_dataset_without_its_item_table(pair, tmp_path):
    from serving import export as E
    d = str(tmp_path / "c")
    shutil.copytree(pair["dirs"]["compact"], d)
    os.remove(os.path.join(d, S.ITEM_TABLE_FILE))
    with pytest.raises(S.MissingItemTableError, match="item_table.tsv is missing"):
        S.load_item_table(d)


def test_record_reader_of_replay_staleness_and_bench_accuracy(pair, exported):
    """lifelong.replay._read_records (replay, staleness report, bench accuracy) gives
    the same full records on the compact copy, so the same requests and, through the
    staleness report's in-process serving path, the same CTRs."""
    from lifelong.replay import _read_records, last_requests
    from lifelong.reports.staleness import staleness_of_model
    dirs = pair["dirs"]
    got = {fmt: list(_read_records(S.split_pattern(d, "test"))) for fmt, d in dirs.items()}
    assert got["full"] == got["compact"]
    assert not any(S.is_compact_record(r) for r in got["compact"])
    res = {}
    for fmt, d in dirs.items():
        records, requests = last_requests(_read_records(S.split_pattern(d, "test")))
        assert requests
        res[fmt] = staleness_of_model(exported["model"], records, requests, [0, 1], 86400.0,
                                      str(pair["root"] / f"stale-{fmt}"), batch_size=4,
                                      bootstrap=0)
    rows = {fmt: r["rows"] for fmt, r in res.items()}
    assert len(rows["full"]) == len(rows["compact"]) == 2
    for a, b in zip(rows["full"], rows["compact"]):
        for k in ("auc", "logloss", "behaviors_excluded_mean", "max_abs_diff_vs_one_shot"):
            assert a[k] == b[k], k


def test_cluster_job_on_compact_records(pair):
    """The clustering job reads compact records and writes the same clustered records
    (full format) as from the full copy."""
    from beam_jobs import cluster as CJ
    from beam_jobs import cluster_snapshot as CS
    outs = {}
    for fmt, d in pair["dirs"].items():
        out = str(pair["root"] / f"clustered-{fmt}")
        parser = argparse.ArgumentParser()
        CJ.add_arguments(parser)
        args, beam_args = parser.parse_known_args(
            ["--data", d, "--output", out, "--num_shards", "1", "--keep_recent", "5",
             "--gamma", "6", "--snapshot_ts", "none"])
        report = CJ.run(args, beam_args)
        assert report["summary"]["virtual_items"] > 0
        meta = S.read_meta(out)
        assert meta["format"] == S.FORMAT_FULL and "record" not in meta
        outs[fmt] = {split: sorted(_read(S.split_pattern(out, split))) for split in S.SPLITS}
    for split in S.SPLITS:
        assert outs["full"][split] == outs["compact"][split], split
        assert not any(S.is_compact_record(r) for r in outs["compact"][split])
    # the Python parser itself: compact == full
    raw_c = _read(S.split_pattern(pair["dirs"]["compact"], "train"))[0]
    raw_f = _read(S.split_pattern(pair["dirs"]["full"], "train"))[0]
    a, b = CS.parse_record(raw_f), CS.parse_record(raw_c, pair["table"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_precompute_on_compact_records(pair, exported):
    """The precompute job (batched engine) on the compact test records writes the same
    cache rows as on the full ones (the export holds the item table)."""
    from beam_jobs import precompute as P
    rows = {}
    for fmt, d in pair["dirs"].items():
        ns = argparse.Namespace(records=S.split_pattern(d, "test"), model="din_l",
                                base=exported["base"], version=1, model_dir=None,
                                output=str(pair["root"] / f"cache-{fmt}"), num_shards=1,
                                no_reshuffle=True, store=None, previous_cache=None)
        P.run(ns, [])
        rows[fmt] = {}
        for rec in P.read_cache_records(ns.output):
            _, uid, _, tensors = P.decode_cache_record(rec)
            rows[fmt][uid] = tensors
    assert rows["full"].keys() == rows["compact"].keys() and rows["full"]
    for uid, tensors in rows["full"].items():
        assert tensors.keys() == rows["compact"][uid].keys()
        for k, v in tensors.items():
            np.testing.assert_array_equal(v, rows["compact"][uid][k], err_msg=f"{uid} {k}")


def test_cluster_quality_user_batches_on_compact_records(pair):
    """The cluster-quality report's user-tower windows: compact == full."""
    from lifelong.reports.cluster_quality import _user_batches
    fs = S.FeatureSchema.from_data_dir(pair["dirs"]["full"], 4, 16)
    got = {fmt: list(_user_batches(d, "train", 5, 2, 0, fs)) for fmt, d in pair["dirs"].items()}
    assert len(got["full"]) == len(got["compact"]) == 3
    for a, b in zip(got["full"], got["compact"]):
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def test_lifelong_export_cli_bakes_the_data_dirs_item_table(pair):
    """`lifelong export --model M --data D` (export.run): the table of a compact D is
    baked in and compact records are answered; a full D exports for full records only."""
    from serving import export as E
    from serving import flags
    got = {}
    for fmt, d in pair["dirs"].items():
        parser = argparse.ArgumentParser()
        flags.add_export_arguments(parser)
        args = parser.parse_args(["--model", "avg_pool", "--data", d, "--short_len", "4",
                                  "--long_len", "8", "--emb_dim", "4", "--base",
                                  str(pair["root"] / f"cli-{fmt}"), "--warmup_max_candidates",
                                  "0"])
        out = E.run(args)
        got[fmt] = E.read_export_meta(out["path"])["record_formats"]
        if fmt == "compact":
            comp = _read(S.split_pattern(d, "test"))
            fn = tf.saved_model.load(out["path"]).signatures["user_tower"]
            assert fn(records=tf.constant(comp))["user_id"].shape == [len(comp)]
    assert got == {"full": [S.FORMAT_FULL], "compact": [S.FORMAT_COMPACT, S.FORMAT_FULL]}
