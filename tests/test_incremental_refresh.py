"""Incremental user-cache refresh (``lifelong precompute --previous_cache``, issue 19 item 2).

One tiny untrained DIN-L export; a full precompute over the OLD records is the
previous cache; the NEW records have users unchanged (one with new impressions
only), changed (a behavior appended; an engagement edited), new and removed. The
incremental refresh must write the same records as a full recompute over the new
records, and the model must see only the changed and new users. The delta refresh
(``--changed_records``: the changed and new users' records only) must give what a full
recompute over the histories after the delta gives, through every cache reader.
"""
import argparse
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from beam_jobs import precompute as P
from beam_jobs import precompute_incremental as INC
from serving.cache_store import SQLiteCacheStore
from serving.export import export_model
from tfmodels import schema as S
from tfmodels.model import build_model

L, SHORT = 12, 4
UNCHANGED = [2, 3, 4]          # 4: same history, different impressions
CHANGED = [5, 6]               # 5: one behavior appended; 6: one engagement edited
REMOVED = [7]
NEW = [8, 9]


def _history(uid: int, n: int):
    rng = np.random.default_rng(uid)
    items = rng.integers(S.FIRST_ID, S.FIRST_ID + 40, size=n)
    return {"hist_item_id": items, "hist_cate_id": items % 5 + S.FIRST_ID,
            "hist_ts": 1_600_000_000 + np.arange(n, dtype=np.int64) * 3600,
            "hist_engage": rng.random(n).astype(np.float32),
            "hist_domain": np.full(n, S.DEFAULT_DOMAIN)}


def _record(uid, hist, n_imps=2, imp_item=S.FIRST_ID):
    n = len(hist["hist_item_id"])
    imps = {"imp_item_id": [imp_item] * n_imps, "imp_cate_id": [S.FIRST_ID] * n_imps,
            "imp_ts": [1_700_000_000] * n_imps, "imp_label": [1.0, 0.0][:n_imps],
            "imp_hist_index": [n] * n_imps}
    return S.encode_user_record(uid, f"u{uid}", hist, imps)


def _write(path, records):
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in records:
            w.write(r)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    tf.keras.utils.set_random_seed(3)
    fs = S.FeatureSchema(S.Vocab(60, 10, 100), SHORT, L)
    model = build_model(fs, "din_l", emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4])
    base = str(root / "saved_models")
    export_model(model, base, "din_l", 1)
    old = {u: _history(u, 8 + u) for u in UNCHANGED + CHANGED + REMOVED}
    new = {u: old[u] for u in UNCHANGED}
    grown = {k: np.concatenate([v, v[-1:]]) for k, v in old[5].items()}
    grown["hist_ts"][-1] += 60
    grown["hist_item_id"][-1] = S.FIRST_ID + 39
    new[5] = grown
    edited = {k: v.copy() for k, v in old[6].items()}
    edited["hist_engage"][0] += 0.5
    new[6] = edited
    for u in NEW:
        new[u] = _history(u, 30)
    old_path = _write(str(root / "old-00000-of-00001.tfrecord.gz"),
                      [_record(u, h) for u, h in old.items()])
    new_path = _write(str(root / "new-00000-of-00001.tfrecord.gz"),
                      [_record(u, h, n_imps=1 if u == 4 else 2,
                               imp_item=S.FIRST_ID + 7 if u == 4 else S.FIRST_ID)
                       for u, h in new.items()])

    def run(records, output, previous=None, store=None, **engine):
        ns = argparse.Namespace(records=records, model="din_l", base=base, version=1,
                                model_dir=None, output=str(root / output), num_shards=1,
                                no_reshuffle=True, store=None, previous_cache=previous, **engine)
        return P.run(ns, [], store=store)

    rep_old = run(old_path, "cache_old")
    rep_full = run(new_path, "cache_full")
    return {"root": root, "run": run, "old_path": old_path, "new_path": new_path, "base": base,
            "rep_old": rep_old, "rep_full": rep_full}


def _by_user(folder):
    out = {}
    for rec in P.read_cache_records(folder):
        meta = P.cache_record_meta(rec)
        assert meta.user_id not in out
        out[meta.user_id] = (rec, meta, P.decode_cache_record(rec))
    return out


def _assert_same_cache(a, b):
    assert sorted(a) == sorted(b)
    for uid in a:
        (_, ma, (na, ua, va, ta)), (_, mb, (nb, ub, vb, tb)) = a[uid], b[uid]
        assert ma == mb and (na, ua, va) == (nb, ub, vb)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"user {uid} tensor {k}")


