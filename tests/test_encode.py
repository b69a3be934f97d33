"""ENCODE (METHODS 2.2): faithfulness tests 1-7 plus the layer test of every config.

Run with ``-s`` to see the triplet-order numbers of the training test.
"""
import itertools

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import registry
from tfmodels.methods.encode import (Encode, InterestTargetAttention, IntraClusterAttention,
                                     MetricDimensionReduction, cosine_distance,
                                     farthest_point_seeds, sample_pairs, spherical_kmeans)
from lifelong.reports.encode_report import (distance_spearman, triplet_agreement,
                                            triplet_order_preservation, user_sequences)
from tfmodels.testing import (layer_test, random_sequence, random_target,
                              training_outputs_and_grads)

BETA = 20.0


def _seq(emb, mask, item_id=None):
    emb, mask = tf.constant(emb, tf.float32), tf.constant(mask, tf.float32)
    out = {"emb": emb * mask[..., None], "mask": mask}
    if item_id is not None:
        out["item_id"] = tf.constant(item_id, tf.int64)
    return out


def _same_partition(a, b):
    """Two label vectors define the same partition (up to a permutation of labels)."""
    a, b = np.asarray(a), np.asarray(b)
    fwd = {}
    bwd = {}
    for x, y in zip(a, b):
        if fwd.setdefault(x, y) != y or bwd.setdefault(y, x) != x:
            return False
    return True


def _cos_np(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, -1)


# ---- layer test of every config ----------------------------------------------------------------
@pytest.mark.parametrize("config,training", [
    ({}, False), ({}, True),
    ({"reduction_loss": False}, True),
    ({"margin": "fixed"}, True),
    ({"online_metric": "dot"}, False),
    ({"beta_mode": "divide", "num_clusters": 3}, False),
    ({"kmeans_init": "spaced", "num_clusters": 5}, True),   # the non-default init
])
def test_layer_test(config, training):
    out = layer_test(Encode, config, training=training)
    if training and config.get("reduction_loss", True):
        assert out["aux_loss"] > 0          # the triplet loss is added in training ...
    else:
        assert out["aux_loss"] == 0.0       # ... and only there (and not without the loss)


def test_registry_variants():
    expect = {"encode": {}, "encode_no_loss": {"reduction_loss": False},
              "encode_fixed_margin": {"margin": "fixed"}, "encode_dot": {"online_metric": "dot"}}
    for name, preset in expect.items():
        assert registry.long_module_class(name) is Encode
        assert registry.preset_config(name) == preset
        Encode(emb_dim=8, **preset)   # the preset is a valid config


def test_bad_flags_are_rejected():
    for bad in ({"margin": "x"}, {"online_metric": "l2"}, {"beta_mode": "pow"}, {"num_clusters": 0},
                {"kmeans_init": "random"}):
        with pytest.raises(ValueError):
            Encode(emb_dim=8, **bad)


# ---- (E4-E6) triplet loss: faithfulness test 2 ---------------------------------------------------
def test_sampling_never_picks_padding_and_picks_distinct_real_items():
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 20)) < 0.4).astype(np.float32)   # arbitrary (non-prefix) masks too
    mask[:8] = 0
    mask[:8, :3] = 1                                          # rows with exactly 3 real items
    salt = tf.constant(rng.integers(0, 2 ** 31, 64), tf.int64)
    j, k, ok = (t.numpy() for t in sample_pairs(tf.constant(mask), seed=3, salt=salt))
    rows, cols = np.nonzero(ok)
    assert len(rows) > 100
    assert np.all(mask[rows, j[rows, cols]] == 1) and np.all(mask[rows, k[rows, cols]] == 1)
    assert np.all(j[rows, cols] != cols) and np.all(k[rows, cols] != cols)
    assert np.all(j[rows, cols] != k[rows, cols])
    n = mask.sum(1)
    assert np.array_equal(ok, mask * (n >= 3)[:, None])


def test_sampling_is_uniform_over_other_pairs():
    """Anchor 0 of a 5-item row: the 6 unordered pairs of the other 4 come up equally often."""
    salts = tf.range(6000, dtype=tf.int64)
    mask = tf.concat([tf.ones([6000, 5]), tf.zeros([6000, 3])], 1)
    j, k, _ = sample_pairs(mask, seed=0, salt=salts)
    pairs = [tuple(sorted(p)) for p in zip(j[:, 0].numpy(), k[:, 0].numpy())]
    counts = {p: pairs.count(p) for p in itertools.combinations(range(1, 5), 2)}
    assert sum(counts.values()) == 6000
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts


