"""Search-based baselines (METHODS section 3, B4-B7): SIM hard, SIM soft, ETA, SDIM.

Faithfulness against hand-computed / independent NumPy references, the traps of public
implementations (packed-integer "Hamming", per-head constant biases, SDIM without L2
normalisation), and the shared layer contract (cached == call, padding, broadcasting,
serialization) of tfmodels.testing.layer_test.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import registry
from tfmodels.methods.esu import (SimHash, TargetAttention, gaussian_projection, hamming,
                                  pack_bits)
from tfmodels.methods.eta import ETA
from tfmodels.methods.sdim import SDIM
from tfmodels.methods.sim import SimHard, SimSoft
from tfmodels.testing import layer_test, random_sequence, random_target

D = 8
MODULES = [(SimHard, {"top_k": 3}), (SimSoft, {"top_k": 3}), (ETA, {"top_k": 3}), (SDIM, {})]


# ---- references ---------------------------------------------------------------------------
def np_esu(esu: TargetAttention, q, rows):
    """MHTA(q, K = V = rows) in NumPy, written from the equation with the layer's weights."""
    rows = np.asarray(rows, np.float64).reshape(-1, esu.emb_dim)
    if len(rows) == 0:
        return np.zeros(esu.emb_dim)
    wq, wk, wv, wo = (w.numpy().astype(np.float64) for w in (esu.w_q, esu.w_k, esu.w_v, esu.w_o))
    h, dk, dv = esu.num_heads, esu.key_dim, esu.value_dim
    qp = (np.asarray(q, np.float64) @ wq).reshape(h, dk)
    k = (rows @ wk).reshape(-1, h, dk)
    v = (rows @ wv).reshape(-1, h, dv)
    heads = []
    for a in range(h):
        logits = k[:, a] @ qp[a] / math.sqrt(dk)
        w = np.exp(logits - logits.max())
        heads.append((w / w.sum()) @ v[:, a])
    return np.concatenate(heads) @ wo


def np_bits(x, r):
    return (np.asarray(x, np.float64) @ r.astype(np.float64) > 0).astype(np.int64)


def _seq(batch=4, length=12, lengths=(12, 5, 0, 3), seed=0):
    return random_sequence(batch, length, D, lengths=lengths, seed=seed)


def _built(cls, seq=None, target=None, **cfg):
    tf.keras.utils.set_random_seed(0)
    layer = cls(D, **cfg)
    seq = _seq() if seq is None else seq
    target = random_target(int(seq["emb"].shape[0]), D) if target is None else target
    layer(seq, target)
    return layer


# ---- the shared contract ------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg", MODULES + [
    (SimHard, {}), (SimHard, {"key_field": "item_id", "top_k": 2}), (SimSoft, {}),
    (ETA, {"num_bits": 40, "top_k": 5}), (SDIM, {"num_bits": 8, "bits_per_signature": 2}),
    (SDIM, {"l2_normalize": False})])
def test_layer_contract(cls, cfg):
    """cached == call (1e-5), extra padding / garbage at padded positions change nothing,
    a batch-1 cache broadcasts against N candidates, config round trip."""
    layer_test(cls, cfg)


def test_registry_lines():
    assert registry.long_module_class("sim_hard") is SimHard
    assert registry.long_module_class("sim_soft") is SimSoft
    assert registry.long_module_class("eta") is ETA
    assert registry.long_module_class("sdim") is SDIM
    for name in ("sim_hard", "sim_soft", "eta", "sdim"):
        assert registry.long_module_class(name).reads_fields == ()


