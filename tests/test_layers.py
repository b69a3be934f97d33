"""Backbone layers: the DIN unit (G2) against a NumPy reference of the concat form, masking."""
import numpy as np
import pytest
import tensorflow as tf

from tfmodels.layers import DinAttention, ItemEmbedding, MLP, masked_softmax


def _prelu(x, alpha):
    return np.where(x > 0, x, alpha * x)


def reference_din(layer, keys, mask, query):
    """w_l = MLP([e, t, e - t, e * t]) computed literally with the layer's weights."""
    w1, b1 = layer.w1.numpy(), layer.b1.numpy()
    a1 = layer.act1.get_weights()[0]
    mlp = layer.rest
    B, L, d = keys.shape
    t = np.broadcast_to(query[:, None, :], keys.shape)
    x = np.concatenate([keys, t, keys - t, keys * t], -1)
    h = _prelu(x @ w1 + b1, a1)
    for dense, act in zip(mlp.dense, mlp.acts):
        h = _prelu(h @ dense.kernel.numpy() + dense.bias.numpy(), act.get_weights()[0])
    w = (h @ mlp.out.kernel.numpy() + mlp.out.bias.numpy())[..., 0] * mask
    return np.einsum("bl,bld->bd", w, keys), w


def test_din_matches_concat_reference():
    rng = np.random.default_rng(0)
    B, L, d = 3, 6, 4
    mask = (np.arange(L)[None] < np.array([[0], [2], [6]])).astype(np.float32)
    keys = (rng.normal(size=(B, L, d)) * mask[..., None]).astype(np.float32)
    query = rng.normal(size=(B, d)).astype(np.float32)
    layer = DinAttention((5, 3))
    out = layer(tf.constant(keys), tf.constant(mask), tf.constant(query)).numpy()
    # make PReLU alphas non-zero so the negative branch is exercised
    for act in [layer.act1] + layer.rest.acts:
        act.set_weights([np.full_like(act.get_weights()[0], 0.25)])
    out = layer(tf.constant(keys), tf.constant(mask), tf.constant(query)).numpy()
    ref, _ = reference_din(layer, keys, mask, query)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.all(out[0] == 0), "a row without valid behaviors must give a zero vector"


def _concat_first_layer(layer, keys, query):
    """[k, q, k - q, k * q] W + b: the DIN unit's first layer on the literal concatenation
    (keys [B or 1, L, d] broadcast against query [B, d]) -> [B, L, h0]."""
    t = np.broadcast_to(query[:, None, :], (query.shape[0],) + keys.shape[1:])
    k = np.broadcast_to(keys, t.shape)
    x = np.concatenate([k, t, k - t, k * t], -1)
    return x @ layer.w1.numpy() + layer.b1.numpy()


def test_din_first_layer_split_equals_the_concatenation():
    """The split blocks (W_a + W_c, W_b - W_c, W_d) give the concatenation formula, in
    both layouts: per candidate (DinAttention's own) and one user against N candidates
    (the serving path's single GEMM), with a precomputed key projection used as is."""
    rng = np.random.default_rng(4)
    d, h0 = 5, 7
    layer = DinAttention((h0, 3))
    layer.build(tf.TensorShape([None, None, d]))
    layer.w1.assign(rng.normal(size=(4 * d, h0)))
    layer.b1.assign(rng.normal(size=h0))            # a bias that is not zero
    keys = rng.normal(size=(3, 6, d)).astype(np.float32)
    query = rng.normal(size=(3, d)).astype(np.float32)
    got = layer.first_layer(tf.constant(keys), tf.constant(query)).numpy()
    assert got.shape == (3, 6, h0)
    np.testing.assert_allclose(got, _concat_first_layer(layer, keys, query), atol=1e-4)

    one = rng.normal(size=(1, 6, d)).astype(np.float32)      # one user's keys
    cands = rng.normal(size=(4, d)).astype(np.float32)       # N = 4 candidates
    want = _concat_first_layer(layer, one, cands)
    for one_user in (False, True):
        got = layer.first_layer(tf.constant(one), tf.constant(cands), one_user=one_user)
        assert got.shape == (4, 6, h0)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    shifted = layer.precompute(tf.constant(one)) + 1.0      # key_proj is taken as given
    for one_user in (False, True):
        got = layer.first_layer(tf.constant(one), tf.constant(cands), key_proj=shifted,
                                one_user=one_user).numpy()
        np.testing.assert_allclose(got, want + 1.0, atol=1e-4)