def test_margin_nonnegative_and_positive_is_closer():
    tf.keras.utils.set_random_seed(0)
    red = MetricDimensionReduction(4, seed=1)
    seq = random_sequence(6, 12, 8, [12, 12, 7, 3, 2, 0], seed=4)
    s = seq["emb"]
    t = red.triplet_terms(s, seq["mask"], seq["item_id"])
    valid = t["valid"].numpy() > 0
    alpha = t["alpha"].numpy()
    assert np.all(alpha[valid] >= 0)
    s_np = s.numpy()
    for b, i in zip(*np.nonzero(valid)):
        p, n = t["pos"].numpy()[b, i], t["neg"].numpy()[b, i]
        d_p = 1 - _cos_np(s_np[b, i], s_np[b, p])
        d_n = 1 - _cos_np(s_np[b, i], s_np[b, n])
        assert d_p <= d_n + 1e-6 and p != n and p != i and n != i
        np.testing.assert_allclose(alpha[b, i], d_n - d_p, atol=1e-5)


def test_margin_is_zero_for_equidistant_samples():
    """Anchor e1, the others e2 and e3: dis = 1 to both -> alpha = 0 (dynamic)."""
    emb = np.eye(3, dtype=np.float32)[None]
    red = MetricDimensionReduction(2, seed=0)
    t = red.triplet_terms(tf.constant(emb), tf.ones([1, 3]))
    np.testing.assert_allclose(t["alpha"].numpy(), 0.0, atol=1e-6)
    fixed = MetricDimensionReduction(2, margin="fixed", fixed_margin=0.2, seed=0)
    np.testing.assert_allclose(fixed.triplet_terms(tf.constant(emb), tf.ones([1, 3]))["alpha"], 0.2)


