"""`lifelong lcn-consistency` (lifelong/reports/lcn_consistency.py) and LAP.level_scores:
the share of FSA's whole-window top-K2 that LAP's earlier levels keep (METHODS 2.5,
the paper's consistency analysis)."""
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from lifelong import cli
from lifelong.reports import lcn_consistency as R
from tfmodels import schema as S
from tfmodels.methods.lcn import LAP
from tfmodels.testing import random_sequence, random_target

D = 8


def _lap(seq, target, **cfg):
    tf.keras.utils.set_random_seed(0)
    layer = LAP(D, **cfg)
    layer(seq, target)
    return layer


def _ranked(score, valid, pool=None):
    """Valid positions (within pool) by score descending, ties by position (plain Python)."""
    cand = [i for i in range(len(score)) if valid[i] and (pool is None or i in pool)]
    return sorted(cand, key=lambda i: (-float(score[i]), i))


def _numpy_scores(layer, seq, target):
    """CSA / MSA / head-averaged FSA logits [N, L] in float64 NumPy from the weights
    (context: engage and the request-time gap, as tests/test_lcn.py builds e^c)."""
    w = {v.name.split("/")[-1].split(":")[0]: v.numpy().astype(np.float64)
         for v in layer.weights}
    emb = seq["emb"].numpy().astype(np.float64)
    mask = seq["mask"].numpy().astype(np.float64)
    q = target["emb"].numpy().astype(np.float64)
    gap = np.asarray(target["ts"]).reshape(-1, 1) - seq["ts"].numpy()
    ids = np.where(mask > 0, S.gap_bucket_np(gap), 0)
    ctx = {"gap_bucket": layer.gap_table.get_weights()[0][ids] * mask[..., None]}
    k, b = layer.engage_dense.get_weights()
    ctx["engage"] = np.tanh((seq["engage"].numpy() * mask)[..., None] * k[0] + b) * mask[..., None]
    x = np.concatenate([emb * mask[..., None]] + [ctx[f] for f in layer.context_features], -1)
    csa = np.einsum("nld,nd->nl", emb * mask[..., None], q)
    msa = np.einsum("nla,na->nl", x @ w["w_k_msa"], q @ w["w_q_msa"]) / math.sqrt(
        layer.attention_dim)
    l, dh = layer.num_heads, layer.head_dim
    keys = (x @ w["w_k_fsa"]).reshape(*x.shape[:2], l, dh)
    qh = (q @ w["w_q_fsa"]).reshape(-1, l, dh)
    fsa = np.einsum("nlhc,nhc->nl", keys, qh) / math.sqrt(dh) / l
    return csa, msa, fsa, mask


def test_level_scores_match_numpy_and_attends_selections():
    """level_scores = N7 / N9 / the mean over heads of N11's logits over all L; top-K1 of
    its CSA score and top-K2 of its MSA score within that are attend's index1 / index2."""
    seq = random_sequence(4, 16, D, lengths=(16, 11, 3, 0), seed=3)
    target = random_target(4, D, seed=4)
    layer = _lap(seq, target, k1=6, k2=3)
    got = {k: v.numpy() for k, v in layer.level_scores(layer.user_cache(seq), target).items()}
    csa, msa, fsa, mask = _numpy_scores(layer, seq, target)
    for name, want in (("csa", csa), ("msa", msa), ("fsa", fsa)):
        np.testing.assert_allclose(got[name] * mask, want * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["mask"], mask)
    out = layer.attend(layer.user_cache(seq), target)
    for n in range(3):                                  # rows with a valid item
        valid = mask[n] > 0
        k1, k2 = min(6, int(valid.sum())), min(3, int(valid.sum()))
        sel1 = R.top_k(got["csa"][n], valid, 6)
        assert set(np.flatnonzero(sel1)) == set(out["index1"].numpy()[n][:k1].tolist())
        sel2 = R.top_k(got["msa"][n], valid, 3, sel1)
        assert set(np.flatnonzero(sel2)) == set(out["index2"].numpy()[n][:k2].tolist())


def _identity_lap(seq, target):
    """MSA and FSA with identity maps and no context: r^msa = mean_h FSA logit =
    r^csa / sqrt(d), so every level ranks the window as CSA does."""
    layer = _lap(seq, target, k1=6, k2=3, num_heads=1, context_features=[])
    eye = np.eye(D, dtype=np.float32)
    for v in (layer.w_q_msa, layer.w_k_msa, layer.w_q_fsa, layer.w_k_fsa):
        v.assign(eye)
    return layer


def test_shares_are_one_when_fsa_ranks_as_csa():
    seq = random_sequence(3, 20, D, lengths=(20, 9, 2), seed=5)
    target = random_target(3, D, seed=6)
    layer = _identity_lap(seq, target)
    s = {k: v.numpy() for k, v in layer.level_scores(layer.user_cache(seq), target).items()}
    np.testing.assert_allclose(s["fsa"], s["csa"] / math.sqrt(D), rtol=1e-5, atol=1e-6)
    for n in range(3):
        p = R.pair_shares(s["csa"][n], s["msa"][n], s["fsa"][n], s["mask"][n], [1, 3, 5, 20], 3)
        assert p["oracle"] == min(3, int(s["mask"][n].sum()))
        assert p["csa_topk2"] == 1.0
        for k1 in (3, 5, 20):
            assert p["per_k1"][k1] == {"csa": 1.0, "lap": 1.0, "csa_fsa": 1.0}
        # K1 = 1 < K2: each level keeps 1 of the |O| items (the module clamps K2 to K1)
        want = 1.0 / p["oracle"]
        assert p["per_k1"][1] == {"csa": want, "lap": want, "csa_fsa": want}


