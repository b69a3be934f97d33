"""TWIN (B9) and TWIN V2 (METHODS 2.4) layers: the faithfulness tests of section 2.4.

Clustering (Algorithm 1, virtual items, the Beam job) is tested in tests/test_cluster.py.
"""
import numpy as np
import pytest
import tensorflow as tf

from tfmodels import schema as S
from tfmodels.methods.twin import Twin
from tfmodels.methods.twin_v2 import TwinV2
from tfmodels.testing import layer_test, random_sequence, random_target

D = 8


def _seq(batch=3, length=12, lengths=(12, 5, 0), seed=0, sizes=None):
    seq = random_sequence(batch, length, D, lengths=lengths, seed=seed)
    if sizes is not None:
        seq["cluster_size"] = tf.constant(sizes, tf.int64) * tf.cast(seq["mask"], tf.int64)
    return seq


def _pair(**cfg):
    """A TWIN and a TWIN V2 with identical weights."""
    tf.keras.utils.set_random_seed(0)
    seq, tgt = _seq(), random_target(3, D)
    twin, v2 = Twin(D, **cfg), TwinV2(D, **cfg)
    twin(seq, tgt)
    v2(seq, tgt)
    v2.set_weights(twin.get_weights())
    return twin, v2


@pytest.mark.parametrize("cls,cfg", [(Twin, {}), (TwinV2, {}), (TwinV2, {"top_k": 3}),
                                     (TwinV2, {"gsu_log_n": False}),
                                     (Twin, {"cross_features": ["gap_bucket"], "top_k": 2})])
def test_layer_contract(cls, cfg):
    layer_test(cls, cfg)


def test_registry_lines():
    from tfmodels import registry
    assert registry.long_module_class("twin") is Twin
    assert registry.long_module_class("twin_v2") is TwinV2
    assert registry.preset_config("twin_v2_no_ln_gsu") == {"gsu_log_n": False}
    assert registry.preset_config("twin_v2_no_ln_esu") == {"esu_log_n": False}
    assert "cluster_size" in TwinV2(D).reads_fields and "cluster_size" not in Twin(D).reads_fields