@pytest.mark.parametrize("margin", ["dynamic", "fixed"])
def test_triplet_loss_hand_computed(margin):
    """n = 3 fixes every triplet (the two others of each anchor); padding ignored; a row
    with 2 real items contributes 0 but counts in the batch mean."""
    s = np.array([[[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [9, 9, 9]],
                  [[1.0, 2.0, 3.0], [3.0, 1.0, 0.0], [5, 5, 5], [7, 7, 7]]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    w = np.array([[1.0, 0.5], [-0.5, 1.0], [0.3, -0.2]], np.float32)
    red = MetricDimensionReduction(2, margin=margin, fixed_margin=0.2, seed=0)
    red.build([None, None, 3])
    red.w_h.assign(w)
    seq = _seq(s, mask)
    loss = float(red.triplet_loss(seq["emb"], seq["mask"]))

    dis = lambda a, b: 1 - _cos_np(a, b)
    x, h = s[0, :3].astype(np.float64), s[0, :3].astype(np.float64) @ w
    terms = []
    for i in range(3):
        j, k = [z for z in range(3) if z != i]
        p, n = (j, k) if dis(x[i], x[j]) <= dis(x[i], x[k]) else (k, j)
        alpha = dis(x[i], x[n]) - dis(x[i], x[p]) if margin == "dynamic" else 0.2
        terms.append(max(0.0, dis(h[i], h[p]) - dis(h[i], h[n]) + alpha))
    expected = (np.mean(terms) + 0.0) / 2
    assert expected > 0
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_triplet_loss_trains_w_h_only():
    tf.keras.utils.set_random_seed(0)
    red = MetricDimensionReduction(4, seed=0)
    seq = random_sequence(3, 10, 8, [10, 6, 4])
    s = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        loss = red.triplet_loss(s, seq["mask"], seq["item_id"])
    g_s, g_w = tape.gradient(loss, [s, red.w_h])
    assert g_s is None                       # s under stop_gradient
    assert np.any(g_w.numpy() != 0)


def test_triplets_deterministic_for_seed_and_vary_with_it():
    seq = random_sequence(4, 30, 8, [30, 25, 12, 9], seed=2)
    a = MetricDimensionReduction(4, seed=7).triplet_terms(seq["emb"], seq["mask"], seq["item_id"])
    b = MetricDimensionReduction(4, seed=7).triplet_terms(seq["emb"], seq["mask"], seq["item_id"])
    c = MetricDimensionReduction(4, seed=8).triplet_terms(seq["emb"], seq["mask"], seq["item_id"])
    for key in ("pos", "neg", "alpha"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(a["pos"].numpy(), c["pos"].numpy())


# ---- (E7) KMeans: faithfulness test 3 -----------------------------------------------------------
def _blobs(rng, n_per, dirs, noise=0.05, order="contiguous"):
    labels = np.repeat(np.arange(len(dirs)), n_per)
    if order == "shuffled":
        labels = rng.permutation(labels)
    x = dirs[labels] + noise * rng.normal(size=(len(labels), dirs.shape[1]))
    x *= rng.uniform(0.5, 3.0, size=(len(labels), 1))        # scale must not matter
    return x.astype(np.float32), labels


def _blob_batch(order, users=6):
    rng = np.random.default_rng(0)
    dirs = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [-1, -1, -1, -1]],
                    np.float64)
    xs, ys = zip(*[_blobs(rng, 12, dirs, order=order) for _ in range(users)])
    h = np.concatenate([np.stack(xs), np.zeros((users, 10, 4), np.float32)], 1)
    mask = np.concatenate([np.ones((users, 60)), np.zeros((users, 10))], 1)
    return tf.constant(h), tf.constant(mask), ys


@pytest.mark.parametrize("order,init", [("contiguous", "spaced"), ("contiguous", None),
                                        ("shuffled", None), ("shuffled", "farthest")])
def test_kmeans_recovers_well_separated_clusters(order, init):
    """5 well separated directions x 12 items each (random scales), 6 users, K = 5:
    the partition equals the true one up to label permutation; padding unassigned.
    'contiguous' = each interest a run of consecutive behaviors (time-ordered);
    init None = the default (farthest-point seeding)."""
    h, mask, ys = _blob_batch(order)
    kwargs = {} if init is None else {"init": init}
    km = spherical_kmeans(h, mask, 5, 15, **kwargs)
    assign = km["assign"].numpy()
    for b in range(len(ys)):
        assert _same_partition(assign[b, :60], ys[b]), (b, assign[b, :60], ys[b])
    assert np.all(assign[:, 60:] == -1)
    np.testing.assert_array_equal(km["cluster_mask"].numpy(), 1.0)


def _recovered(assign, ys):
    return sum(_same_partition(assign[b, :60], ys[b]) for b in range(len(ys)))


def test_default_init_recovers_interleaved_planted_clusters():
    """12 users, 5 planted well-separated interests interleaved in time (shuffled):
    the default init (farthest-point) recovers >= 10 of 12 users exactly, through
    spherical_kmeans and through the Encode module (W_h = identity, so h = s). The
    case discriminates: the old evenly spaced init ('spaced', the first default)
    recovers fewer (4 of 12 when written) -- two of its seeds land in one interest
    and Lloyd stays in that local optimum."""
    h, mask, ys = _blob_batch("shuffled", users=12)
    default = _recovered(spherical_kmeans(h, mask, 5, 15)["assign"].numpy(), ys)
    spaced = _recovered(spherical_kmeans(h, mask, 5, 15, init="spaced")["assign"].numpy(), ys)

    layer = Encode(emb_dim=4, reduced_dim=4, num_clusters=5)
    assert layer.kmeans_init == "farthest"
    seq = {"emb": h, "mask": mask}
    layer.user_cache(seq)                                   # builds W_h
    layer.reduction.w_h.assign(np.eye(4, dtype=np.float32))
    module = _recovered(layer.encode(seq)["kmeans"]["assign"].numpy(), ys)
    print(f"\n[encode] shuffled planted clusters recovered exactly: default (farthest) "
          f"{default}/12, Encode module {module}/12, spaced {spaced}/12")
    assert default >= 10 and module >= 10
    assert spaced < 10


def test_farthest_point_seeds_hand_computed():
    """Seeds on a constructed case (angles in 2D, arbitrary scales):
    row 0: real positions 1..4 at 0, 10, 90, 170 degrees; garbage at the padded
      positions 0 and 5 points where it would be farthest. Seed 0 = the first real
      position (1); then 170 deg (dis 1.985 from 0 deg); then 90 deg (min dis
      min(1, 1 - cos 80) = 0.826 beats 10 deg's 0.015); then 10 deg -> [1, 4, 3, 2].
    row 1: 2 real behaviors, K = 4 -> seeds [0, 1], 2 live clusters, no NaN.
    row 2: duplicated directions (exact ties) -> lowest position wins: [0, 1, 2, 3];
      the duplicates' clusters stay empty -> 2 live clusters.
    row 3: no real behavior -> no live cluster, no NaN."""
    deg = lambda a, r=1.0: [r * np.cos(np.radians(a)), r * np.sin(np.radians(a))]
    h = np.array([
        [deg(180.5, 9.0), deg(0, 2.0), deg(10, 0.3), deg(90, 5.0), deg(170, 1.0), deg(-90, 7.0)],
        [deg(0), deg(90), deg(180), deg(270), deg(45), deg(135)],
        [deg(0), deg(90), deg(90), deg(90, 3.0), deg(0, 2.0), deg(0, 0.5)],
        [deg(30), deg(60), deg(90), deg(120), deg(150), deg(180)]], np.float32)
    mask = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1] * 6, [0] * 6], np.float32)
    km = spherical_kmeans(tf.constant(h), tf.constant(mask), 4, 15)
    seeds = km["seeds"].numpy()
    np.testing.assert_array_equal(seeds[0], [1, 4, 3, 2])
    np.testing.assert_array_equal(seeds[1, :2], [0, 1])
    np.testing.assert_array_equal(seeds[2], [0, 1, 2, 3])
    np.testing.assert_array_equal(km["cluster_mask"].numpy(),
                                  [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert _same_partition(km["assign"].numpy()[2], [0, 1, 1, 1, 0, 0])
    for key in ("centers", "prev_centers"):
        assert np.all(np.isfinite(km[key].numpy()))
    # the helper itself on unit rows, and scale invariance of the whole init
    unit = h / np.linalg.norm(h, axis=-1, keepdims=True)
    np.testing.assert_array_equal(
        farthest_point_seeds(tf.constant(unit), tf.constant(mask), 4).numpy()[0], [1, 4, 3, 2])
    # appending padding with garbage changes no seed
    more_h = np.concatenate([h, 50 * np.ones((4, 3, 2), np.float32)], 1)
    more_m = np.concatenate([mask, np.zeros((4, 3), np.float32)], 1)
    seeds2 = spherical_kmeans(tf.constant(more_h), tf.constant(more_m), 4, 15)["seeds"].numpy()
    np.testing.assert_array_equal(seeds2[[0, 2]], seeds[[0, 2]])
    np.testing.assert_array_equal(seeds2[1, :2], seeds[1, :2])


def test_kmeans_partition_padding_scale_and_last_assignment():
    rng = np.random.default_rng(1)
    lengths = [40, 33, 7, 1, 0]
    mask = (np.arange(40)[None] < np.array(lengths)[:, None]).astype(np.float32)
    h = rng.normal(size=(5, 40, 4)).astype(np.float32)
    garbage = np.where(mask[..., None] > 0, h, 50 * rng.normal(size=h.shape)).astype(np.float32)
    km = spherical_kmeans(tf.constant(garbage), tf.constant(mask), 6, 15)
    onehot, assign = km["onehot"].numpy(), km["assign"].numpy()
    # a partition of the real items; padding never assigned (garbage there is ignored)
    np.testing.assert_array_equal(onehot.sum(-1), mask)
    assert np.all((assign >= 0) == (mask > 0))
    # the last assignment picks the highest-cosine center among those it was made against
    prev, cmask = km["prev_centers"].numpy(), km["cluster_mask"].numpy()
    for b, n in enumerate(lengths):
        live = min(n, 6)
        cos = _cos_np(h[b, :n, None, :], prev[b, None, :live, :])
        if n:   # (up to float ties between near-equal cosines)
            chosen = np.take_along_axis(cos, assign[b, :n, None], -1)[:, 0]
            np.testing.assert_array_less(cos.max(-1) - chosen, 1e-5)
        assert cmask[b].sum() <= live and np.all(cmask[b, live:] == 0)
        np.testing.assert_array_equal(cmask[b], (onehot[b].sum(0) > 0).astype(np.float32))
    # rescaling any h_i (positive factor) changes no assignment
    scaled = h * rng.uniform(0.01, 100.0, size=(5, 40, 1)).astype(np.float32)
    km2 = spherical_kmeans(tf.constant(scaled), tf.constant(mask), 6, 15)
    np.testing.assert_array_equal(km2["assign"].numpy(), assign)
    # deterministic
    np.testing.assert_array_equal(
        spherical_kmeans(tf.constant(h), tf.constant(mask), 6, 15)["assign"].numpy(), assign)


# ---- (E8) faithfulness test 4 -------------------------------------------------------------------
def test_intra_cluster_weights_sum_to_one_and_values_are_original_embeddings():
    tf.keras.utils.set_random_seed(0)
    layer = Encode(emb_dim=8, num_clusters=5)
    seq = random_sequence(4, 20, 8, [20, 11, 3, 0], seed=5)
    out = layer.encode(seq)
    w, onehot = out["weights"].numpy(), out["kmeans"]["onehot"].numpy()
    sums = w.sum(1)
    cmask = out["cluster_mask"].numpy()
    np.testing.assert_allclose(sums[cmask > 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(sums[cmask == 0], 0.0)
    assert np.all(w[onehot == 0] == 0)       # only the cluster's own members
    np.testing.assert_allclose(out["interests"].numpy(),
                               np.einsum("blk,bld->bkd", w, seq["emb"].numpy()), atol=1e-5)


# ---- (E9) faithfulness test 5 -------------------------------------------------------------------
def test_k_equal_to_number_of_behaviors_is_plain_scaled_cosine_target_attention():
    tf.keras.utils.set_random_seed(0)
    lengths = [12, 12, 9, 5]
    seq = random_sequence(4, 16, 8, lengths, seed=11)
    target = random_target(4, 8, seed=12)
    layer = Encode(emb_dim=8, num_clusters=12)
    got = layer(seq, target).numpy()
    s, x = seq["emb"].numpy(), target["emb"].numpy()
    for b, n in enumerate(lengths):
        logits = BETA * _cos_np(s[b, :n], x[b][None])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        np.testing.assert_allclose(got[b], w @ s[b, :n], atol=1e-4)
    # every cluster a singleton: all K (or n) clusters live
    np.testing.assert_array_equal(layer.user_cache(seq)["mask"].numpy().sum(1), lengths)


def test_k_equal_one_does_not_depend_on_the_target():
    layer = Encode(emb_dim=8, num_clusters=1)
    seq = random_sequence(3, 10, 8, [10, 4, 2])
    a = layer(seq, random_target(3, 8, seed=1)).numpy()
    b = layer(seq, random_target(3, 8, seed=2)).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dot_metric_and_divide_mode_follow_their_formulas():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 3, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    for layer, logits in [
        (InterestTargetAttention("dot"), np.einsum("bkd,bd->bk", u, x) / np.sqrt(8)),
        (InterestTargetAttention("cosine", beta_mode="divide"), _cos_np(u, x[:, None]) / BETA),
        (InterestTargetAttention("cosine"), BETA * _cos_np(u, x[:, None]))]:
        logits = np.where(mask > 0, logits, -np.inf)
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        np.testing.assert_allclose(layer(tf.constant(u), tf.constant(mask), tf.constant(x)),
                                   np.einsum("bk,bkd->bd", w, u), atol=1e-5)


# ---- faithfulness tests 6, 7, padding, gradients -------------------------------------------------
def test_fewer_behaviors_than_k_masked_no_nan_and_empty_user_zero():
    tf.keras.utils.set_random_seed(0)
    layer = Encode(emb_dim=8, num_clusters=30)
    lengths = [0, 1, 2, 3, 17]
    seq = random_sequence(5, 20, 8, lengths, seed=3)
    target = random_target(5, 8)
    cache = layer.user_cache(seq)
    cmask = cache["mask"].numpy()
    assert cmask.shape == (5, 30)
    for b, n in enumerate(lengths):
        assert 0 < cmask[b].sum() <= n or n == 0
        assert np.all(cmask[b, n:] == 0)
        assert np.all(cache["interests"].numpy()[b][cmask[b] == 0] == 0)
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer({**seq, "emb": emb}, target, training=True)
        total = tf.reduce_sum(out) + tf.add_n(layer.losses)
    grads = tape.gradient(total, [emb] + layer.trainable_variables)
    assert np.all(np.isfinite(out.numpy()))
    assert all(np.all(np.isfinite(g.numpy())) for g in grads if g is not None)
    np.testing.assert_array_equal(out.numpy()[0], 0.0)         # no real behavior -> zeros
    np.testing.assert_allclose(out.numpy()[1], seq["emb"].numpy()[1, 0], atol=1e-6)  # one item


def test_cached_path_equals_call_with_one_user_many_candidates():
    tf.keras.utils.set_random_seed(0)
    layer = Encode(emb_dim=8, num_clusters=4)
    seq = random_sequence(1, 24, 8, [24], seed=8)
    target = random_target(6, 8)
    tiled = {k: tf.repeat(v, 6, axis=0) for k, v in seq.items()}
    np.testing.assert_allclose(layer.score(layer.user_cache(seq), target).numpy(),
                               layer(tiled, target).numpy(), atol=1e-5)


def test_padding_and_garbage_change_no_output_and_no_loss():
    tf.keras.utils.set_random_seed(0)
    layer = Encode(emb_dim=8, num_clusters=4)
    seq = random_sequence(3, 12, 8, [12, 8, 4], seed=2)
    target = random_target(3, 8)
    out = layer(seq, target, training=True).numpy()
    loss = float(tf.add_n(layer.losses))
    rng = np.random.default_rng(0)
    mask = np.concatenate([seq["mask"].numpy(), np.zeros((3, 7), np.float32)], 1)
    longer = {}
    for key, v in seq.items():
        v = np.concatenate([v.numpy(), np.zeros((3, 7) + v.shape[2:], v.numpy().dtype)], 1)
        m = mask.reshape(mask.shape + (1,) * (v.ndim - 2))
        noise = rng.integers(1, 99, v.shape) if v.dtype.kind == "i" else 5 * rng.normal(size=v.shape)
        longer[key] = tf.constant(v if key == "mask" else np.where(m > 0, v, noise).astype(v.dtype))
    out2 = layer(longer, target, training=True).numpy()
    np.testing.assert_allclose(out2, out, atol=1e-5)
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), loss, rtol=1e-5)


def test_gradient_flow_through_clustering():
    """CTR gradient reaches W_h (attention weights + recomputed centers) and the
    embeddings; the no-loss ablation has a frozen W_h and adds no loss."""
    tf.keras.utils.set_random_seed(0)
    seq = random_sequence(3, 16, 8, [16, 10, 5], seed=1)
    target = random_target(3, 8)
    layer = Encode(emb_dim=8, num_clusters=4)
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer({**seq, "emb": emb}, target)            # inference: CTR path only
        ctr = tf.reduce_sum(out * target["emb"])
    g_w, g_e = tape.gradient(ctr, [layer.reduction.w_h, emb])
    assert np.any(np.abs(g_w.numpy()) > 0) and np.any(np.abs(g_e.numpy()) > 0)

    frozen = Encode(emb_dim=8, num_clusters=4, reduction_loss=False)
    frozen(seq, target, training=True)
    assert frozen.trainable_variables == [] and frozen.losses == []
    assert frozen.reduction.w_h in frozen.non_trainable_variables


def test_module_determinism_for_fixed_seed():
    seq, target = random_sequence(4, 20, 8, [20, 15, 6, 2], seed=6), random_target(4, 8)
    outs = []
    for _ in range(2):
        tf.keras.utils.set_random_seed(3)
        layer = Encode(emb_dim=8, num_clusters=5, seed=11)
        outs.append((layer(seq, target, training=True).numpy(), float(tf.add_n(layer.losses))))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]


# ---- faithfulness test 1: training the reduction preserves distance order -------------------------
def test_trained_reduction_preserves_distance_order_better_than_random():
    d, m, length = 16, 4, 32
    scale = np.diag(np.linspace(0.3, 3.0, d))                # anisotropic embedding space

    def batch(rng, n):
        out = []
        for _ in range(n):                                    # each user: a mixture of 6 interests
            centers = rng.normal(size=(6, d)) @ scale
            out.append(centers[rng.integers(0, 6, length)]
                       + 0.3 * rng.normal(size=(length, d)) @ scale)
        return np.stack(out).astype(np.float32)

    tf.keras.utils.set_random_seed(0)
    red = MetricDimensionReduction(m, seed=0)
    red.build([None, None, d])
    w_init = red.w_h.numpy().copy()
    opt = tf.keras.optimizers.Adam(0.05)
    mask = tf.ones([32, length])

    @tf.function
    def step(s):
        with tf.GradientTape() as tape:
            loss = red.triplet_loss(s, mask)
        opt.apply_gradients(zip(tape.gradient(loss, [red.w_h]), [red.w_h]))
        return loss

    rng = np.random.default_rng(1)
    losses = [float(step(tf.constant(batch(rng, 32)))) for _ in range(120)]
    held_out = list(batch(np.random.default_rng(99), 40))
    fresh = np.random.default_rng(5).normal(size=(d, m))
    res = {name: (triplet_agreement(held_out, w), distance_spearman(held_out, w))
           for name, w in [("initial", w_init), ("trained", red.w_h.numpy()), ("fresh", fresh)]}
    print("\n[encode] triplet-loss training: loss %.4f -> %.4f" % (np.mean(losses[:10]),
                                                                   np.mean(losses[-10:])))
    for name, (agree, rho) in res.items():
        print(f"[encode] {name:8s} projection: preserved triplet orders {agree:.4f}, "
              f"distance Spearman {rho:.4f}")
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    for other in ("initial", "fresh"):
        assert res["trained"][0] > res[other][0] + 0.02
        assert res["trained"][1] > res[other][1] + 0.02


def test_triplet_agreement_and_spearman_hand_computed():
    """s0, s1, s2 at 0, 36.87 and 90 degrees: ds01 = 0.2, ds12 = 0.4, ds02 = 1.
    W = diag(0.1, 1) moves them to 0, 82.4 and 90 degrees: dh01 = 0.868, dh12 = 0.0088,
    dh02 = 1. Pairwise-distance ranks (01, 02, 12): [1, 3, 2] vs [2, 3, 1] -> Spearman
    1 - 6*2/(3*8) = 0.5. Anchor 1's nearer neighbour flips (0 -> 2), anchors 0 and 2
    keep theirs, and the sampled triplets' anchors are uniform -> agreement 2/3.
    Identity and a scaled rotation keep every order (1.0); a rank-1 map sending
    every behavior to one half-line ties every reduced distance (0.0)."""
    s = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    w = np.diag([0.1, 1.0])
    np.testing.assert_allclose(distance_spearman([s], w), 0.5, atol=1e-12)
    np.testing.assert_allclose(distance_spearman([s], np.eye(2)), 1.0, atol=1e-12)
    agree = triplet_agreement([s] * 300, w, triplets_per_seq=200, seed=0)
    assert abs(agree - 2.0 / 3.0) < 0.02, agree
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(12, 5)) for _ in range(10)]
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert triplet_agreement(seqs, np.eye(5)) == 1.0
    assert triplet_agreement(seqs, 3.0 * q) == 1.0
    positive = [np.abs(x) for x in seqs]
    assert triplet_agreement(positive, np.ones((5, 1))) == 0.0


