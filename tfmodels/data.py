"""tf.data input pipeline: per-user records -> impression windows -> shuffled batches.

A per-user record (see :mod:`tfmodels.schema`) stores the chronological history
once (oldest first) and the user's impressions with ``imp_hist_index``. This
module expands it into one window example per impression:

* ``long_*``  = the last ``L`` behaviors strictly before the impression,
* ``short_*`` = the last ``S`` behaviors strictly before the impression,
* ``*_cluster_size`` = ``hist_cluster_size`` of each row (1 for records without
  it; > 1 only for a TWIN V2 clustered history, see ``beam_jobs/cluster.py``),

both *most recent first*, right-padded with 0, with ``*_len`` valid rows, and the
impression-dependent ``*_gap_bucket`` (log2 minutes between behavior and
impression) computed here. Storage therefore grows with behaviors + impressions;
the L-fold expansion exists only in memory, a chunk of impressions at a time.

Cross-domain windows (``cross_domain=True``, ``FeatureSchema.cross_domain``; LCN,
METHODS 2.5 / 4.3; docs/cross_domain.md): instead of ``short_*``, ``short_t_*`` = the
last ``S`` TARGET-domain behaviors (``hist_domain == schema.TARGET_DOMAIN``) and
``short_s_*`` = the last ``S`` SOURCE-domain behaviors, and ``long_*`` = the last ``L``
SOURCE-domain behaviors only (the lifelong source sequence), all strictly before the
impression, most recent first, as above (:func:`domain_history`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import schema as S

# Impressions of one user are windowed this many at a time, bounding memory at
# IMPRESSION_CHUNK x L per user (a heavy user can have thousands of impressions).
IMPRESSION_CHUNK = 64


def _dense(parsed: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    return {name: tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
            for name, value in parsed.items()}


def is_compact_marker(marker: tf.Tensor) -> tf.Tensor:
    """Elementwise: the record-format marker is one of the compact versions' (v1, v2)."""
    return tf.reduce_any(tf.stack([tf.equal(marker, m) for m in S.COMPACT_MARKERS]), 0)


def _not_compact(marker: tf.Tensor) -> tf.Tensor:
    return tf.logical_not(is_compact_marker(marker))


def parse_user_records(serialized: tf.Tensor, with_impressions: bool = True,
                       item_table: Optional[S.ItemTable] = None) -> Dict[str, tf.Tensor]:
    """Parse ONE serialized per-user record into dense 1-D tensors (the full layout).

    ``item_table`` (:func:`schema.load_item_table`): the records are in the compact
    format (``per_user_record_compact_v1`` or ``_v2``) and are decoded with it
    (:func:`schema.decode_compact_tensors`); None = the full format, and a compact
    record met there fails with a message saying its item table is missing.
    """
    if item_table is not None:
        parsed = _dense(tf.io.parse_single_example(
            serialized, S.compact_parse_spec(with_impressions)))
        tables = S.item_table_tensors(item_table)
        out = S.decode_compact_tensors(parsed, tables["cate"], tables["domain"], tables)
    else:
        spec = dict(S.user_record_parse_spec(with_impressions))
        spec["record_format"] = tf.io.FixedLenFeature([], tf.string, default_value=b"")
        out = _dense(tf.io.parse_single_example(serialized, spec))
        marker = out.pop("record_format")
        with tf.control_dependencies([tf.debugging.Assert(
                _not_compact(marker),
                [f"a compact per-user record ({' / '.join(S.COMPACT_FORMATS)}) was read "
                 "without its item "
                 f"table: read the prepared dataset through make_dataset (which loads "
                 f"{S.ITEM_TABLE_FILE} when meta.json says compact) or pass item_table="
                 "tfmodels.schema.load_item_table(data_dir)"])]):
            # Every output waits for the check: a compact record's fields parsed as full
            # ones would otherwise reach a downstream gather first (graph order is free)
            # and fail there with an index error instead of this message.
            out = {k: tf.identity(v) for k, v in out.items()}
    # Optional history fields a record does not store get their default per row
    # (hist_cluster_size: 1 = every row is one real behavior).
    n_hist = tf.shape(out["hist_item_id"])[0]
    for name, default in S.OPTIONAL_HISTORY_DEFAULTS.items():
        value = out[name]
        out[name] = tf.cond(tf.equal(tf.shape(value)[0], n_hist), lambda v=value: v,
                            lambda v=value: tf.fill([n_hist], tf.constant(default, v.dtype)))
    return out


