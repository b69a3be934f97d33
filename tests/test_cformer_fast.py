"""C-Former's inference formulation (issue 19 item 1): ``CFormer.user_cache`` goes
through ``CFormerEncoder.inference_attention`` and ``DenoiseAssign.centroids_from_rows``
(no key/value projection over L, no per-head normalisation of [B, h, J, L], segment
sums instead of the one-hot assignment). It must compute the same function as the
training path's ``encode`` + ``centroids_from`` (``user_cache_reference``), with the
same variables, on inputs with padding, empty users, one-behavior users (exact ties)
and garbage in padded slots.
"""
import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.methods import cformer as cformer_module
from tfmodels.methods.cformer import CFormer, DenoiseAssign
from tfmodels.testing import _pad_more, random_sequence, random_target

DIM, L = 8, 20
# empty user, one behavior (A = 1 for every anchor: an exact tie -> anchor 0),
# partial, full
LENGTHS = [0, 1, 7, L, 13]
RTOL, ATOL = 1e-5, 1e-6

CONFIGS = [
    {},
    {"centroid_norm": "sum"},
    {"num_heads": 3, "head_dim": 3, "encoder_layers": 3},     # h * d_k != d
    {"assignments": 3, "num_clusters": 5, "encoder_layers": 1},
    {"denoise": False},
    {"num_heads": 1, "num_clusters": 2},
]


def _layer(config, seed=0):
    tf.keras.utils.set_random_seed(seed)
    layer = CFormer(DIM, din_hidden=(8, 4), **config)
    seq = random_sequence(len(LENGTHS), L, DIM, LENGTHS, seed=seed + 3)
    layer(seq, random_target(len(LENGTHS), DIM))
    # non-zero biases and larger anchors than the zero/glorot init, so that every term
    # of the reformulation (the dropped q . b^K, the b^V folded after the pooling,
    # the W^O bias of an empty user) is exercised
    rng = np.random.default_rng(seed)
    layer.set_weights([w + rng.normal(size=w.shape).astype(w.dtype) * 0.3
                       for w in layer.get_weights()])
    return layer, seq


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_user_cache_equals_reference_formulation(config):
    layer, seq = _layer(config)
    want = layer.user_cache_reference(seq)
    for s in (seq, _pad_more(seq, 5, garbage=True)):
        got = layer.user_cache(s)
        np.testing.assert_allclose(got["centroids"].numpy(), want["centroids"].numpy(),
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(got["centroid_mask"].numpy(),
                                      want["centroid_mask"].numpy())
    mask = want["centroid_mask"].numpy()
    assert mask[0].sum() == 0                                   # empty user: nothing
    if config.get("denoise", True):
        # one behavior, all anchors tied at A = 1: it goes to the lowest index(es)
        k = config.get("assignments", 1)
        np.testing.assert_array_equal(mask[1], np.arange(mask.shape[1]) < k)
    # and not trivially: the users' caches differ
    assert np.abs(want["centroids"].numpy()[2] - want["centroids"].numpy()[3]).max() > 1e-2


def test_user_cache_equals_reference_in_a_graph():
    layer, seq = _layer({})
    fast = tf.function(lambda s: layer.user_cache(s))(seq)
    ref = tf.function(lambda s: layer.user_cache_reference(s))(seq)
    np.testing.assert_allclose(fast["centroids"].numpy(), ref["centroids"].numpy(),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("config", [{}, {"num_heads": 3, "head_dim": 3}], ids=str)
def test_inference_attention_equals_encoder_call(config):
    layer, seq = _layer(config)
    enc = layer.encode(seq, reference=True)     # the literal blocks
    anchors, att_t = layer.encoder.inference_attention(seq["emb"], seq["mask"],
                                                       with_anchors=True)
    mask = seq["mask"].numpy()
    want_a = enc["attention"].numpy().transpose(0, 2, 1)               # [B, L, J]
    has = mask.any(1)
    # A rows of users with a behavior; 0 at their padded positions (exp underflow)
    np.testing.assert_allclose(att_t.numpy()[has], want_a[has], rtol=RTOL, atol=ATOL)
    assert (att_t.numpy()[has][mask[has] == 0] == 0).all()
    # O^enc of every user, the empty one included (its heads are 0: O = LN(.. W^O bias))
    np.testing.assert_allclose(anchors.numpy(), enc["anchors"].numpy(), rtol=RTOL,
                               atol=ATOL)
    assert layer.encoder.inference_attention(seq["emb"], seq["mask"])[0] is None


HAND_A = np.array([[[0.1, 0.5, 0.2, 0.3], [0.6, 0.1, 0.2, 0.3], [0.3, 0.4, 0.6, 0.3]]],
                  np.float32)                                  # [1, J=3, L=4]
HAND_E = np.array([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, -1.0]]], np.float32)