def test_din_precompute_and_broadcast():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(1, 5, 4)).astype(np.float32)
    mask = np.ones((1, 5), np.float32)
    queries = rng.normal(size=(7, 4)).astype(np.float32)
    layer = DinAttention((6, 3))
    one_shot = layer(tf.repeat(keys, 7, 0), tf.repeat(mask, 7, 0), queries).numpy()
    pre = layer.precompute(tf.constant(keys))
    cached = layer(tf.constant(keys), tf.constant(mask), queries, key_proj=pre).numpy()
    np.testing.assert_allclose(cached, one_shot, atol=1e-5)


def test_din_softmax_normalization_masks_padding():
    rng = np.random.default_rng(2)
    mask = np.array([[1, 1, 0, 0]], np.float32)
    keys = rng.normal(size=(1, 4, 3)).astype(np.float32)
    layer = DinAttention((4, 2), normalize="softmax")
    w = layer.attention_weights(tf.constant(keys), tf.constant(mask),
                                tf.constant(rng.normal(size=(1, 3)), tf.float32)).numpy()
    assert w[0, :2].sum() == pytest.approx(1.0, abs=1e-6) and np.all(w[0, 2:] == 0)
    with pytest.raises(ValueError, match="normalize"):
        DinAttention(normalize="sum")


def test_masked_softmax_all_padding_gives_zeros():
    out = masked_softmax(tf.constant([[1.0, 2.0]]), tf.constant([[0.0, 0.0]])).numpy()
    assert np.all(out == 0) and np.all(np.isfinite(out))


def test_item_embedding_zeroes_padding_and_shares_tables():
    emb = ItemEmbedding(10, 5, dim=3)
    e = emb(tf.constant([[0, 4, 0]]), tf.constant([[2, 3, 1]])).numpy()
    assert e.shape == (1, 3, 6) and np.all(e[0, 0] == 0) and np.all(e[0, 2] == 0)
    t = emb(tf.constant([4]), tf.constant([3])).numpy()
    np.testing.assert_array_equal(t[0], e[0, 1])


def test_mlp_config_round_trip():
    mlp = MLP((4, 2), output_units=1)
    assert MLP.from_config(mlp.get_config()).get_config() == mlp.get_config()
    assert mlp(tf.zeros([3, 5])).shape == (3, 1)


def test_every_concrete_layer_class_is_registered_for_config_round_trips():
    """Each Keras layer defined in tfmodels.layers and tfmodels.methods.* carries
    ``@serializable`` (a saved model's config names it by its registered name); only the
    two abstract bases are not meant to be instantiated from a config. Guards against the
    decorator drifting onto a neighbouring helper (it once decorated a function above
    CFormerAttention, leaving the class unregistered)."""
    import importlib
    import inspect
    import pkgutil
    import tfmodels.methods as methods
    abstract = {"LongSequenceModule", "_TwoStage"}
    modules = [importlib.import_module("tfmodels.layers")] + [
        importlib.import_module(f"tfmodels.methods.{m.name}")
        for m in pkgutil.iter_modules(methods.__path__)]
    unregistered = [f"{mod.__name__}.{name}" for mod in modules
                    for name, obj in vars(mod).items()
                    if inspect.isclass(obj) and issubclass(obj, tf.keras.layers.Layer)
                    and obj.__module__ == mod.__name__ and name not in abstract
                    and tf.keras.utils.get_registered_name(obj) == obj.__name__]
    assert unregistered == []