@pytest.mark.parametrize("cls,cfg", MODULES)
def test_empty_window_gives_zeros(cls, cfg):
    """A window without any valid row -> exactly zero, whatever sits in the padded slots
    (garbage embeddings, and categories equal to the candidate's)."""
    layer = _built(cls, **cfg)
    seq = _seq(batch=2, lengths=(0, 0), seed=3)
    rng = np.random.default_rng(0)
    seq["emb"] = tf.constant(rng.normal(size=(2, 12, D)).astype(np.float32))   # mask says pad
    tgt = random_target(2, D, seed=4)
    seq["cate_id"] = tf.repeat(tgt["cate_id"][:, None], 12, axis=1)
    seq["item_id"] = tf.zeros([2, 12], tf.int64)
    np.testing.assert_array_equal(layer(seq, tgt).numpy(), np.zeros((2, D), np.float32))
    one = {k: v[:1] for k, v in seq.items()}
    np.testing.assert_array_equal(layer.score(layer.user_cache(one), tgt).numpy(), 0.0)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of bits_per_signature"):
        SDIM(D, num_bits=10, bits_per_signature=3)
    with pytest.raises(ValueError, match="key_field"):
        SimHard(D, key_field="brand_id")
    with pytest.raises(ValueError, match="top_k"):
        ETA(D, top_k=0)


