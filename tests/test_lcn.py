"""LCN's LAP (METHODS 2.5): faithfulness tests 1, 2, 3, 6, 7 of the spec, a NumPy
reference of the three levels, masking, the cached path and the request-time gap.

CRP (tests 4, 5) belongs to the backbone's cross-domain part and is tested there.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import registry
from tfmodels import schema as S
from tfmodels.methods.lcn import LAP
from tfmodels.testing import layer_test, random_sequence, random_target

D = 8


def _layer(seq, target, **cfg):
    tf.keras.utils.set_random_seed(0)
    layer = LAP(D, **cfg)
    layer(seq, target)
    return layer


def _softmax(x, m):
    x = np.where(m > 0, x, -1e9)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) * m


def _top(score, mask, k):
    """Top-k positions: valid rows by score descending, ties by the lower position,
    then padding (by position)."""
    order = sorted(range(len(score)), key=lambda i: (mask[i] == 0, -score[i] if mask[i] else 0, i))
    return np.array(order[:k])


def reference(layer: LAP, seq, target):
    """LAP in float64 NumPy from the layer's weights (one candidate at a time)."""
    w = {v.name.split("/")[-1].split(":")[0]: v.numpy().astype(np.float64)
         for v in layer.weights}
    emb = seq["emb"].numpy().astype(np.float64)
    mask = seq["mask"].numpy().astype(np.float64)
    q_all = target["emb"].numpy().astype(np.float64)
    ctx = []
    for f in layer.context_features:
        if f == "gap_bucket":
            gap = np.asarray(target["ts"]).reshape(-1, 1) - seq["ts"].numpy()
            ids = np.where(mask > 0, S.gap_bucket_np(gap), 0)
            ctx.append(layer.gap_table.get_weights()[0][ids] * mask[..., None])
        elif f == "engage":
            k, b = layer.engage_dense.get_weights()
            x = seq["engage"].numpy() * mask
            ctx.append(np.tanh(x[..., None] * k[0] + b) * mask[..., None])
        else:
            ids = np.clip(seq["domain"].numpy(), 0, layer.num_domains - 1) * mask.astype(int)
            ctx.append(layer.domain_table.get_weights()[0][ids] * mask[..., None])
    x_all = np.concatenate([emb * mask[..., None]] + ctx, -1)         # e^h || e^c
    outs, sel1, sel2 = [], [], []
    for n in range(len(q_all)):
        e, m, q, x = emb[n] * mask[n][:, None], mask[n], q_all[n], x_all[n]
        parts, pool = [], np.arange(len(m))
        if layer.csa:
            r = e @ q
            wts = _softmax(r, m) if layer.csa_norm == "softmax" else r * m
            parts.append(wts @ e)
            pool = _top(np.maximum(r, -1e8), m, min(layer.k1, len(m)))
            sel1.append(pool)
        if layer.msa:
            pm = m[pool]
            keys, vals = x[pool] @ w["w_k_msa"], x[pool] @ w["w_v_msa"]
            r = keys @ (q @ w["w_q_msa"]) / math.sqrt(layer.attention_dim)
            parts.append(_softmax(r, pm) @ vals)
            if layer.fsa:
                pool = pool[_top(np.maximum(r, -1e8), pm, min(layer.k2, len(pool)))]
                sel2.append(pool)
        if layer.fsa:
            pm = m[pool]
            l, dh = layer.num_heads, layer.head_dim
            keys = (x[pool] @ w["w_k_fsa"]).reshape(-1, l, dh)
            vals = (x[pool] @ w["w_v_fsa"]).reshape(-1, l, dh)
            qh = (q @ w["w_q_fsa"]).reshape(l, dh)
            a = np.stack([_softmax(keys[:, h] @ qh[h] / math.sqrt(dh), pm) for h in range(l)])
            w1, b1 = layer.ffn_hidden.get_weights()
            w2, b2 = layer.ffn_out.get_weights()
            ffn = lambda z: np.maximum(z @ w1 + b1, 0.0) @ w2 + b2          # (N12)
            if layer.fsa_pooling == "per_item_mean":
                per_item = (a.T[..., None] * vals).reshape(len(pool), l * dh)   # H_{h,k}
                ir = (ffn(per_item) * pm[:, None]).sum(0) / max(pm.sum(), 1.0)
            else:
                ir = ffn(np.einsum("hp,phc->hc", a, vals).reshape(-1)) * float(pm.sum() > 0)
            parts.append(ir)
        outs.append(np.concatenate(parts))
    return np.stack(outs), sel1, sel2