def test_fingerprint_reads_history_only():
    h = _history(3, 10)
    fp = lambda r: P.history_fingerprint(tf.train.Example.FromString(r).features.feature)
    a, last = fp(_record(3, h))
    assert last == 1_600_000_000 + 9 * 3600 and len(a) == 16
    assert fp(_record(3, h, n_imps=1, imp_item=S.FIRST_ID + 5))[0] == a   # impressions
    for field in ("hist_item_id", "hist_ts", "hist_engage", "hist_cate_id"):
        changed = {k: v.copy() for k, v in h.items()}
        changed[field][4] += 1
        assert fp(_record(3, changed))[0] != a, field
    assert fp(_record(3, dict(h, hist_cluster_size=np.ones(10, np.int64))))[0] != a
    empty = {k: v[:0] for k, v in h.items()}
    assert fp(_record(3, empty))[1] is None
    assert P.parse_key(P.make_key(12, a, last)) == (12, a, last)
    assert P.parse_key(P.make_key(12)) == (12, None, None)


def test_full_run_writes_fingerprints(setup):
    rows = _by_user(setup["root"] / "cache_full")
    assert sorted(rows) == sorted(UNCHANGED + CHANGED + NEW)
    assert setup["rep_full"]["users_to_model"] == setup["rep_full"]["users"] == len(rows)
    assert rows[5][1].last_behavior_ts == 1_600_000_000 + 12 * 3600 + 60
    assert all(len(r[1].fingerprint) == 16 for r in rows.values())


def test_incremental_equals_full_and_skips_unchanged(setup, tmp_path):
    store = SQLiteCacheStore(str(tmp_path / "c.db"))
    P.load_into_store(str(setup["root"] / "cache_old"), store)
    assert store.get("din_l", REMOVED[0]) is not None
    rep = setup["run"](setup["new_path"], "cache_incr",
                       previous=str(setup["root"] / "cache_old"), store=store)
    full, incr = _by_user(setup["root"] / "cache_full"), _by_user(setup["root"] / "cache_incr")
    _assert_same_cache(full, incr)
    assert rep["users"] == len(incr)        # counted from the job's counters
    old = _by_user(setup["root"] / "cache_old")
    for u in UNCHANGED:                       # carried over byte for byte
        assert incr[u][0] == old[u][0]
    # only changed and new users reached the model
    assert rep["users_to_model"] == len(CHANGED) + len(NEW)
    assert (rep["users_carried"], rep["users_changed"], rep["users_new"],
            rep["users_removed"]) == (len(UNCHANGED), len(CHANGED), len(NEW), len(REMOVED))
    assert rep["removed_user_ids"] == REMOVED and INC.read_removed(rep["output"]) == REMOVED
    assert rep["deleted_from_store"] == 1 and store.get("din_l", REMOVED[0]) is None
    assert store.count("din_l") == len(full)
    store.close()


def _rewrite(src, dst, fn):
    os.makedirs(dst, exist_ok=True)
    _write(os.path.join(dst, "cache-00000-of-00001.tfrecord.gz"),
           [fn(r) for r in P.read_cache_records(src)])


def test_carried_rows_are_not_recomputed(setup, tmp_path):
    """A previous row with the right fingerprint is trusted as is: mark its tensors and
    the marks come out (a recompute would have overwritten them)."""
    def mark(rec):
        name, uid, version, tensors = P.decode_cache_record(rec)
        meta = P.cache_record_meta(rec)
        tensors = {k: (np.full_like(v, 7) if k == "keys" else v) for k, v in tensors.items()}
        return P.encode_cache_record(name, version, uid, tensors, meta.fingerprint,
                                     meta.last_behavior_ts)
    prev = str(tmp_path / "marked")
    _rewrite(str(setup["root"] / "cache_old"), prev, mark)
    setup["run"](setup["new_path"], "cache_marked", previous=prev)
    out = _by_user(setup["root"] / "cache_marked")
    for u in UNCHANGED:
        assert np.all(out[u][2][3]["keys"] == 7)
    for u in CHANGED + NEW:
        assert not np.all(out[u][2][3]["keys"] == 7)


