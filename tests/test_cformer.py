"""C-Former (METHODS 2.1): the spec's faithfulness tests 1-8, plus layer_test for every config.

The shared ``model_test`` of every registered name (cformer and its ablations)
runs in tests/test_models.py.
"""
import json

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import registry
from tfmodels import schema as S
from tfmodels.methods.cformer import (CFormer, CFormerAttention, CFormerBlock, CFormerDecoder,
                                      DenoiseAssign, orthogonality_loss, reconstruction_loss)
from tfmodels.model import build_model
from tfmodels.testing import _pad_more, layer_test, random_sequence, random_target, tiny_schema

DIM, J, L = 8, 6, 12
LENGTHS = [0, 1, 5, 12]
CFORMER_NAMES = [n for n in registry.names() if n.startswith("cformer")]


@pytest.fixture(scope="module")
def setup():
    tf.keras.utils.set_random_seed(0)
    layer = CFormer(DIM, num_clusters=J, din_hidden=(8, 4))
    seq = random_sequence(len(LENGTHS), L, DIM, LENGTHS, seed=3)
    target = random_target(len(LENGTHS), DIM)
    layer(seq, target)
    enc = layer.encode(seq)
    return layer, seq, target, {k: v.numpy() for k, v in enc.items()}


def numpy_assignment(A, E, mask, k, norm="sum"):
    """Loop reference of (C11-C14): top-k anchors per valid behavior (ties -> lowest j);
    ``norm="weighted_mean"`` then divides mu_j by its mass sum_i A[j, i] 1(j in c_i)."""
    B, nj, nl = A.shape
    mu, n = np.zeros((B, nj, E.shape[-1])), np.zeros((B, nj))
    mass = np.zeros((B, nj))
    owner = np.zeros((B, nl, nj))
    for b in range(B):
        for i in range(nl):
            if mask[b, i] == 0:
                continue
            for j in np.argsort(-A[b, :, i], kind="stable")[:k]:
                mu[b, j] += A[b, j, i] * E[b, i]
                mass[b, j] += A[b, j, i]
                n[b, j] += 1
                owner[b, i, j] = 1
    if norm == "weighted_mean":
        for b in range(B):
            for j in range(nj):
                if mass[b, j] > 0:
                    mu[b, j] /= mass[b, j]
    return mu, n, owner


# ---- 1. k = 1: a partition of the valid behaviors; NumPy loop of (C11-C12) -----------------
@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_k1_partition_and_loop_reference(setup, norm):
    ref, seq, target, enc = setup
    layer = CFormer(DIM, num_clusters=J, din_hidden=(8, 4), centroid_norm=norm)
    layer(seq, target)
    layer.set_weights(ref.get_weights())
    out = {k: v.numpy() for k, v in
           DenoiseAssign(1, norm)(tf.constant(enc["attention"]), tf.constant(enc["emb"]),
                                  tf.constant(enc["mask"])).items()}
    mask = enc["mask"]
    np.testing.assert_array_equal(out["assign"].sum(-1), mask)     # exactly one cluster / none
    np.testing.assert_array_equal(out["sizes"].sum(-1), LENGTHS)   # sum_j n_j = #valid
    mu, n, owner = numpy_assignment(enc["attention"], enc["emb"], mask, 1, norm)
    np.testing.assert_array_equal(out["assign"], owner)
    np.testing.assert_array_equal(out["sizes"], n)
    np.testing.assert_allclose(out["centroids"], mu, atol=1e-6)
    np.testing.assert_array_equal(out["mask"], (n > 0).astype(np.float32))
    cache = layer.user_cache(seq)                                   # the module uses the same
    np.testing.assert_allclose(cache["centroids"].numpy(), mu, atol=1e-6)
    np.testing.assert_array_equal(cache["centroid_mask"].numpy(), n > 0)
    assert not cache["centroid_mask"].numpy()[0].any()              # empty user: all masked
    np.testing.assert_array_equal(cache["centroids"].numpy()[0], 0.0)


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_top2_matches_loop_reference(setup, norm):
    _, _, _, enc = setup
    out = DenoiseAssign(2, norm)(tf.constant(enc["attention"]), tf.constant(enc["emb"]),
                                 tf.constant(enc["mask"]))
    mu, n, _ = numpy_assignment(enc["attention"], enc["emb"], enc["mask"], 2, norm)
    np.testing.assert_allclose(out["centroids"].numpy(), mu, atol=1e-6)
    np.testing.assert_array_equal(out["sizes"].numpy(), n)
    np.testing.assert_array_equal(out["sizes"].numpy().sum(-1), 2 * np.array(LENGTHS))