def test_triplet_order_preservation_report_on_a_model(tiny_data):
    """The report reads the model's own W_h: set to the identity (m = d) every
    triplet order and the distance ranking are kept exactly, while the fresh
    N(0, 1) projection it compares against is not order-preserving."""
    from tfmodels import data as D
    from tfmodels import schema as S
    from tfmodels.model import build_model
    from tfmodels.testing import tiny_schema
    tf.keras.utils.set_random_seed(0)
    fs = tiny_schema(tiny_data)
    model = build_model(fs, "encode", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4),
                        long_module_config={"reduced_dim": 8})
    ds = D.make_dataset(S.split_pattern(tiny_data, "test"), fs.short_len, fs.long_len, 64)
    model(next(iter(ds)))
    w_h = model.long_module.reduction.w_h
    assert tuple(w_h.shape) == (8, 8)
    w_h.assign(np.eye(8, dtype=np.float32))
    out = triplet_order_preservation(model, data=tiny_data, num_users=8, triplets_per_seq=50)
    assert out["users"] == 8 and out["reduced_dim"] == 8
    assert out["trained_agreement"] == 1.0
    np.testing.assert_allclose(out["trained_spearman"], 1.0, atol=1e-9)
    assert out["random_agreement"] < 0.95 and out["random_spearman"] < 0.95
    seqs = user_sequences(model, ds, 8)
    assert len(seqs) == 8 and all(len(x) >= 3 for x in seqs)