# ---- ESU -----------------------------------------------------------------------------------
def test_esu_equals_numpy_multi_head_target_attention():
    tf.keras.utils.set_random_seed(0)
    esu = TargetAttention(D)
    assert (esu.num_heads, esu.key_dim, esu.value_dim) == (4, 2, 2)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, D)).astype(np.float32)
    rows = rng.normal(size=(3, 5, D)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    proj = esu.project(tf.constant(rows))
    out = esu.attend(tf.constant(q), proj["keys"], proj["values"], tf.constant(mask))
    for b in range(3):
        expect = np_esu(esu, q[b], rows[b][mask[b] > 0])
        np.testing.assert_allclose(out["output"].numpy()[b], expect, atol=1e-5)
    assert np.all(out["weights"].numpy()[1, :, 2:] == 0)       # a selected pad gets 0


class _HeadBiasESU(TargetAttention):
    """The trap: a per-head constant added to every logit of the head (a "cross-feature
    bias" that does not vary over the behaviors)."""

    def build(self, input_shape=None):
        super().build(input_shape)
        self.head_bias = self.add_weight("head_bias", shape=[self.num_heads],
                                         initializer="ones")

    def attend(self, query, keys, values, mask):
        from tfmodels.layers import masked_softmax
        n = tf.shape(query)[0]
        q = tf.reshape(tf.matmul(query, self.w_q), tf.stack([n, self.num_heads, self.key_dim]))
        logits = tf.einsum("nhc,njhc->nhj", q, keys) + self.head_bias[None, :, None]
        w = masked_softmax(logits, tf.broadcast_to(mask[:, None, :], tf.shape(logits)))
        heads = tf.einsum("nhj,njhv->nhv", w, values)
        return {"output": tf.matmul(tf.reshape(heads, tf.stack([n, -1])), self.w_o)}


def _grads(layer, seq, tgt, extra=()):
    with tf.GradientTape() as tape:
        out = layer(seq, tgt, training=True)
        loss = tf.reduce_sum(out * tf.constant(
            np.random.default_rng(1).normal(size=out.shape).astype(np.float32)))
    vars_ = list(layer.trainable_weights) + list(extra)
    return {v.name: g for v, g in zip(vars_, tape.gradient(loss, vars_))}, vars_


@pytest.mark.parametrize("cls,cfg", MODULES[:3])
def test_every_esu_weight_gets_a_gradient(cls, cfg):
    """No dead parameter: a per-head constant on the logits (the public trap) would get a
    gradient of exactly 0, since softmax is shift invariant. Shown on a trapped ESU below."""
    seq, tgt = _seq(), random_target(4, D)
    layer = _built(cls, seq, tgt, **cfg)
    grads, vars_ = _grads(layer, seq, tgt)
    assert {v.name.split("/")[-1] for v in vars_} >= {"w_q:0", "w_k:0", "w_v:0", "w_o:0"}
    for name, g in grads.items():
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 1e-6, f"{name}: no gradient"
    # the detector works: a head bias is dead
    trapped = _built(cls, seq, tgt, **cfg)
    trapped.esu = _HeadBiasESU(D, name="esu")
    trapped(seq, tgt)
    tgrads, _ = _grads(trapped, seq, tgt)
    bias = [g for n, g in tgrads.items() if "head_bias" in n]
    assert len(bias) == 1 and float(tf.reduce_max(tf.abs(bias[0]))) < 1e-5


# ---- SIM hard --------------------------------------------------------------------------------
def _hand_window(cates, length=10, seed=0):
    n = len(cates)
    seq = random_sequence(1, length, D, lengths=[n], seed=seed)
    cate = np.zeros((1, length), np.int64)
    cate[0, :n] = cates
    cate[0, n:] = 3                 # garbage in padded slots: the candidate's category
    seq["cate_id"] = tf.constant(cate)
    return seq


def test_sim_hard_selects_the_most_recent_k_of_the_category():
    #           pos: 0  1  2  3  4  5  6
    seq = _hand_window([3, 5, 3, 3, 7, 3, 3])
    emb = seq["emb"].numpy()[0]
    tgt = random_target(3, D, seed=2)
    tgt["cate_id"] = tf.constant([3, 5, 9], tf.int64)       # 5 rows / 1 row / none
    for k, rows3 in ((2, [0, 2]), (4, [0, 2, 3, 5]), (10, [0, 2, 3, 5, 6])):
        layer = _built(SimHard, seq, tgt, top_k=k)
        cache = layer.user_cache(seq)
        out = layer.attend(cache, tgt)
        np.testing.assert_array_equal(out["count"].numpy(), [5, 1, 0])
        np.testing.assert_array_equal(out["selected_mask"].numpy().sum(1),
                                      [min(k, 5), 1, 0])
        got = out["output"].numpy()
        q = tgt["emb"].numpy()
        np.testing.assert_allclose(got[0], np_esu(layer.esu, q[0], emb[rows3]), atol=1e-5)
        np.testing.assert_allclose(got[1], np_esu(layer.esu, q[1], emb[[1]]), atol=1e-5)
        np.testing.assert_array_equal(got[2], 0.0)
        if k == 2:   # the test can tell recency apart: the two OLDEST give another output
            other = np_esu(layer.esu, q[0], emb[[5, 6]])
            assert np.abs(other - got[0]).max() > 1e-3
        # the batch-N training path reads the same rows
        tiled = {kk: tf.repeat(v, 3, axis=0) for kk, v in seq.items()}
        np.testing.assert_allclose(layer(tiled, tgt).numpy(), got, atol=1e-5)


def test_sim_hard_cache_is_a_category_index():
    """sorted_key ascends, rows of a category stay most-recent-first, padding last."""
    seq = _hand_window([3, 5, 3, 7, 5])
    layer = _built(SimHard, seq)
    cache = layer.user_cache(seq)
    keys = cache["sorted_key"].numpy()[0]
    np.testing.assert_array_equal(keys[:5], [3, 3, 5, 5, 7])
    assert np.all(keys[5:] == np.iinfo(np.int64).max)
    proj = layer.esu.project(seq["emb"])["keys"].numpy()[0]
    np.testing.assert_allclose(cache["keys"].numpy()[0][:5], proj[[0, 2, 1, 4, 3]], atol=1e-6)


def test_sim_hard_by_item_id():
    seq = _hand_window([3, 3, 3, 3])
    seq["item_id"] = tf.constant([[11, 12, 11, 13, 0, 0, 0, 0, 0, 0]], tf.int64)
    tgt = random_target(1, D, seed=5)
    tgt["item_id"] = tf.constant([11], tf.int64)
    layer = _built(SimHard, seq, tgt, key_field="item_id")
    emb = seq["emb"].numpy()[0]
    np.testing.assert_allclose(layer(seq, tgt).numpy()[0],
                               np_esu(layer.esu, tgt["emb"].numpy()[0], emb[[0, 2]]), atol=1e-5)


# ---- SIM soft --------------------------------------------------------------------------------
def test_sim_soft_selects_the_true_top_k_by_inner_product():
    seq, tgt = _seq(), random_target(4, D, seed=6)
    layer = _built(SimSoft, seq, tgt, top_k=4)
    out = layer.attend(layer.user_cache(seq), tgt)
    emb, q = seq["emb"].numpy(), tgt["emb"].numpy()
    idx, sel = out["index"].numpy(), out["selected_mask"].numpy()
    for b, n_valid in enumerate((12, 5, 0, 3)):
        r = emb[b, :n_valid] @ q[b]
        top = np.argsort(-r, kind="stable")[:4]
        picked = [i for i in idx[b] if i < n_valid]
        assert len(picked) == min(4, n_valid)                       # never a pad while valid
        assert set(picked) == set(top)
        np.testing.assert_array_equal(sel[b], (idx[b] < n_valid).astype(np.float32))
        np.testing.assert_allclose(out["output"].numpy()[b],
                                   np_esu(layer.esu, q[b], emb[b, top]), atol=1e-5)


def test_sim_soft_very_negative_relevance_still_beats_padding():
    seq = _seq(batch=1, length=6, lengths=(2,))
    tgt = random_target(1, D)
    seq["emb"] = -tf.sign(tgt["emb"])[:, None, :] * 1e6 * seq["mask"][..., None]  # r ~ -1e7
    layer = _built(SimSoft, seq, tgt, top_k=3)
    out = layer.attend(layer.user_cache(seq), tgt)
    assert set(out["index"].numpy()[0, :2]) == {0, 1}
    assert np.all(np.isfinite(out["output"].numpy()))


def test_sim_soft_auxiliary_loss():
    """L_aux = BCE(y, MLP_aux([sum_l softmax(r)_l e_l, e_t])), in training only; padding
    does not change it; it trains the general-search embeddings."""
    seq, tgt = _seq(), random_target(4, D, seed=7)
    tgt["label"] = tf.constant([1.0, 0.0, 1.0, 0.0])
    layer = _built(SimSoft, seq, tgt, top_k=3, aux_loss=True, aux_weight=0.5)
    assert layer.reads_label and not SimSoft(D).reads_label
    layer(seq, tgt, training=False)
    assert layer.losses == []                                        # inference: no loss
    layer(seq, tgt, training=True)
    got = float(layer.losses[0])
    emb, q, mask = seq["emb"].numpy(), tgt["emb"].numpy(), seq["mask"].numpy()
    u = np.zeros((4, D))
    for b in range(4):
        valid = mask[b] > 0
        if valid.any():
            r = emb[b, valid] @ q[b]
            w = np.exp(r - r.max())
            u[b] = (w / w.sum()) @ emb[b, valid]
    logit = layer.aux_mlp(tf.constant(np.concatenate([u, q], 1), tf.float32)).numpy()[:, 0]
    y = tgt["label"].numpy()
    bce = np.mean(np.maximum(logit, 0) - logit * y + np.log1p(np.exp(-np.abs(logit))))
    np.testing.assert_allclose(got, 0.5 * bce, rtol=1e-5)
    # garbage in padded slots: same loss
    from tfmodels.testing import _pad_more
    layer(_pad_more(seq, 4, garbage=True), tgt, training=True)
    np.testing.assert_allclose(float(layer.losses[0]), got, rtol=1e-5)
    # gradient of the aux loss reaches the behavior and target embeddings
    e, t = tf.Variable(seq["emb"]), tf.Variable(tgt["emb"])
    with tf.GradientTape() as tape:
        loss = layer.auxiliary_loss(layer.user_cache(dict(seq, emb=e)), dict(tgt, emb=t),
                                    SimSoft.relevance(e * seq["mask"][..., None], t))
    ge, gt = tape.gradient(loss, [e, t])
    assert float(tf.reduce_max(tf.abs(ge))) > 1e-6 and float(tf.reduce_max(tf.abs(gt))) > 1e-6
    with pytest.raises(ValueError, match="needs the click label"):
        layer(seq, {k: v for k, v in tgt.items() if k != "label"}, training=True)


def test_model_passes_the_label_to_the_aux_task(tiny_data):
    from tfmodels import data as Dt
    from tfmodels import schema as S
    from tfmodels.model import build_model
    from tfmodels.testing import tiny_schema
    model = build_model(tiny_schema(tiny_data), "sim_soft", emb_dim=4, mlp_hidden=(8,),
                        din_hidden=(8, 4), long_module_config={"aux_loss": True})
    batch = next(iter(Dt.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 8)))
    model(batch, training=True)
    assert len(model.long_module.losses) == 1 and np.isfinite(float(model.long_module.losses[0]))
    model(batch, training=False)
    assert model.long_module.losses == []


