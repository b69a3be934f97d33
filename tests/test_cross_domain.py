"""Cross-domain windows (FeatureSchema.cross_domain; METHODS 2.5 / 4.3; docs/cross_domain.md).

* a hand-built history with interleaved domains gives exactly the expected
  short_t / short_s / long windows (most recent first, only behaviors before the
  impression, padding 0, lengths, every per-row field, gap buckets);
* on random two-domain data every window of the tf.data pipeline and of the user
  tower path equals a NumPy reference;
* the single-domain schema and windows are unchanged (feature names, old schema
  dicts load), and asking cross_domain on single-domain data is a clear error;
* cached == full path and a SavedModel round trip for cross-domain models with CRP
  (tfmodels.testing.model_test), and served (user_tower + rank) == the training
  window through an export.
"""
import os

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import model_test, write_tiny_dataset

SHORT, LONG = 5, 24
CFG = dict(emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))

# hand case: 8 behaviors, domains interleaved (1 = target, 2 = source)
DOMAINS = [1, 2, 2, 1, 2, 1, 2, 2]
ITEMS = [10, 11, 12, 13, 14, 15, 16, 17]
T0 = 1_600_000_000
TS = [T0 + 600 * i for i in range(8)]
CUTS = [0, 3, 6, 8]


def _hand_record():
    h = len(ITEMS)
    history = {"hist_item_id": ITEMS, "hist_cate_id": [i + 100 for i in ITEMS],
               "hist_ts": TS, "hist_engage": [0.5 + i for i in range(h)],
               "hist_domain": DOMAINS}
    imp_ts = [TS[c - 1] + 3600 if c else T0 - 60 for c in CUTS]
    imps = {"imp_item_id": [50] * 4, "imp_cate_id": [3] * 4, "imp_ts": imp_ts,
            "imp_label": [1.0, 0.0, 1.0, 0.0], "imp_hist_index": CUTS}
    return S.encode_user_record(7, "u7", history, imps), imp_ts


def _write(records, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "test-00000-of-00001.tfrecord.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in records:
            w.write(r)
    return S.split_pattern(out_dir, "test")


def test_hand_built_interleaved_history_gives_the_expected_windows(tmp_path):
    rec, imp_ts = _hand_record()
    batch = next(iter(D.make_dataset(_write([rec], str(tmp_path)), 2, 3, 16,
                                     cross_domain=True)))
    got = {k: v.numpy() for k, v in batch.items()}
    # expected item ids per impression (cut 0, 3, 6, 8), most recent first, 0 = padding
    want = {
        "short_t_item_id": [[0, 0], [10, 0], [15, 13], [15, 13]],
        "short_s_item_id": [[0, 0], [12, 11], [14, 12], [17, 16]],
        "long_item_id": [[0, 0, 0], [12, 11, 0], [14, 12, 11], [17, 16, 14]],
    }
    lens = {"short_t_len": [0, 1, 2, 2], "short_s_len": [0, 2, 2, 2], "long_len": [0, 2, 3, 3]}
    for name, value in {**want, **lens}.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # no mixed short window in the cross-domain schema
    assert not any(k.startswith("short_item") for k in got)
    index = {item: i for i, item in enumerate(ITEMS)}
    for prefix, domain in (("short_t", S.TARGET_DOMAIN), ("short_s", S.SOURCE_DOMAIN),
                           ("long", S.SOURCE_DOMAIN)):
        items = got[f"{prefix}_item_id"]
        valid = items > 0
        rows = np.vectorize(lambda x: index.get(x, 0))(items)
        for field, src in (("cate_id", [i + 100 for i in ITEMS]), ("ts", TS),
                           ("engage", [0.5 + i for i in range(8)])):
            want_f = np.where(valid, np.asarray(src)[rows], 0)
            np.testing.assert_allclose(got[f"{prefix}_{field}"], want_f, err_msg=prefix + field)
        np.testing.assert_array_equal(got[f"{prefix}_domain"], np.where(valid, domain, 0))
        np.testing.assert_array_equal(got[f"{prefix}_cluster_size"], valid.astype(np.int64))
        gaps = S.gap_bucket_np(np.asarray(imp_ts)[:, None] - got[f"{prefix}_ts"])
        np.testing.assert_array_equal(got[f"{prefix}_gap_bucket"], np.where(valid, gaps, 0))
    # the same record, single-domain schema: the mixed windows as before
    single = next(iter(D.make_dataset(_write([rec], str(tmp_path / "s")), 2, 3, 16)))
    np.testing.assert_array_equal(single["short_item_id"].numpy(),
                                  [[0, 0], [12, 11], [15, 14], [17, 16]])
    np.testing.assert_array_equal(single["long_item_id"].numpy(),
                                  [[0, 0, 0], [12, 11, 10], [15, 14, 13], [17, 16, 15]])


def _reference(items, domains, cut, domain, length):
    rows = [i for i in range(cut) if domains[i] == domain][::-1][:length]
    return np.array([items[i] for i in rows] + [0] * (length - len(rows)))


@pytest.fixture(scope="module")
def two_domain(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("cd")), num_users=24, seed=5,
                              domains=2)


