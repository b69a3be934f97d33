"""Issue 22 item 6: the faster training paths compute what today's paths compute.

* the "parallel" input pipeline yields the same batches (order, values, dtypes) as the
  "legacy" one, with and without shuffling, and rejects an unknown pipeline name;
* int32 narrowing of window fields is exact and refuses ids that do not fit;
* TrainConfig's jit_compile resolves as documented and rejects bad values.
"""
import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S


def _batches(data_dir, pipeline, shuffle):
    ds = D.make_dataset(S.split_pattern(data_dir, "train"), 5, 24, 16, shuffle=shuffle,
                        seed=3, shuffle_buffer=64, pipeline=pipeline)
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


@pytest.mark.parametrize("shuffle", [False, True])
def test_parallel_pipeline_yields_the_legacy_batches(tiny_data, shuffle):
    new, old = _batches(tiny_data, "parallel", shuffle), _batches(tiny_data, "legacy", shuffle)
    assert len(new) == len(old) > 1
    for a, b in zip(new, old):
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the windows are not trivially empty: long ids vary inside the batches
    assert len(np.unique(new[0]["long_item_id"])) > 2


def test_unknown_pipeline_is_rejected(tiny_data):
    with pytest.raises(ValueError, match="pipeline must be one of"):
        D.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 16, pipeline="fast")


