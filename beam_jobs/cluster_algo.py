"""TWIN V2 offline hierarchical clustering (METHODS 2.4, Algorithm 1) in NumPy, without Beam.

The algorithm that the Beam job :mod:`beam_jobs.cluster` runs per user record
(through :mod:`beam_jobs.cluster_snapshot`): engagement groups, item embeddings
K_s, the recursive k-means (compiled backend :mod:`beam_jobs.cluster_numba`, or
batched NumPy here), virtual items and cluster accuracy. Importing this module
does not import Apache Beam (benchmarks and tests use it alone).

Equations / steps -> code
=========================

* (T1, Eq. 3) C = h_comp(S): :func:`hierarchical_clustering` (compiled queue, or
  level-synchronous batched NumPy) and :func:`hierarchical_clustering_queue` (the
  literal queue in Python, one k-means call per set; scikit-learn reference).
* Algorithm 1 lines 3-8 (getGroup): :func:`engagement_groups`, M = 5 equal ranges
  of the engagement ratio p in [0, 1]. Signal per dataset (``--engage_mode``):

  - ``ratio`` (synthetic): ``engage`` is a completion ratio in [0, 1] (the
    paper's playing time / duration); p = clip(engage, 0, 1).
  - ``rating`` (MovieLens): p = (rating - 0.5) / 4.5, so the five ranges hold
    the ratings {0.5, 1}, {1.5, 2}, {2.5, 3}, {3.5, 4}, {4.5, 5}.
  - ``type`` (Taobao): one group per behavior type code (pv = 1, cart = 2,
    fav = 3, buy = 4): M = 4, as the spec allows for data without a ratio.
  - ``none``: M = 1 (a single group).
  ``auto`` (default) picks by the dataset's ``meta.json`` source.
* Algorithm 1 lines 10-28: every set V with |V| >= gamma (20) is split by
  k-means (Euclidean, k-means++ init, seeded, <= 20 Lloyd iterations, stopped
  early when no assignment changes) into delta = floor(|V|^0.3) sets
  (``adaptive``); ``binary``: delta = 2; ``balanced_binary``: delta = 2 and after
  every assignment the items with the smallest margin d(x, c_0) - d(x, c_1) go to
  cluster 0 until both halves are equal (ceil / floor of |V|/2): the paper's
  "items of the larger cluster closest to the other centroid are moved". Sets
  with |V| < gamma are emitted (all final sizes <= gamma - 1, spec [interp]).
  Guards (termination): delta = max(2, .) (only matters for gamma < 11); empty
  k-means clusters are dropped; a split that leaves ONE non-empty cluster
  (identical embeddings, duplicates) cuts V in time order into chunks of
  gamma - 1. Every split therefore strictly shrinks the sets, so the recursion
  ends after at most |V| levels; in practice ~log_{delta} |V|.
* (T2, Eq. 5) numerical features of a virtual item = member means: ``hist_ts``
  (mean timestamp, rounded; the window's gap_bucket is then the log gap to the
  mean time) and ``hist_engage``.
* (T3, Eq. 6-7) categorical features (``hist_item_id``, ``hist_cate_id``,
  ``hist_domain``) = those of the member nearest the centroid
  (argmin ||k_v - k_centroid||^2, ties -> the earliest member): :func:`virtual_items`.
* cluster accuracy (Table 4) = mean over items of cos(k_v, centroid of its
  cluster): :func:`cluster_accuracy`.

Why our own k-means and not scikit-learn
----------------------------------------
Algorithm 1 runs hundreds of tiny k-means per user (at T = 14,500: ~700 sets,
most with |V| < 50). scikit-learn's ``KMeans`` pays ~1.2 ms per call whatever the
size (``../shared/ANCHORS.md``: 1.19 s/user), so the per-call overhead IS the
cost. Two backends (``--backend``):

* ``numba`` (default when numba is installed, :mod:`beam_jobs.cluster_numba`):
  the literal queue of Algorithm 1 compiled, one k-means per set in tight loops
  over a contiguous [|V|, d] buffer; ~0.05 s CPU per user at T = 14,500.
* ``numpy`` (fallback): :func:`hierarchical_clustering` runs the recursion level
  by level and splits all sets of one level that share a delta in a few batched
  k-means calls (sets packed by size into padded [sets, max |V|, d + 1] tensors;
  one batched matmul gives all distances, one gives the member sums and counts);
  ~0.13 s CPU per user at T = 14,500.

Both are measured by ``lifelong cluster-bench`` (``lifelong/bench/clustering.py``;
table in ``docs/methods/twin_v2.md``) against scikit-learn on the same machine and
run, at equal cluster accuracy; :func:`hierarchical_clustering_queue` with
scikit-learn stays as the well-kept reference (``lifelong cluster-bench --backends
sklearn``).

Item embeddings K_s
===================
``--embeddings RUN_DIR``: a ``lifelong train`` run; K_s = its behavior embedding
[item_table[item]; cate_table[category]] (the model's collaborative signal, as
the paper; METHODS 2.4 "offline reproduction: train a base model -> take its item
embeddings -> cluster -> train TWIN V2"). First pass without a trained model
(the default): a deterministic **category-anchored random embedding**,
k_v = g(category) + 0.5 g'(item) with g, g' seeded Gaussian vectors hashed from
the ids (no table, identical on every worker): behaviors of one category sit
close together (k-means first separates categories), items of one category
are split at random below that. It carries no collaborative signal beyond the
category; :func:`fallback_embeddings`.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from beam_jobs import cluster_numba
from tfmodels.errors import LifelongError

GAMMA = 20                    # maximum cluster size (exclusive): final sizes <= 19
NUM_GROUPS = 5                # M, equal ranges of the engagement ratio
MAX_ITER = 20                 # Lloyd iterations per k-means
KMEANS_TOL = 1e-4             # center-shift tolerance (scikit-learn's default)
DELTA_POWER = 0.3             # delta = floor(|V| ** 0.3)
VARIANTS = ("adaptive", "binary", "balanced_binary")
BACKENDS = ("auto", "numba", "numpy")
ENGAGE_MODES = ("auto", "ratio", "rating", "type", "none")
FALLBACK_DIM = 32


class ClusterError(ValueError, LifelongError):
    """Bad arguments or unusable input; one line for the CLI."""


# ======================================================================================
# 1. Engagement groups (Algorithm 1, lines 3-8)
# ======================================================================================


def engagement_groups(engage: np.ndarray, mode: str, num_groups: int = NUM_GROUPS) -> np.ndarray:
    """getGroup(p_j) for every behavior: int group ids [T] (see the module docstring)."""
    e = np.asarray(engage, dtype=np.float64)
    if mode == "none" or e.size == 0:
        return np.zeros(e.shape[0], np.int64)
    if mode == "type":
        return np.rint(e).astype(np.int64)
    if mode == "rating":
        p = (e - 0.5) / 4.5
    elif mode == "ratio":
        p = e
    else:
        raise ClusterError(f"unknown engage mode {mode!r}; expected one of {ENGAGE_MODES[1:]}")
    p = np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)
    # bins [0, 1/M), ..., [(M-1)/M, 1]; a tiny epsilon keeps 0.4 / 0.2 etc. in the upper bin
    return np.minimum((p * num_groups + 1e-9).astype(np.int64), num_groups - 1)


# ======================================================================================
# 2. Item embeddings K_s
# ======================================================================================


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_normal(ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """A seeded N(0, 1/dim) vector per id, [len(ids), dim] float32, from a counter hash
    (no table: the same id gives the same vector on every worker and for any vocab size)."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1)
    j = np.arange(dim, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = (ids[:, None] * np.uint64(2 * dim) + np.uint64(2) * j[None, :]
                + np.uint64(seed) * np.uint64(0x632BE59BD9B4E019))
    u1 = (_splitmix64(base) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    u2 = (_splitmix64(base + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)          # Box-Muller
    return (z / math.sqrt(dim)).astype(np.float32)


def fallback_embeddings(item_ids: np.ndarray, cate_ids: np.ndarray, dim: int = FALLBACK_DIM,
                        seed: int = 0, item_weight: float = 0.5) -> np.ndarray:
    """First-pass K_s without a trained model: g(category) + item_weight * g'(item)."""
    return (hashed_normal(cate_ids, dim, 2 * seed + 1)
            + item_weight * hashed_normal(item_ids, dim, 2 * seed + 2))


def load_run_tables(run_dir: str, vocab: Optional[Mapping[str, int]] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """(item_table [num_items, e], cate_table [num_categories, e]) of a trained run."""
    import tensorflow as tf
    from tfmodels.train import load_run
    _, model = load_run(run_dir)
    zero = tf.zeros([1], tf.int64)
    model.item_embedding(zero, zero)         # build the tables -> the deferred restore fills them
    item = model.item_embedding.item_table.embeddings.numpy()
    cate = model.item_embedding.cate_table.embeddings.numpy()
    if vocab is not None and (item.shape[0] != int(vocab["num_items"])
                              or cate.shape[0] != int(vocab["num_categories"])):
        raise ClusterError(f"--embeddings {run_dir!r} was trained on another vocabulary "
                           f"({item.shape[0]} items, {cate.shape[0]} categories) than the "
                           f"dataset ({vocab['num_items']}, {vocab['num_categories']})")
    return item.astype(np.float32), cate.astype(np.float32)


class Embedder:
    """K_s for (item ids, category ids): the run's tables, or the fallback."""

    def __init__(self, tables: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                 dim: int = FALLBACK_DIM, seed: int = 0):
        self.tables, self.dim, self.seed = tables, dim, seed

    def __call__(self, item_ids: np.ndarray, cate_ids: np.ndarray) -> np.ndarray:
        if self.tables is None:
            return fallback_embeddings(item_ids, cate_ids, self.dim, self.seed)
        item, cate = self.tables
        i = np.clip(np.asarray(item_ids, np.int64), 0, item.shape[0] - 1)
        c = np.clip(np.asarray(cate_ids, np.int64), 0, cate.shape[0] - 1)
        return np.concatenate([item[i], cate[c]], axis=1)


# ======================================================================================
# 3. Hierarchical clustering (Algorithm 1, lines 10-28)
# ======================================================================================


def num_splits(size: int, variant: str = "adaptive") -> int:
    """delta for a set of ``size`` items: floor(size^0.3) (>= 2), or 2 for the binary variants."""
    if variant == "adaptive":
        return max(2, int(math.floor(size ** DELTA_POWER + 1e-9)))
    return 2


def _kmeanspp_batched(x: np.ndarray, xx: np.ndarray, valid: np.ndarray, sizes: np.ndarray,
                      k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding for B padded sets at once: x [B, n, d], xx = ||x||^2 [B, n],
    valid [B, n] (0/1 floats) -> centers [B, k, d]."""
    b, n, d = x.shape
    rows = np.arange(b)
    centers = np.empty((b, k, d), x.dtype)

    def sqdist(c):        # ||x - c||^2 [B, n] for one center per set, without an [B, n, d] temp
        return np.maximum(xx - 2.0 * np.matmul(x, c[:, :, None])[..., 0] + (c * c).sum(-1)[:, None],
                          0.0) * valid

    first = np.minimum((rng.random(b) * sizes).astype(np.int64), sizes - 1)
    centers[:, 0] = x[rows, first]
    d2 = sqdist(centers[:, 0])
    for t in range(1, k):   # (a set with fewer than k clusters ignores its extra draws)
        total = d2.sum(1)
        u = rng.random(b)
        pick = (np.cumsum(d2, axis=1) <= (u * total)[:, None]).sum(1)
        # all remaining distances zero (identical points): any member
        pick = np.where(total > 0, pick, (u * sizes).astype(np.int64))
        pick = np.minimum(pick, sizes - 1)
        centers[:, t] = x[rows, pick]
        d2 = np.minimum(d2, sqdist(centers[:, t]))
    return centers


def _balanced_halves(margin: np.ndarray, half: np.ndarray) -> np.ndarray:
    """0 for the ``half`` smallest margins of each row (ties by position), else 1.

    margin [B, n] (+inf on padding), half [B]. The items of the larger side with
    the smallest margin, i.e. closest to the other centroid, are the ones moved.
    """
    order = np.argsort(margin, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(margin.shape[1])[None, :], axis=1)
    return (rank >= half[:, None]).astype(np.int64)


def kmeans_batched(x: np.ndarray, valid: np.ndarray, k: int, rng: np.random.Generator,
                   max_iter: int = MAX_ITER, balanced: bool = False,
                   tol: float = KMEANS_TOL, ks: Optional[np.ndarray] = None) -> np.ndarray:
    """Lloyd's k-means on B padded sets at once (Euclidean, k-means++ init).

    x [B, n, d] float32, valid [B, n] bool -> assignment [B, n] in 0..k-1 (-1 on
    padding). ``ks`` [B] (optional, <= k): clusters of each set; centers j >= ks[b]
    of set b are disabled (never seeded into the result, never assigned). A set stops when none of its assignments changes, when its squared
    center shift is <= ``tol`` x its mean per-dimension variance (scikit-learn's
    rule and default), or after ``max_iter`` assignment steps; converged sets
    leave the batch, so late iterations only pay for the sets still moving. ``balanced`` (k = 2 only):
    assignment by the margin d(x, c0) - d(x, c1), the smaller ceil(|V|/2) to 0.
    """
    b, n, d = x.shape
    valid_in = valid
    sizes = valid.sum(1)
    vf = valid.astype(x.dtype)
    xx = np.einsum("bnd,bnd->bn", x, x)
    centers = _kmeanspp_batched(x, xx, vf, sizes, k, rng)
    # scikit-learn's stopping rule besides "no label changed": the squared center
    # shift falls below tol * (mean per-dimension variance of the set)
    mean = np.matmul(vf[:, None, :], x)[:, 0] / sizes[:, None]
    tol_b = tol * np.maximum((xx * vf).sum(1) / sizes - (mean * mean).sum(1), 0.0) / d
    # +inf-like penalty on disabled centers (a set with fewer clusters than the batch's k)
    off = (np.zeros((b, k), x.dtype) if ks is None else
           np.where(np.arange(k)[None, :] < np.asarray(ks)[:, None], 0.0, 1e30).astype(x.dtype))
    # x_aug = [x, 1] with padded rows all zero: one matmul x_aug @ [-2c, ||c||^2]^T gives
    # ||x - c||^2 - ||x||^2 (the argmin is the same), and one matmul onehot @ x_aug gives
    # the member sums AND counts; padded rows add nothing to either.
    x_aug = np.concatenate([x, np.ones((b, n, 1), x.dtype)], axis=2) * vf[..., None]
    result = np.full((b, n), -1, np.int64)
    act = np.arange(b)                       # sets still iterating (rows of x_aug, ...)
    prev = shift = None
    ar = np.arange(k, dtype=np.int64)[None, :, None]
    for _ in range(max_iter):
        c_aug = np.concatenate([-2.0 * centers, ((centers * centers).sum(-1) + off)[..., None]],
                               axis=2)
        dist = np.matmul(x_aug, c_aug.transpose(0, 2, 1))                  # [B, n, k]
        if balanced:
            assign = _balanced_halves(np.where(valid, dist[..., 0] - dist[..., 1], np.inf),
                                      (sizes + 1) // 2)
        else:
            assign = dist.argmin(-1)
        moving = np.ones(len(act), bool) if prev is None else (assign != prev).any(1)
        if shift is not None:
            moving &= shift > tol_b
        if not moving.any():
            break
        if moving.sum() <= len(act) // 2:              # compact: drop the converged sets
            done = ~moving
            result[act[done]] = assign[done]
            act, x_aug, valid, sizes, assign, centers, tol_b, off = (
                act[moving], x_aug[moving], valid[moving], sizes[moving],
                assign[moving], centers[moving], tol_b[moving], off[moving])
        prev = assign
        onehot_t = (assign[:, None, :] == ar).astype(x.dtype)             # [B, k, n]
        sums = np.matmul(onehot_t, x_aug)                                   # [B, k, d + 1]
        counts = sums[..., d:]                                              # [B, k, 1]
        new = np.where(counts > 0, sums[..., :d] / np.maximum(counts, 1.0), centers)
        shift = ((new - centers) ** 2).sum((1, 2))
        centers = new
    result[act] = assign
    return np.where(valid_in, result, -1)


def _pack(sizes: np.ndarray, waste: float = 2.0, max_rows: int = 1 << 16) -> List[np.ndarray]:
    """Group set indices into padded batches: largest first, a batch grows while its padded
    rows (count x largest size) stay <= max(waste x its real rows, max_rows)."""
    order = np.argsort(-sizes, kind="stable")
    out, i = [], 0
    while i < len(order):
        n0, total, j = int(sizes[order[i]]), int(sizes[order[i]]), i + 1
        while j < len(order):
            nxt = total + int(sizes[order[j]])
            if (j - i + 1) * n0 > max(waste * nxt, max_rows):
                break
            total, j = nxt, j + 1
        out.append(order[i:j])
        i = j
    return out


def _emit_order_labels(n: int, segments: List[np.ndarray]) -> np.ndarray:
    labels = np.full(n, -1, np.int64)
    for cid, rows in enumerate(segments):
        labels[rows] = cid
    return labels


def hierarchical_clustering(emb: np.ndarray, groups: Optional[np.ndarray] = None,
                            gamma: int = GAMMA, variant: str = "adaptive",
                            max_iter: int = MAX_ITER, seed: int = 0,
                            stats: Optional[Dict[str, int]] = None,
                            backend: str = "auto") -> np.ndarray:
    """Algorithm 1: cluster label per behavior [T].

    ``backend``: ``numba`` (the compiled per-set queue, :mod:`beam_jobs.cluster_numba`),
    ``numpy`` (level-synchronous and batched, below) or ``auto`` (numba when it is
    installed, else numpy). Both give valid clusterings with the same guarantees;
    their random streams differ, so labels differ between backends for one seed.

    ``emb`` [T, d] (rows in time order), ``groups`` [T] engagement group ids.
    Every set of size >= gamma at one level is split in the same batched k-means
    as the other sets of that level with the same delta; sets < gamma are final.
    Labels are 0..C-1; every cluster holds < gamma behaviors of one group.
    ``stats`` (optional dict) accumulates ``kmeans_sets``, ``batched_calls``,
    ``chunk_fallbacks`` and ``levels``.
    """
    if variant not in VARIANTS:
        raise ClusterError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if gamma < 2:
        raise ClusterError(f"gamma must be >= 2, got {gamma}")
    if backend not in BACKENDS:
        raise ClusterError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ClusterError(f"emb must be [T, d], got shape {emb.shape}")
    t = emb.shape[0]
    labels = np.full(t, -1, np.int64)
    if t == 0:
        return labels
    groups = np.zeros(t, np.int64) if groups is None else np.asarray(groups, np.int64)
    if groups.shape != (t,):
        raise ClusterError(f"groups must have shape ({t},), got {groups.shape}")
    stats = stats if stats is not None else {}
    if backend == "numba" or (backend == "auto" and cluster_numba.AVAILABLE):
        return cluster_numba.hierarchical_clustering_numba(
            emb, groups, gamma, variant, max_iter, seed, KMEANS_TOL, DELTA_POWER, stats)
    rng = np.random.default_rng(seed)
    next_label = 0
    # current level: points laid out contiguously per set, time order inside a set
    pts = np.argsort(groups, kind="stable")
    _, starts, sizes = np.unique(groups[pts], return_index=True, return_counts=True)
    while True:
        final = sizes < gamma
        for s, n in zip(starts[final], sizes[final]):
            labels[pts[s:s + n]] = next_label
            next_label += 1
        keep = ~final
        if not keep.any():
            break
        stats["levels"] = stats.get("levels", 0) + 1
        starts, sizes = starts[keep], sizes[keep]
        # points of the sets still to split, re-laid contiguously
        seg = np.repeat(np.arange(len(sizes)), sizes)
        pos_in = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        pts = pts[np.repeat(starts, sizes) + pos_in]
        starts = np.cumsum(sizes) - sizes
        child = np.empty(pts.shape[0], np.int64)
        deltas = np.array([num_splits(int(n), variant) for n in sizes])
        # A few batched k-means per level: per delta, sets are packed greedily by size
        # into padded batches (padding <= 2x the real rows, or <= 2^16 padded rows).
        # At these sizes the per-call NumPy overhead and the passes over the
        # [sets, rows, delta] distance tensor cost more than the arithmetic, so fewer,
        # fuller calls win (one class per delta would pad the many 20-row sets to the
        # largest set; one batch per level would pad every set to the largest delta;
        # both measured slower).
        batches = [np.nonzero(deltas == k_)[0][b_] for k_ in np.unique(deltas)
                   for b_ in _pack(sizes[deltas == k_])]
        for sel in batches:
            nmax = int(sizes[sel].max())
            col = np.arange(nmax)
            valid = col[None, :] < sizes[sel][:, None]
            idx = starts[sel][:, None] + np.where(valid, col[None, :], 0)
            x = emb[pts[idx]]
            ks = deltas[sel]
            assign = kmeans_batched(x, valid, int(ks.max()), rng, max_iter,
                                    balanced=(variant == "balanced_binary"), ks=ks)
            child[idx[valid]] = assign[valid]
            stats["kmeans_sets"] = stats.get("kmeans_sets", 0) + len(sel)
            stats["batched_calls"] = stats.get("batched_calls", 0) + 1
        # guard: a set whose k-means left one non-empty cluster is cut in time order
        kmax = int(deltas.max())
        nonempty = np.zeros((len(sizes), kmax), bool)
        nonempty[seg, child] = True
        stuck = nonempty.sum(1) <= 1
        if stuck.any():
            stats["chunk_fallbacks"] = stats.get("chunk_fallbacks", 0) + int(stuck.sum())
            chunk = pos_in // (gamma - 1)
            on = stuck[seg]
            child = np.where(on, chunk, child)
            kmax = max(kmax, int(chunk[on].max()) + 1)
        key = seg * kmax + child
        order = np.argsort(key, kind="stable")          # stable: time order inside a child
        pts = pts[order]
        # chunks of a stuck set have gamma - 1 rows at most: final at the next level
        _, starts, sizes = np.unique(key[order], return_index=True, return_counts=True)
    return labels


def _kmeans_one(x: np.ndarray, k: int, backend: str, seed: int, max_iter: int,
                balanced: bool) -> np.ndarray:
    if backend == "sklearn" and not balanced:
        from sklearn.cluster import KMeans
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "fewer distinct clusters than n_clusters"
            return KMeans(n_clusters=k, n_init=1, max_iter=max_iter, init="k-means++",
                          random_state=seed, algorithm="lloyd").fit_predict(x).astype(np.int64)
    rng = np.random.default_rng(seed)
    return kmeans_batched(x[None], np.ones((1, x.shape[0]), bool), k, rng, max_iter,
                          balanced)[0]


def hierarchical_clustering_queue(emb: np.ndarray, groups: Optional[np.ndarray] = None,
                                  gamma: int = GAMMA, variant: str = "adaptive",
                                  max_iter: int = MAX_ITER, seed: int = 0,
                                  backend: str = "sklearn",
                                  stats: Optional[Dict[str, int]] = None) -> np.ndarray:
    """Algorithm 1 literally: a queue per group, one k-means call per set.

    ``backend``: ``sklearn`` (scikit-learn ``KMeans``, n_init=1, k-means++, Lloyd)
    or ``numpy`` (:func:`kmeans_batched` with one set). ``balanced_binary`` always
    uses the NumPy k-means (scikit-learn has no balanced assignment).
    """
    if variant not in VARIANTS:
        raise ClusterError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    t = emb.shape[0]
    groups = np.zeros(t, np.int64) if groups is None else np.asarray(groups, np.int64)
    stats = stats if stats is not None else {}
    segments: List[np.ndarray] = []
    calls = 0
    for g in np.unique(groups):
        queue = [np.nonzero(groups == g)[0]]
        while queue:
            v = queue.pop(0)
            if len(v) < gamma:                                   # Algorithm 1, line 16
                segments.append(v)
                continue
            delta = num_splits(len(v), variant)
            assign = _kmeans_one(emb[v], delta, backend, seed * 1_000_003 + calls, max_iter,
                                 variant == "balanced_binary")
            calls += 1
            parts = [v[assign == j] for j in range(delta)]
            parts = [p for p in parts if len(p)]
            if len(parts) <= 1:                                  # guard: cut in time order
                stats["chunk_fallbacks"] = stats.get("chunk_fallbacks", 0) + 1
                segments.extend(v[i:i + gamma - 1] for i in range(0, len(v), gamma - 1))
                continue
            queue.extend(parts)
    stats["kmeans_sets"] = stats.get("kmeans_sets", 0) + calls
    return _emit_order_labels(t, segments)


# ======================================================================================
# 4. Virtual items (Eq. 4-7) and cluster accuracy
# ======================================================================================


def _segments(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    return order, starts, sizes


def centroids(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean embedding per cluster [C, d] (labels 0..C-1)."""
    order, starts, sizes = _segments(labels)
    sums = np.add.reduceat(emb[order].astype(np.float64), starts, axis=0)
    return (sums / sizes[:, None]).astype(np.float32)


def cluster_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """Table 4's cluster accuracy: mean over items of cos(k_v, centroid of its cluster)."""
    if len(labels) == 0:
        return float("nan")
    cen = centroids(emb, labels)[labels]
    num = (emb * cen).sum(1)
    den = np.linalg.norm(emb, axis=1) * np.linalg.norm(cen, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    return float(cos.mean())


def virtual_items(labels: np.ndarray, emb: np.ndarray, rows: Mapping[str, np.ndarray]
                  ) -> Dict[str, np.ndarray]:
    """One virtual item per cluster, sorted by (mean ts, first member).

    ``rows``: ``hist_item_id``, ``hist_cate_id``, ``hist_ts``, ``hist_engage``,
    ``hist_domain`` of the clustered behaviors [T]. Returns the same keys [C]
    plus ``hist_cluster_size`` [C] and ``members`` (list of row-index arrays).
    """
    t = len(labels)
    if t == 0:
        out = {k: np.zeros(0, np.asarray(v).dtype) for k, v in rows.items()}
        out["hist_cluster_size"] = np.zeros(0, np.int64)
        out["members"] = []
        return out
    order, starts, sizes = _segments(labels)
    cen = centroids(emb, labels)
    d2 = ((emb - cen[labels]) ** 2).sum(1)
    # (T3) nearest member to the centroid; ties -> the earliest row
    near_order = np.lexsort((np.arange(t), d2, labels))
    nearest = near_order[np.r_[0, np.cumsum(sizes)[:-1]]]
    ts = np.asarray(rows["hist_ts"], np.int64)
    engage = np.asarray(rows["hist_engage"], np.float64)
    mean_ts = np.add.reduceat(ts[order].astype(np.float64), starts) / sizes         # (T2)
    mean_engage = np.add.reduceat(engage[order], starts) / sizes                    # (T2)
    first = order[starts]
    out = {"hist_item_id": np.asarray(rows["hist_item_id"], np.int64)[nearest],
           "hist_cate_id": np.asarray(rows["hist_cate_id"], np.int64)[nearest],
           "hist_domain": np.asarray(rows["hist_domain"], np.int64)[nearest],
           "hist_ts": np.rint(mean_ts).astype(np.int64),
           "hist_engage": mean_engage.astype(np.float32),
           "hist_cluster_size": sizes.astype(np.int64)}
    by_time = np.lexsort((first, out["hist_ts"]))
    out = {k: v[by_time] for k, v in out.items()}
    members = np.split(order, starts[1:])
    out["members"] = [members[i] for i in by_time]
    return out