def _records(data_dir, split="test"):
    files = sorted(tf.io.gfile.glob(S.split_pattern(data_dir, split)))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def _rows_of(user_ids):
    """user -> the rows of its impressions (in record order: a user's impressions stay
    in order in the unshuffled pipeline; users of different shards may interleave)."""
    out = {}
    for i, u in enumerate(user_ids):
        out.setdefault(int(u), []).append(i)
    return out


def _field(f, name):
    return list(f[name].float_list.value if S.USER_RECORD_FIELDS[name] == tf.float32
                else f[name].int64_list.value)


def test_pipeline_and_user_tower_windows_equal_a_numpy_reference(two_domain):
    records = _records(two_domain)
    batch = next(iter(D.make_dataset(S.split_pattern(two_domain, "test"), SHORT, LONG,
                                     100_000, cross_domain=True)))
    got = {k: v.numpy() for k, v in batch.items()}
    fs = S.FeatureSchema.from_data_dir(two_domain, SHORT, LONG, cross_domain=True)
    tower = {k: v.numpy() for k, v in D.user_history_features(tf.constant(records), fs).items()}
    rows_of = _rows_of(got["user_id"])
    row, both = 0, 0
    for u, raw in enumerate(records):
        f = tf.train.Example.FromString(raw).features.feature
        items, domains = _field(f, "hist_item_id"), _field(f, "hist_domain")
        both += len(set(domains)) == 2
        rows = rows_of[int(f["user_id"].int64_list.value[0])]
        assert tower["user_id"][u] == f["user_id"].int64_list.value[0]
        checks = [(c, rows[j], got) for j, c in enumerate(_field(f, "imp_hist_index"))]
        checks.append((len(items), u, tower))   # the tower: the whole stored history
        row += len(_field(f, "imp_hist_index"))
        for cut, r, src in checks:
            for prefix, domain, length in (("short_t", 1, SHORT), ("short_s", 2, SHORT),
                                           ("long", 2, LONG)):
                want = _reference(items, domains, cut, domain, length)
                np.testing.assert_array_equal(src[f"{prefix}_item_id"][r], want)
                assert src[f"{prefix}_len"][r] == np.count_nonzero(want)
    assert row == len(got["user_id"]) and both >= 10   # the data does interleave domains