# ---- 2. k = J: mu = A E^S (rows of A sum to 1, so both norms agree) -------------------------
@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_k_equals_j_is_attention_pooling(setup, norm):
    layer, seq, target, enc = setup
    want = np.einsum("bjl,bld->bjd", enc["attention"], enc["emb"])
    out = DenoiseAssign(J, norm)(tf.constant(enc["attention"]), tf.constant(enc["emb"]),
                                 tf.constant(enc["mask"]))
    np.testing.assert_allclose(out["centroids"].numpy(), want, atol=1e-6)
    full = CFormer(DIM, num_clusters=J, assignments=J, din_hidden=(8, 4), centroid_norm=norm)
    full(seq, target)
    full.set_weights(layer.get_weights())
    np.testing.assert_allclose(full.user_cache(seq)["centroids"].numpy(), want, atol=1e-6)


# ---- centroid_norm [interp]: hand-computed C12 / C14, padding, empty clusters -----------------
# One user with 3 valid behaviors + 1 padded slot (garbage embedding, A = 0 there), one user
# with none. J = 3, d = 2. Columns of A (per behavior i): i0 (.5, .2, .4) -> argmax j0;
# i1 (.1, .7, .3) -> j1; i2 (.4, .1, .3) -> j0. Anchor 2 is never an argmax: empty for k = 1.
HAND_A = np.array([[[0.5, 0.1, 0.4, 0.0],
                    [0.2, 0.7, 0.1, 0.0],
                    [0.4, 0.3, 0.3, 0.0]],
                   np.zeros((3, 4))], np.float32)
HAND_E = np.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [50.0, -9.0]],
                   np.full((4, 2), 7.0)], np.float32)
HAND_MASK = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
HAND_K1 = {
    # (C12) as printed: mu_0 = .5 E_0 + .4 E_2 = (1.7, .4); mu_1 = .7 E_1 = (0, 1.4).
    "sum": [[1.7, 0.4], [0.0, 1.4], [0.0, 0.0]],
    # / mass: (.5 E_0 + .4 E_2) / .9 = (17/9, 4/9); .7 E_1 / .7 = E_1 = (0, 2).
    "weighted_mean": [[17 / 9, 4 / 9], [0.0, 2.0], [0.0, 0.0]],
}
HAND_K2 = {
    # (C14) top-2 per behavior: i0 -> {j0 .5, j2 .4}; i1 -> {j1 .7, j2 .3};
    # i2 -> {j0 .4, j2 .3}. mu_2 = .4 E_0 + .3 E_1 + .3 E_2 = (1.3, .9), mass 1.
    "sum": [[1.7, 0.4], [0.0, 1.4], [1.3, 0.9]],
    "weighted_mean": [[17 / 9, 4 / 9], [0.0, 2.0], [1.3, 0.9]],
}