def _data(batch=4, length=12, lengths=(12, 7, 2, 0), seed=0):
    return (random_sequence(batch, length, D, lengths=lengths, seed=seed),
            random_target(batch, D, seed=seed + 1))


# ---- equations ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    dict(k1=5, k2=3),
    dict(k1=5, k2=3, fsa_pooling="standard", csa_norm="none",
         context_features=["gap_bucket", "engage", "domain"]),
    dict(k1=4, levels=["csa", "fsa"]),
    dict(k2=3, levels=["msa", "fsa"], context_features=["engage"]),
    dict(k1=6, levels=["csa", "msa"], context_features=[]),
])
def test_matches_numpy_reference(cfg):
    """N7-N13 with every level, both poolings and CSA norms, and the request-time gap."""
    seq, target = _data()
    layer = _layer(seq, target, **cfg)
    got = layer.attend(layer.user_cache(seq), target)
    want, sel1, sel2 = reference(layer, seq, target)
    np.testing.assert_allclose(got["output"].numpy(), want, rtol=1e-5, atol=1e-5)
    if sel1:
        np.testing.assert_array_equal(got["index1"].numpy(), np.stack(sel1))
    if sel2:
        np.testing.assert_array_equal(got["index2"].numpy(), np.stack(sel2))


def test_top_k1_is_largest_inner_products_ties_by_index_and_never_padding():
    """Test 1: top-K1 = the K1 valid rows with the largest e^h . e^v (ties to the lower
    index), padding only after every valid row; top-K2 is a subset of top-K1."""
    e = np.zeros((2, 8, D), np.float32)
    # row 0: scores (e . q with q = unit x) 3, 1, 3, 5, 1, 2 + two padded rows holding a
    # huge score (garbage); row 1: three valid rows only, K1 = 5 > 3
    e[0, :6, 0] = [3, 1, 3, 5, 1, 2]
    e[0, 6:, 0] = 100.0
    e[1, :3, 0] = [-2, -1, -3]
    e[:, :, 1:] = np.random.default_rng(0).normal(size=(2, 8, D - 1)) * 0.01
    mask = np.array([[1] * 6 + [0, 0], [1, 1, 1] + [0] * 5], np.float32)
    seq = {"emb": tf.constant(e), "mask": tf.constant(mask)}
    q = np.zeros((2, D), np.float32)
    q[:, 0] = 1.0
    target = {"emb": tf.constant(q)}
    layer = _layer(seq, target, k1=5, k2=2, context_features=[])
    out = layer.attend(layer.user_cache(seq), target)
    idx1 = out["index1"].numpy()
    np.testing.assert_array_equal(idx1[0], [3, 0, 2, 5, 1])    # 5, 3 (0 before 2), 2, 1 (1 before 4)
    np.testing.assert_array_equal(idx1[1, :3], [1, 0, 2])      # every valid row first
    assert set(idx1[1, 3:]) <= {3, 4, 5, 6, 7}
    idx2 = out["index2"].numpy()
    for n in range(2):
        assert set(idx2[n]) <= set(idx1[n])
    assert set(idx2[1]) <= {0, 1, 2}                           # K2 = 2 of 3 valid: no padding


