"""CRP (LCN's contrastive loss, METHODS 2.5 N3-N6; tfmodels/crp.py) and its wiring.

Faithfulness test 4: the loss equals -s_pos/tau + logsumexp(s_neg/tau) on hand cases
(InfoNCE alone, and a whole batch whose every cosine is fixed by construction);
negatives never pair two items of the same user; the loss falls when positive pairs
align. Test 5: inference (graph and exported SavedModel) holds no CRP op and gives the
same p with CRP on or off for the same weights. Plus: L = L_CTR + lambda_CRP L_CRP
in training and the crp_loss metric of fit.
"""
import glob
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import crp
from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import write_tiny_dataset

TAU = 0.1
CFG = dict(emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))


def _seq(emb, lengths):
    emb = np.asarray(emb, np.float32)
    mask = (np.arange(emb.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return {"emb": tf.constant(emb * mask[..., None]), "mask": tf.constant(mask)}


def test_info_nce_equals_the_printed_formula_by_hand():
    s_pos = np.array([0.5, -0.2, 0.9], np.float32)
    s_neg = np.array([0.1, 0.3, 0.9, -0.4], np.float32)
    pos_valid, neg_valid = np.array([1, 1, 0], bool), np.array([1, 1, 0, 1], bool)
    lse = np.log(np.exp(1.0) + np.exp(3.0) + np.exp(-4.0))       # valid negatives / tau
    want = np.mean([-5.0 + lse, 2.0 + lse])                        # valid positives only
    got = crp.info_nce(tf.constant(s_pos), tf.constant(pos_valid), tf.constant(s_neg),
                       tf.constant(neg_valid), TAU)
    assert abs(float(got) - want) < 1e-5
    # no valid negative or no valid positive: no term
    assert float(crp.info_nce(tf.constant(s_pos), tf.constant(pos_valid), tf.constant(s_neg),
                              tf.zeros(4, tf.bool), TAU)) == 0.0
    assert float(crp.info_nce(tf.constant(s_pos), tf.zeros(3, tf.bool), tf.constant(s_neg),
                              tf.constant(neg_valid), TAU)) == 0.0


def _hand_batch():
    """Rows: user 5 (twice: two impressions), user 6, user 9 (empty sequences).

    Every H_T item of user 5 points along x, of user 6 along y; every H_S item of user 5
    along y, of user 6 along x. So every cosine is fixed whatever the draw: positives
    PT = PS = 1, PC = 0; negatives TT = SS = 0 (x vs y), TS = 1 (x with x, y with y).
    Valid items: H_T 2 + 2 (user 5, twice) + 3 (user 6) + 0; H_S 2 + 2 + 1 + 0.
    """
    x, y, z = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
    users = np.array([5, 5, 6, 9])
    emb_t = [[x, [2, 0], z], [[3, 0], x, z], [y, [0, 2], [0, 5]], [z, z, z]]
    emb_s = [[y, [0, 3], z], [[0, 4], y, z], [x, z, z], [z, z, z]]
    return users, _seq(emb_t, [2, 2, 3, 0]), _seq(emb_s, [2, 2, 1, 0])


@pytest.mark.parametrize("m", [4096, 5])
def test_crp_loss_on_a_hand_batch(m):
    users, seq_t, seq_s = _hand_batch()
    out = crp.crp_loss(tf.constant(users), seq_t, seq_s, tf.constant([3, 11]), m, TAU,
                       return_pairs=True)
    # distinct cross-user pairs P: TT 7*7 - (4*4 + 3*3) = 24; SS 5*5 - (4*4 + 1) = 8;
    # TS 7*5 - (4*4 + 3*1) = 16. M_eff = min(M, P) copies of one negative logit each.
    # PT: rows 0-2 contribute (>= 2 items), row 3 not: -1/tau + log(M_eff * e^0)
    want_pt = -10.0 + np.log(min(m, 24))
    # PS: row 2 (1 item) and row 3 contribute nothing: rows 0, 1
    want_ps = -10.0 + np.log(min(m, 8))
    # PC: rows 0-2 (row 3 empty): -0/tau + log(M_eff * e^(1/tau))
    want_pc = 0.0 + 10.0 + np.log(min(m, 16))
    for kind, want in (("pt", want_pt), ("ps", want_ps), ("pc", want_pc)):
        assert abs(float(out[kind]) - want) < 1e-4, (kind, float(out[kind]), want)
        pairs = {k: v.numpy() for k, v in out["pairs"][kind].items()}
        np.testing.assert_array_equal(pairs["neg_valid"].sum(), min(m, {"pt": 24, "ps": 8,
                                                                         "pc": 16}[kind]))
    np.testing.assert_array_equal(out["pairs"]["pt"]["pos_valid"].numpy(), [1, 1, 1, 0])
    np.testing.assert_array_equal(out["pairs"]["ps"]["pos_valid"].numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(out["pairs"]["pc"]["pos_valid"].numpy(), [1, 1, 1, 0])
    assert abs(float(out["crp"]) - (want_pt + want_ps + want_pc)) < 1e-4   # lambdas = 1


def _random_batch(rng, users, s=6, d=8, aligned=False):
    b = len(users)
    lt, ls = rng.integers(0, s + 1, size=b), rng.integers(0, s + 1, size=b)
    et, es = rng.normal(size=(b, s, d)), rng.normal(size=(b, s, d))
    if aligned:   # every item of a user (both domains) along that user's own direction
        direction = {u: rng.normal(size=d) for u in set(users)}
        base = np.stack([direction[u] for u in users])[:, None, :]
        scale = rng.uniform(0.5, 2.0, size=(b, s, 1))
        et, es = base * scale, base * scale[:, ::-1]
    return _seq(et, lt), _seq(es, ls)


def test_negatives_never_pair_two_items_of_the_same_user_and_positives_are_valid():
    rng = np.random.default_rng(0)
    for trial in range(10):
        users = rng.integers(2, 6, size=12)            # few users: many repeated rows
        seq_t, seq_s = _random_batch(rng, users)
        out = crp.crp_loss(tf.constant(users), seq_t, seq_s, tf.constant([trial, 1]), 256,
                           TAU, return_pairs=True)
        mask = {"t": seq_t["mask"].numpy(), "s": seq_s["mask"].numpy()}
        for kind, (x, y) in zip(crp.KINDS, (("t", "t"), ("s", "s"), ("t", "s"))):
            p = {k: v.numpy() for k, v in out["pairs"][kind].items()}
            v = p["neg_valid"]
            assert v.any()
            assert np.all(users[p["neg_row_a"][v]] != users[p["neg_row_b"][v]])
            assert np.all(mask[x][p["neg_row_a"][v], p["neg_pos_a"][v]] == 1)
            assert np.all(mask[y][p["neg_row_b"][v], p["neg_pos_b"][v]] == 1)
            rows = np.flatnonzero(p["pos_valid"])
            assert np.all(mask[x][rows, p["pos_a"][rows]] == 1)
            assert np.all(mask[y][rows, p["pos_b"][rows]] == 1)
            if x == y:
                assert np.all(p["pos_a"][rows] != p["pos_b"][rows])
                n = mask[x].sum(1)
                np.testing.assert_array_equal(p["pos_valid"], n >= 2)


def test_negative_draws_cover_every_other_user_item_uniformly():
    """The second item of a negative is uniform over the items of the OTHER users:
    with one a-item of user 2, the b-items of users 3 and 4 (1 + 3 items) are hit in
    proportion 1 : 3 and user 2's own b-items never."""
    users = np.array([2, 3, 4])
    mask_a = tf.constant([[1, 0, 0], [0, 0, 0], [0, 0, 0]], tf.float32)
    mask_b = tf.constant([[1, 1, 1], [1, 0, 0], [1, 1, 1]], tf.float32)
    ra, _, rb, _, valid = crp.negative_pairs(tf.constant(users, tf.int64), mask_a, mask_b,
                                             4000, tf.constant([1, 2], tf.int64))
    assert np.all(ra.numpy() == 0) and np.all(valid.numpy()[:4])
    # P = 1 * 7 - 3 = 4 distinct pairs: M_eff = 4
    assert valid.numpy().sum() == 4
    counts = np.bincount(rb.numpy(), minlength=3)
    assert counts[0] == 0
    assert abs(counts[2] / 4000 - 0.75) < 0.03


def test_loss_falls_when_positive_pairs_align():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(2, 10), 2)
    seed = tf.constant([4, 0])
    rand = crp.crp_loss(tf.constant(users), *_random_batch(np.random.default_rng(2), users),
                        seed, 512, TAU)
    aligned = crp.crp_loss(tf.constant(users),
                           *_random_batch(np.random.default_rng(2), users, aligned=True),
                           seed, 512, TAU)
    for kind in crp.KINDS:
        assert float(aligned[kind]) < float(rand[kind]) - 3.0, kind
    # and gradient steps on the embeddings themselves lower it
    t, s = _random_batch(rng, users)
    et, es = tf.Variable(t["emb"]), tf.Variable(s["emb"])
    losses = []
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = crp.crp_loss(tf.constant(users), {"emb": et, "mask": t["mask"]},
                                {"emb": es, "mask": s["mask"]}, seed, 512, TAU)["crp"]
        g = tape.gradient(loss, [et, es])
        et.assign_sub(0.5 * g[0])
        es.assign_sub(0.5 * g[1])
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses


# ---- wiring into the model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_domain(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("crp")), num_users=16, seed=2,
                              domains=2)


@pytest.fixture(scope="module")
def schema(two_domain):
    return S.FeatureSchema.from_data_dir(two_domain, 5, 12, cross_domain=True)


@pytest.fixture(scope="module")
def batch(two_domain):
    return next(iter(D.make_dataset(S.split_pattern(two_domain, "train"), 5, 12, 32,
                                    cross_domain=True)))


def test_training_loss_is_ctr_plus_weighted_crp(schema, batch):
    tf.keras.utils.set_random_seed(0)
    model = build_model(schema, "din_l", crp_weight=0.1, crp_negatives=64, crp_seed=7, **CFG)
    model(batch, training=True)
    assert len(model.losses) == 1
    shorts = {p: model.embed_sequence(batch, p) for p in ("short_t", "short_s")}
    want = crp.crp_loss(batch["user_id"], shorts["short_t"], shorts["short_s"],
                        tf.constant([7, 0], tf.int64), 64, 0.1)["crp"]   # uncompiled: step 0
    assert abs(float(model.losses[0]) - 0.1 * float(want)) < 1e-5
    assert abs(float(model.crp_tracker.result()) - float(want)) < 1e-5
    model(batch, training=False)
    assert model.losses == []     # inference adds nothing


def test_fit_reports_crp_loss(schema, two_domain):
    tf.keras.utils.set_random_seed(0)
    model = build_model(schema, "din", crp_weight=0.1, crp_negatives=64, **CFG)
    # eager train step: seconds instead of a trace (the graph trace of the CRP training
    # path is covered by the inference test below)
    model.compile(tf.keras.optimizers.Adam(1e-2), run_eagerly=True)
    ds = D.make_dataset(S.split_pattern(two_domain, "train"), 5, 12, 16, shuffle=True, seed=0,
                        repeat=True, cross_domain=True)
    h = model.fit(ds, steps_per_epoch=1, epochs=2, verbose=0).history
    assert len(h["crp_loss"]) == 2
    # one step per epoch: the regularization loss of that step is lambda * L_CRP
    for crp_value, reg in zip(h["crp_loss"], h["regularization_loss"]):
        assert abs(0.1 * crp_value - reg) < 1e-4 * max(1.0, abs(reg))
        assert crp_value != 0.0


def _op_names(graph_def):
    names = [n.name for n in graph_def.node]
    for f in graph_def.library.function:
        names += [n.name for n in f.node_def]
    return names


def test_inference_holds_no_crp_op_and_p_is_the_same_with_crp_on_or_off(schema, batch,
                                                                       tmp_path):
    from serving import export as E
    tf.keras.utils.set_random_seed(0)
    on = build_model(schema, "sim_soft", crp_weight=0.1, crp_negatives=64, **CFG)
    tf.keras.utils.set_random_seed(1)
    off = build_model(schema, "sim_soft", **CFG)
    on(batch, training=True)            # CRP ran once in training
    off(batch, training=True)           # (builds SIM soft's training-only auxiliary head too)
    off.set_weights(on.get_weights())
    p_on = on.predict_ctr(batch, training=False).numpy()
    p_off = off.predict_ctr(batch, training=False).numpy()
    np.testing.assert_array_equal(p_on, p_off)
    specs = {n: tf.TensorSpec([None] + s.shape.as_list()[1:], s.dtype)
             for n, s in schema.feature_specs().items()}
    specs["user_id"] = tf.TensorSpec([None], tf.int64)
    infer = tf.function(lambda f: on(f, training=False)).get_concrete_function(specs)
    train = tf.function(lambda f: on(f, training=True)).get_concrete_function(specs)
    assert not [n for n in _op_names(infer.graph.as_graph_def()) if "crp" in n.lower()]
    assert [n for n in _op_names(train.graph.as_graph_def()) if "crp/" in n]   # control
    # the exported SavedModel (user_tower, rank, serving_default) holds no CRP op
    out = E.export_model(on, str(tmp_path), "crp_on", 1)
    from tensorflow.core.protobuf import saved_model_pb2
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(out["path"], "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    names = [n for mg in sm.meta_graphs for n in _op_names(mg.graph_def)]
    assert len(names) > 100 and not [n for n in names if "crp" in n.lower()]
    sig = tf.saved_model.load(out["path"]).signatures["serving_default"]
    feats = {n: batch[n] for n in on.feature_names("all")}
    np.testing.assert_allclose(sig(**feats)["ctr"].numpy(), p_on, atol=1e-6)
    assert glob.glob(os.path.join(out["path"], "variables", "*"))


# ---- per-kind weights (crp_lambdas): "L_PT + L_PS only" (the paper's Table 1 row) ------------
def test_lambdas_1_1_0_give_pt_plus_ps_on_the_hand_batch():
    users, seq_t, seq_s = _hand_batch()
    m = 5
    out = crp.crp_loss(tf.constant(users), seq_t, seq_s, tf.constant([3, 11]), m, TAU,
                       lambdas=(1.0, 1.0, 0.0))
    # by hand (see test_crp_loss_on_a_hand_batch): L_PT = -10 + log 5, L_PS = -10 + log 5
    want = (-10.0 + np.log(min(m, 24))) + (-10.0 + np.log(min(m, 8)))
    assert abs(float(out["crp"]) - want) < 1e-4
    assert abs(float(out["crp"]) - float(out["pt"]) - float(out["ps"])) < 1e-6
    assert float(out["pc"]) > 1.0            # the PC term exists; its weight is 0
    weighted = crp.crp_loss(tf.constant(users), seq_t, seq_s, tf.constant([3, 11]), m, TAU,
                            lambdas=(0.5, 2.0, 3.0))
    assert abs(float(weighted["crp"]) - (0.5 * float(out["pt"]) + 2.0 * float(out["ps"])
                                         + 3.0 * float(out["pc"]))) < 1e-4


def test_model_with_lambdas_1_1_0_adds_weight_times_pt_plus_ps(schema, batch):
    tf.keras.utils.set_random_seed(0)
    model = build_model(schema, "din", crp_weight=0.1, crp_negatives=64, crp_seed=7,
                        crp_lambdas=(1, 1, 0), **CFG)
    assert model.get_config()["crp_lambdas"] == [1.0, 1.0, 0.0]
    model(batch, training=True)
    shorts = {p: model.embed_sequence(batch, p) for p in ("short_t", "short_s")}
    parts = crp.crp_loss(batch["user_id"], shorts["short_t"], shorts["short_s"],
                         tf.constant([7, 0], tf.int64), 64, 0.1)      # lambdas (1, 1, 1)
    want = 0.1 * (float(parts["pt"]) + float(parts["ps"]))
    assert abs(float(parts["pc"])) > 1e-3                              # PC would change it
    assert abs(float(model.losses[0]) - want) < 1e-5
    with pytest.raises(ValueError, match="crp_lambdas must be 3 numbers >= 0"):
        build_model(schema, "din", crp_weight=0.1, crp_lambdas=(1, 1), **CFG)


def test_crp_lambdas_flag_reaches_the_config_and_the_model(two_domain, schema, capsys):
    import dataclasses
    from lifelong import cli
    from tfmodels import train as T

    def config(*argv):
        args, _ = cli.build_parser(False, command="train").parse_known_args(
            ["train", "--data", two_domain, "--config_dir", "none", "--model", "din",
             "--cross_domain", "--crp_weight", "0.1", *argv])
        return cli._train_config(args)

    assert config().crp_lambdas == [1.0, 1.0, 1.0]                     # default
    cfg = config("--crp_lambdas", "1,1,0").validate()
    assert cfg.crp_lambdas == [1.0, 1.0, 0.0]
    assert dataclasses.asdict(cfg)["crp_lambdas"] == [1.0, 1.0, 0.0]   # config.json / run.json
    model = T.model_from_config(cfg, schema)
    assert model.crp_lambdas == [1.0, 1.0, 0.0]
    assert model.get_config()["crp_lambdas"] == [1.0, 1.0, 0.0]
    # bad values: one line naming the field
    for bad in ("1,1", "1,-1,0", "1,1,0,1"):
        with pytest.raises(T.ConfigError, match="crp_lambdas must be 3 numbers >= 0"):
            config("--crp_lambdas", bad).validate()
    with pytest.raises(cli.CliError, match="--crp_lambdas must be comma separated numbers"):
        config("--crp_lambdas", "1,x,0")
    assert cli.main(["train", "--data", two_domain, "--config_dir", "none", "--cross_domain",
                     "--crp_weight", "0.1", "--crp_lambdas", "1,1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lifelong train: error: crp_lambdas must be 3 numbers >= 0")


def test_crp_lambdas_in_a_model_config_file_and_set(tmp_path, two_domain):
    import json as _json
    from lifelong import cli
    from lifelong import model_configs as MC
    root = tmp_path / "configs" / "default"
    root.mkdir(parents=True)
    (root / "lcn_no_pc.json").write_text(_json.dumps(
        {"base": "din", "cross_domain": True, "crp_weight": 0.1, "crp_lambdas": [1, 1, 0]}))
    args, _ = cli.build_parser(False, command="train").parse_known_args(
        ["train", "--data", two_domain, "--config_dir", str(tmp_path / "configs"),
         "--model", "lcn_no_pc"])
    assert cli._train_config(args).validate().crp_lambdas == [1, 1, 0]
    args.set = ["lcn_no_pc.crp_lambdas=[1, 0.5, 0]"]
    assert cli._train_config(args).crp_lambdas == [1, 0.5, 0]
    args.set = ["lcn_no_pc.crp_lambdas=\"1,1,0\""]
    with pytest.raises(MC.ModelConfigError, match="'crp_lambdas' must be a list of numbers"):
        cli._train_config(args)