@pytest.mark.parametrize("norm", ["weighted_mean", "sum"])
@pytest.mark.parametrize("k", [1, 2])
def test_centroids_from_rows_hand_computed(norm, k):
    """Behavior 3 ties across all anchors (0.3): k = 1 gives it to anchor 0, k = 2 to
    anchors 0 and 1; behavior 2 is padding."""
    mask = np.array([[1, 1, 0, 1]], np.float32)
    got = DenoiseAssign(k, norm).centroids_from_rows(
        tf.constant(HAND_A.transpose(0, 2, 1)), tf.constant(HAND_E), tf.constant(mask))
    ref = DenoiseAssign(k, norm)(tf.constant(HAND_A), tf.constant(HAND_E), tf.constant(mask))
    # k = 1: c = (1, 0, -, 0): mu_0 = 0.5 e1 + 0.3 e3, mu_1 = 0.6 e0, mu_2 empty
    # k = 2: c_0 = {1, 2}, c_1 = {0, 2}, c_3 = {0, 1} (the tie: lowest indices)
    if k == 1:
        mu = np.array([0.5 * HAND_E[0, 1] + 0.3 * HAND_E[0, 3], 0.6 * HAND_E[0, 0],
                       [0.0, 0.0]])
        mass = np.array([0.8, 0.6, 1.0])
        sizes = [2, 1, 0]
    else:
        mu = np.array([0.5 * HAND_E[0, 1] + 0.3 * HAND_E[0, 3],
                       0.6 * HAND_E[0, 0] + 0.3 * HAND_E[0, 3],
                       0.3 * HAND_E[0, 0] + 0.4 * HAND_E[0, 1]])
        mass = np.array([0.8, 0.9, 0.7])
        sizes = [2, 2, 2]
    if norm == "weighted_mean":
        mu = mu / mass[:, None]
    np.testing.assert_allclose(got["centroids"].numpy()[0], mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["centroids"].numpy(), ref["centroids"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(got["mask"].numpy()[0], np.array(sizes) > 0)
    np.testing.assert_array_equal(got["mask"].numpy(), ref["mask"].numpy())


def test_centroids_from_rows_rejects_k_above_j():
    with pytest.raises(ValueError, match="assignments k=4 > num_clusters J=3"):
        DenoiseAssign(4).centroids_from_rows(tf.constant(HAND_A.transpose(0, 2, 1)),
                                             tf.constant(HAND_E), tf.ones([1, 4]))


def test_same_variables_as_before():
    """The reformulation reads the existing weights and creates none: a checkpoint of
    the earlier code loads unchanged (same names, shapes, count)."""
    layer, seq = _layer({})
    names = [(w.name, tuple(w.shape)) for w in layer.weights]
    layer.user_cache(seq)
    assert [(w.name, tuple(w.shape)) for w in layer.weights] == names
    enc = [n for n, _ in names if "/encoder/" in n or n.startswith("encoder/")]
    # anchors + per layer: attention (8), norm1/norm2 (gamma, beta), ffn1/ffn2 (kernel, bias)
    assert len(enc) == 1 + 2 * (8 + 2 * 2 + 2 * 2), enc
    assert any(n.endswith("/encoder/layer_1/attention/wk:0") for n in enc), enc


def test_export_jit_user_tower_equals_graph_user_tower(tiny_data, tmp_path):
    """serving.export ``jit_user_tower``: the same user_tower outputs as the plain
    export for batch sizes that are and are not powers of two (padded rows cut off),
    and the export meta records it."""
    from serving import export as X
    from tfmodels import schema as S
    from tfmodels.model import build_model
    fs = S.FeatureSchema.from_data_dir(tiny_data, 5, 20)
    tf.keras.utils.set_random_seed(0)
    model = build_model(fs, "cformer", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    plain = X.export_model(model, str(tmp_path), "plain", 1)
    jit = X.export_model(model, str(tmp_path), "jit", 1, jit_user_tower=True)
    assert X.read_export_meta(jit["path"])["jit_user_tower"] is True
    assert X.read_export_meta(plain["path"])["jit_user_tower"] is False
    files = sorted(tf.io.gfile.glob(S.split_pattern(tiny_data, "test")))
    recs = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    f_plain = tf.saved_model.load(plain["path"]).signatures["user_tower"]
    f_jit = tf.saved_model.load(jit["path"]).signatures["user_tower"]
    for n in (1, 3, 4):
        batch = tf.constant(recs[:n])
        want, got = f_plain(records=batch), f_jit(records=batch)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].shape == want[k].shape, k
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg=k)
    assert want["centroid_mask"].numpy().sum() > 0            # not all empty users


def test_bench_precompute_table_with_xla_rows(capsys):
    """``bench precompute --precompute_xla both``: each row's "vs runinference" is
    against the runinference row of the same export (XLA or not)."""
    from lifelong.bench import precompute as BP
    row = dict(model="cformer", L=10, users=1001, startup_s=2.0, record_bytes_per_user=10.0,
               store_bytes_per_user=8, cache_tensors={"c": [1, 2]},
               steady_cpu_ms_per_user=2.0, tower_cpu_ms_per_user=1.0)
    res = {"rows": [dict(row, xla=False, engine="runinference", steady_users_per_s=100.0),
                    dict(row, xla=False, engine="batched", steady_users_per_s=200.0),
                    dict(row, xla=True, engine="runinference", steady_users_per_s=50.0),
                    dict(row, xla=True, engine="batched", steady_users_per_s=300.0)]}
    BP.print_precompute(res, "cmd")
    lines = [l.split(" | ") for l in capsys.readouterr().out.splitlines()
             if l.startswith("| cformer")]
    assert [(l[0], l[1], l[4]) for l in lines] == [
        ("| cformer", "runinference", "1.00x"), ("| cformer", "batched", "2.00x"),
        ("| cformer (XLA user_tower)", "runinference", "1.00x"),
        ("| cformer (XLA user_tower)", "batched", "6.00x")]


# ---- issue 22: the training step's formulation (encoder and "1*" decoder) ----------------
TRAIN_CONFIGS = [{}, {"num_heads": 3, "head_dim": 3, "encoder_layers": 3, "denoise": False},
                 {"decoder_layers": 2, "centroid_norm": "sum", "stop_grad_target": True}]


def _train_step(layer, seq, target, reference, monkeypatch):
    """Output, auxiliary loss and gradients (all variables and the behavior embeddings)
    of one training call; ``reference`` runs the per-block layers (the code before)."""
    monkeypatch.setattr(cformer_module, "_REFERENCE_TRAINING", reference)
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer(dict(seq, emb=emb), target, training=True)
        aux = tf.add_n(layer.losses)
        # an output weighting that gives every output dim its own gradient
        loss = tf.reduce_sum(out * tf.range(1.0, 1.0 + out.shape[-1])) + aux
    grads = tape.gradient(loss, layer.trainable_variables + [emb])
    return out.numpy(), aux.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=str)