def _hand_assign(k, norm, A=HAND_A, E=HAND_E, mask=HAND_MASK):
    out = DenoiseAssign(k, norm)(tf.constant(A), tf.constant(E), tf.constant(mask))
    return {key: v.numpy() for key, v in out.items()}


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_centroid_norm_hand_computed_k1(norm):
    out = _hand_assign(1, norm)
    np.testing.assert_allclose(out["centroids"][0], HAND_K1[norm], atol=1e-6)
    np.testing.assert_array_equal(out["centroids"][1], 0.0)          # no behavior: all zero
    np.testing.assert_array_equal(out["sizes"], [[2, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(out["mask"], [[1, 1, 0], [0, 0, 0]])
    if norm == "weighted_mean":                                      # = the A-weighted mean
        members = HAND_E[0, [0, 2]]
        w = HAND_A[0, 0, [0, 2]]
        np.testing.assert_allclose(out["centroids"][0, 0], w @ members / w.sum(), atol=1e-6)
    # Default of both the layer and the module is weighted_mean [interp].
    np.testing.assert_allclose(DenoiseAssign(1)(tf.constant(HAND_A), tf.constant(HAND_E),
                                                tf.constant(HAND_MASK))["centroids"].numpy()[0],
                               HAND_K1["weighted_mean"], atol=1e-6)


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_centroid_norm_hand_computed_multi_assignment(norm):
    out = _hand_assign(2, norm)
    np.testing.assert_allclose(out["centroids"][0], HAND_K2[norm], atol=1e-6)
    np.testing.assert_array_equal(out["sizes"][0], [2, 1, 3])
    np.testing.assert_array_equal(out["centroids"][1], 0.0)


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_centroid_norm_padding_changes_nothing(norm, setup):
    base = _hand_assign(1, norm)
    # More padded slots (A = 0, garbage embeddings) and other garbage in the old one.
    rng = np.random.default_rng(1)
    A = np.concatenate([HAND_A, np.zeros((2, 3, 5), np.float32)], 2)
    E = np.concatenate([HAND_E, rng.normal(size=(2, 5, 2)).astype(np.float32) * 100], 1)
    E[0, 3] = [-1e4, 1e4]
    mask = np.concatenate([HAND_MASK, np.zeros((2, 5), np.float32)], 1)
    out = _hand_assign(1, norm, A, E, mask)
    for key in ("centroids", "sizes", "mask"):
        np.testing.assert_allclose(out[key], base[key], atol=1e-6)
    # Through the module: extra padding / garbage in padded slots leaves the cache alone.
    ref, seq, target, _ = setup
    layer = CFormer(DIM, num_clusters=J, din_hidden=(8, 4), centroid_norm=norm)
    layer(seq, target)
    layer.set_weights(ref.get_weights())
    want = layer.user_cache(seq)
    for garbage in (False, True):
        got = layer.user_cache(_pad_more(seq, 7, garbage))
        np.testing.assert_allclose(got["centroids"].numpy(), want["centroids"].numpy(),
                                   atol=1e-5)
        np.testing.assert_array_equal(got["centroid_mask"].numpy(),
                                      want["centroid_mask"].numpy())


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
def test_centroid_norm_empty_cluster_is_zero_with_finite_gradients(norm, setup):
    A, E = tf.Variable(HAND_A), tf.Variable(HAND_E)
    weights = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 2)), tf.float32)
    with tf.GradientTape() as tape:
        out = DenoiseAssign(1, norm)(A, E, tf.constant(HAND_MASK))
        loss = tf.reduce_sum(out["centroids"] * weights)
    g_a, g_e = tape.gradient(loss, [A, E])
    c = out["centroids"].numpy()
    np.testing.assert_array_equal(c[0, 2], 0.0)                      # empty anchor 2
    np.testing.assert_array_equal(c[1], 0.0)                         # user without behaviors
    assert np.isfinite(g_a.numpy()).all() and np.isfinite(g_e.numpy()).all()
    np.testing.assert_array_equal(g_a.numpy()[0, 2], 0.0)            # nothing reaches j = 2
    np.testing.assert_array_equal(g_a.numpy()[1], 0.0)
    np.testing.assert_array_equal(g_e.numpy()[1], 0.0)
    np.testing.assert_array_equal(g_e.numpy()[0, 3], 0.0)            # padded slot
    if norm == "weighted_mean":
        # d mu_0 / d A[0, i] = (E_i - mu_0) / mass_0 for i in {0, 2}; hand-checked here.
        mu0, mass0 = np.array(HAND_K1["weighted_mean"][0]), 0.9
        for i in (0, 2):
            np.testing.assert_allclose(g_a.numpy()[0, 0, i],
                                       (HAND_E[0, i] - mu0) @ weights.numpy()[0, 0] / mass0,
                                       rtol=1e-5)
    # Whole module, with an all-padding user (every cluster empty): finite gradients.
    ref, seq, target, _ = setup
    layer = CFormer(DIM, num_clusters=J, din_hidden=(8, 4), centroid_norm=norm)
    layer(seq, target)
    layer.set_weights(ref.get_weights())
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(dict(seq, emb=emb), target, training=True))
        loss += tf.add_n(layer.losses)
    grads = tape.gradient(loss, layer.trainable_variables + [emb])
    assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)
    assert np.isfinite(layer(seq, target).numpy()).all()