def gap_bucket(gap_seconds: tf.Tensor) -> tf.Tensor:
    """In-graph log2 bucketing of time gaps (twin of :func:`schema.gap_bucket_np`)."""
    minutes = tf.maximum(tf.cast(gap_seconds, tf.float64), 0.0) / 60.0
    b = tf.cast(tf.floor(tf.math.log(1.0 + minutes) / tf.math.log(tf.constant(2.0, tf.float64))),
                tf.int64) + 1
    return tf.minimum(b, S.NUM_GAP_BUCKETS - 1)


def window_history(history: Dict[str, tf.Tensor], cutoff: tf.Tensor, ref_ts: tf.Tensor,
                   length: int, prefix: str) -> Dict[str, tf.Tensor]:
    """Gather the last ``length`` behaviors before each cutoff, most recent first.

    Args:
      history: ``hist_*`` tensors of one user, each [H], oldest first.
      cutoff: [N] int64, number of visible history rows per row of the output.
      ref_ts: [N] int64, the timestamp the time gaps are measured to.
      length: window length (S or L).
      prefix: ``"short"`` or ``"long"``.
    Returns:
      ``{prefix}_{field}`` [N, length] for every schema sequence field, and
      ``{prefix}_len`` [N].
    """
    n_hist = tf.shape(history["hist_item_id"], out_type=tf.int64)[0]
    cutoff = tf.minimum(tf.cast(cutoff, tf.int64), n_hist)
    pos = cutoff[:, None] - 1 - tf.range(length, dtype=tf.int64)[None, :]   # [N, length]
    valid = pos >= 0
    # Index n_hist points at an appended zero row, so padding gathers zeros and a
    # user with an empty history needs no special case.
    safe = tf.where(valid, pos, n_hist)
    out = {}
    for field in S.SEQUENCE_FIELDS:
        if field == "gap_bucket":
            continue
        src = history.get(f"hist_{field}")
        if src is None:   # an optional field (hist_cluster_size) not given: its default
            src = tf.fill(tf.shape(history["hist_item_id"]),
                          tf.constant(S.OPTIONAL_HISTORY_DEFAULTS[f"hist_{field}"],
                                      S.SEQUENCE_FIELDS[field]))
        src = tf.concat([src, tf.zeros([1], src.dtype)], axis=0)
        out[S.seq_name(prefix, field)] = tf.gather(src, safe)
    ts = tf.gather(tf.concat([history["hist_ts"], tf.zeros([1], tf.int64)], 0), safe)
    gaps = gap_bucket(ref_ts[:, None] - ts)
    out[S.seq_name(prefix, "gap_bucket")] = tf.where(valid, gaps, tf.zeros_like(gaps))
    out[f"{prefix}_len"] = tf.minimum(cutoff, length)
    return out


def domain_history(history: Dict[str, tf.Tensor], cutoff: tf.Tensor,
                   domain: int) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """The rows of one domain and the cutoffs mapped onto them.

    Returns ``(sub, sub_cutoff)``: ``sub`` = every ``hist_*`` tensor restricted to the
    rows with ``hist_domain == domain`` (order kept, oldest first), ``sub_cutoff[n]`` =
    how many of those rows lie strictly before ``cutoff[n]``. So
    ``window_history(sub, sub_cutoff, ...)`` is the window of that domain's behaviors
    before each impression.
    """
    keep = tf.where(tf.equal(history["hist_domain"], domain))[:, 0]          # [H_d] int64
    sub = {k: tf.gather(v, keep) for k, v in history.items()}
    sub_cutoff = tf.searchsorted(keep, tf.cast(cutoff, tf.int64), side="left",
                                 out_type=tf.int64)
    return sub, sub_cutoff


