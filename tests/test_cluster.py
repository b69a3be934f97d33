"""TWIN V2 offline clustering (METHODS 2.4, Algorithm 1): faithfulness tests 1-3,
termination on adversarial inputs, virtual items, the snapshot protocol, and the
Beam job end to end on a tiny dataset (DirectRunner)."""
import argparse
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from beam_jobs import cluster as CJ
from beam_jobs import cluster_algo as C
from beam_jobs import cluster_snapshot as CS
from tfmodels import schema as S

VARIANTS = C.VARIANTS
from beam_jobs import cluster_numba as CN

# the job's default backend is numba when installed; both backends must hold every guarantee
BACKENDS = ["numba", "numpy"] if CN.AVAILABLE else ["numpy"]


def _blobs(t, d=16, k=12, seed=0, noise=0.4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    return (centers[rng.integers(0, k, t)] + noise * rng.normal(size=(t, d))).astype(np.float32)


def _check_partition(labels, groups, gamma, t):
    """Faithfulness 1: every behavior in exactly one cluster, sizes < gamma, one group each."""
    assert labels.shape == (t,)
    if t == 0:
        return
    assert labels.min() == 0
    sizes = np.bincount(labels)
    assert sizes.min() >= 1, "cluster ids must be dense (no empty cluster)"
    assert sizes.sum() == t and sizes.max() < gamma
    for c in range(len(sizes)):
        assert len(set(groups[labels == c])) == 1, "a cluster mixes engagement groups"


# ---- module layering -------------------------------------------------------------------------
def test_algorithm_imports_without_beam():
    """The NumPy algorithm and the snapshot logic import without Apache Beam (benchmarks and
    notebooks use them alone); the Beam job, imported next in the same fresh interpreter,
    does load Beam, so the check would see it."""
    code = ("import sys\n"
            "beam = lambda: sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam')\n"
            "import beam_jobs.cluster_algo, beam_jobs.cluster_snapshot\n"
            "print(len(beam()))\n"
            "import beam_jobs.cluster\n"
            "print(len(beam()) > 0)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "True"], r.stdout


# ---- Algorithm 1 -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["blobs", "identical", "one", "empty", "duplicates", "two_groups",
                                  "gamma_small", "huge"])
def test_partition_sizes_and_termination(variant, case, backend):
    rng = np.random.default_rng(1)
    gamma = 20
    if case == "blobs":
        emb = _blobs(1500)
    elif case == "identical":                      # every embedding the same
        emb = np.ones((700, 8), np.float32)
    elif case == "one":
        emb = _blobs(1)
    elif case == "empty":
        emb = np.zeros((0, 8), np.float32)
    elif case == "duplicates":                     # a few items repeated hundreds of times
        emb = _blobs(4)[rng.integers(0, 4, 900)]
    elif case == "two_groups":
        emb = _blobs(400)
    elif case == "gamma_small":                    # gamma < 11: delta guard max(2, .)
        emb, gamma = _blobs(300), 3
    else:                                          # huge set
        emb = _blobs(30000, d=8)
    t = emb.shape[0]
    groups = (C.engagement_groups(rng.random(t), "ratio") if case != "two_groups"
              else np.repeat([0, 3], [150, 250]))
    stats = {}
    labels = C.hierarchical_clustering(emb, groups, gamma=gamma, variant=variant, seed=3,
                                       stats=stats, backend=backend)
    _check_partition(labels, groups, gamma, t)
    if case in ("identical", "duplicates") and variant != "balanced_binary":
        assert stats.get("chunk_fallbacks", 0) > 0
    if case == "identical":                        # chunks are cut in time order
        for c in np.unique(labels):
            rows = np.nonzero(labels == c)[0]
            assert np.all(np.diff(rows) > 0)