def test_weighted_mean_is_sum_divided_by_cluster_mass(setup):
    """On the module's own attention: weighted_mean == sum / sum_i A[j, i] 1(c_i = j)."""
    _, _, _, enc = setup
    args = [tf.constant(enc[k]) for k in ("attention", "emb", "mask")]
    s = DenoiseAssign(1, "sum")(*args)
    w = DenoiseAssign(1, "weighted_mean")(*args)
    mass = np.einsum("bjl,blj->bj", enc["attention"], s["assign"].numpy())
    want = np.where(mass[..., None] > 0, s["centroids"].numpy() / np.where(
        mass[..., None] > 0, mass[..., None], 1.0), 0.0)
    np.testing.assert_allclose(w["centroids"].numpy(), want, rtol=1e-5, atol=1e-6)
    # The user with 12 behaviors spreads them over several anchors, so under "sum" every
    # centroid is shrunk by its mass < 1 (what weighted_mean undoes).
    assert s["mask"].numpy()[3].sum() > 1
    assert (mass[3][s["mask"].numpy()[3] > 0] < 1).all()


# ---- 3. rows of A sum to 1 over valid keys, 0 on padding -------------------------------------
def test_attention_rows(setup):
    _, _, _, enc = setup
    A, mask = enc["attention"], enc["mask"]
    assert A.shape == (len(LENGTHS), J, L)
    has_any = mask.max(-1)
    np.testing.assert_allclose(A.sum(-1), np.broadcast_to(has_any[:, None], (len(LENGTHS), J)),
                               atol=1e-6)
    np.testing.assert_array_equal(A * (1 - mask)[:, None, :], 0.0)
    assert (A >= 0).all()


# ---- 4. permutation invariance ---------------------------------------------------------------
def _permute_valid(tensors, lengths, seed=0):
    rng = np.random.default_rng(seed)
    perms = [np.concatenate([rng.permutation(n), np.arange(n, L)]) for n in lengths]
    return {k: tf.constant(np.stack([v.numpy()[b, p] for b, p in enumerate(perms)]))
            for k, v in tensors.items()}


def test_permutation_invariance_of_centroids_and_output(setup):
    layer, seq, target, _ = setup
    perm = _permute_valid(seq, LENGTHS)
    assert not np.allclose(perm["emb"].numpy(), seq["emb"].numpy())
    c1, c2 = layer.user_cache(seq), layer.user_cache(perm)
    # No positional encoding: each anchor's centroid is unchanged (a fortiori as a set).
    np.testing.assert_allclose(c1["centroids"].numpy(), c2["centroids"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(c1["centroid_mask"].numpy(), c2["centroid_mask"].numpy())
    np.testing.assert_allclose(layer(seq, target).numpy(), layer(perm, target).numpy(),
                               atol=1e-5)


def test_permutation_invariance_of_model_prediction(tiny_data):
    fs = tiny_schema(tiny_data, short_len=5, long_len=L)
    tf.keras.utils.set_random_seed(0)
    model = build_model(fs, "cformer", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4),
                        long_module_config={"num_clusters": J, "din_hidden": [8, 4]})
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "test"), 5, L, 16)))
    lengths = batch["long_len"].numpy()
    assert lengths.max() > 2
    long = {k: batch[k] for k in S.names_with_prefix("long") if k != "long_len"}
    perm = dict(batch, **_permute_valid(long, lengths, seed=1))
    np.testing.assert_allclose(model.predict_ctr(perm).numpy(), model.predict_ctr(batch).numpy(),
                               atol=1e-6)


# ---- 5. orthogonality loss --------------------------------------------------------------------
def test_orthogonality_loss_zero_iff_orthogonal():
    scales = np.array([[0.5, 2.0, 3.0, 7.0], [1.0, 1e-3, 10.0, 4.0]], np.float32)
    basis = np.eye(4, DIM, dtype=np.float32)                         # J = 4 <= d = 8
    anchors = tf.constant(scales[:, :, None] * basis[None])
    assert float(orthogonality_loss(anchors)) < 1e-6
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0].astype(np.float32)
    assert float(orthogonality_loss(anchors @ rot)) < 1e-5           # any orthogonal set
    skew = anchors.numpy().copy()
    skew[:, 1, 0] = 0.3                                              # rows 0 and 1 now overlap
    assert float(orthogonality_loss(tf.constant(skew))) > 1e-2
    # Hand value: two identical rows -> ||[[0,1],[1,0]]||_F = sqrt(2).
    same = tf.constant([[[1.0, 2.0], [2.0, 4.0]]])
    np.testing.assert_allclose(float(orthogonality_loss(same)), np.sqrt(2), rtol=1e-6)
    # Mean over users with a behavior only; the gradient at the optimum is finite (zero).
    both = tf.concat([same, tf.constant([[[1.0, 0.0], [0.0, 1.0]]])], 0)
    np.testing.assert_allclose(float(orthogonality_loss(both)), np.sqrt(2) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(orthogonality_loss(both, tf.constant([1.0, 0.0]))),
                               np.sqrt(2), rtol=1e-6)
    x = tf.Variable(anchors)
    with tf.GradientTape() as tape:
        loss = orthogonality_loss(x)
    grad = tape.gradient(loss, x).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() < 1e-3