def history_windows(history: Dict[str, tf.Tensor], cutoff: tf.Tensor, ref_ts: tf.Tensor,
                    short_len: int, long_len: int,
                    cross_domain: bool = False) -> Dict[str, tf.Tensor]:
    """Every window of the schema (``short``/``long``, or cross-domain ``short_t``,
    ``short_s`` and the source-only ``long``) before each cutoff: [N, ...]."""
    out = {}
    if not cross_domain:
        out.update(window_history(history, cutoff, ref_ts, short_len, S.SHORT))
        out.update(window_history(history, cutoff, ref_ts, long_len, S.LONG))
        return out
    target, target_cut = domain_history(history, cutoff, S.TARGET_DOMAIN)
    source, source_cut = domain_history(history, cutoff, S.SOURCE_DOMAIN)
    out.update(window_history(target, target_cut, ref_ts, short_len, S.SHORT_TARGET))
    out.update(window_history(source, source_cut, ref_ts, short_len, S.SHORT_SOURCE))
    out.update(window_history(source, source_cut, ref_ts, long_len, S.LONG))
    return out


def impression_windows(record: Dict[str, tf.Tensor], short_len: int,
                       long_len: int, cross_domain: bool = False) -> Dict[str, tf.Tensor]:
    """All window examples of one parsed user record, batched over its impressions [N, ...]."""
    history = {k: record[k] for k in S.HISTORY_FIELDS if k in record}
    cutoff = record["imp_hist_index"]
    ref_ts = record["imp_ts"]
    n = tf.shape(cutoff)[0]
    out = {
        "user_id": tf.fill([n], record["user_id"]),
        "target_item_id": record["imp_item_id"],
        "target_cate_id": record["imp_cate_id"],
        "imp_ts": ref_ts,
        S.LABEL: record["imp_label"],
    }
    out.update(history_windows(history, cutoff, ref_ts, short_len, long_len, cross_domain))
    return out


#: make_dataset's input pipelines: "parallel" (default) and "legacy" (the pipeline before
#: issue 22 item 6, kept so its cost can be measured in the same run). Both give the same
#: batches in the same order, values and dtypes (tests/test_train_speed_paths.py).
PIPELINES = ("parallel", "legacy")

#: Sequence fields held as int32 between windowing and batching by the "parallel" pipeline
#: (the shuffle buffer holds up to ``shuffle_buffer`` windows of L rows: at L = 1,000 and
#: 20,000 windows the int64 copies alone were ~1 GB). All are bounded far below 2**31:
#: vocabulary indices, log2 gap buckets (< NUM_GAP_BUCKETS), domain codes and cluster
#: sizes (<= the history length); item/category ids and cluster sizes are checked, the
#: others are small by construction. ``ts`` and ``engage`` keep their dtype.
NARROW_FIELDS = ("item_id", "cate_id", "gap_bucket", "domain", "cluster_size")
_INT32_MAX = 2 ** 31 - 1


def _narrow_names(example: Dict[str, tf.Tensor]):
    return [k for k, v in example.items() if v.dtype == tf.int64
            and any(k.endswith("_" + f) for f in NARROW_FIELDS)
            and k.split("_")[0] in ("short", "long")]