# ---- ETA -------------------------------------------------------------------------------------
def test_simhash_projection_is_fixed_seeded_and_saved(tmp_path):
    layer = SimHash(D, 16, seed=3)
    layer.build()
    np.testing.assert_array_equal(layer.projection.numpy(), gaussian_projection(D, 16, 3))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    r = np.random.default_rng(0).normal(size=(D, 16)).astype(np.float32)
    eta = ETA(D, num_bits=16, hash_seed=3)
    eta(_seq(), random_target(4, D))
    assert eta.simhash.projection not in eta.trainable_weights
    eta.simhash.projection.assign(r)
    path = tf.train.Checkpoint(m=eta).write(str(tmp_path / "ckpt"))
    fresh = ETA(D, num_bits=16, hash_seed=3)
    fresh(_seq(), random_target(4, D))
    tf.train.Checkpoint(m=fresh).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.simhash.projection.numpy(), r)


def test_pack_bits_and_hamming_count_differing_bits():
    rng = np.random.default_rng(0)
    for m in (8, 32, 40, 64, 100):
        a, b = rng.integers(0, 2, (6, m)), rng.integers(0, 2, (6, m))
        a[0], b[0] = 1, 0                                   # all bits differ (bit 31 set)
        got = hamming(pack_bits(tf.constant(a, tf.int32)), pack_bits(tf.constant(b, tf.int32)))
        np.testing.assert_array_equal(got.numpy(), (a != b).sum(1))
    words = pack_bits(tf.constant([[1] * 32 + [1, 0, 1]], tf.int32)).numpy()
    np.testing.assert_array_equal(words, [[-1, 5]])


