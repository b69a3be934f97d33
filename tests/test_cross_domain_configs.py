"""Issue 18 leftovers and the cross-domain comparison configs.

* ``lifelong compare`` knows ``taobao_ad`` (``--source`` choice, ``detect_source`` of a
  Tianchi 56 folder);
* the cluster job knows two-domain data: taobao_ad's engagement mode and time-split
  snapshot, and clusters that never mix domains;
* ``configs-cross-domain/`` (docs/cross_domain.md, "Cross-domain comparison configs"):
  every variant resolves to the model, the CRP fields and the shared cross-domain
  training block it claims, and one variant trains a step on two-domain data.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

from lifelong import model_configs as MC

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "configs-cross-domain")
#: name -> (registered model, crp_weight, crp_lambdas) as the files resolve them
VARIANTS = {
    "lcn_crp": ("lcn", 0.1, None),
    "lcn": ("lcn", None, None),
    "lcn_crp_no_pc": ("lcn", 0.1, [1, 1, 0]),
    "lcn_k1_only_crp": ("lcn_k1_only", 0.1, None),
    "din": ("din", None, None),
    "din_l": ("din_l", None, None),
    "avg_pool": ("avg_pool", None, None),
    "sim_soft": ("sim_soft", None, None),
    "sim_soft_crp": ("sim_soft", 0.1, None),
    "lcn_crp_no_ctx": ("lcn", 0.1, None),
}
#: variants whose method block differs from the registry preset (name -> long_module_config)
METHOD_BLOCKS = {"lcn_crp_no_ctx": {"context_features": []}}
CRP_FIELDS = ("crp_weight", "crp_lambdas", "crp_negatives", "crp_tau")


# ---- compare: taobao_ad -----------------------------------------------------------------
def test_detect_source_taobao_ad_folder(tmp_path):
    from lifelong.compare import detect_source
    from tfmodels.errors import LifelongError
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "raw_sample.csv").write_text("user,time_stamp,adgroup_id,pid,nonclk,clk\n")
    assert detect_source(str(ad)) == "taobao_ad"
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    assert detect_source(str(ml)) == "movielens"
    for name in ("ratings.dat", "u.data"):        # ml-1m / ml-10m, ml-100k
        old = tmp_path / name
        old.mkdir()
        (old / name).write_text("1::2::3::4\n")
        assert detect_source(str(old)) == "movielens"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(LifelongError, match="raw_sample.csv"):
        detect_source(str(other))


def test_compare_accepts_source_taobao_ad():
    from lifelong import cli
    parser = cli.build_parser()
    args, _ = parser.parse_known_args(["compare", "--source", "taobao_ad", "--data", "x"])
    assert args.source == "taobao_ad"
    with pytest.raises(SystemExit):
        parser.parse_known_args(["compare", "--source", "nope"])


# ---- cluster job: two-domain data ---------------------------------------------------------
def _cluster_args(**kw):
    from beam_jobs import flags
    parser = argparse.ArgumentParser()
    flags.add_cluster_arguments(parser)
    argv = ["--data", "d", "--output", "o"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return parser.parse_args(argv)


def test_cluster_settings_taobao_ad():
    from beam_jobs import cluster as CJ
    meta = {"source": "taobao_ad", "protocol": "labeled_impressions_time_split",
            "split_rule": {"train_end_ts": 100, "valid_end_ts": 200},
            "vocab": {"num_domains": 3}}
    s = CJ.resolve_settings(_cluster_args(), meta)
    # btag codes pv 1 .. buy 4 -> one group per code; time split -> snapshot at the
    # valid/test boundary with the 14-day refresh; two domains -> split by domain
    assert (s["engage_mode"], s["snapshot_ts"], s["refresh_days"], s["split_domains"]) == \
        ("type", 200, 14.0, True)
    single = CJ.resolve_settings(_cluster_args(), {
        "source": "synthetic", "protocol": "labeled_impressions", "vocab": {"num_domains": 2}})
    assert (single["engage_mode"], single["snapshot_ts"], single["split_domains"]) == \
        ("ratio", None, False)


def _record(t=60, seed=0):
    rng = np.random.default_rng(seed)
    return {"user_id": 3, "user_key": "u3",
            "hist_item_id": rng.integers(2, 40, t), "hist_cate_id": rng.integers(2, 5, t),
            "hist_ts": np.arange(t, dtype=np.int64) * 10 + 1000,
            "hist_engage": np.full(t, 0.5, np.float32),      # one engagement group
            "hist_domain": rng.integers(1, 3, t),
            "imp_item_id": np.array([5]), "imp_cate_id": np.array([2]),
            "imp_ts": np.array([1000 + 10 * t]), "imp_label": np.array([1.0], np.float32),
            "imp_hist_index": np.array([t])}


@pytest.mark.parametrize("split_domains", [False, True])
def test_cluster_record_split_domains(split_domains):
    from beam_jobs.cluster_algo import Embedder
    from beam_jobs.cluster_snapshot import cluster_record
    rec = _record()
    (out,) = cluster_record(rec, Embedder(None, 8, 0), "ratio", keep_recent=0, gamma=20,
                            split_domains=split_domains)
    virtual = [m for m in out["members"] if len(m) > 1]
    assert virtual and sorted(i for m in out["members"] for i in m) == list(range(60))
    mixed = [m for m in virtual if len(set(rec["hist_domain"][m].tolist())) > 1]
    if split_domains:
        assert not mixed
        # a virtual item's domain is its members' domain
        for row, m in enumerate(out["members"]):
            assert out["hist"]["hist_domain"][row] == rec["hist_domain"][m[0]]
    else:
        assert mixed          # the grouping by engagement alone does mix them here


def test_cluster_job_two_domain_data(tmp_path):
    """The Beam job on two-domain data (meta num_domains 3): no output cluster mixes
    domains (members file), the job records split_domains, every row is kept once."""
    import glob
    import json
    from beam_jobs import cluster as CJ
    from tfmodels import schema as S
    from tfmodels.testing import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "d"), num_users=4, max_history=80,
                              impressions_per_user=2, domains=2, seed=1)
    out = str(tmp_path / "c")
    args = _cluster_args(data=data, output=out, keep_recent=0, gamma=8, num_shards=1,
                         snapshot_ts="none", backend="numpy")
    args.write_members = True
    CJ.run(args, [])
    assert json.load(open(os.path.join(out, S.META_FILE)))["clustering"]["settings"][
        "split_domains"] is True
    from beam_jobs.cluster_snapshot import parse_record
    import tensorflow as tf
    src = {}                            # (split, user_key) -> input record
    for split in S.SPLITS:
        for f in glob.glob(S.split_pattern(data, split)):
            for r in tf.data.TFRecordDataset(f, compression_type="GZIP"):
                rec = parse_record(r.numpy())
                src[split, rec["user_key"]] = rec
    virtual = 0
    for f in glob.glob(os.path.join(out, "members", "*.jsonl")):
        split = os.path.basename(f).split("-")[0]
        for line in open(f):
            m = json.loads(line)
            dom = src[split, m["user_key"]]["hist_domain"]
            for x in m["members"]:
                virtual += len(x) > 1
                assert len(set(dom[x].tolist())) == 1, (m["user_key"], x)
    assert virtual > 0


# ---- configs-cross-domain ------------------------------------------------------------------
@pytest.mark.parametrize("dataset,long_len", [("synthetic", 500), ("movielens", 300),
                                              ("taobao_ad", 500)])
def test_cross_domain_configs_resolve(dataset, long_len):
    shared = None
    for name, (model, crp_weight, lambdas) in VARIANTS.items():
        c = MC.load(name, dataset, ROOT)
        assert c.model == model, name
        f = c.fields
        assert f["cross_domain"] is True and f["long_len"] == long_len and f["short_len"] == 24
        assert f.get("crp_weight") == crp_weight and f.get("crp_lambdas") == lambdas, name
        # like for like: every training field but CRP's and the method's is shared
        train = {k: v for k, v in f.items() if k not in CRP_FIELDS + ("long_module_config",)}
        shared = shared or train
        assert train == shared, name
        # the registry preset of lcn_k1_only keeps its own K1 (no lcn k1 = 200 leaks in);
        # only the no-context ablation sets a method block
        assert f.get("long_module_config") == METHOD_BLOCKS.get(name), name
        folder = dataset if dataset != "taobao_ad" else "default"
        assert c.files[0] == os.path.join(ROOT, folder, "cross_domain_train.json")


def test_cross_domain_config_trains_one_step(tmp_path):
    """lcn_crp_no_pc resolved from the files trains a step on two-domain data with CRP on
    and the PC weight off (crp_loss logged), and the run records the resolved fields."""
    import json
    from lifelong import cli
    from tfmodels.testing import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "d"), num_users=8, max_history=12,
                              impressions_per_user=2, domains=2)
    out = str(tmp_path / "run")
    rc = cli.main(["train", "--data", data, "--config_dir", ROOT, "--model", "lcn_crp_no_pc",
                   "--epochs", "1", "--steps_per_epoch", "1", "--batch_size", "16",
                   "--out_dir", out, "--verbose", "0",
                   # tiny sizes from the command line (they override the files' L = 500
                   # and MLP 200-80); the fields checked below come from the files
                   "--short_len", "5", "--long_len", "24", "--emb_dim", "4",
                   "--mlp_hidden", "8", "--din_hidden", "8,4", "--no_eval"])
    assert rc in (0, None)
    run = json.load(open(os.path.join(out, "run.json")))
    cfg = run["config"]
    assert cfg["model"] == "lcn" and cfg["cross_domain"] is True
    assert cfg["crp_weight"] == 0.1 and cfg["crp_lambdas"] == [1, 1, 0]
    assert (cfg["long_len"], cfg["emb_dim"], cfg["learning_rate"]) == (24, 4, 0.001)
    assert "crp_loss" in run["history"]