def test_narrow_windows_is_exact_and_checks_the_range():
    ex = {"long_item_id": tf.constant([[7, 0], [2**31 - 1, 3]], tf.int64),
          "long_ts": tf.constant([[2**40, 0], [1, 2]], tf.int64),
          "long_engage": tf.constant([[0.5, 0.0], [1.0, 2.0]]),
          "target_item_id": tf.constant([5, 6], tf.int64)}
    narrow = D.narrow_windows(ex)
    assert narrow["long_item_id"].dtype == tf.int32
    assert narrow["long_ts"].dtype == tf.int64          # timestamps are never narrowed
    assert narrow["target_item_id"].dtype == tf.int64   # only window fields
    back = D.widen_windows(narrow)
    for k in ex:
        assert back[k].dtype == ex[k].dtype
        np.testing.assert_array_equal(back[k].numpy(), ex[k].numpy())
    too_big = dict(ex, long_item_id=tf.constant([[2**31, 0]], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="long_item_id above 2"):
        D.narrow_windows(too_big)


@pytest.fixture
def din_path_restored():
    from tfmodels import layers
    before = layers.din_path()
    yield layers
    layers.set_din_path(before)


@pytest.mark.parametrize("normalize", ["softmax", None])
@pytest.mark.parametrize("keys_batch", [4, 1])
def test_din_rows_path_equals_per_candidate_path(din_path_restored, normalize, keys_batch):
    """Outputs and gradients of the DIN unit on fixed weights: the "folded", "rows" and
    "valid" (padded positions skipped) layouts equal the "per_candidate" one (before issue 22) and the explicit concatenation
    [e_l, e_t, e_l - e_t, e_l * e_t] W + b (G2) computed here by hand."""
    layers = din_path_restored
    rng = np.random.default_rng(0)
    d, L, B = 6, 7, 4
    keys = tf.constant(rng.normal(size=(keys_batch, L, d)), tf.float32)
    query = tf.constant(rng.normal(size=(B, d)), tf.float32)
    mask = rng.random((keys_batch, L)) > 0.3
    if keys_batch > 1:
        mask[-1] = False        # a window of padding only: "valid" has no row of it
    mask = tf.constant(mask, tf.float32)
    din = layers.DinAttention([5, 3], normalize)
    layers.set_din_path("per_candidate")
    din(keys, mask, query)   # creates every weight (build() alone makes w1, b1 only)
    assert len(din.weights) == 8
    for v in din.weights:   # non-zero PReLU slopes and biases, so every term is tested
        v.assign(rng.normal(size=v.shape) * 0.5)

    def run(path):
        layers.set_din_path(path)
        with tf.GradientTape() as tape:
            tape.watch([keys, query])
            out = din(keys, mask, query)
            loss = tf.reduce_sum(out * tf.range(1.0, d + 1.0))
        return out.numpy(), tape.gradient(loss, [keys, query] + din.trainable_variables)

    old, g_old = run("per_candidate")
    max_share = layers.VALID_PATH_MAX_SHARE, layers.VALID_PRELU_MAX_SHARE
    # "valid" / "valid_prelu" on the valid rows (share below the threshold), then their
    # folded branch
    for path, share in (("folded", None), ("rows", None), ("valid", 1.01), ("valid", 0.0),
                        ("valid_prelu", 1.01), ("valid_prelu", 0.0)):
        if share is not None:
            layers.VALID_PATH_MAX_SHARE = layers.VALID_PRELU_MAX_SHARE = share
        try:
            out, g_out = run(path)
        finally:
            layers.VALID_PATH_MAX_SHARE, layers.VALID_PRELU_MAX_SHARE = max_share
        np.testing.assert_allclose(out, old, rtol=1e-5, atol=1e-5, err_msg=path)
        for a, b in zip(g_out, g_old):
            np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(),
                                       tf.convert_to_tensor(b).numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=path)
    rows = out
    # hand reference: the 4d concatenation through the first layer, then the MLP
    k = np.broadcast_to(keys.numpy(), (B, L, d))
    q = np.broadcast_to(query.numpy()[:, None, :], (B, L, d))
    x = np.concatenate([k, q, k - q, k * q], -1)
    pre = x @ din.w1.numpy() + din.b1.numpy()
    a0 = din.act1.alpha.numpy()
    h = np.maximum(pre, 0) + a0 * np.minimum(pre, 0)
    h = h @ din.rest.dense[0].kernel.numpy() + din.rest.dense[0].bias.numpy()
    a1 = din.rest.acts[0].alpha.numpy()
    h = np.maximum(h, 0) + a1 * np.minimum(h, 0)
    logits = (h @ din.rest.out.kernel.numpy() + din.rest.out.bias.numpy())[..., 0]
    m = np.broadcast_to(mask.numpy(), (B, L))
    if normalize == "softmax":
        z = np.where(m > 0, logits, -1e9)
        w = np.exp(z - z.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True) * m
    else:
        w = logits * m
    np.testing.assert_allclose(rows, np.einsum("bl,bld->bd", w, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden", [[5], [5, 4, 3]])
def test_din_valid_path_equals_per_candidate_for_other_depths(din_path_restored, hidden):
    """The split-PReLU MLP of "valid" (both branches) for an attention MLP of one hidden
    layer (the first layer's split goes straight into the output) and of three (the
    split repeated), against "per_candidate" on the same weights, with slopes of both
    signs; and on a fresh unit, "valid" creates the same weights (names, shapes, order)
    as the layers' own calls, so checkpoints are interchangeable."""
    layers = din_path_restored
    rng = np.random.default_rng(1)
    d, L, B = 4, 6, 3
    keys = tf.constant(rng.normal(size=(B, L, d)), tf.float32)
    query = tf.constant(rng.normal(size=(B, d)), tf.float32)
    mask = tf.constant(rng.random((B, L)) > 0.4, tf.float32)

    def fresh(path):
        tf.keras.backend.clear_session()
        layers.set_din_path(path)
        din = layers.DinAttention(hidden, name="din")
        din(keys, mask, query)
        return din

    ref_din, new_din = fresh("per_candidate"), fresh("valid")
    assert ([(w.name, w.shape) for w in new_din.weights]
            == [(w.name, w.shape) for w in ref_din.weights])
    assert len(ref_din.weights) == 2 + 1 + 3 * (len(hidden) - 1) + 2
    for v in ref_din.weights:
        v.assign(rng.normal(size=v.shape) * 0.5)
    new_din.set_weights(ref_din.get_weights())

    def run(din, path):
        layers.set_din_path(path)
        with tf.GradientTape() as tape:
            tape.watch([keys, query])
            loss = tf.reduce_sum(din(keys, mask, query) * tf.range(1.0, d + 1.0))
        return [tf.convert_to_tensor(g).numpy() for g in
                tape.gradient(loss, [keys, query] + din.trainable_variables)] + [loss.numpy()]

    want = run(ref_din, "per_candidate")
    saved = layers.VALID_PATH_MAX_SHARE
    for share in (1.01, 0.0):   # gathered rows, then the folded form
        layers.VALID_PATH_MAX_SHARE = share
        try:
            got = run(new_din, "valid")
        finally:
            layers.VALID_PATH_MAX_SHARE = saved
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(share))


def test_deduplicated_embedding_lookup_equals_the_plain_one(din_path_restored):
    """ItemEmbedding traced with "valid" looks each distinct id up once: the same
    embeddings (padding rows zero), the same table gradients (summed over repeated ids,
    hand-checked for one row), and the gradient reaching the optimizer is IndexedSlices
    with each id once (what makes its deduplication cheap). Other layouts keep the
    plain lookup (one gradient row per looked-up id)."""
    layers = din_path_restored
    rng = np.random.default_rng(2)
    emb = layers.ItemEmbedding(9, 4, dim=3)
    ids = tf.constant([[3, 5, 3, 0], [8, 3, 0, 0]], tf.int64)
    cats = tf.constant([[1, 2, 1, 0], [3, 1, 0, 0]], tf.int64)
    emb(ids, cats)
    upstream = tf.constant(rng.normal(size=(2, 4, 6)), tf.float32)

    def run(path):
        layers.set_din_path(path)
        with tf.GradientTape() as tape:
            out = emb(ids, cats)
            loss = tf.reduce_sum(out * upstream)
        return out.numpy(), tape.gradient(loss, [emb.item_table.embeddings,
                                                 emb.cate_table.embeddings])

    out_plain, g_plain = run("folded")
    out_dedup, g_dedup = run("valid")
    np.testing.assert_array_equal(out_dedup, out_plain)
    assert not out_dedup[1, 2:].any()
    assert len(g_plain[0].indices) == 8                       # one row per lookup
    for g, distinct in zip(g_dedup, ([0, 3, 5, 8], [0, 1, 2, 3])):
        assert isinstance(g, tf.IndexedSlices)
        assert sorted(g.indices.numpy().tolist()) == distinct   # each id once
    for a, b in zip(g_dedup, g_plain):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(),
                                   tf.convert_to_tensor(b).numpy(), rtol=1e-6, atol=1e-6)
    # item 3 at (0, 0), (0, 2), (1, 1): its row's gradient is the sum of the three
    # upstream rows' item half
    dense = tf.convert_to_tensor(g_dedup[0]).numpy()
    u = upstream.numpy()
    np.testing.assert_allclose(dense[3], u[0, 0, :3] + u[0, 2, :3] + u[1, 1, :3], rtol=1e-6)
    assert not dense[0].any()                                  # padding: masked out