@pytest.mark.parametrize("num_bits", [64, 40])
def test_eta_selects_the_true_top_k_by_hamming_distance(num_bits):
    """Distances from an independent NumPy SimHash (R regenerated from the seed): the
    selection is the k smallest distances among the valid rows, ties to the lower index;
    padding has distance m + 1 and is never picked while a valid row remains."""
    seq = _seq(batch=4, length=30, lengths=(30, 7, 0, 3), seed=1)
    tgt = random_target(4, D, seed=8)
    layer = _built(ETA, seq, tgt, top_k=5, num_bits=num_bits, hash_seed=11)
    out = layer.attend(layer.user_cache(seq), tgt)
    r = gaussian_projection(D, num_bits, 11)
    emb, q = seq["emb"].numpy(), tgt["emb"].numpy()
    dist, idx = out["distance"].numpy(), out["index"].numpy()
    for b, n_valid in enumerate((30, 7, 0, 3)):
        expect = (np_bits(emb[b, :n_valid], r) != np_bits(q[b], r)[None]).sum(1)
        np.testing.assert_array_equal(dist[b, :n_valid], expect)
        assert np.all(dist[b, n_valid:] == num_bits + 1)
        order = np.argsort(expect, kind="stable")[:5]
        np.testing.assert_array_equal(idx[b, :len(order)], order)
        assert np.all(idx[b, len(order):] >= n_valid)
        np.testing.assert_allclose(out["output"].numpy()[b],
                                   np_esu(layer.esu, q[b], emb[b, order]), atol=1e-5)
    assert len(set(dist[0].tolist())) > 3            # the case has distinct distances


