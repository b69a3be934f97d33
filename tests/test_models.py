"""Every registered model through the shared model test; every long module through the layer test."""
import numpy as np
import pytest
import tensorflow as tf

from tfmodels import data as D
from tfmodels import registry
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import layer_test, model_test, tiny_schema


# Named variants (paper ablations: the same class with preset kwargs) go through the
# layer test with their preset below; the full model test runs once per base entry.
BASE_NAMES = [n for n in registry.names() if not registry.preset_config(n)]


# The eager train step (Keras' run_eagerly) for one model of each structure: DIN over the
# window (din_l), search then attend over cached rows with clusters (twin_v2), three
# candidate-dependent levels (lcn), an encoder over the sequence (cformer), a compressed
# cache absorbed into the head (lrea). The other methods' layers share these ops; their
# graph-mode runs below and their layer tests cover them.
EAGER_NAMES = ("din_l", "twin_v2", "lcn", "cformer", "lrea")
assert set(EAGER_NAMES) <= set(BASE_NAMES), EAGER_NAMES
CASES = [(n, False) for n in BASE_NAMES] + [(n, True) for n in BASE_NAMES if n in EAGER_NAMES]


@pytest.mark.parametrize("name,run_eagerly", CASES,
                         ids=[f"{n}-{'eager' if e else 'graph'}" for n, e in CASES])
def test_model(name, run_eagerly, tiny_data, tmp_path):
    # export=False: tests/test_serving.py exports every registered base method through
    # serving.export and checks the reloaded SavedModel against the Keras model (1e-5),
    # which is what model_test's own export check would repeat at twice the cost.
    out = model_test(name, tiny_data, str(tmp_path), run_eagerly=run_eagerly, export=False)
    tol = getattr(registry.long_module_class(name), "cache_parity_tol", 1e-5)
    assert out["cached_gap"] <= max(1e-5, tol)


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.MODELS[n]])
def test_long_module_layer(name):
    layer_test(registry.long_module_class(name), registry.preset_config(name))


def test_unknown_model_is_rejected():
    with pytest.raises(registry.UnknownModelError, match="unknown model 'nope'.*din_l"):
        registry.long_module_class("nope")


def test_model_ignores_padded_positions(tiny_data):
    """Garbage in every padded slot of the raw window features changes no prediction."""
    fs = tiny_schema(tiny_data)
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "test"), 5, 24, 16)))
    rng = np.random.default_rng(0)
    for name in registry.names():
        model = build_model(fs, name, emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
        p = model.predict_ctr(batch).numpy()
        noisy = dict(batch)
        for prefix in ("short", "long"):
            valid = batch[f"{prefix}_item_id"].numpy() != 0
            for field in ("engage", "gap_bucket", "domain"):
                key = S.seq_name(prefix, field)
                v = batch[key].numpy()
                garbage = rng.integers(1, 5, size=v.shape).astype(v.dtype)
                noisy[key] = tf.constant(np.where(valid, v, garbage))
        np.testing.assert_allclose(model.predict_ctr(noisy).numpy(), p, atol=1e-6)


def test_din_l_over_short_window_equals_din_attention_weights(tiny_data):
    """DIN-L's long DIN with L = S sees exactly what the short DIN sees."""
    fs = tiny_schema(tiny_data, short_len=5, long_len=5)
    model = build_model(fs, "din_l", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "test"), 5, 5, 8)))
    model(batch)
    model.long_module.din.set_weights(model.short_din.get_weights())
    short = model.embed_sequence(batch, "short")
    target = model.embed_target(batch)
    v_short = model.short_din(short["emb"], short["mask"], target["emb"])
    v_long = model.long_module(model.embed_sequence(batch, "long"), target)
    np.testing.assert_allclose(v_long.numpy(), v_short.numpy(), atol=1e-6)


def test_avg_pool_hand_computed():
    from tfmodels.methods.avg_pool import AvgPooling
    emb = tf.constant([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], [[0.0, 0.0]] * 3])
    mask = tf.constant([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = AvgPooling(emb_dim=2)({"emb": emb, "mask": mask}, {"emb": tf.zeros([2, 2])})
    np.testing.assert_allclose(out.numpy(), [[2.0, 3.0], [0.0, 0.0]])