def test_old_cache_without_fingerprints_recomputes_everyone(setup, tmp_path):
    def strip(rec):
        ex = tf.train.Example.FromString(rec)
        for k in (P.FINGERPRINT, P.LAST_TS):
            del ex.features.feature[k]
        return ex.SerializeToString()
    prev = str(tmp_path / "old_format")
    _rewrite(str(setup["root"] / "cache_old"), prev, strip)
    assert P.cache_record_meta(next(P.read_cache_records(prev))).fingerprint is None
    rep = setup["run"](setup["new_path"], "cache_from_old_format", previous=prev)
    assert rep["users_without_fingerprint"] == len(UNCHANGED) + len(CHANGED)
    assert rep["users_carried"] == 0
    assert rep["users_to_model"] == len(UNCHANGED) + len(CHANGED) + len(NEW)
    _assert_same_cache(_by_user(setup["root"] / "cache_full"),
                       _by_user(setup["root"] / "cache_from_old_format"))


def test_cli_previous_cache(setup, capsys):
    from lifelong import cli
    import json
    db = str(setup["root"] / "cli.db")
    capsys.readouterr()
    assert cli.main(["precompute", "--records", setup["new_path"], "--model", "din_l",
                     "--base", setup["base"], "--output", str(setup["root"] / "cache_cli"),
                     "--previous_cache", str(setup["root"] / "cache_old"),
                     "--store", f"sqlite:{db}"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["users_carried"], rep["users_to_model"], rep["removed_user_ids"]) == (
        len(UNCHANGED), len(CHANGED) + len(NEW), REMOVED)
    assert rep["loaded"] == len(UNCHANGED + CHANGED + NEW)
    assert cli.main(["precompute", "--records", setup["new_path"], "--model", "din_l",
                     "--base", setup["base"], "--output", str(setup["root"] / "cache_cli"),
                     "--previous_cache", str(setup["root"] / "none")]) == 2
    assert "holds no cache records" in capsys.readouterr().err


def test_previous_cache_errors(setup):
    with pytest.raises(P.PrecomputeError, match="holds no cache records"):
        setup["run"](setup["new_path"], "x", previous=str(setup["root"] / "nothing"))
    with pytest.raises(P.PrecomputeError, match="must not be the --output"):
        setup["run"](setup["new_path"], "cache_old", previous=str(setup["root"] / "cache_old"))
    # the refused run deleted nothing
    assert len(_by_user(setup["root"] / "cache_old")) == 6


def test_runinference_engine_equals_batched_engine(setup):
    """``--engine runinference`` (one Beam element per user, gzip files) writes the same
    cache as the default batched engine (uncompressed files), in a full run and in an
    incremental run over the batched engine's previous cache."""
    import glob
    root = setup["root"]
    rep = setup["run"](setup["new_path"], "cache_full_ri", engine="runinference")
    assert rep["engine"] == "runinference" and setup["rep_full"]["engine"] == "batched"
    assert glob.glob(str(root / "cache_full_ri" / "cache-*.tfrecord.gz"))
    assert glob.glob(str(root / "cache_full" / "cache-*.tfrecord"))
    full = _by_user(root / "cache_full")
    _assert_same_cache(full, _by_user(root / "cache_full_ri"))
    rep = setup["run"](setup["new_path"], "cache_incr_ri", previous=str(root / "cache_old"),
                       engine="runinference")
    assert (rep["users_to_model"], rep["users_carried"]) == (len(CHANGED) + len(NEW),
                                                             len(UNCHANGED))
    _assert_same_cache(full, _by_user(root / "cache_incr_ri"))


def test_batched_engine_shards_by_user_and_rejects_bad_flags(setup):
    import glob
    root = setup["root"]
    ns = argparse.Namespace(records=setup["new_path"], model="din_l", base=setup["base"],
                            version=1, model_dir=None, output=str(root / "cache_3"),
                            num_shards=3, no_reshuffle=True, store=None,
                            previous_cache=str(root / "cache_old"), batch_size=2)
    rep = P.run(ns, [])
    assert rep["users_carried"] == len(UNCHANGED) and rep["users_to_model"] == 4
    files = sorted(glob.glob(str(root / "cache_3" / "cache-*-of-00003.tfrecord")))
    assert len(files) == 3
    for f in files:          # bucket b of 3 holds the users with user_id % 3 == b
        b = int(os.path.basename(f).split("-")[1])
        assert {P.cache_record_meta(r).user_id % 3 for r in P.read_cache_records(f)} == {b}
    _assert_same_cache(_by_user(root / "cache_full"), _by_user(root / "cache_3"))
    for bad, match in ((dict(cache_compression="zip"), "--cache_compression"),
                       (dict(batch_size=0), "--batch_size"),
                       (dict(engine="fast"), "--engine must be one of")):
        with pytest.raises(P.PrecomputeError, match=match):
            setup["run"](setup["new_path"], "cache_bad", **bad)


def test_shard_index_locates_rows_and_a_stale_index_is_ignored(setup, tmp_path):
    """The batched engine writes index-BBBBB-of-NNNNN.npz next to each uncompressed shard:
    offset/length of each framed row and its user, fingerprint and last ts. An incremental
    refresh copies carried rows by those byte ranges; an index whose shard size does not
    match is ignored (rows read instead), with the same result."""
    import glob
    import shutil
    from beam_jobs import precompute_batched as B
    root = setup["root"]
    shard = glob.glob(str(root / "cache_old" / "cache-*.tfrecord"))[0]
    idx = B.read_index(shard)
    data = open(shard, "rb").read()
    rows = list(P.read_cache_records(shard))
    assert int(idx["shard_bytes"]) == len(data) and len(idx["user_id"]) == len(rows) == 6
    for k, row in enumerate(rows):
        off, ln = int(idx["offset"][k]), int(idx["length"][k])
        assert ln == len(row) + B.FRAME and data[off + 12:off + ln - 4] == row
        meta = P.cache_record_meta(row)
        assert int(idx["user_id"][k]) == meta.user_id
        assert bytes(idx["fingerprint"][k]) == meta.fingerprint
        assert int(idx["last_ts"][k]) == meta.last_behavior_ts
    assert str(idx["model_name"]) == "din_l" and int(idx["model_version"]) == 1
    # a shard that grew after its index was written: the index is not trusted
    stale = tmp_path / "stale"
    shutil.copytree(root / "cache_old", stale)
    shard2 = glob.glob(str(stale / "cache-*.tfrecord"))[0]
    with tf.io.TFRecordWriter(shard2 + ".x") as w:
        for row in rows:
            w.write(row)
        w.write(rows[0])                          # the same user twice: duplicate_users
    os.replace(shard2 + ".x", shard2)
    assert B.read_index(shard2) is None
    rep = setup["run"](setup["new_path"], "cache_from_stale", previous=str(stale))
    assert rep.get("previous_rows_from_index", 0) == 0
    _assert_same_cache(_by_user(root / "cache_full"), _by_user(root / "cache_from_stale"))
    rep = setup["run"](setup["new_path"], "cache_from_index", previous=str(root / "cache_old"))
    assert rep["users_carried"] == len(UNCHANGED)
    _assert_same_cache(_by_user(root / "cache_full"), _by_user(root / "cache_from_index"))
    # its own index is right too: the carried rows were copied at the offsets it names
    out = glob.glob(str(root / "cache_from_index" / "cache-*.tfrecord"))[0]
    idx2, data2 = B.read_index(out), open(out, "rb").read()
    for k, row in enumerate(P.read_cache_records(out)):
        off, ln = int(idx2["offset"][k]), int(idx2["length"][k])
        assert data2[off + 12:off + ln - 4] == row


# ---- delta refresh (--changed_records): the changed users' records only -------------------
def _old_records(setup):
    return {
        int(tf.train.Example.FromString(r).features.feature["user_id"].int64_list.value[0]): r
        for r in tf.data.TFRecordDataset(setup["old_path"], compression_type="GZIP")
        .as_numpy_iterator()}


def _new_records(setup):
    return {int(tf.train.Example.FromString(r).features.feature["user_id"].int64_list.value[0]): r
            for r in tf.data.TFRecordDataset(setup["new_path"], compression_type="GZIP")
            .as_numpy_iterator()}


@pytest.fixture(scope="module")
def delta(setup):
    """The delta (CHANGED + NEW users' new records) and a full recompute over the histories
    after it: the new records plus the removed user's old one (a delta removes nobody)."""
    root = setup["root"]
    new, old = _new_records(setup), _old_records(setup)
    path = _write(str(root / "delta-00000-of-00001.tfrecord.gz"), [new[u] for u in CHANGED + NEW])
    keep = _write(str(root / "keep-00000-of-00001.tfrecord.gz"),
                  [new[u] for u in UNCHANGED + CHANGED + NEW] + [old[u] for u in REMOVED])
    setup["run"](keep, "cache_full_keep")
    return {"path": path, "new": new, "old": old}


def _delta(setup, changed_records, output, previous, store=None, **kw):
    ns = dict(records=None, changed_records=changed_records, model="din_l",
              base=setup["base"], version=1, model_dir=None,
              output=str(setup["root"] / output), num_shards=1,
              no_reshuffle=True, store=None, previous_cache=previous)
    return P.run(argparse.Namespace(**{**ns, **kw}), [], store=store)


def _index_by_user(folder):
    """Every index entry of a cache folder by user: (fingerprint, last ts, framed length),
    each checked to point at its row's bytes in its shard; live users only."""
    import glob
    from beam_jobs import precompute_batched as B
    out = {}
    for shard in glob.glob(os.path.join(str(folder), "cache-*.tfrecord")):
        idx, data = B.read_index(shard), open(shard, "rb").read()
        for k, uid in enumerate(idx["user_id"].tolist()):
            off, ln = int(idx["offset"][k]), int(idx["length"][k])
            row = data[off + 12:off + ln - 4]
            assert P.cache_record_meta(row).user_id == uid
            assert uid not in out
            out[uid] = (bytes(idx["fingerprint"][k]), int(idx["last_ts"][k]),
                        bool(idx["has_last"][k]), ln, _canonical(row))
    return out


def _canonical(row: bytes) -> bytes:
    """A row's bytes with its feature map in key order. Two full runs over the same records
    write rows that differ only in that order (tfx-bsl's C++ encoder serializes the map in
    hash order, per row), so rows from two runs are compared in this form; a carried row is
    compared raw (byte for byte with the previous cache's)."""
    return tf.train.Example.FromString(row).SerializeToString(deterministic=True)


def _assert_identical(folder, expected_folder):
    """Row bytes per user (canonical map order) and index entries per user equal (user,
    fingerprint, last ts, framed length, the row it points at; offsets differ by layout)."""
    a, b = _by_user(folder), _by_user(expected_folder)
    assert sorted(a) == sorted(b)
    for u in a:
        assert len(a[u][0]) == len(b[u][0]) and _canonical(a[u][0]) == _canonical(b[u][0]), \
            f"user {u}: rows differ"
    ia, ib = _index_by_user(folder), _index_by_user(expected_folder)
    assert sorted(ia) == sorted(a) and ia == ib


def test_delta_refresh_equals_full_recompute(setup, delta, tmp_path):
    import glob
    root = setup["root"]
    store = SQLiteCacheStore(str(tmp_path / "c.db"))
    P.load_into_store(str(root / "cache_old"), store)
    before = store.get("din_l", 5)
    rep = _delta(setup, delta["path"], "cache_delta", str(root / "cache_old"), store=store)
    _assert_identical(root / "cache_delta", root / "cache_full_keep")
    # exactly the delta's users reached the model; the others were carried unread
    assert rep["mode"] == "delta" and rep["users_to_model"] == len(CHANGED + NEW)
    assert (rep["users_carried"], rep["users_changed"], rep["users_new"]) == (
        len(UNCHANGED + REMOVED), len(CHANGED), len(NEW))
    assert rep["users"] == len(UNCHANGED + REMOVED + CHANGED + NEW)
    old, out = _by_user(root / "cache_old"), _by_user(root / "cache_delta")
    for u in UNCHANGED + REMOVED:
        assert out[u][0] == old[u][0]
    # the previous shard is shared (a hard link), not rewritten; its changed rows are dead
    (shared,) = glob.glob(str(root / "cache_delta" / "cache-prev*.sparse.tfrecord"))
    (prev,) = glob.glob(str(root / "cache_old" / "cache-*.tfrecord"))
    assert os.path.samefile(shared, prev)
    assert (rep["previous_shards_linked"], rep["previous_shards_sparse"],
            rep["previous_shards_rewritten"]) == (1, 1, 0)
    assert rep["dead_bytes_shared"] == sum(len(old[u][0]) + 16 for u in CHANGED)
    # the store (loaded from the previous cache) got the recomputed users only
    assert rep["loaded"] == len(CHANGED + NEW) and store.count("din_l") == 8
    after = store.get("din_l", 5)
    for k, v in out[5][2][3].items():         # the recomputed row, not the previous one
        np.testing.assert_array_equal(after.tensors[k], v)
    assert not all(np.array_equal(before.tensors[k], after.tensors[k]) for k in before.tensors)
    store.close()


def test_delta_layered_cache_every_reader(setup, delta):
    """A cache written by a delta refresh (a shared .sparse shard + the delta shard) read by
    every reader: read_cache_records / load_into_store (above), a fingerprint refresh on
    both engines, a second delta over it (a chain), compaction, a lost index."""
    import glob
    import shutil
    from beam_jobs import precompute_batched as B
    root = setup["root"]
    layered = str(root / "cache_delta")
    if not os.path.exists(layered):
        _delta(setup, delta["path"], "cache_delta", str(root / "cache_old"))
    # fingerprint refreshes over the layered cache: same as full, dead rows never carried
    for engine in ("batched", "runinference"):
        rep = setup["run"](setup["new_path"], f"cache_fp_over_delta_{engine}",
                           previous=layered, engine=engine)
        assert (rep["users_carried"], rep["users_to_model"], rep["removed_user_ids"]) == (
            len(UNCHANGED + CHANGED + NEW), 0, REMOVED), engine
        _assert_same_cache(_by_user(root / "cache_full"),
                           _by_user(root / f"cache_fp_over_delta_{engine}"))
    # a second delta over the layered one: user 2 changes, user 5 changes again
    hist2 = {k: np.concatenate([v, v[-1:]]) for k, v in _history(2, 10).items()}
    hist2["hist_ts"][-1] += 5
    hist5 = {k: np.concatenate([v, v[-1:]]) for k, v in _history(5, 13).items()}
    hist5["hist_ts"][-2:] += np.array([60, 120])
    rec2, rec5 = _record(2, hist2), _record(5, hist5)
    d2 = _write(str(root / "delta2-00000-of-00001.tfrecord.gz"), [rec2, rec5])
    new = {**delta["new"], 2: rec2, 5: rec5}
    keep2 = _write(str(root / "keep2-00000-of-00001.tfrecord.gz"),
                   list(new.values()) + [delta["old"][u] for u in REMOVED])
    setup["run"](keep2, "cache_full_keep2")
    rep = _delta(setup, d2, "cache_delta2", layered)
    assert (rep["users_to_model"], rep["users_carried"], rep["users_changed"]) == (2, 6, 2)
    assert rep["previous_shards_sparse"] == 2          # both shards of the layered cache
    _assert_identical(root / "cache_delta2", root / "cache_full_keep2")
    # most of a shard superseded: rewritten with its live rows (a plain shard) instead
    big = _write(str(root / "delta_big-00000-of-00001.tfrecord.gz"),
                 [new[u] for u in (2, 3, 4, 5, 6, 8)])
    rep = _delta(setup, big, "cache_delta_big", layered)
    assert rep["previous_shards_rewritten"] >= 1 and rep["carried_bytes_rewritten"] > 0
    assert not glob.glob(str(root / "cache_delta_big" / "*.sparse.*"))
    setup["run"](_write(str(root / "keep3-00000-of-00001.tfrecord.gz"),
                        [new[u] for u in (2, 3, 4, 5, 6, 8, 9)] + [delta["old"][7]]),
                 "cache_full_keep3")
    _assert_identical(root / "cache_delta_big", root / "cache_full_keep3")
    # a .sparse shard whose index is lost cannot be read as a whole file: every reader refuses
    lost = root / "cache_lost_index"
    shutil.copytree(layered, lost)
    for f in glob.glob(str(lost / "index-*.sparse.npz")):
        os.remove(f)
    with pytest.raises(B.SparseShardError, match="superseded"):
        list(P.read_cache_records(str(lost)))
    with pytest.raises(Exception, match="superseded"):
        setup["run"](setup["new_path"], "cache_from_lost", previous=str(lost))


def test_delta_refresh_errors(setup, delta):
    import glob
    root = setup["root"]
    old = str(root / "cache_old")
    with pytest.raises(P.PrecomputeError, match="holds no cache records"):
        _delta(setup, delta["path"], "d_err", str(root / "nothing"))
    with pytest.raises(P.PrecomputeError, match="needs --previous_cache"):
        _delta(setup, delta["path"], "d_err", None)
    with pytest.raises(P.PrecomputeError, match="exclude each other"):
        setup["run"](setup["new_path"], "d_err", previous=old, changed_records=delta["path"])
    with pytest.raises(P.PrecomputeError, match="no record files match"):
        _delta(setup, str(root / "absent-*.tfrecord.gz"), "d_err", old)
    # records of another format: cache rows, and examples without a history
    rows = _write(str(root / "rows.tfrecord.gz"), list(P.read_cache_records(old))[:2])
    with pytest.raises(P.PrecomputeError, match="user-cache rows, not per-user records"):
        _delta(setup, rows, "d_err", old)
    ex = tf.train.Example()
    ex.features.feature["user_id"].int64_list.value.append(5)
    ex.features.feature["label"].float_list.value.append(1.0)
    other = _write(str(root / "other.tfrecord.gz"), [ex.SerializeToString()])
    with pytest.raises(P.PrecomputeError, match="not a per-user record"):
        _delta(setup, other, "d_err", old)
    no_id = tf.train.Example.FromString(delta["new"][8])
    del no_id.features.feature["user_id"]          # past the first record: found by the job
    later = _write(str(root / "later.tfrecord.gz"), [delta["new"][5], no_id.SerializeToString()])
    with pytest.raises(P.PrecomputeError, match="1 record\\(s\\) without exactly one user_id"):
        _delta(setup, later, "d_later", old)
    assert not glob.glob(str(root / "d_later" / "*.tfrecord"))
    plain = str(root / "plain.tfrecord")
    with tf.io.TFRecordWriter(plain) as w:       # gzip by name, but not gzip
        w.write(delta["new"][5])
    os.rename(plain, plain + ".gz")
    with pytest.raises(P.PrecomputeError, match="not a readable TFRecord"):
        _delta(setup, plain + ".gz", "d_err", old)
    # a user twice in the delta: refused, and nothing is left in --output
    twice = _write(str(root / "twice.tfrecord.gz"),
                   [delta["new"][5], delta["new"][8], delta["new"][5]])
    with pytest.raises(P.PrecomputeError, match="holds user 5 2 times"):
        _delta(setup, twice, "d_twice", old)
    assert not glob.glob(str(root / "d_twice" / "*.tfrecord")) and not glob.glob(
        str(root / "d_twice" / "*.npz"))
    # a previous cache without shard indexes (the runinference engine's gzip files)
    if not os.path.exists(root / "cache_full_ri"):
        setup["run"](setup["new_path"], "cache_full_ri", engine="runinference")
    with pytest.raises(P.PrecomputeError, match="needs a previous cache with shard indexes"):
        _delta(setup, delta["path"], "d_err", str(root / "cache_full_ri"))
    with pytest.raises(P.PrecomputeError, match="must not be the --output"):
        _delta(setup, delta["path"], "cache_old", old)
    assert len(_by_user(root / "cache_old")) == 6
    # previous rows of another version, or indexed without fingerprints: refused
    import shutil
    from beam_jobs import precompute_batched as B
    v2 = os.path.join(setup["base"], "din_l", "2")
    if not os.path.exists(v2):
        shutil.copytree(os.path.join(setup["base"], "din_l", "1"), v2)
    try:
        with pytest.raises(P.PrecomputeError, match="holds din_l v1, this run is din_l v2"):
            _delta(setup, delta["path"], "d_err", old, version=None)
    finally:
        shutil.rmtree(v2)
    nofp = root / "cache_old_nofp"
    shutil.copytree(old, nofp)
    (shard,) = glob.glob(str(nofp / "cache-*.tfrecord"))
    idx = B.read_index(shard)
    B.write_index(shard, "din_l", 1, [(u, None, None, o, n) for u, o, n in zip(
        idx["user_id"].tolist(), idx["offset"].tolist(), idx["length"].tolist())])
    with pytest.raises(P.PrecomputeError, match="rows without a history fingerprint"):
        _delta(setup, delta["path"], "d_err", str(nofp))


def test_cli_changed_records(setup, delta, capsys):
    from lifelong import cli
    import json
    capsys.readouterr()
    assert cli.main(["precompute", "--changed_records", delta["path"], "--model", "din_l",
                     "--base", setup["base"], "--output", str(setup["root"] / "cache_cli_d"),
                     "--previous_cache", str(setup["root"] / "cache_old")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["mode"], rep["users_to_model"], rep["users_carried"]) == (
        "delta", len(CHANGED + NEW), len(UNCHANGED + REMOVED))
    assert cli.main(["precompute", "--model", "din_l", "--base", setup["base"],
                     "--output", str(setup["root"] / "cache_cli_d2")]) == 2
    assert "give --records" in capsys.readouterr().err