def test_single_domain_schema_unchanged_and_cross_domain_needs_a_source_domain(tmp_path):
    fs = S.FeatureSchema(S.Vocab(10, 5, 4), 3, 4)
    old = {"vocab": {"num_items": 10, "num_categories": 5, "num_users": 4, "num_domains": 2},
           "short_len": 3, "long_len": 4}           # a schema dict written before the option
    assert S.FeatureSchema.from_dict(old) == fs and not fs.cross_domain
    fields = list(S.SEQUENCE_FIELDS) + ["len"]
    want = {"user_id", "target_item_id", "target_cate_id", "imp_ts",
            *(f"short_{f}" for f in fields), *(f"long_{f}" for f in fields)}
    assert set(fs.feature_specs()) == want
    cd = S.FeatureSchema(S.Vocab(10, 5, 4, 3), 3, 4, cross_domain=True)
    assert S.FeatureSchema.from_dict(cd.to_dict()) == cd
    assert set(cd.feature_specs()) == (want - {f"short_{f}" for f in fields}) | {
        f"{p}_{f}" for p in ("short_t", "short_s") for f in fields}
    assert cd.seq_len("short_s") == 3 and cd.seq_len("long") == 4
    with pytest.raises(KeyError, match="no window 'short'"):
        cd.seq_len("short")
    single = write_tiny_dataset(str(tmp_path), num_users=4, num_shards=1)
    with pytest.raises(S.CrossDomainError, match="num_domains = 2.*two-domain dataset"):
        S.FeatureSchema.from_data_dir(single, 3, 4, cross_domain=True)
    from tfmodels.errors import LifelongError
    from tfmodels.train import ConfigError, TrainConfig, feature_schema_for
    assert issubclass(S.CrossDomainError, LifelongError)
    with pytest.raises(S.CrossDomainError):
        feature_schema_for(TrainConfig(data=single, cross_domain=True, crp_weight=0.1))
    with pytest.raises(ConfigError, match="--crp_weight needs --cross_domain"):
        TrainConfig(data=single, crp_weight=0.1).validate()
    with pytest.raises(S.CrossDomainError, match="cross_domain=True"):
        build_model(S.FeatureSchema.from_data_dir(single, 3, 4), "din", crp_weight=0.1, **CFG)


@pytest.mark.parametrize("name", ["sim_soft"])   # twin: served parity below
def test_model_test_cross_domain_with_crp(name, two_domain, tmp_path):
    """fit (CRP on), config round trip, reload, SavedModel, cached == full path."""
    out = model_test(name, two_domain, str(tmp_path), SHORT, LONG, cross_domain=True,
                     crp_weight=0.1, crp_negatives=64)
    names = out["feature_names"]
    assert {"short_t_item_id", "short_s_item_id", "short_t_cate_id",
            "short_s_cate_id"} <= set(names)
    assert not any(n.startswith("short_item") or n.startswith("short_cate") for n in names)


def _record_before(raw: bytes, cut: int) -> bytes:
    f = tf.train.Example.FromString(raw).features.feature
    history = {k: _field(f, k)[:cut] for k in S.HISTORY_FIELDS
               if k in f or k not in S.OPTIONAL_HISTORY_DEFAULTS}
    return S.encode_user_record(int(f["user_id"].int64_list.value[0]), "u", history,
                                {k: [] for k in S.IMPRESSION_FIELDS})