def test_shares_equal_a_numpy_count_when_the_levels_disagree():
    seq = random_sequence(4, 30, D, lengths=(30, 24, 13, 0), seed=7)
    target = random_target(4, D, seed=8)
    layer = _lap(seq, target, k1=8, k2=4)
    s = {k: v.numpy() for k, v in layer.level_scores(layer.user_cache(seq), target).items()}
    csa, msa, fsa, mask = _numpy_scores(layer, seq, target)
    k2, below_one = 4, 0
    for n in range(4):
        p = R.pair_shares(s["csa"][n], s["msa"][n], s["fsa"][n], s["mask"][n], [4, 8, 16], k2)
        valid = mask[n] > 0
        if not valid.any():
            assert p is None
            continue
        oracle = set(_ranked(fsa[n], valid)[:k2])
        assert p["csa_topk2"] == len(set(_ranked(csa[n], valid)[:k2]) & oracle) / len(oracle)
        for k1 in (4, 8, 16):
            pool = set(_ranked(csa[n], valid)[:k1])
            lap = set(_ranked(msa[n], valid, pool)[:min(k2, k1)])
            cascade = set(_ranked(fsa[n], valid, pool)[:k2])
            want = {"csa": len(pool & oracle) / len(oracle), "lap": len(lap & oracle) / len(oracle),
                    "csa_fsa": len(cascade & oracle) / len(oracle)}
            assert p["per_k1"][k1] == pytest.approx(want), (n, k1)
            assert want["csa_fsa"] == want["csa"]          # (c) = (a), as the docs say
            below_one += want["lap"] < 1.0
    assert below_one > 0                                   # the levels do disagree here


def test_k1_list_parsing():
    assert R.parse_k1s("50,100,200,L/4", 1000) == [50, 100, 200, 250]
    assert R.parse_k1s("50,100,200,L/4", 120) == [30, 50, 100, 120]    # clamped, sorted
    assert R.parse_k1s("L, 8", 40) == [8, 40]
    for bad in ("0", "x", "L/0", ""):
        with pytest.raises(Exception, match="--k1s"):
            R.parse_k1s(bad, 40)


# ---- the command ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Run directories of lcn and din as `lifelong train` leaves them for
    :func:`tfmodels.train.load_run` (config.json, run.json's feature_schema, final/
    weights), written without training: a fit would cost tens of seconds here."""
    import dataclasses
    from tfmodels import data as D
    from tfmodels import train as T
    root = tmp_path_factory.mktemp("lcn_runs")
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 8)))
    out = {}
    for model in ("lcn", "din"):
        out[model] = str(root / model)
        cfg = T.TrainConfig(data=tiny_data, model=model, out_dir=out[model], short_len=5,
                            long_len=24, emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4])
        schema = T.feature_schema_for(cfg)
        tf.keras.utils.set_random_seed(0)
        m = T.model_from_config(cfg, schema)
        m(batch, training=False)
        os.makedirs(os.path.join(out[model], "final"))
        with open(os.path.join(out[model], "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f)
        with open(os.path.join(out[model], "run.json"), "w") as f:
            json.dump({"feature_schema": schema.to_dict()}, f)
        tf.train.Checkpoint(model=m).write(os.path.join(out[model], "final", "weights"))
    return out


def _check_outputs(out_dir, k1s):
    with open(os.path.join(out_dir, "consistency.json")) as f:
        r = json.load(f)
    with open(os.path.join(out_dir, "consistency.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [int(k) for k in r["per_k1"]] == k1s
    assert r["pairs"] == len(r["per_pair"]) > 0
    for k1 in r["per_k1"]:                                 # table = mean over pairs
        for key in ("csa", "lap", "csa_fsa"):
            assert r["per_k1"][k1][key] == pytest.approx(
                np.mean([p["per_k1"][k1][key] for p in r["per_pair"]]))
    return r


def test_command_on_an_untrained_model(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "untrained")
    assert cli.main(["lcn-consistency", "--data", tiny_data, "--long_len", "40",
                     "--short_len", "5", "--emb_dim", "4", "--k1s", "5,10,L/4,L", "--k2", "4",
                     "--num_users", "6", "--candidates_per_user", "2",
                     "--out_dir", out]) == 0
    table = capsys.readouterr().out
    assert "| K1 | (a) CSA top-K1 | (b) LAP" in table and "| 40 * |" in table
    r = _check_outputs(out, [5, 10, 40])
    assert r["users"] == 6 and r["pairs"] <= 12 and not r["trained"] and r["k2"] == 4
    users = [p["user_id"] for p in r["per_pair"]]
    assert max(users.count(u) for u in users) <= 2


def test_command_on_a_trained_run_and_refusals(runs, tmp_path, capsys):
    assert cli.main(["lcn-consistency", "--run", runs["lcn"], "--num_users", "4",
                     "--k1s", "3,6,L/4", "--k2", "3"]) == 0
    r = _check_outputs(os.path.join(runs["lcn"], "lcn_consistency"), [3, 6])
    assert r["trained"] and r["model"] == "lcn" and r["long_len"] == 24
    capsys.readouterr()
    # a run of another model: one line, nothing written
    assert cli.main(["lcn-consistency", "--run", runs["din"], "--out_dir",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lifelong lcn-consistency: error: {runs['din']!r} is a 'din' model; "
                   "lcn-consistency needs an LCN model (LAP: lcn, lcn_k1_only)"]
    assert not os.path.exists(tmp_path / "x")
    # neither --run nor --data; --long_len with a run
    assert cli.main(["lcn-consistency"]) == 2
    assert "give --run RUN_DIR" in capsys.readouterr().err
    assert cli.main(["lcn-consistency", "--run", runs["lcn"], "--long_len", "50"]) == 2
    assert "--long_len is for an untrained model" in capsys.readouterr().err