def test_module_orth_and_recon_use_the_spec_functions(setup):
    layer, seq, target, _ = setup
    enc = layer.encode(seq)
    losses = layer.aux_losses(enc)
    has_any = tf.constant([0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(float(losses["orth"]),
                               float(orthogonality_loss(enc["anchors"], has_any)), rtol=1e-6)
    decoded = layer.decoder(enc["emb"], enc["anchors"])
    np.testing.assert_allclose(float(losses["recon"]),
                               float(reconstruction_loss(enc["emb"], decoded, enc["mask"])),
                               rtol=1e-6)
    # (C19) / beta: the module adds (L_recon + alpha L_orth) / beta; the task adds L_bce.
    scaled = CFormer(DIM, num_clusters=J, alpha=0.5, beta=4.0, din_hidden=(8, 4))
    scaled(seq, target)
    scaled.set_weights(layer.get_weights())
    scaled(seq, target, training=True)
    want = (float(losses["recon"]) + 0.5 * float(losses["orth"])) / 4.0
    np.testing.assert_allclose(float(tf.add_n(scaled.losses)), want, rtol=1e-5)


# ---- 6. 1* decoder: no FFN / LN / residual; L_recon ignores padded rows -----------------------
def test_one_star_decoder_is_a_single_cross_attention(setup):
    layer, seq, _, _ = setup
    dec = layer.decoder
    assert layer.get_config()["decoder_layers"] == "1*"
    assert len(dec.blocks) == 1 and isinstance(dec.blocks[0], CFormerAttention)
    kinds = {type(m).__name__ for m in dec._flatten_layers(include_self=False)}
    assert kinds == {"CFormerAttention"}, kinds                    # no LN, no Dense/FFN
    assert len(dec.weights) == 8                                   # W^{Q,K,V,O} + biases
    enc = layer.encode(seq)
    out = dec(enc["emb"], enc["anchors"]).numpy()
    att, _ = dec.blocks[0](enc["emb"], enc["anchors"])
    np.testing.assert_allclose(out, att.numpy(), atol=1e-6)        # no residual, no norm
    # Changing FFN settings changes nothing: same weights -> same reconstruction.
    for ffn_mult in (1, 16):
        other = CFormerDecoder(DIM, "1*", ffn_mult=ffn_mult)
        other.build(None)
        assert [w.shape for w in other.weights] == [w.shape for w in dec.weights]
        other.set_weights(dec.get_weights())
        np.testing.assert_allclose(other(enc["emb"], enc["anchors"]).numpy(), out, atol=1e-6)
    full = CFormerDecoder(DIM, 2)
    full.build(None)
    assert len(full.blocks) == 2 and all(isinstance(b, CFormerBlock) for b in full.blocks)


def test_reconstruction_loss_ignores_padded_rows():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    target = rng.normal(size=(2, 4, 3)).astype(np.float32) * mask[..., None]
    recon = rng.normal(size=(2, 4, 3)).astype(np.float32)
    want = (((target - recon) ** 2).sum(-1) * mask).sum() / (mask.sum() * 3)
    got = reconstruction_loss(tf.constant(target), tf.constant(recon), tf.constant(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    recon[mask == 0] = np.inf                                      # garbage, even inf
    target[mask == 0] = 123.0
    got = reconstruction_loss(tf.constant(target), tf.constant(recon), tf.constant(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    zero = reconstruction_loss(tf.constant(target), tf.constant(recon), tf.zeros([2, 4]))
    assert float(zero) == 0.0


def test_module_losses_ignore_padding(setup):
    layer, seq, target, _ = setup
    layer(seq, target, training=True)
    base = float(tf.add_n(layer.losses))
    for garbage in (False, True):
        layer(_pad_more(seq, 7, garbage), target, training=True)
        np.testing.assert_allclose(float(tf.add_n(layer.losses)), base, rtol=1e-6)
    layer(seq, target)                                             # inference: no aux loss
    assert not layer.losses


# ---- 7. gradients ------------------------------------------------------------------------------
def _grads(layer, loss_fn):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    names = [v.name for v in layer.trainable_variables]
    return dict(zip(names, tape.gradient(loss, layer.trainable_variables)))


def _nonzero(g):
    return g is not None and float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0


@pytest.mark.parametrize("denoise", [True, False])
def test_gradient_flow(setup, denoise):
    ref, seq, target, _ = setup
    layer = CFormer(DIM, num_clusters=J, denoise=denoise, din_hidden=(8, 4))
    layer(seq, target)
    layer.set_weights(ref.get_weights())
    labels = tf.constant([0.0, 1.0, 0.0, 1.0])

    def bce():
        logits = tf.reduce_sum(layer(seq, target, training=False), -1)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))

    g_bce = _grads(layer, bce)
    enc_vars = {n: g for n, g in g_bce.items() if "/encoder/" in n}
    dec_vars = {n: g for n, g in g_bce.items() if "/decoder/" in n}
    assert enc_vars and dec_vars
    assert _nonzero(g_bce[[n for n in g_bce if n.endswith("anchors:0")][0]])   # Q_1
    # Every encoder weight of the first layer gets L_bce gradient (bk aside: a key bias
    # adds a per-query constant to the logits, which the softmax cancels exactly).
    first = {n: g for n, g in enc_vars.items() if "/layer_0/" in n and not n.endswith("bk:0")}
    assert first and all(_nonzero(g) for g in first.values()), \
        [n for n, g in first.items() if not _nonzero(g)]
    last = {n: g for n, g in enc_vars.items() if "/layer_1/" in n}
    for w in ("attention/wq:0", "attention/wk:0", "attention/bq:0"):   # A -> centroids
        assert _nonzero(next(g for n, g in last.items() if n.endswith(w))), w
    # With denoise, mu = sum A E: the last layer's values/output/FFN/LN feed O^enc only,
    # so L_bce does not reach them (they learn from L_orth / L_recon). Without denoise,
    # O^enc is the centroid set and they do.
    value_side = [n for n in last if not n.endswith(("wq:0", "wk:0", "bq:0", "bk:0"))]
    assert len(value_side) == 12, value_side
    for n in value_side:
        assert _nonzero(last[n]) != denoise, n                      # None or exactly 0
    # Decoder weights: nothing from L_bce (nor L_orth), only from L_recon.
    assert all(g is None for g in dec_vars.values())
    g_orth = _grads(layer, lambda: layer.aux_losses(layer.encode(seq))["orth"])
    assert all(g_orth[n] is None for n in dec_vars)
    g_rec = _grads(layer, lambda: layer.aux_losses(layer.encode(seq))["recon"])
    assert all(g_rec[n] is not None for n in dec_vars)
    assert all(_nonzero(g_rec[n]) for n in dec_vars if not n.endswith("bk:0"))
    assert _nonzero(g_rec[[n for n in g_rec if n.endswith("anchors:0")][0]])


def test_stop_grad_target_removes_only_the_target_side_gradient(setup):
    ref, seq, target, _ = setup
    grads = {}
    for stop in (False, True):
        layer = CFormer(DIM, num_clusters=J, stop_grad_target=stop, din_hidden=(8, 4))
        layer(seq, target)
        layer.set_weights(ref.get_weights())
        emb = tf.Variable(seq["emb"])
        with tf.GradientTape() as tape:
            enc = layer.encode(dict(seq, emb=emb))
            loss = layer.aux_losses(enc)["recon"]
        grads[stop] = tape.gradient(loss, emb).numpy()
        decoded = layer.decoder(enc["emb"], enc["anchors"]).numpy()
    # d/dE of the target side of ||E - O||^2 / (n d) is 2 (E - O) m / (n d).
    mask = seq["mask"].numpy()
    want = 2 * (seq["emb"].numpy() - decoded) * mask[..., None] / (mask.sum() * DIM)
    np.testing.assert_allclose(grads[False] - grads[True], want, atol=1e-6)


# ---- 8. cached path == full path; score never runs encoder/decoder ---------------------------
def test_cached_path_equals_full_path(setup):
    layer, seq, target, _ = setup
    full = layer(seq, target).numpy()
    cache = layer.user_cache(seq)
    assert cache["centroids"].shape == (len(LENGTHS), J, DIM)
    assert cache["centroid_mask"].shape == (len(LENGTHS), J)
    np.testing.assert_allclose(layer.score(cache, target).numpy(), full, atol=1e-6)
    np.testing.assert_array_equal(full[0], 0.0)                     # no behaviors -> 0
    one = layer.user_cache({k: v[2:3] for k, v in seq.items()})       # batch-1 broadcast
    tiled = {k: tf.repeat(v[2:3], 4, 0) for k, v in seq.items()}
    np.testing.assert_allclose(layer.score(one, target).numpy(),
                               layer(tiled, target).numpy(), atol=1e-6)


def test_score_never_runs_encoder_or_decoder(setup, monkeypatch):
    layer, seq, target, _ = setup
    cache = layer.user_cache(seq)
    want = layer.score(cache, target).numpy()

    def boom(*a, **k):
        raise AssertionError("encoder/decoder ran in score")
    monkeypatch.setattr(layer.encoder, "call", boom)
    monkeypatch.setattr(layer.decoder, "call", boom)
    np.testing.assert_allclose(layer.score(cache, target).numpy(), want)


def test_model_cached_path(tiny_data):
    fs = tiny_schema(tiny_data, short_len=5, long_len=20)
    model = build_model(fs, "cformer", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "test"), 5, 20, 8)))
    cache = model.user_tower(batch)
    assert sorted(cache) == ["centroid_mask", "centroids"]
    assert model.feature_names("user_tower") == ["long_item_id", "long_cate_id"]
    np.testing.assert_allclose(model.rank(cache, batch).numpy(), model(batch).numpy(),
                               atol=1e-5)


# ---- shared layer test for every config; registry; config ------------------------------------
LAYER_CONFIGS = [registry.preset_config(n) for n in CFORMER_NAMES] + [
    {"decoder_layers": 2}, {"assignments": 3, "num_clusters": 5, "encoder_layers": 1},
    {"stop_grad_target": True, "head_dim": 3, "num_heads": 3}]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_layer(config, training):
    out = layer_test(CFormer, config, training=training)
    if training and (config.get("reconstruction", True) or config.get("orthogonality", True)):
        assert out["aux_loss"] > 0


def test_registry_entries():
    assert set(CFORMER_NAMES) == {"cformer", "cformer_wo_denoise", "cformer_wo_recon",
                                  "cformer_wo_orth", "cformer_sum"}
    for name in CFORMER_NAMES:
        assert registry.long_module_class(name) is CFormer
    assert registry.preset_config("cformer_wo_denoise") == {"denoise": False}
    assert registry.preset_config("cformer_wo_recon") == {"reconstruction": False}
    assert registry.preset_config("cformer_wo_orth") == {"orthogonality": False}
    assert registry.preset_config("cformer_sum") == {"centroid_norm": "sum"}
    assert CFormer(DIM, reconstruction=False).decoder is None


def test_defaults_and_config_round_trip_through_json():
    cfg = CFormer(32).get_config()
    want = {"num_clusters": 24, "encoder_layers": 2, "decoder_layers": "1*", "num_heads": 2,
            "assignments": 1, "alpha": 0.1, "beta": 1.0, "denoise": True,
            "reconstruction": True, "orthogonality": True, "stop_grad_target": False,
            "din_hidden": [80, 40], "centroid_norm": "weighted_mean"}
    assert {k: cfg[k] for k in want} == want
    again = CFormer.from_config(json.loads(json.dumps(cfg))).get_config()
    assert again == cfg
    with pytest.raises(ValueError, match="decoder_layers"):
        CFormer(8, decoder_layers="3*")
    with pytest.raises(ValueError, match="assignments"):
        CFormer(8, num_clusters=4, assignments=5)
    with pytest.raises(ValueError, match="beta"):
        CFormer(8, beta=0.0)
    with pytest.raises(ValueError, match="centroid_norm must be one of"):
        CFormer(8, centroid_norm="mean")
    with pytest.raises(ValueError, match="centroid_norm must be one of"):
        DenoiseAssign(1, "l2")
    summed = CFormer(8, centroid_norm="sum")
    assert summed.assign.centroid_norm == "sum"
    assert CFormer.from_config(json.loads(json.dumps(summed.get_config()))).assign \
        .centroid_norm == "sum"


# ---- clustering-quality report -----------------------------------------------------------------
def numpy_silhouette(x, labels, metric="euclidean"):
    """Loop reference of the silhouette (Rousseeuw 1987): s_i = (b_i - a_i) / max(a_i, b_i),
    a_i = mean distance to the other members of i's cluster, b_i = smallest mean distance
    to another cluster; s_i = 0 for a singleton cluster (sklearn's convention)."""
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - u @ u.T
    else:
        dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        s[i] = (b - a) / max(a, b)
    return float(s.mean())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_matches_reference_and_separates_planted_clusters(metric):
    from sklearn.metrics import silhouette_score
    from lifelong.reports import cluster_quality as CQ
    rng = np.random.default_rng(0)
    centers = np.eye(4, 6) * 10.0                                   # 4 well-separated clusters
    planted = np.repeat(np.arange(4), 15)
    x = centers[planted] + rng.normal(scale=0.5, size=(60, 6))
    shuffled = rng.permutation(planted)                             # a random labelling
    scores = {}
    for name, labels in (("planted", planted), ("random", shuffled)):
        got = CQ._silhouette(x, labels, metric)
        np.testing.assert_allclose(got, numpy_silhouette(x, labels, metric), atol=1e-6)
        np.testing.assert_allclose(got, silhouette_score(x, labels, metric=metric), atol=1e-6)
        scores[name] = got
    assert scores["planted"] > 0.5, scores
    assert scores["random"] < scores["planted"] - 0.4, scores
    assert CQ._silhouette(x, np.zeros(60, int), metric) is None     # one cluster: undefined


def _fake_run(run_dir, data_dir, model_name, **extra):
    """A run directory as ``lifelong train`` lays it out (config.json, run.json, final/),
    with untrained weights: cluster_quality only needs load_run to work (no fit, fast)."""
    import dataclasses
    import os
    from tfmodels.train import TrainConfig, feature_schema_for, model_from_config
    cfg = TrainConfig(data=data_dir, model=model_name, out_dir=run_dir, short_len=5,
                      long_len=24, emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4], **extra)
    fs = feature_schema_for(cfg)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"feature_schema": fs.to_dict()}, f)
    model = model_from_config(cfg, fs)
    model(next(iter(D.make_dataset(S.split_pattern(data_dir, "test"), 5, 24, 4))))
    tf.train.Checkpoint(model=model).write(os.path.join(run_dir, "final", "weights"))
    return run_dir