def test_training_formulation_equals_reference_with_gradients(config, monkeypatch):
    """CFormerEncoder.training_attention and CFormerDecoder._one_star (keys, values and
    queries never projected over L) against the literal blocks: the same output, aux
    loss (L_recon + alpha L_orth) and gradient of every variable and of E^S, up to
    float rounding (1e-5 of each tensor's scale), on users with padding, an empty user
    and a one-behavior user, with non-zero biases."""
    layer, seq = _layer(config)
    target = random_target(len(LENGTHS), DIM, seed=5)
    fast = _train_step(layer, seq, target, False, monkeypatch)
    ref = _train_step(layer, seq, target, True, monkeypatch)
    np.testing.assert_allclose(fast[0], ref[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fast[1], ref[1], rtol=RTOL, atol=ATOL)
    names = [v.name for v in layer.trainable_variables] + ["emb"]
    for name, got, want in zip(names, fast[2], ref[2]):
        scale = max(1.0, float(np.abs(want).max()))
        if name.endswith("/bk:0"):
            # b^K shifts every logit of a softmax row equally: its gradient is 0 in
            # exact arithmetic, rounding noise in both formulations.
            assert np.abs(got).max() < 1e-4 * scale and np.abs(want).max() < 1e-4 * scale
            continue
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_training_attention_masks_padding_and_empty_users():
    """A of the training formulation: rows sum to 1 over the valid behaviors, exact 0 on
    padding and for the empty user; garbage in padded slots changes nothing."""
    layer, seq = _layer({})
    mask = seq["mask"].numpy()
    _, att = layer.encoder.training_attention(seq["emb"], seq["mask"])
    att = att.numpy()                                                     # [B, J, L]
    np.testing.assert_allclose(att.sum(-1)[mask.any(1)], 1.0, rtol=1e-5)
    assert (att[0] == 0).all()                                            # empty user
    assert (np.transpose(att, (0, 2, 1))[mask == 0] == 0).all()
    garbage = tf.where(seq["mask"][..., None] > 0, seq["emb"], 1e3)
    _, att2 = layer.encoder.training_attention(garbage, seq["mask"])
    np.testing.assert_array_equal(att2.numpy(), att)