def test_output_is_concat_of_the_levels_in_order_and_k_equal_l_runs():
    """Test 2: v_long = [IR_CSA (d), IR_MSA (d_v), IR_FSA (d_out)]; K1 = L, K2 = K1 run."""
    seq, target = _data(length=6, lengths=(6, 4, 1, 0))
    layer = _layer(seq, target, k1=6, k2=6, value_dim=5, fsa_dim=3)
    assert layer.output_dim == D + 5 + 3
    out = layer.attend(layer.user_cache(seq), target)
    v = out["output"].numpy()
    assert v.shape == (4, D + 5 + 3)
    np.testing.assert_array_equal(v[:, :D], out["ir_csa"].numpy())
    np.testing.assert_array_equal(v[:, D:D + 5], out["ir_msa"].numpy())
    np.testing.assert_array_equal(v[:, D + 5:], out["ir_fsa"].numpy())
    assert out["index1"].shape[1] == 6 and out["index2"].shape[1] == 6
    assert np.all(np.isfinite(v))
    # k larger than the window is clamped to L (K1) and K1 (K2)
    big = _layer(seq, target, k1=200, k2=50)
    res = big.attend(big.user_cache(seq), target)
    assert res["index1"].shape[1] == 6 and res["index2"].shape[1] == 6
    assert LAP(D, levels=["msa"]).output_dim == D and LAP(D, levels=["csa", "fsa"]).output_dim == 2 * D


def test_gradient_reaches_valid_rows_outside_top_k1_through_csa():
    """Test 3: d v_long / d e^h_k != 0 for every valid row outside the top-K1, zero on padding."""
    seq, target = _data(batch=2, length=10, lengths=(10, 7))
    layer = _layer(seq, target, k1=3, k2=2)
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer.attend(layer.user_cache(dict(seq, emb=emb)), target)
        loss = tf.reduce_sum(out["output"] ** 2)
    grad = np.abs(tape.gradient(loss, emb).numpy()).sum(-1)           # [B, L]
    idx1, mask = out["index1"].numpy(), seq["mask"].numpy()
    for n in range(2):
        outside = [k for k in range(10) if mask[n, k] > 0 and k not in idx1[n]]
        assert outside and np.all(grad[n, outside] > 0), (n, outside, grad[n])
        assert np.all(grad[n, mask[n] == 0] == 0)


def test_every_weight_gets_a_gradient():
    seq, target = _data()
    layer = _layer(seq, target, k1=5, k2=3, context_features=["gap_bucket", "engage", "domain"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(seq, target) ** 2)
    grads = tape.gradient(loss, layer.trainable_weights)
    dead = [v.name for v, g in zip(layer.trainable_weights, grads)
            if g is None or float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) == 0.0]
    assert not dead, dead


def test_one_valid_item_in_the_fsa_pool_gives_equal_poolings():
    """Test 6: one valid row in FSA's pool -> per_item_mean == standard == FFN(concat_h V_h)."""
    for lengths, k2 in (((1, 1), 50), ((6, 4), 1)):     # a one-row window; K2 = 1
        seq, target = _data(batch=2, length=6, lengths=lengths)
        a = _layer(seq, target, k1=4, k2=k2)
        b = _layer(seq, target, k1=4, k2=k2, fsa_pooling="standard")
        b.set_weights(a.get_weights())
        ra, rb = a.attend(a.user_cache(seq), target), b.attend(b.user_cache(seq), target)
        np.testing.assert_allclose(ra["ir_fsa"].numpy(), rb["ir_fsa"].numpy(), atol=1e-6)
        # both = FFN(concat_h V_h) of the one kept row (softmax weight 1)
        cache = a.user_cache(seq)
        values = cache["fsa_values"] + a.request_terms(cache, target)["fsa_values"]
        row = tf.gather(values, ra["fsa_index"][:, 0], batch_dims=1)
        np.testing.assert_allclose(ra["ir_fsa"].numpy(), a.ffn(row).numpy(), atol=1e-6)