# ---- issue 22: the training step (KMeans assignment, triplet distances) ---------------------
def test_assign_nearest_equals_argmax_with_ties_and_dead_clusters():
    """_assign_nearest (top_k k=1, the dead-cluster add skipped when no cluster is dead)
    picks the same winners as tf.argmax(cos + dead_logit): on logits full of exact ties
    (rounded to quarters), with and without dead clusters."""
    from tfmodels.methods import encode as E
    rng = np.random.default_rng(0)
    cos = tf.constant(np.round(rng.uniform(-1, 1, size=(6, 50, 7)) * 4) / 4, tf.float32)
    for live_k in ([7] * 6, [7, 3, 1, 7, 5, 7]):
        live = tf.cast(tf.range(7)[None, :] < tf.constant(live_k)[:, None], tf.float32)
        dead = -1e9 * (1.0 - live)[:, None, :]
        got = E._assign_nearest(cos, dead, tf.reduce_all(live > 0)).numpy()
        want = tf.argmax(cos + dead, -1, output_type=tf.int32).numpy()
        np.testing.assert_array_equal(got, want)
        # ties: the lowest index, the documented rule
        first = np.argmax((cos + dead).numpy(), -1)
        np.testing.assert_array_equal(got, first)
        assert (got < np.array(live_k)[:, None]).all()