def test_served_equals_training_window_cross_domain(two_domain, tmp_path):
    """Export a cross-domain TWIN (CRP on in training; its gap buckets are measured to
    the request time from the cached rows' timestamps): the user_tower of the record
    cut before each impression returns the training pipeline's short_t / short_s
    windows, and rank(user_tower) == serving_default on the training window."""
    from serving import export as E
    fs = S.FeatureSchema.from_data_dir(two_domain, SHORT, LONG, cross_domain=True)
    tf.keras.utils.set_random_seed(1)
    model = build_model(fs, "twin", crp_weight=0.1, **CFG)
    out = E.export_model(model, str(tmp_path), "cd", 1)
    sigs = tf.saved_model.load(out["path"]).signatures
    batch = next(iter(D.make_dataset(S.split_pattern(two_domain, "test"), SHORT, LONG,
                                     100_000, cross_domain=True)))
    win = {k: v.numpy() for k, v in batch.items()}
    rows_of = _rows_of(win["user_id"])
    cut_records, rows = [], []
    for raw in _records(two_domain):
        f = tf.train.Example.FromString(raw).features.feature
        user_rows = rows_of[int(f["user_id"].int64_list.value[0])]
        for j, cut in enumerate(_field(f, "imp_hist_index")):
            cut_records.append(_record_before(raw, cut))
            rows.append(user_rows[j])
    tower = {k: v.numpy() for k, v in sigs["user_tower"](
        records=tf.constant(cut_records)).items()}
    short = [n for n in model.feature_names("rank") if n.startswith("short_")]
    assert sorted(short) == ["short_s_cate_id", "short_s_item_id", "short_t_cate_id",
                             "short_t_item_id"]
    for n in short:
        np.testing.assert_array_equal(tower[n], win[n][rows])
    assert "imp_ts" in model.feature_names("rank")
    served = []
    for i in rows:
        req = {k: tf.constant(v[i:i + 1]) for k, v in tower.items() if k != "user_id"}
        req.update({k: tf.constant(win[k][i:i + 1]) for k in ("target_item_id",
                                                               "target_cate_id", "imp_ts")})
        served.append(sigs["rank"](**req)["ctr"].numpy()[0])
    names = model.feature_names("all")
    training = sigs["serving_default"](**{k: tf.constant(win[k]) for k in names})["ctr"]
    gap = float(np.abs(np.asarray(served) - training.numpy()[rows]).max())
    assert gap <= 1e-5, f"served CTR differs from the training window's by {gap}"
    # one user, N = 4 candidates (the [1, S] short windows broadcast in rank's
    # one-user DIN path) == serving_default on the window tiled to the candidates
    rng = np.random.default_rng(0)
    for i in rows[:8]:
        items = rng.integers(2, 60, size=4).astype(np.int64)
        cates = rng.integers(2, 8, size=4).astype(np.int64)
        req = {k: tf.constant(v[i:i + 1]) for k, v in tower.items() if k != "user_id"}
        got = sigs["rank"](**req, target_item_id=tf.constant(items),
                           target_cate_id=tf.constant(cates),
                           imp_ts=tf.constant(win["imp_ts"][i:i + 1]))["ctr"].numpy()
        tiled = {k: tf.constant(np.repeat(win[k][i:i + 1], 4, axis=0)) for k in names}
        tiled.update(target_item_id=tf.constant(items), target_cate_id=tf.constant(cates))
        want = sigs["serving_default"](**tiled)["ctr"].numpy()
        assert np.abs(got - want).max() <= 1e-5


def test_lifelong_train_cross_domain_with_crp(two_domain, tmp_path, capsys):
    """`lifelong train --cross_domain --crp_weight ...` trains (crp_loss in the history),
    records the cross-domain schema, evaluates; on single-domain data it is one clear
    error line (exit 2) naming the fix."""
    import json
    from lifelong import cli
    out = str(tmp_path / "run")
    tiny = ["--short_len", str(SHORT), "--long_len", str(LONG), "--emb_dim", "4",
            "--mlp_hidden", "8", "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0",
            "--epochs", "1", "--steps_per_epoch", "3"]
    assert cli.main(["train", "--data", two_domain, "--model", "sim_soft", "--cross_domain",
                     "--crp_weight", "0.1", "--crp_negatives", "64", "--crp_tau", "0.2",
                     "--out_dir", out, *tiny]) == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["feature_schema"]["cross_domain"] is True
    assert run["config"]["crp_weight"] == 0.1 and run["config"]["crp_tau"] == 0.2
    assert len(run["history"]["crp_loss"]) == 1 and run["history"]["crp_loss"][0] != 0
    assert os.path.exists(os.path.join(out, "metrics-test.json"))
    single = write_tiny_dataset(str(tmp_path / "single"), num_users=4, num_shards=1)
    capsys.readouterr()
    assert cli.main(["train", "--data", single, "--model", "din", "--cross_domain",
                     "--out_dir", str(tmp_path / "bad"), *tiny]) == 2
    err = capsys.readouterr().err
    assert "needs source-domain behaviors" in err and "two-domain dataset" in err