def test_twin_v2_with_unit_sizes_equals_twin():
    """Faithfulness 4b: n = 1 everywhere (or no cluster_size at all) -> exactly TWIN."""
    twin, v2 = _pair()
    tgt = random_target(3, D, seed=5)
    ones = _seq(sizes=np.ones((3, 12)))
    ref = twin(_seq(), tgt).numpy()
    np.testing.assert_allclose(v2(ones, tgt).numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(v2(_seq(), tgt).numpy(), ref, atol=1e-6)
    # ... and sizes > 1 do change it
    big = _seq(sizes=np.random.default_rng(0).integers(1, 19, (3, 12)))
    assert np.abs(v2(big, tgt).numpy() - ref).max() > 1e-4


def test_esu_softmax_is_size_weighted():
    """Faithfulness 4a (T9): softmax(alpha + ln n) = n exp(alpha) / sum n exp(alpha)."""
    _, v2 = _pair()
    sizes = np.random.default_rng(1).integers(1, 19, (3, 12))
    seq, tgt = _seq(sizes=sizes), random_target(3, D, seed=2)
    out = v2.attend(v2.user_cache(seq), tgt)
    alpha, idx = out["alpha"].numpy(), out["index"].numpy()            # [B,H,L], [B,k]
    w = out["weights"].numpy()                                          # [B,H,k]
    mask = seq["mask"].numpy()
    for b in range(3):
        valid = mask[b] > 0
        if not valid.any():
            assert np.all(w[b] == 0)                                    # empty row: zeros
            continue
        for h in range(v2.num_heads):
            num = np.where(valid, sizes[b] * np.exp(alpha[b, h]), 0.0)
            expect = num / num.sum()
            got = np.zeros(12)
            got[idx[b]] = w[b, h]
            np.testing.assert_allclose(got, expect, atol=1e-6)


def test_gsu_score_adds_log_n_and_ablations():
    twin, v2 = _pair()
    sizes = np.random.default_rng(2).integers(1, 19, (3, 12))
    seq, tgt = _seq(sizes=sizes), random_target(3, D, seed=3)
    out = v2.attend(v2.user_cache(seq), tgt)
    expect = out["alpha"].numpy().mean(1) + np.log(np.maximum(sizes, 1)) * seq["mask"].numpy()
    np.testing.assert_allclose(out["gsu_score"].numpy(), expect, atol=1e-5)
    no_gsu = TwinV2(D, gsu_log_n=False)
    no_gsu(seq, tgt)
    no_gsu.set_weights(twin.get_weights())
    o2 = no_gsu.attend(no_gsu.user_cache(seq), tgt)
    np.testing.assert_allclose(o2["gsu_score"].numpy(), out["alpha"].numpy().mean(1), atol=1e-5)


def test_gsu_top_k_never_picks_padding_while_valid_remain():
    """Faithfulness 5: padding is never selected while a valid row is left; with
    T_valid <= k every valid row is kept; L < k works."""
    tf.keras.utils.set_random_seed(0)
    layer = TwinV2(D, top_k=4)
    seq = _seq(batch=3, length=10, lengths=(10, 6, 3),
               sizes=np.random.default_rng(3).integers(1, 19, (3, 10)))
    tgt = random_target(3, D)
    out = layer.attend(layer.user_cache(seq), tgt)
    idx, sel = out["index"].numpy(), out["selected_mask"].numpy()
    score = out["gsu_score"].numpy()
    for b, n_valid in enumerate((10, 6, 3)):
        assert idx[b].shape == (4,)
        picked_valid = [i for i in idx[b] if i < n_valid]
        assert len(picked_valid) == min(4, n_valid)
        np.testing.assert_array_equal(sel[b], (idx[b] < n_valid).astype(np.float32))
        if n_valid > 4:    # the top 4 by score among the valid rows
            top = np.argsort(-score[b, :n_valid], kind="stable")[:4]
            assert set(idx[b]) == set(top)
    # L (4) < k (100): everything kept, output equals k = L explicitly
    short = _seq(batch=2, length=4, lengths=(4, 2))
    big_k, small_k = TwinV2(D, top_k=100), TwinV2(D, top_k=4)
    t2 = random_target(2, D)
    big_k(short, t2)
    small_k(short, t2)
    small_k.set_weights(big_k.get_weights())
    o = big_k.attend(big_k.user_cache(short), t2)
    assert o["index"].shape == (2, 4)
    np.testing.assert_allclose(o["output"].numpy(), small_k(short, t2).numpy(), atol=1e-6)


def test_huge_valid_scores_still_outrank_padding():
    """A valid row with a very negative relevance is still picked before padding."""
    tf.keras.utils.set_random_seed(0)
    layer = Twin(D, top_k=3)
    seq = _seq(batch=1, length=6, lengths=(2,))
    seq["emb"] = seq["emb"] * 1e6              # extreme alphas of either sign
    out = layer.attend(layer.user_cache(seq), random_target(1, D))
    assert set(out["index"].numpy()[0, :2]) == {0, 1}
    assert np.all(np.isfinite(out["output"].numpy()))


def test_block_diagonal_cross_projection():
    """Faithfulness 6 (T5): K_c W^c with block-diagonal W^c = per-feature dot products."""
    tf.keras.utils.set_random_seed(0)
    layer = Twin(D)
    seq = _seq()
    seq.pop("ts")               # hand-given gap buckets (no row timestamps): used as they are
    layer(seq, random_target(3, D))
    k_c = layer.cross_embeddings(seq).numpy()                       # [B, L, J, 8]
    got = layer.cross_projection(tf.constant(k_c)).numpy()          # [B, L, H, J]
    w_c = layer.w_c.numpy()                                         # [J, 8, H]
    j, c, h = w_c.shape
    flat = k_c.reshape(k_c.shape[0], k_c.shape[1], j * c)
    for a in range(h):
        block = np.zeros((j * c, j))
        for f in range(j):
            block[f * c:(f + 1) * c, f] = w_c[f, :, a]
        np.testing.assert_allclose(got[:, :, a, :], flat @ block, atol=1e-5)
    # cross term of the relevance = (K_c W^c) beta per head: the cached part (engage,
    # domain) plus the request-time part (the gap feature) that score adds
    cache = layer.user_cache(seq)
    expect = np.einsum("blhj,hj->bhl", got, layer.beta.numpy())
    request_cross = layer.request_terms(cache, random_target(3, D))[0].numpy()
    np.testing.assert_allclose(cache["cross"].numpy() + request_cross, expect, atol=1e-5)
    # and the cached part alone holds no gap term
    static = [f for f in layer.cross_features if f != "gap_bucket"]
    idx = [layer.cross_features.index(f) for f in static]
    expect_static = np.einsum("blhj,hj->bhl", got[..., idx], layer.beta.numpy()[:, idx])
    np.testing.assert_allclose(cache["cross"].numpy(), expect_static, atol=1e-5)


def test_cached_item_projection_equals_on_the_fly():
    """Faithfulness 7: K_h W^h looked up from a per-item projected table = projecting rows."""
    tf.keras.utils.set_random_seed(0)
    layer = Twin(D)
    rng = np.random.default_rng(4)
    table = rng.normal(size=(50, D)).astype(np.float32)             # an item-embedding table
    ids = rng.integers(1, 50, size=(2, 9))
    seq = random_sequence(2, 9, D, lengths=(9, 9))
    seq["emb"] = tf.constant(table[ids])
    layer(seq, random_target(2, D))
    per_item = layer.item_projection(tf.constant(table)).numpy()    # [50, H, dk], once per item
    np.testing.assert_allclose(layer.user_cache(seq)["keys"].numpy(), per_item[ids], atol=1e-5)


def test_alpha_matches_equation_8():
    """(T4) alpha_a = (K_h W^h_a)(q W^q_a)^T / sqrt(d_k) + (K_c W^c_a) beta_a."""
    tf.keras.utils.set_random_seed(0)
    layer = Twin(D)
    seq, tgt = _seq(), random_target(3, D)
    layer(seq, tgt)
    emb = seq["emb"].numpy() * seq["mask"].numpy()[..., None]
    kh = np.einsum("bld,dhk->blhk", emb, layer.w_h.numpy())
    q = np.einsum("bd,dhk->bhk", tgt["emb"].numpy(), layer.w_q.numpy())
    cache = layer.user_cache(seq)
    cross = cache["cross"].numpy() + layer.request_terms(cache, tgt)[0].numpy()
    expect = np.einsum("blhk,bhk->bhl", kh, q) / np.sqrt(layer.key_dim) + cross
    got = layer.attend(layer.user_cache(seq), tgt)["alpha"].numpy()
    np.testing.assert_allclose(got, expect, atol=1e-4)


def test_padding_size_zero_and_empty_rows():
    """Padded clusters have n = 0: ln max(n, 1) is used (never ln 0); a user without
    behaviors gets a zero vector."""
    tf.keras.utils.set_random_seed(0)
    layer = TwinV2(D)
    seq = _seq(sizes=np.full((3, 12), 7))
    assert seq["cluster_size"].numpy()[2].sum() == 0
    out = layer(seq, random_target(3, D)).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(layer.user_cache(seq)["log_n"].numpy()[2], 0.0)


def test_model_reads_long_cluster_size(tiny_data):
    from tfmodels import data as Dd
    from tfmodels.model import build_model
    from tfmodels.testing import tiny_schema
    fs = tiny_schema(tiny_data)
    model = build_model(fs, "twin_v2", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    assert "long_cluster_size" in model.feature_names("user_tower")
    assert "long_cluster_size" not in build_model(fs, "twin", emb_dim=4).feature_names()
    batch = next(iter(Dd.make_dataset(S.split_pattern(tiny_data, "test"), 5, 24, 8)))
    # records without hist_cluster_size: every valid row has n = 1, padding 0
    np.testing.assert_array_equal(batch["long_cluster_size"].numpy(),
                                  (batch["long_item_id"].numpy() > 0).astype(np.int64))
    np.testing.assert_allclose(model.rank(model.user_tower(batch), batch).numpy(),
                               model(batch).numpy(), atol=1e-5)


def test_gap_buckets_are_measured_to_the_request_time():
    """Train/serve skew guard: the cache holds each row's timestamp, not a gap bucket;
    score measures the gaps to target["ts"] (the impression / request time) with the
    pipeline's bucketing, so one cache scored at two request times equals the
    hand-bucketed windows of those two times."""
    tf.keras.utils.set_random_seed(0)
    layer = Twin(D, top_k=4)
    seq, tgt = _seq(), random_target(3, D)
    layer(seq, tgt)
    cache = layer.user_cache(seq)
    assert "gap_bucket" not in cache and "row_ts" in cache
    np.testing.assert_array_equal(cache["row_ts"].numpy(),
                                  seq["ts"].numpy() * (seq["mask"].numpy() > 0))
    for delay in (0, 7 * 86400):                        # the same cache, a week later
        t = dict(tgt, ts=tgt["ts"] + delay)
        got = layer.score(cache, t).numpy()
        hand = dict(seq)
        hand.pop("ts")
        buckets = S.gap_bucket_np(t["ts"].numpy()[:, None] - seq["ts"].numpy())
        hand["gap_bucket"] = tf.constant(buckets * (seq["mask"].numpy() > 0))
        np.testing.assert_allclose(got, layer(hand, t).numpy(), atol=1e-5)
    assert np.abs(layer.score(cache, tgt).numpy()
                  - layer.score(cache, dict(tgt, ts=tgt["ts"] + 7 * 86400)).numpy()).max() > 1e-4


@pytest.mark.parametrize("cls", [Twin, TwinV2])
def test_one_user_path_equals_batched_path(cls):
    """The serving path (a cache of batch 1 against N candidates: alpha's q term laid out
    [H, N, L], the cross term and ln n added after the head mean and at the gathered rows)
    selects the same rows and gives the same alpha, GSU scores, ESU weights and output
    as the batched path on the window tiled N times. L = 40 > 1.25 k, so the serving
    top-k's pre-filter is active; 9 padded rows; cluster sizes and the gap feature."""
    tf.keras.utils.set_random_seed(0)
    n, length, k = 6, 40, 8
    sizes = np.random.default_rng(4).integers(1, 19, (1, length))
    seq = _seq(batch=1, length=length, lengths=(31,), seed=5, sizes=sizes)
    layer = cls(D, top_k=k)
    tgt = random_target(n, D, seed=6)
    tgt["ts"] = tgt["ts"][:1]                # one request time (rank's imp_ts is [1])
    cache = layer.user_cache(seq)
    assert cache["keys"].shape[0] == 1 and layer.request_terms(cache, tgt)[1].shape[0] == 1
    one = layer.attend(cache, tgt)
    tiled = {key: tf.repeat(v, n, axis=0) for key, v in seq.items()}
    ref = layer.attend(layer.user_cache(tiled), tgt)
    np.testing.assert_array_equal(one["index"].numpy(), ref["index"].numpy())
    np.testing.assert_array_equal(one["selected_mask"].numpy(), ref["selected_mask"].numpy())
    assert one["selected_mask"].numpy().all()          # 31 valid rows >= k: no padding picked
    for key in ("alpha", "gsu_score", "weights", "output"):
        np.testing.assert_allclose(one[key].numpy(), ref[key].numpy(), atol=1e-5, err_msg=key)
    # the GSU key by hand: mean over heads of alpha, + ln n for TWIN V2
    expect = ref["alpha"].numpy().mean(1) + (np.log(np.maximum(sizes, 1)) * seq["mask"].numpy()
                                             if layer.gsu_log_n else 0.0)
    np.testing.assert_allclose(one["gsu_score"].numpy(), expect, atol=1e-5)
    assert np.abs(one["output"].numpy()).max() > 1e-3  # not a vacuous zero output