def test_unknown_din_path_is_rejected(din_path_restored):
    with pytest.raises(ValueError, match="din_path must be one of"):
        din_path_restored.set_din_path("fused")


def test_train_config_speed_fields_resolve_and_reject_bad_values():
    from lifelong import cli
    from tfmodels import train as T
    assert T.TrainConfig().jit_compile == "auto"
    assert T.resolve_jit_compile("auto") is (T.JIT_AUTO == "on")
    assert T.resolve_jit_compile("on") is True and T.resolve_jit_compile("off") is False
    for field, bad, msg in [("jit_compile", "yes", "jit_compile must be one of auto, on, off"),
                            ("din_path", "fused", "din_path must be one of folded, rows, per_candidate, valid, valid_prelu"),
                            ("input_pipeline", "fast", "input_pipeline must be one of")]:
        with pytest.raises(T.ConfigError, match=msg):
            T.TrainConfig(data="d", **{field: bad}).validate()
    args, _ = cli.build_parser(False, command="train").parse_known_args(
        ["train", "--data", "d", "--jit_compile", "on", "--din_path", "per_candidate",
         "--input_pipeline", "legacy", "--config_dir", "none"])
    cfg = cli._train_config(args)
    assert T.TrainConfig().din_path == "valid"
    # "valid" has a data-dependent row count: under XLA the run traces "folded"
    assert T.traced_din_path(T.TrainConfig(din_path="valid", jit_compile="on")) == "folded"
    assert T.traced_din_path(T.TrainConfig(din_path="valid", jit_compile="off")) == "valid"
    assert T.traced_din_path(T.TrainConfig(din_path="valid_prelu", jit_compile="on")) == "folded"
    assert T.traced_din_path(T.TrainConfig(din_path="rows", jit_compile="on")) == "rows"
    assert (cfg.jit_compile, cfg.din_path, cfg.input_pipeline) == ("on", "per_candidate",
                                                                   "legacy")


def test_bench_train_summary_ratios_by_hand():
    """lifelong bench train's summary: speed-up = today's step time / the path's, L-ratio =
    step time at the longest L / at the shortest (same batch), on hand-made rows; a failed
    cell leaves its ratios out instead of failing the table."""
    from lifelong.bench.train import summarise
    rows = [
        {"model": "m", "long_len": 500, "path": "today", "wall_s_per_step": 2.0,
         "cpu_s_per_step": 4.0},
        {"model": "m", "long_len": 500, "path": "new", "wall_s_per_step": 1.0,
         "cpu_s_per_step": 1.0},
        {"model": "m", "long_len": 2000, "path": "today", "wall_s_per_step": 16.0,
         "cpu_s_per_step": 30.0},
        {"model": "m", "long_len": 2000, "path": "new", "wall_s_per_step": 4.0,
         "cpu_s_per_step": 5.0},
        {"model": "x", "long_len": 500, "path": "new", "wall_s_per_step": 1.0,
         "cpu_s_per_step": 1.0},
        {"model": "x", "long_len": 2000, "path": "new", "error": "exit 1: boom"},
    ]
    s = {(r["model"], r["path"]): r for r in summarise(rows, [500, 2000])}
    assert s["m", "today"]["l_ratio_wall"] == 8.0 and s["m", "today"]["l_ratio_cpu"] == 7.5
    assert s["m", "new"]["l_ratio_wall"] == 4.0 and s["m", "new"]["l_ratio_cpu"] == 5.0
    assert s["m", "new"]["speedup_wall_L500"] == 2.0 and s["m", "new"]["speedup_cpu_L500"] == 4.0
    assert s["m", "new"]["speedup_wall_L2000"] == 4.0 and s["m", "new"]["speedup_cpu_L2000"] == 6.0
    assert "speedup_wall_L500" not in s["m", "today"]
    assert "l_ratio_wall" not in s["x", "new"]