@pytest.mark.parametrize("backend", ["numpy", "sklearn"])
def test_queue_reference_partitions(backend):
    emb = np.concatenate([_blobs(600, seed=2), np.ones((60, 16), np.float32)])
    groups = C.engagement_groups(np.random.default_rng(0).random(660), "ratio")
    labels = C.hierarchical_clustering_queue(emb, groups, seed=0, backend=backend)
    _check_partition(labels, groups, C.GAMMA, 660)


def test_delta_is_floor_power_and_balanced_halves(monkeypatch):
    """Faithfulness 2: each split uses delta = floor(|V|^0.3) (binary: 2); Balanced&Binary
    splits every set into halves."""
    calls = []
    orig = C.kmeans_batched

    def spy(x, valid, k, rng, max_iter=20, balanced=False, tol=C.KMEANS_TOL, ks=None):
        out = orig(x, valid, k, rng, max_iter, balanced, tol, ks)
        calls.append((valid.sum(1), np.full(len(x), k) if ks is None else ks, balanced, out))
        return out

    monkeypatch.setattr(C, "kmeans_batched", spy)
    emb = _blobs(3000)
    for variant in VARIANTS:
        calls.clear()
        C.hierarchical_clustering(emb, None, variant=variant, seed=0, backend="numpy")
        assert calls
        for sizes, k, balanced, out in calls:
            assert np.all(sizes >= C.GAMMA)
            assert np.all(out < k[:, None])                 # only the set's own clusters
            if variant == "adaptive":
                assert all(kk == math.floor(n ** 0.3) for kk, n in zip(k, sizes))
            else:
                assert np.all(k == 2)
            if variant == "balanced_binary":
                assert balanced
                for row, n in zip(out, sizes):
                    c0 = int((row == 0).sum())
                    assert c0 == (n + 1) // 2 and int((row == 1).sum()) == n // 2
    assert [C.num_splits(n) for n in (20, 38, 39, 101, 102, 14500)] == [2, 2, 3, 3, 4, 17]


@pytest.mark.skipif(not CN.AVAILABLE, reason="numba not installed")
def test_numba_delta_balanced_halves_and_determinism():
    """Faithfulness 2 for the compiled backend: every k-means call is on a set >= gamma with
    delta = floor(|V|^0.3) (binary: 2); balanced halves; same seed -> same labels."""
    emb = _blobs(3000)
    groups = C.engagement_groups(np.random.default_rng(0).random(3000), "ratio")
    for variant in VARIANTS:
        stats = {"trace": None}
        labels = C.hierarchical_clustering(emb, groups, variant=variant, seed=5, stats=stats,
                                           backend="numba")
        trace = stats["trace"]
        assert len(trace) == stats["kmeans_sets"] > 0
        assert np.all(trace[:, 0] >= C.GAMMA)
        want = ([C.num_splits(int(n)) for n in trace[:, 0]] if variant == "adaptive"
                else [2] * len(trace))
        np.testing.assert_array_equal(trace[:, 1], want)
        again = C.hierarchical_clustering(emb, groups, variant=variant, seed=5, backend="numba")
        np.testing.assert_array_equal(labels, again)
    x = _blobs(41, d=6)
    a = np.full(41, -1, np.int64)
    CN._kmeans_set(x, 2, 20, C.KMEANS_TOL, True, a)
    assert (a == 0).sum() == 21 and (a == 1).sum() == 20


@pytest.mark.skipif(not CN.AVAILABLE, reason="numba not installed")
def test_numba_kmeans_recovers_separated_blobs_and_matches_numpy_accuracy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 4)) * 0.01 + 5,
                        rng.normal(size=(30, 4)) * 0.01 - 5]).astype(np.float32)
    a = np.full(60, -1, np.int64)
    assert CN._kmeans_set(x, 2, 20, C.KMEANS_TOL, False, a) == 2
    assert len(set(a[:30])) == 1 and len(set(a[30:])) == 1 and a[0] != a[-1]
    emb = _blobs(2000, k=40)
    groups = np.zeros(2000, np.int64)
    acc = {b: C.cluster_accuracy(emb, C.hierarchical_clustering(emb, groups, seed=1, backend=b))
           for b in ("numba", "numpy")}
    assert abs(acc["numba"] - acc["numpy"]) < 0.02, acc