def test_eta_ranks_by_hamming_not_by_packed_integer_difference():
    """R = I (d = m = 8): bit i = 1[x_i > 0]. Target 0b1000_0000 (128). Row 0: all bits set
    (255; |255 - 128| = 127, Hamming 7). Row 1: none set (0; |0 - 128| = 128, Hamming 1).
    Hamming picks row 1; the packed-integer difference would pick row 0."""
    seq = random_sequence(1, 4, D, lengths=[2])
    seq["emb"] = tf.constant([[[1.0] * 8, [-1.0] * 8, [0.0] * 8, [0.0] * 8]])
    tgt = {"emb": tf.constant([[-1.0] * 7 + [1.0]]), "item_id": tf.constant([5], tf.int64),
           "cate_id": tf.constant([3], tf.int64)}
    layer = ETA(D, top_k=1, num_bits=8)
    layer(seq, tgt)
    layer.simhash.projection.assign(np.eye(8, dtype=np.float32))
    cache = layer.user_cache(seq)
    np.testing.assert_array_equal(cache["signature"].numpy()[0, :2, 0], [255, 0])
    np.testing.assert_array_equal(layer.signature(tgt["emb"]).numpy(), [[128]])
    out = layer.attend(cache, tgt)
    np.testing.assert_array_equal(out["distance"].numpy()[0], [7, 1, 9, 9])
    np.testing.assert_array_equal(out["index"].numpy(), [[1]])


def test_eta_signatures_follow_the_live_embeddings():
    """End to end: the cache is rebuilt from the embeddings of the call (no stale hash);
    gradients reach the gathered embeddings through the ESU, none through the hash."""
    seq, tgt = _seq(), random_target(4, D)
    layer = _built(ETA, seq, tgt, top_k=3)
    flipped = dict(seq, emb=-seq["emb"])
    a = layer.user_cache(seq)["signature"].numpy()
    b = layer.user_cache(flipped)["signature"].numpy()
    assert np.any(a != b)
    e = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer(dict(seq, emb=e), tgt)
    g = tape.gradient(out, e).numpy()
    idx = layer.attend(layer.user_cache(seq), tgt)["index"].numpy()
    for row in range(4):
        chosen = set(idx[row].tolist())
        for pos in range(12):
            if pos not in chosen:
                assert np.all(g[row, pos] == 0)      # unselected rows: no gradient
    assert np.abs(g[0]).max() > 1e-6