def narrow_windows(example: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """int64 -> int32 for :data:`NARROW_FIELDS` of every window (exact: see there)."""
    out = dict(example)
    for k in _narrow_names(example):
        v = example[k]
        if not k.endswith(("_gap_bucket", "_domain")):
            tf.debugging.assert_less_equal(   # (an empty window's max is int64's min)
                tf.reduce_max(v), tf.constant(_INT32_MAX, tf.int64),
                message=f"{k} above 2**31 - 1: cannot be held as int32 in the input pipeline")
        out[k] = tf.cast(v, tf.int32)
    return out


def widen_windows(batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Undo :func:`narrow_windows`: the schema's int64 again."""
    out = dict(batch)
    for k, v in batch.items():
        if v.dtype == tf.int32 and k.split("_")[0] in ("short", "long"):
            out[k] = tf.cast(v, tf.int64)
    return out


def _expand_user(serialized: tf.Tensor, short_len: int, long_len: int,
                 cross_domain: bool = False, pipeline: str = "legacy",
                 item_table: Optional[S.ItemTable] = None) -> tf.data.Dataset:
    record = parse_user_records(serialized, item_table=item_table)
    history = {k: record[k] for k in S.HISTORY_FIELDS if k in record}
    scalars = {"user_id": record["user_id"]}
    imps = {k: record[k] for k in S.IMPRESSION_FIELDS}

    def chunk_windows(chunk):
        rec = dict(history, **scalars, **chunk)
        out = impression_windows(rec, short_len, long_len, cross_domain)
        return narrow_windows(out) if pipeline == "parallel" else out

    chunks = tf.data.Dataset.from_tensor_slices(imps).batch(IMPRESSION_CHUNK)
    if pipeline == "parallel":
        # window building of a heavy user's chunks in parallel (order kept)
        chunks = chunks.map(chunk_windows, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    else:
        chunks = chunks.map(chunk_windows)
    return chunks.unbatch()


#: tf.data traces every map / interleave function through autograph by default, which
#: rewrote the source of the 7 parsing and windowing functions on each new process
#: (~3 of make_dataset's ~4.6 s before the first batch, tiny data). They branch only on
#: Python values (explicit tf.cond where a tensor decides), so they are traced as plain
#: Python; functions they create inside (the per-user chunk map) inherit the setting.
_plain = tf.autograph.experimental.do_not_convert


def item_table_for(pattern: str):
    """The item table of the prepared dataset a file pattern points into
    (:func:`schema.load_item_table` of its folder: None for full or bare records)."""
    return S.load_item_table(os.path.dirname(pattern))


def list_files(pattern: str) -> list:
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files


def make_dataset(pattern: str, short_len: int, long_len: int, batch_size: int,
                 shuffle: bool = False, seed: Optional[int] = None,
                 shuffle_buffer: int = 20000, repeat: bool = False,
                 drop_remainder: bool = False, cycle_length: int = 4,
                 cross_domain: bool = False, pipeline: str = "parallel",
                 item_table="auto") -> tf.data.Dataset:
    """Batched window examples from sharded per-user TFRecords.

    ``item_table``: ``"auto"`` (default) reads the record format from the meta.json
    beside the files (:func:`item_table_for`: compact records are decoded with the
    dataset's item table); an :class:`~tfmodels.schema.ItemTable` or None (full) says
    it explicitly.

    Each element is a dict of the schema's window features plus ``label``
    (``cross_domain``: the per-domain windows, see the module docstring).
    With ``shuffle=False`` the order is deterministic (files, users, impressions).

    ``pipeline`` (:data:`PIPELINES`): ``"parallel"`` builds a user's impression chunks
    in parallel (deterministic order; this is what keeps the cores busy in evaluation,
    where users are not interleaved), holds the windows' bounded integer fields as
    int32 in the shuffle buffer (:data:`NARROW_FIELDS`; ~40% less buffer memory) and
    casts them back after batching; ``"legacy"`` is the pipeline before that. Both
    yield identical batches.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    files = list_files(pattern)
    if isinstance(item_table, str):
        if item_table != "auto":
            raise ValueError(f"item_table must be 'auto', None or an ItemTable, got {item_table!r}")
        item_table = item_table_for(pattern)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(_plain(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP")),
                       cycle_length=min(cycle_length, len(files)), block_length=16,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Interleave users so a heavy user's impressions are spread out before the shuffle.
    ds = ds.interleave(_plain(lambda x: _expand_user(x, short_len, long_len, cross_domain,
                                                     pipeline, item_table)),
                       cycle_length=16 if shuffle else 1, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if pipeline == "parallel":
        ds = ds.map(_plain(widen_windows), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------
# The user tower's windows of a BATCH of records (serving's user_tower, precompute)
# --------------------------------------------------------------------------------------
# One tf.io.parse_example for the whole batch, then every window gathered from the users'
# zero-padded [B, W] history matrices at once: the same values as parse_user_records +
# history_windows per record (user_history_features_map_fn, the path before issue 19,
# kept as the reference: tests/test_data.py compares both on every record kind). The
# per-record tf.map_fn cost ~0.55 ms of CPU per user at L = 1,000, most of a cheap
# user_tower (docs/benchmarks.md, "User-cache precompute throughput").

#: The history lists every window reads (hist_cluster_size is optional, see
#: :data:`schema.OPTIONAL_HISTORY_DEFAULTS`).
_REQUIRED_HISTORY = tuple(k for k in S.HISTORY_FIELDS if k not in S.OPTIONAL_HISTORY_DEFAULTS)


def _ragged_spec(spec: Dict[str, object]) -> Dict[str, object]:
    """A parse spec's VarLenFeatures as RaggedFeatures: ``tf.io.parse_example`` then gives
    each list's row lengths directly (the same wire parse and parse errors)."""
    return {k: tf.io.RaggedFeature(v.dtype, row_splits_dtype=tf.int64)
            if isinstance(v, tf.io.VarLenFeature) else v for k, v in spec.items()}


def _after(check: tf.Operation, rt: tf.RaggedTensor) -> tf.RaggedTensor:
    """``rt`` (values and row splits) only after ``check`` ran."""
    with tf.control_dependencies([check]):
        return tf.RaggedTensor.from_row_splits(tf.identity(rt.flat_values),
                                               tf.identity(rt.row_splits), validate=False)


def _compact_lookup_batch(item: tf.RaggedTensor, table: tf.Tensor, pos: tf.RaggedTensor,
                          vals: tf.RaggedTensor, what: str) -> tf.RaggedTensor:
    """Batched twin of the lookup in :func:`schema.decode_compact_tensors`: ``table[item]``
    with each user's exceptions (values ``vals`` at that user's rows ``pos``) written over."""
    n_table = tf.shape(table, out_type=tf.int64)[0]
    ids = item.flat_values
    ok = tf.reduce_all((ids >= S.OOV_ID) & (ids < n_table))
    in_table = tf.debugging.Assert(ok, [     # the per-record decoder's message
        f"compact per-user record: {what} holds item ids outside the item table "
        f"(ids {S.OOV_ID}..n-1); the records and {S.ITEM_TABLE_FILE} come from "
        "different prepare runs. n, ids:", n_table, ids], summarize=8)
    # Per record, a position outside the record's rows failed the scatter; on the
    # batch's flat values it would land in another user's row: checked here.
    rows = pos.value_rowids()
    ok_pos = tf.logical_and(
        tf.reduce_all(tf.equal(pos.row_lengths(), vals.row_lengths())),
        tf.reduce_all((pos.flat_values >= 0)
                      & (pos.flat_values < tf.gather(item.row_lengths(), rows))))
    in_rows = tf.debugging.Assert(ok_pos, [
        f"compact per-user record: {what}'s exception lists (positions, values) differ in "
        "length or name a position outside the record's rows"])
    with tf.control_dependencies([in_table, in_rows]):
        got = tf.gather(table, tf.clip_by_value(ids, 0, n_table - 1))
        flat_pos = tf.gather(item.row_starts(), rows) + pos.flat_values
        got = tf.tensor_scatter_nd_update(got, flat_pos[:, None], vals.flat_values)
    return item.with_flat_values(got)


def _decode_compact_batch(p: Dict[str, tf.Tensor],
                          item_table: S.ItemTable) -> Dict[str, tf.RaggedTensor]:
    """Batched twin of :func:`schema.decode_compact_tensors` (history fields) on the
    ragged parse of compact records: per user the same values."""
    tables = S.item_table_tensors(item_table)
    cate_table, domain_table = tables["cate"], tables["domain"]
    # v1 records store hist_item_id, v2 records the item address (group, rank): the
    # items are the two concatenated per user (schema.decode_compact_tensors)
    group, rank = p["hist_item_group"], p["hist_item_rank"]
    same = tf.debugging.Assert(tf.reduce_all(tf.equal(group.row_lengths(), rank.row_lengths())), [
        "compact v2 per-user record: the history's item group and rank lists differ in "
        "length (a corrupt record)"])
    with tf.control_dependencies([same]):
        v2_item = group.with_flat_values(S.item_from_address_tensor(
            group.flat_values, rank.flat_values, tables, "the history"))
    item = tf.concat([p["hist_item_id"], v2_item], axis=1)
    deltas = p["hist_ts_delta"]
    q = p["hist_engage_q"]
    lens = tf.debugging.Assert(tf.reduce_all(
        tf.equal(item.row_lengths(), deltas.row_lengths())
        & tf.equal(item.row_lengths(), q.row_lengths())), [
        "compact per-user record: the history's lists (hist_item_id or the item address, "
        "hist_ts_delta, hist_engage_q) differ in length (a corrupt record)"])
    item = _after(lens, item)
    # each user's cumsum, on the zero-padded [B, W] matrix (integers: exact), times the
    # record's ts_step (1 for v1 and for exact v2 records)
    ts = tf.RaggedTensor.from_tensor(
        tf.cumsum(deltas.to_tensor(), axis=1) * p["ts_step"][:, None],
        lengths=deltas.row_lengths())
    step = tf.gather(p["engage_step"], q.value_rowids())
    return {"hist_item_id": item,
            "hist_cate_id": _compact_lookup_batch(item, cate_table, p["hist_cate_exc_pos"],
                                                  p["hist_cate_exc_id"], "the history"),
            "hist_ts": ts,
            "hist_engage": q.with_flat_values(tf.cast(q.flat_values, tf.float32) * step),
            "hist_domain": _compact_lookup_batch(item, domain_table, p["hist_domain_exc_pos"],
                                                 p["hist_domain_exc_val"], "the history"),
            "hist_cluster_size": p["hist_cluster_size"]}


def _parse_history_batch(serialized: tf.Tensor, item_table: Optional[S.ItemTable]
                         ) -> Tuple[tf.Tensor, Dict[str, tf.RaggedTensor]]:
    """``(user_id [B], {hist_* field: RaggedTensor [B, None]})`` of a batch of per-user
    records in ONE ``tf.io.parse_example`` (impressions not parsed); the formats and
    checks of :func:`parse_user_records`."""
    if item_table is not None:
        p = tf.io.parse_example(serialized, _ragged_spec(S.compact_parse_spec(False)))
        return p["user_id"], _decode_compact_batch(p, item_table)
    spec = _ragged_spec(S.user_record_parse_spec(with_impressions=False))
    spec["record_format"] = tf.io.FixedLenFeature([], tf.string, default_value=b"")
    p = tf.io.parse_example(serialized, spec)
    check = tf.debugging.Assert(
        tf.reduce_all(_not_compact(p["record_format"])),
        [f"a compact per-user record ({' / '.join(S.COMPACT_FORMATS)}) was read without "
         "its item "
         f"table: read the prepared dataset through make_dataset (which loads "
         f"{S.ITEM_TABLE_FILE} when meta.json says compact) or pass item_table="
         "tfmodels.schema.load_item_table(data_dir)"])
    # everything downstream waits for the check (see parse_user_records)
    with tf.control_dependencies([check]):
        user_id = tf.identity(p["user_id"])
    return user_id, {k: _after(check, p[k]) for k in S.HISTORY_FIELDS}


def _padded(rt: tf.RaggedTensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(rt`` as a zero-padded [B, W + 1] matrix, ``W)``: column W is always 0, the
    padding row that :func:`window_history` appends."""
    dense = rt.to_tensor()
    return tf.pad(dense, [[0, 0], [0, 1]]), tf.shape(dense, out_type=tf.int64)[1]


def _last_rows(cutoff: tf.Tensor, length: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """Positions ``cutoff - 1, cutoff - 2, ...`` [B, length] and which are rows (>= 0)."""
    pos = cutoff[:, None] - 1 - tf.range(length, dtype=tf.int64)[None, :]
    return pos, pos >= 0


def _gather_window(fields: Dict[str, Tuple[tf.Tensor, tf.Tensor]], idx: tf.Tensor,
                   valid: tf.Tensor, ref: tf.Tensor, cluster_ok: tf.Tensor,
                   prefix: str) -> Dict[str, tf.Tensor]:
    """Window ``prefix`` of every user: the history rows ``idx`` [B, length] of the
    :func:`_padded` matrices ``fields`` where ``valid``, 0 elsewhere, and the gap buckets
    to ``ref`` [B], as :func:`window_history` builds them per user."""
    out = {}
    for field in S.SEQUENCE_FIELDS:
        if field == "gap_bucket":
            continue
        dense, width = fields[f"hist_{field}"]
        if field == "cluster_size":
            # a record without it (or with another length) means 1 per row
            # (parse_user_records' OPTIONAL_HISTORY_DEFAULTS rule)
            g = tf.gather(dense, tf.where(valid & cluster_ok[:, None], idx, width), batch_dims=1)
            default = tf.constant(S.OPTIONAL_HISTORY_DEFAULTS["hist_cluster_size"], g.dtype)
            g = tf.where(valid & ~cluster_ok[:, None], default, g)
        else:
            g = tf.gather(dense, tf.where(valid, idx, width), batch_dims=1)
        out[S.seq_name(prefix, field)] = g
    gaps = gap_bucket(ref[:, None] - out[S.seq_name(prefix, "ts")])
    out[S.seq_name(prefix, "gap_bucket")] = tf.where(valid, gaps, tf.zeros_like(gaps))
    return out


def _rows_check(hist: Dict[str, tf.RaggedTensor], need: tf.Tensor, user_id: tf.Tensor,
                what: str) -> list:
    """Every history list holds at least ``need`` [B] values (the rows the windows read).
    Per record a shorter list failed a gather; on the batch it would read another
    user's values, so it is refused here with its name."""
    return [tf.debugging.Assert(tf.reduce_all(hist[k].row_lengths() >= need), [
        f"per-user record: {k} has fewer values than {what} (a history list holds one "
        "value per behavior); user ids of the batch:", user_id], summarize=8)
        for k in _REQUIRED_HISTORY]


def user_history_features(serialized: tf.Tensor, schema: S.FeatureSchema,
                          snapshot_ts: Optional[tf.Tensor] = None,
                          item_table: Optional[S.ItemTable] = None) -> Dict[str, tf.Tensor]:
    """Long and short windows over a user's WHOLE stored history (or before ``snapshot_ts``).

    This is what the user tower sees offline: ``serialized`` is a batch [B] of
    per-user records (impressions ignored); windows end at the last behavior
    (``ref_ts`` = the last behavior's timestamp, or ``snapshot_ts``). The windows are
    the schema's (cross-domain ones with ``schema.cross_domain``), equal to what the
    training pipeline's code (:func:`history_windows`) builds per record
    (:func:`user_history_features_map_fn`, tested), computed for the whole batch at once.
    ``item_table``: the records are compact (see :func:`parse_user_records`).
    """
    user_id, hist = _parse_history_batch(serialized, item_table)
    n_item = hist["hist_item_id"].row_lengths()
    ts = hist["hist_ts"]
    fields = {k: _padded(v) for k, v in hist.items()}
    if snapshot_ts is None:       # the last stored timestamp (0 without behaviors), all rows
        n_ts = ts.row_lengths()
        last = tf.gather(fields["hist_ts"][0], tf.maximum(n_ts - 1, 0), batch_dims=1)
        ref = tf.where(n_ts > 0, last, tf.zeros_like(last))
        cut = n_ts
    else:
        ref = tf.fill(tf.shape(user_id), tf.cast(snapshot_ts, tf.int64))
        cut = tf.reduce_sum(tf.cast(ts < tf.cast(snapshot_ts, tf.int64), tf.int64), axis=1)
    cluster_ok = tf.equal(hist["hist_cluster_size"].row_lengths(), n_item)
    out = {"user_id": user_id, "imp_ts": ref}
    if not schema.cross_domain:
        with tf.control_dependencies(_rows_check(hist, n_item, user_id, "hist_item_id")):
            cutoff = tf.minimum(cut, n_item)
        for prefix, length in ((S.SHORT, schema.short_len), (S.LONG, schema.long_len)):
            pos, valid = _last_rows(cutoff, length)
            out.update(_gather_window(fields, pos, valid, ref, cluster_ok, prefix))
            out[f"{prefix}_len"] = tf.minimum(cutoff, length)
        return out
    # Cross-domain (domain_history): per domain, the indices of its rows in the record
    # (oldest first) and how many of them lie before the cutoff.
    dom = hist["hist_domain"]
    rowids = dom.value_rowids()
    in_row = (tf.range(tf.size(dom.flat_values, out_type=tf.int64))
              - tf.gather(dom.row_starts(), rowids))
    n_users = tf.shape(user_id, out_type=tf.int64)[0]
    keeps = {}
    for d in (S.TARGET_DOMAIN, S.SOURCE_DOMAIN):
        mask = tf.equal(dom.flat_values, d)
        keeps[d] = tf.RaggedTensor.from_value_rowids(
            tf.boolean_mask(in_row, mask), tf.boolean_mask(rowids, mask), nrows=n_users)
    either = tf.equal(dom.flat_values, S.TARGET_DOMAIN) | tf.equal(dom.flat_values,
                                                                     S.SOURCE_DOMAIN)
    need = tf.maximum(tf.math.unsorted_segment_max(tf.where(either, in_row + 1, 0), rowids,
                                                   n_users), 0)
    checks = _rows_check(hist, need, user_id, "the target- and source-domain rows")
    for prefix, d, length in ((S.SHORT_TARGET, S.TARGET_DOMAIN, schema.short_len),
                              (S.SHORT_SOURCE, S.SOURCE_DOMAIN, schema.short_len),
                              (S.LONG, S.SOURCE_DOMAIN, schema.long_len)):
        keep = keeps[d]
        before = tf.cast(keep.flat_values < tf.gather(cut, keep.value_rowids()), tf.int64)
        with tf.control_dependencies(checks):
            sub_cut = tf.math.unsorted_segment_sum(before, keep.value_rowids(), n_users)
        keep_rows, width = _padded(keep)
        pos, valid = _last_rows(sub_cut, length)
        idx = tf.gather(keep_rows, tf.where(valid, pos, width), batch_dims=1)
        out.update(_gather_window(fields, idx, valid, ref, cluster_ok, prefix))
        out[f"{prefix}_len"] = tf.minimum(sub_cut, length)
    return out


def user_history_features_map_fn(serialized: tf.Tensor, schema: S.FeatureSchema,
                                 snapshot_ts: Optional[tf.Tensor] = None,
                                 item_table: Optional[S.ItemTable] = None
                                 ) -> Dict[str, tf.Tensor]:
    """:func:`user_history_features` as it was before issue 19 (one
    :func:`parse_user_records` + :func:`history_windows` per record through
    ``tf.map_fn``): the reference its batched form is tested against, and the
    "before" of scripts/bench_cformer_formulations.py."""
    def one(x):
        rec = parse_user_records(x, with_impressions=False, item_table=item_table)
        history = {k: rec[k] for k in S.HISTORY_FIELDS if k in rec}
        h = tf.shape(rec["hist_ts"], out_type=tf.int64)[0]
        if snapshot_ts is None:
            ref = tf.cond(h > 0, lambda: rec["hist_ts"][-1], lambda: tf.constant(0, tf.int64))
            cut = h
        else:
            ref = tf.cast(snapshot_ts, tf.int64)
            cut = tf.reduce_sum(tf.cast(rec["hist_ts"] < ref, tf.int64))
        out = {"user_id": rec["user_id"], "imp_ts": ref}
        w = history_windows(history, cut[None], ref[None], schema.short_len, schema.long_len,
                            schema.cross_domain)
        out.update({k: v[0] for k, v in w.items()})
        return out

    specs = schema.feature_specs()
    sig = {k: tf.TensorSpec(specs[k].shape[1:], specs[k].dtype) for k in specs
           if not k.startswith("target_")}
    return tf.map_fn(one, serialized, fn_output_signature=sig)