def test_unknown_backend_and_bad_shapes_rejected():
    with pytest.raises(C.ClusterError, match="backend"):
        C.hierarchical_clustering(_blobs(30), None, backend="faiss")
    with pytest.raises(C.ClusterError, match="groups"):
        C.hierarchical_clustering(_blobs(30), np.zeros(29), backend="numpy")


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 4)) * 0.01 + 5, rng.normal(size=(30, 4)) * 0.01 - 5])
    out = C.kmeans_batched(x[None].astype(np.float32), np.ones((1, 60), bool), 2, rng)[0]
    assert len(set(out[:30])) == 1 and len(set(out[30:])) == 1 and out[0] != out[-1]


def test_engagement_groups():
    ratio = C.engagement_groups(np.array([0.0, 0.19, 0.2, 0.4, 0.59, 0.8, 1.0, 1.7, -1]), "ratio")
    np.testing.assert_array_equal(ratio, [0, 0, 1, 2, 2, 4, 4, 4, 0])
    ratings = np.arange(1, 11) * 0.5
    np.testing.assert_array_equal(C.engagement_groups(ratings, "rating"),
                                  [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(C.engagement_groups(np.array([1, 2, 3, 4, 1.0]), "type"),
                                  [1, 2, 3, 4, 1])
    np.testing.assert_array_equal(C.engagement_groups(np.array([0.3, 4.0]), "none"), [0, 0])


# ---- virtual items and accuracy -------------------------------------------------------------
def test_virtual_items_means_and_nearest_member():
    """Faithfulness 3 (T2, T3): numerical = member means; categorical = nearest member."""
    emb = np.array([[0, 0], [1, 0], [10, 10], [0.4, 0], [11, 10]], np.float32)
    labels = np.array([0, 0, 1, 0, 1])
    rows = {"hist_item_id": np.array([5, 6, 7, 8, 9]), "hist_cate_id": np.array([2, 3, 4, 5, 6]),
            "hist_ts": np.array([100, 200, 300, 400, 500]),
            "hist_engage": np.array([0.1, 0.2, 0.3, 0.6, 0.5], np.float32),
            "hist_domain": np.array([1, 1, 1, 2, 1])}
    v = C.virtual_items(labels, emb, rows)
    # cluster 0: members 0, 1, 3 (centroid x = 0.4667 -> nearest is row 3), mean ts 233
    # cluster 1: members 2, 4 (centroid x = 10.5, tie -> the earliest, row 2), mean ts 400
    np.testing.assert_array_equal(v["hist_cluster_size"], [3, 2])
    np.testing.assert_array_equal(v["hist_item_id"], [8, 7])
    np.testing.assert_array_equal(v["hist_cate_id"], [5, 4])
    np.testing.assert_array_equal(v["hist_domain"], [2, 1])
    np.testing.assert_array_equal(v["hist_ts"], [233, 400])
    np.testing.assert_allclose(v["hist_engage"], [0.3, 0.4], atol=1e-6)
    assert [m.tolist() for m in v["members"]] == [[0, 1, 3], [2, 4]]


def test_cluster_accuracy():
    emb = np.array([[1, 0], [2, 0], [0, 1], [0, 3]], np.float32)
    assert C.cluster_accuracy(emb, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    acc = C.cluster_accuracy(emb, np.array([0, 0, 0, 0]))
    cen = emb.mean(0)
    cos = emb @ cen / np.linalg.norm(emb, axis=1) / np.linalg.norm(cen)
    assert acc == pytest.approx(cos.mean(), abs=1e-6)


def test_fallback_embeddings_deterministic_and_category_anchored():
    a = C.fallback_embeddings(np.array([5, 6, 5]), np.array([2, 2, 2]), 32, seed=0)
    b = C.fallback_embeddings(np.array([5]), np.array([2]), 32, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], a[2])
    other = C.fallback_embeddings(np.array([5]), np.array([3]), 32, seed=0)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    assert cos(a[0], a[1]) > cos(a[0], other[0]) + 0.3        # same category is closer
    z = C.hashed_normal(np.arange(4000), 16, seed=1) * 4.0
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02


# ---- snapshot plan ---------------------------------------------------------------------------
def test_plan_groups_grid_and_keep_recent():
    hist_ts = np.arange(0, 1000, 10)                 # 100 rows, ts 0..990
    imp_ts = np.array([255, 505, 515, 995])
    p = np.array([26, 51, 52, 100])                  # rows strictly before each impression
    groups = CS.plan_groups(hist_ts, imp_ts, p, snapshot_ts=500, refresh_s=250,
                            keep_recent=10, max_cluster_history=1000)
    assert [g["imps"] for g in groups] == [[0], [1, 2], [3]]
    assert [g["snapshot"] for g in groups] == [250, 500, 750]
    # c = min(#rows with ts < s, p_min - keep_recent)
    assert [(g["lo"], g["c"], g["hi"]) for g in groups] == [(0, 16, 26), (0, 41, 52),
                                                           (0, 75, 100)]
    # per-record rule (no snapshot ts) and the history cap
    (g,) = CS.plan_groups(hist_ts, imp_ts, p, None, 0, keep_recent=10, max_cluster_history=5)
    assert (g["lo"], g["c"], g["hi"], g["snapshot"]) == (11, 16, 100, None)
    # impressions before a single snapshot fall back to the per-record rule
    gs = CS.plan_groups(hist_ts, imp_ts, p, 600, 0, keep_recent=0)
    assert [(g["imps"], g["snapshot"], g["c"]) for g in gs] == [([0, 1, 2], None, 26),
                                                               ([3], 600, 60)]


# ---- the Beam job end to end -----------------------------------------------------------------
def _records(path, split):
    out = []
    for f in sorted(glob.glob(S.split_pattern(path, split))):
        out.extend(CS.parse_record(r.numpy()) | {"raw": r.numpy()} for r in
                   tf.data.TFRecordDataset(f, compression_type="GZIP"))
    return out


def _sizes(raw):
    ex = tf.train.Example.FromString(raw)
    return list(ex.features.feature["hist_cluster_size"].int64_list.value)


def _run_job(data, out, **flags):
    parser = argparse.ArgumentParser()
    CJ.add_arguments(parser)
    argv = ["--data", data, "--output", out, "--write_members", "--num_shards", "2"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    args, beam_args = parser.parse_known_args(argv)
    return CJ.run(args, beam_args)


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    from tfmodels.testing import write_tiny_dataset
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny_long")), num_users=10,
                              max_history=160, impressions_per_user=5, seed=3)


def _check_job_output(data, out, keep_recent, gamma):
    meta = json.load(open(os.path.join(out, S.META_FILE)))
    assert meta["clustering"]["summary"]["virtual_items"] > 0
    members_by_user = {}
    for f in glob.glob(os.path.join(out, "members", "*.jsonl")):
        split = os.path.basename(f).split("-")[0]
        for line in open(f):
            m = json.loads(line)
            members_by_user.setdefault((split, m["user_key"]), []).append(m)
    n_imps = 0
    for split in S.SPLITS:
        src = {r["user_key"]: r for r in _records(data, split)}
        got = _records(out, split)
        assert sum(len(r["imp_ts"]) for r in got) == sum(len(r["imp_ts"]) for r in src.values())
        for r in got:
            orig = src[r["user_key"]]
            sizes = _sizes(r["raw"])
            (m,) = [m for m in members_by_user[split, r["user_key"]]
                    if m["imp_ts"] == r["imp_ts"].tolist()]
            members = m["members"]
            assert len(members) == len(r["hist_ts"]) == len(sizes)
            assert [len(x) for x in members] == sizes                  # n = |cluster|
            assert all(n < gamma for n in sizes)
            flat = [i for x in members for i in x]
            assert len(flat) == len(set(flat))                         # each row once
            for j in range(len(r["imp_ts"])):
                p_new = int(r["imp_hist_index"][j])
                k = int(np.searchsorted(orig["imp_ts"], r["imp_ts"][j]))
                p_old = int(orig["imp_hist_index"][list(orig["imp_ts"]).index(r["imp_ts"][j])])
                visible = sorted(i for x in members[:p_new] for i in x)
                # the visible rows partition exactly the impression's real past
                # (minus rows beyond max_cluster_history: none here)
                assert visible == list(range(p_old)), (r["user_key"], j, k)
                # snapshot rule: no cluster holds a behavior at or after the impression
                for x in members[:p_new]:
                    assert all(orig["hist_ts"][i] < r["imp_ts"][j] for i in x)
                # the short window (last keep_recent rows) stays raw
                recent = members[max(0, p_new - keep_recent):p_new]
                assert all(len(x) == 1 for x in recent[-min(p_old, keep_recent):])
            # virtual items: categorical of a member, numerical = means
            for row, x in enumerate(members):
                assert r["hist_item_id"][row] in orig["hist_item_id"][x]
                assert abs(r["hist_ts"][row] - np.mean(orig["hist_ts"][x])) <= 0.5
                assert abs(r["hist_engage"][row] - np.mean(orig["hist_engage"][x])) < 1e-5
            n_imps += len(r["imp_ts"])
    return meta, n_imps


def test_beam_job_per_record_snapshot(tiny_long, tmp_path):
    """Per-record rule (tiny data has impressions inside the history): every impression
    sees clusters of rows strictly before its group's first impression."""
    out = str(tmp_path / "clustered")
    report = _run_job(tiny_long, out, keep_recent=5, gamma=6, snapshot_ts="none")
    assert report["users_per_second"] > 0
    meta, n = _check_job_output(tiny_long, out, keep_recent=5, gamma=6)
    assert n == sum(meta["stats"]["impressions"].values())
    # the clustered dataset feeds the unchanged tf.data pipeline
    from tfmodels import data as D
    batch = next(iter(D.make_dataset(S.split_pattern(out, "train"), 5, 24, 64)))
    cs = batch["long_cluster_size"].numpy()
    assert cs.max() > 1 and np.all((cs > 0) == (batch["long_item_id"].numpy() > 0))
    assert np.all(batch["short_cluster_size"].numpy() <= 1)        # short windows raw
    with pytest.raises(C.ClusterError, match="already holds"):
        _run_job(tiny_long, out)


def test_beam_job_refresh_grid_with_run_embeddings(tiny_long, tmp_path):
    """Grid snapshots (several records per user) + K_s from a trained run's item table."""
    from tfmodels import train as T
    run_dir = str(tmp_path / "run")
    cfg = T.TrainConfig(data=tiny_long, model="din", out_dir=run_dir, short_len=5, long_len=8,
                        emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4], batch_size=16, epochs=1,
                        steps_per_epoch=2, early_stopping_patience=0, verbose=0)
    T.train(cfg)
    item, cate = C.load_run_tables(run_dir, S.read_meta(tiny_long)["vocab"])
    assert item.shape[1] == 4 and np.abs(item).sum() > 0
    out = str(tmp_path / "grid")
    ts = []
    for split in S.SPLITS:
        ts += [int(t) for r in _records(tiny_long, split) for t in r["hist_ts"]]
    report = _run_job(tiny_long, out, keep_recent=3, gamma=5,
                      snapshot_ts=int(np.median(ts)), refresh_days=5, embeddings=run_dir)
    assert report["settings"]["embeddings"] == run_dir
    assert report["summary"]["records_out"] > report["summary"]["users"]   # several snapshots
    _check_job_output(tiny_long, out, keep_recent=3, gamma=5)