# ---- SDIM ------------------------------------------------------------------------------------
def np_sdim(emb, mask, q, r, tau, normalize=True):
    """Loop over signatures and buckets: mean_j l2(sum_l [sig_j(s_l) == sig_j(q)] s_l)."""
    m = r.shape[1]
    out = np.zeros((len(q), emb.shape[-1]))
    for n in range(len(q)):
        bq = np_bits(q[n], r)
        bs = np_bits(emb[n], r)
        for j in range(m // tau):
            total = np.zeros(emb.shape[-1])
            for l in range(emb.shape[1]):
                if mask[n, l] > 0 and np.array_equal(bs[l, j * tau:(j + 1) * tau],
                                                     bq[j * tau:(j + 1) * tau]):
                    total += emb[n, l]
            norm = np.linalg.norm(total)
            if normalize and norm > 0:
                total = total / norm
            out[n] += total / (m // tau)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_sdim_equals_numpy_loop_over_signatures_and_buckets(normalize):
    seq, tgt = _seq(seed=2), random_target(4, D, seed=9)
    layer = _built(SDIM, seq, tgt, l2_normalize=normalize)
    assert (layer.num_bits, layer.bits_per_signature, layer.num_signatures) == (48, 3, 16)
    r = gaussian_projection(D, 48, 0)
    expect = np_sdim(seq["emb"].numpy(), seq["mask"].numpy(), tgt["emb"].numpy(), r, 3,
                     normalize)
    np.testing.assert_allclose(layer(seq, tgt).numpy(), expect, atol=1e-5)
    assert layer.user_cache(seq)["bucket_sums"].shape == (4, 16, 8, D)


def test_sdim_is_l2_normalised():
    """Target = s itself collides in every signature: [s] and [s, s, s] both give s/|s|
    (without the normalisation the second would be 3 s)."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=D).astype(np.float32) * 5
    seq = random_sequence(2, 4, D, lengths=[1, 3])
    seq["emb"] = tf.constant(np.stack([[s, 0 * s, 0 * s, 0 * s], [s, s, s, 0 * s]]))
    tgt = {"emb": tf.constant(np.stack([s, s])), "item_id": tf.constant([2, 2], tf.int64),
           "cate_id": tf.constant([2, 2], tf.int64)}
    out = SDIM(D)(seq, tgt).numpy()
    np.testing.assert_allclose(out, np.stack([s, s]) / np.linalg.norm(s), atol=1e-6)
    raw = SDIM(D, l2_normalize=False)(seq, tgt).numpy()
    np.testing.assert_allclose(raw[1], 3 * s, rtol=1e-5)


@pytest.mark.parametrize("tau", [1, 3])
def test_sdim_expected_weight_is_the_collision_probability(tau):
    """One behavior s at angle theta to q: the output is (fraction of signatures that
    collide) * s/|s|, whose expectation over R is (1 - theta/pi)^tau. Monte Carlo over
    4 seeds x 3000 signatures (12,000 independent draws of tau hyperplanes): the
    standard error is <= 0.0046, the tolerance 0.02 (> 4 standard errors)."""
    d = 16
    rng = np.random.default_rng(0)
    thetas = np.array([0.3, 1.0, 2.0])
    q = rng.normal(size=(3, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    perp = rng.normal(size=(3, d))
    perp -= (perp * q).sum(1, keepdims=True) * q
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    s = (np.cos(thetas)[:, None] * q + np.sin(thetas)[:, None] * perp) * 2.0
    seq = random_sequence(3, 2, d, lengths=[1, 1, 1])
    seq["emb"] = tf.constant(np.stack([s, np.zeros_like(s)], 1).astype(np.float32))
    tgt = {"emb": tf.constant(q.astype(np.float32)), "item_id": tf.constant([2] * 3, tf.int64),
           "cate_id": tf.constant([2] * 3, tf.int64)}
    s_hat = s / np.linalg.norm(s, axis=1, keepdims=True)
    weights = []
    for seed in range(4):
        out = SDIM(d, num_bits=3000 * tau, bits_per_signature=tau, hash_seed=seed)(seq, tgt)
        weights.append((out.numpy() * s_hat).sum(1))
    got = np.mean(weights, 0)
    np.testing.assert_allclose(got, (1 - thetas / np.pi) ** tau, atol=0.02)


def test_sdim_cache_is_independent_of_the_window_length():
    layer = SDIM(D)
    short = layer.user_cache(_seq(batch=1, length=12, lengths=(12,)))
    long = layer.user_cache(random_sequence(1, 500, D, lengths=[500]))
    assert short["bucket_sums"].shape == long["bucket_sums"].shape == (1, 16, 8, D)


# ---- the serving top-k (issue 20 item 6) --------------------------------------------------
def _prefilter_cases():
    rng = np.random.default_rng(0)
    n, length = 40, 300
    valid = rng.random((n, length)) < 0.9
    valid[0] = False                                   # no valid row
    valid[1, 20:] = False                              # fewer valid rows than k
    valid[2, 60:] = False                              # about 1.25 k valid rows
    normal = rng.normal(size=(n, length))
    ties = -rng.integers(0, 40, size=(n, length)).astype(np.float64)   # Hamming-like
    heavy = rng.standard_exponential((n, length)) ** 3                 # skewed: T often fails
    twin_like = np.where(rng.random((n, length)) < 0.1, 5.0, 0.0) + rng.normal(size=(n, length))
    for x in (normal, ties, heavy, twin_like, np.zeros((n, length))):
        key = np.where(valid, np.maximum(x, -1e8), -1e9).astype(np.float32)
        yield key, valid


@pytest.mark.parametrize("k", [1, 7, 48, 100, 300])
def test_prefiltered_top_k_equals_top_k(k):
    """The serving top-k (threshold pre-filter, then tf.math.top_k) returns exactly
    tf.math.top_k's indices -- same set, same order, ties to the lower index -- for
    normal, tied (integer), skewed and bimodal keys, all-equal rows, rows without or
    with few valid keys; eagerly and under XLA (the exported rank)."""
    from tfmodels.methods.esu import prefilter, prefiltered_top_k
    jit = tf.function(lambda key, valid: prefiltered_top_k(key, k, valid), jit_compile=True)
    key, valid = next(_prefilter_cases())
    lowered = prefilter(tf.constant(key), k, tf.constant(valid)).numpy() < -1e30
    # the filter is active on normal keys for k < L / 1.25 (else rows pass unchanged)
    assert lowered[3:].all(axis=1).sum() == 0
    if 7 <= k <= 100:
        assert (lowered.sum(1) > 0).mean() > 0.5
    if k == 300:                                       # k = L: nothing to filter
        assert not lowered.any()
    for key, valid in _prefilter_cases():
        want = tf.math.top_k(key, k=k, sorted=True)[1].numpy()
        got = prefiltered_top_k(tf.constant(key), k, tf.constant(valid)).numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(jit(tf.constant(key), tf.constant(valid)).numpy(), want)


def test_prefilter_with_one_user_mask_equals_the_broadcast_mask():
    """The serving callers pass one user's mask [1, L] (counted once, not per candidate
    row): the pre-filtered keys and the selection equal those with the mask broadcast to
    the N rows, and tf.math.top_k's indices; 30% padding, one key row all padding-free
    ties (zeros)."""
    from tfmodels.methods.esu import prefilter, prefiltered_top_k
    rng = np.random.default_rng(5)
    n, length, k = 12, 200, 20
    valid = rng.random((1, length)) < 0.7
    x = rng.normal(size=(n, length))
    x[3] = 0.0
    key = tf.constant(np.where(valid, x, -1e9).astype(np.float32))
    full = np.broadcast_to(valid, (n, length))
    got = prefilter(key, k, tf.constant(valid)).numpy()
    np.testing.assert_array_equal(got, prefilter(key, k, tf.constant(full)).numpy())
    assert (got < -1e30).sum(1)[[0, 1, 2, 4]].min() > 0          # the filter is active
    np.testing.assert_array_equal(prefiltered_top_k(key, k, tf.constant(valid)).numpy(),
                                  tf.math.top_k(key, k=k).indices.numpy())


def test_one_user_selection_uses_the_prefilter_and_matches_the_batched_path():
    """SIM soft and ETA on one user's cache (the rank signature's case) select the same
    rows and give the same outputs as the same window tiled per candidate (the training
    path's top_k), at L = 200 with k = 20."""
    tf.keras.utils.set_random_seed(0)
    seq = random_sequence(1, 200, D, lengths=[170], seed=3)
    tgt = random_target(9, D, seed=4)
    for cls in (SimSoft, ETA):
        layer = cls(D, top_k=20)
        layer(seq, random_target(1, D))
        cache = layer.user_cache(seq)
        one = layer.attend(cache, tgt)
        tiled = layer.attend({k: tf.repeat(v, 9, 0) for k, v in cache.items()}, tgt)
        np.testing.assert_array_equal(one["index"].numpy(), tiled["index"].numpy())
        np.testing.assert_allclose(one["output"].numpy(), tiled["output"].numpy(), atol=1e-6)