def test_short_windows_give_no_nan_and_equal_the_unpadded_window():
    """Test 7: a window shorter than K1 and K2, padded to L = 20, equals the same 3 rows
    un-padded (L = 3); an empty window gives zeros."""
    short, target = _data(batch=1, length=3, lengths=(3,))
    layer = _layer(short, target, k1=200, k2=50)
    padded = {}
    for k, v in short.items():
        v = v.numpy()
        padded[k] = tf.constant(np.concatenate([v, np.zeros((1, 17) + v.shape[2:], v.dtype)], 1))
    out_short, out_padded = layer(short, target).numpy(), layer(padded, target).numpy()
    assert np.all(np.isfinite(out_padded))
    np.testing.assert_allclose(out_padded, out_short, atol=1e-6)
    k2_only = _layer(short, target, k2=2, levels=["msa", "fsa"])   # K2 < 3 valid < L
    np.testing.assert_allclose(k2_only(padded, target).numpy(), k2_only(short, target).numpy(),
                               atol=1e-6)
    empty = {k: v * 0 for k, v in padded.items()}
    for cfg in ({}, {"fsa_pooling": "standard"}):
        z = _layer(short, target, **cfg)(empty, target).numpy()
        np.testing.assert_array_equal(z, np.zeros_like(z))


# ---- masking, cache, serving contract ----------------------------------------------------------
@pytest.mark.parametrize("cfg,tol", [
    (dict(k1=5, k2=3, fsa_pooling="standard",
          context_features=["gap_bucket", "engage", "domain"]), 1e-5),
    (dict(levels=["csa"]), 1e-5),
    # the raw r-weighted sum (N8 as printed) grows with L and |r|: outputs of ~10-100
    # differ by float rounding between the one-user and the batched einsum
    (dict(k1=5, k2=3, csa_norm="none"), 1e-4),
])
def test_layer_contract(cfg, tol):
    """Garbage / extra padding changes nothing, cached == full, one-user broadcast, config."""
    layer_test(LAP, cfg, tol=tol)


def test_cache_is_request_independent_and_the_gap_is_measured_at_request_time():
    seq, target = _data()
    layer = _layer(seq, target, k1=5, k2=3)
    cache = layer.user_cache(seq)
    assert "row_ts" in cache and "gap_bucket" not in cache
    assert set(cache) == {"emb", "mask", "msa_keys", "msa_values", "fsa_keys", "fsa_values",
                          "row_ts"}
    assert layer.cache_bytes_per_user(12) == sum(v.numpy()[0].nbytes for v in cache.values())
    assert layer.cache_bytes_per_user(500) == 500 * (20 * D + 12)
    csa_only = _layer(seq, target, levels=["csa"])
    assert csa_only.cache_bytes_per_user(12) == sum(
        v.numpy()[0].nbytes for v in csa_only.user_cache(seq).values())
    later = dict(target, ts=target["ts"] + 86400 * 30)
    a, b = layer.score(cache, target).numpy(), layer.score(cache, later).numpy()
    assert np.abs(a - b)[:3].max() > 1e-4              # the gap changed (rows with history)
    np.testing.assert_allclose(b, reference(layer, seq, later)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="request time"):
        layer.score(cache, {"emb": target["emb"]})
    assert layer.reads_request_time and layer.reads_fields == ("ts", "engage")
    csa = LAP(D, levels=["csa"])
    assert not csa.reads_request_time and csa.reads_fields == ()


def test_bad_configs_are_rejected():
    for bad, match in ((dict(levels=[]), "levels"), (dict(levels=["gsu"]), "levels"),
                       (dict(csa_norm="sum"), "csa_norm"), (dict(fsa_pooling="max"), "fsa_pooling"),
                       (dict(context_features=["age"]), "context"), (dict(k1=0), "k1")):
        with pytest.raises(ValueError, match=match):
            LAP(D, **bad)


def test_registry_presets():
    assert registry.long_module_class("lcn") is LAP and registry.preset_config("lcn") == {}
    k1 = LAP(D, **registry.preset_config("lcn_k1_only"))
    k2 = LAP(D, **registry.preset_config("lcn_k2_only"))
    assert (k1.levels, k1.k1) == (["csa", "fsa"], 50) and (k2.levels, k2.k2) == (["msa", "fsa"], 50)
    full = LAP(D)
    assert (full.k1, full.k2, full.levels, full.num_heads) == (200, 50, ["csa", "msa", "fsa"], 4)