@pytest.mark.parametrize("kw", [{"num_clusters": 5}, {"num_clusters": 12, "margin": "fixed"}],
                         ids=str)
def test_training_step_equals_reference(kw, monkeypatch):
    """The KMeans assignment and triplet distances of issue 22 against the code before
    them (``_REFERENCE_TRAINING``): the same output, triplet loss and gradients of W_h and
    of the behavior embeddings, on users with padding, fewer real behaviors than K (dead
    clusters) and repeated rows (exact ties)."""
    from tfmodels.methods import encode as E
    dim, length, lengths = 8, 40, [0, 1, 2, 7, 40, 13, 33]
    seq = random_sequence(len(lengths), length, dim, lengths, seed=3)
    emb = seq["emb"].numpy()
    emb[:, 5] = emb[:, 2]
    emb[:, 9] = emb[:, 2]
    seq["emb"] = tf.constant(emb) * seq["mask"][..., None]
    target = random_target(len(lengths), dim)
    tf.keras.utils.set_random_seed(0)
    layer = Encode(dim, **kw)
    layer(seq, target)

    def step(reference):
        monkeypatch.setattr(E, "_REFERENCE_TRAINING", reference)
        return training_outputs_and_grads(layer, seq, target)

    fast, ref = step(False), step(True)
    assert ref[1] > 0                      # the triplet loss is live
    # KMeans and the triplet loss are exact; the segment softmax of (E8) differs from
    # the one-hot one by float rounding only
    np.testing.assert_array_equal(fast[1], ref[1])
    for got, want in zip(fast, ref):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_intra_cluster_segments_equal_one_hot_with_gradients():
    """IntraClusterAttention by segment sums (given the assignment) against the [B, L, K]
    one-hot formulation: U, the weights and the gradients w.r.t. h and s, with padding,
    an empty user, an empty cluster and both beta modes; each non-empty cluster's
    weights sum to 1."""
    rng = np.random.default_rng(0)
    assign = np.array([[0, 2, 2, 0, 2, -1, -1], [-1] * 7, [1, 1, 1, 1, 1, 1, 0]], np.int32)
    onehot = tf.constant((assign[..., None] == np.arange(4)).astype(np.float32))
    h = tf.constant(rng.normal(size=(3, 7, 3)).astype(np.float32))
    s = tf.constant(rng.normal(size=(3, 7, 5)).astype(np.float32))
    for mode in ("multiply", "divide"):
        layer = IntraClusterAttention(beta=20.0, beta_mode=mode)
        outs = []
        for a in (tf.constant(assign), None):
            with tf.GradientTape() as tape:
                tape.watch([h, s])
                u, w = layer(h, s, onehot, a) if a is not None else layer(h, s, onehot)
                loss = tf.reduce_sum(u * tf.range(1.0, 6.0))
            outs.append([u.numpy(), w.numpy()] + [g.numpy() for g in tape.gradient(loss, [h, s])])
        for got, want in zip(*outs):      # 1e-5 of each tensor's scale (rounding)
            np.testing.assert_allclose(got, want, rtol=0,
                                       atol=1e-5 * max(1.0, float(np.abs(want).max())))
        w = outs[0][1]
        np.testing.assert_allclose(w.sum(1)[[0, 0, 2, 2], [0, 2, 0, 1]], 1.0, rtol=1e-6)
        assert (w[1] == 0).all() and (w[0][assign[0] < 0] == 0).all()
        assert (outs[0][0][0, [1, 3]] == 0).all()          # empty clusters 1, 3: u = 0