def test_cluster_quality_report(tiny_data, tmp_path, capsys):
    from lifelong.reports import cluster_quality as CQ
    from tfmodels.train import ConfigError
    run_dir = _fake_run(str(tmp_path / "run"), tiny_data, "cformer",
                        long_module_config={"num_clusters": 3, "din_hidden": [8, 4]})
    out = tmp_path / "cq.json"
    assert CQ.main(["--run", run_dir, "--num_users", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_clusters"] == 3 and res["users_sampled"] == 24
    assert res["users_evaluated"] + sum(res["skipped"].values()) == 24
    assert res["users_evaluated"] > 0
    # Every reported C-Former silhouette is recomputed here, independently of the report's
    # code path: the loaded model's own attention argmax over the user's valid behaviors,
    # scored with the NumPy loop silhouette below. (A range check could not fail.)
    from tfmodels.train import load_run
    _, model = load_run(run_dir)
    recomputed = {}
    for feats in CQ._user_batches(tiny_data, "test", 24, 64, 0, model.feature_schema):
        enc = model.long_module.encode(model.embed_sequence(feats, "long"))
        labels = np.argmax(enc["attention"].numpy(), axis=1)
        for b, uid in enumerate(feats["user_id"].numpy()):
            valid = enc["mask"].numpy()[b] > 0
            x, lab = enc["emb"].numpy()[b][valid].astype(np.float64), labels[b][valid]
            if len(x) >= 4 and len(np.unique(lab)) > 1:
                recomputed.setdefault((int(uid), len(x)), []).append(numpy_silhouette(x, lab))
    for row in res["per_user"]:
        assert row["behaviors"] >= 4
        assert 2 <= row["cformer_clusters"] <= 3
        got = recomputed[(row["user_id"], row["behaviors"])]
        assert min(abs(v - row["cformer"]) for v in got) < 1e-6, (row, got)
    table = capsys.readouterr().out
    assert "C-Former (argmax of A)" in table and "K-means (J=3)" in table
    din_dir = _fake_run(str(tmp_path / "din"), tiny_data, "din")
    with pytest.raises(ConfigError, match="C-Former"):
        CQ.cluster_quality(din_dir)
