"""TWIN V2 offline hierarchical clustering (METHODS 2.4, Algorithm 1) as an Apache Beam job.

Reads a prepared dataset (``lifelong prepare``: per-user records, history once
+ labeled impressions), clusters each user's behaviors before a snapshot into
virtual items and writes a new dataset in the SAME per-user record format
(``tfmodels/schema.py``) whose history is

    [virtual items of the behaviors before the snapshot]  ++  [raw behaviors after it]

with ``hist_cluster_size`` = n (members of the virtual item; 1 for a raw row).
``lifelong train --data <output> --model twin_v2`` then trains on it unchanged:
the tf.data windows carry ``long_cluster_size`` and the TWIN V2 layer adds ln n.

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

Both are measured by ``beam_jobs/cluster_bench.py`` (table in
``docs/methods/twin_v2.md``) against scikit-learn on the same machine and run, at
equal cluster accuracy; :func:`hierarchical_clustering_queue` with scikit-learn
stays as the well-kept reference (``cluster_bench --backends sklearn``).

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

Snapshot protocol (DESIGN "Offline artifacts ... are computed on a snapshot")
=============================================================================
Clusters are built only from behaviors strictly before every impression that
sees them. For each record the job assigns each impression j (time t_j,
visible rows p_j) a snapshot s_j:

* ``--snapshot_ts T`` with ``--refresh_days D > 0``: the refresh grid
  {T + k D days, k in Z}; s_j = the latest grid point <= t_j (the paper
  refreshes every 2 weeks). Impressions sharing s_j form one output record.
* ``--snapshot_ts T`` with ``--refresh_days 0``: s_j = T for t_j >= T; earlier
  impressions use the per-record rule below.
* no ``--snapshot_ts``: per-record rule, s = the record's earliest impression.

The rows clustered for a group of impressions are rows [lo, c) with
c = min(#rows with ts < s, p_min - keep_recent) (clamped at 0), p_min = the
group's smallest p_j, lo = max(0, c - max_cluster_history). The rows
[c, p_max) stay raw. Hence every impression sees clusters of rows with
ts < s <= t_j and index < p_j (never at or after it), plus at least
``keep_recent`` raw most recent behaviors (or all of its past): with
keep_recent >= the model's short window S, the short window is exactly the raw
one, so TWIN V2 and the baselines see identical short windows and impressions.

Per-dataset defaults (``--snapshot_ts auto``): time-split data
(``per_event_time_split``, MovieLens) -> T = the train/test boundary
(``split_rule.valid_end_ts``), D = 14 days: test impressions see the refresh at
or after the boundary, training impressions the refreshes before them. User
splits (``labeled_impressions`` synthetic, ``last_item_per_user`` Taobao): every
impression of a record comes after its whole stored history -> per-record rule.
keep_recent = 100 (>= the default S = 50), max_cluster_history = 100,000 (the
paper's cap).

Output: ``<output>/{train,valid,test}-*.tfrecord.gz`` (one record per user and
snapshot group), ``meta.json`` (the input's, plus ``clustering``: settings and
statistics), ``vocab/`` (copied), ``embeddings.npz`` when ``--embeddings`` was
given, and with ``--write_members`` ``members/*.jsonl`` (the original row indices
of every virtual item, for audits and the tests).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from beam_jobs import cluster_numba
from tfmodels.errors import LifelongError

GAMMA = 20                    # maximum cluster size (exclusive): final sizes <= 19
NUM_GROUPS = 5                # M, equal ranges of the engagement ratio
MAX_ITER = 20                 # Lloyd iterations per k-means
KMEANS_TOL = 1e-4             # center-shift tolerance (scikit-learn's default)
DELTA_POWER = 0.3             # delta = floor(|V| ** 0.3)
MAX_CLUSTER_HISTORY = 100_000
KEEP_RECENT = 100
REFRESH_DAYS = 14.0
VARIANTS = ("adaptive", "binary", "balanced_binary")
BACKENDS = ("auto", "numba", "numpy")
ENGAGE_MODES = ("auto", "ratio", "rating", "type", "none")
ENGAGE_BY_SOURCE = {"synthetic": "ratio", "movielens": "rating", "taobao": "type"}
FALLBACK_DIM = 32
NAMESPACE = "cluster"
COUNTS_FILE = "_cluster_counts.json"
EMBEDDINGS_FILE = "embeddings.npz"
MEMBERS_DIR = "members"


class ClusterError(ValueError, LifelongError):
    """Bad arguments or unusable input; one line for the CLI."""


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


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


# ======================================================================================
# 5. Snapshot protocol and the per-record transformation
# ======================================================================================

HIST = ("hist_item_id", "hist_cate_id", "hist_ts", "hist_engage", "hist_domain")
IMPS = ("imp_item_id", "imp_cate_id", "imp_ts", "imp_label", "imp_hist_index")


def snapshot_of(imp_ts: np.ndarray, snapshot_ts: Optional[int], refresh_s: float
                ) -> List[Optional[int]]:
    """The snapshot time of every impression (None = the per-record rule)."""
    out: List[Optional[int]] = []
    for t in np.asarray(imp_ts, np.int64).tolist():
        if snapshot_ts is None:
            out.append(None)
        elif refresh_s > 0:
            k = math.floor((t - snapshot_ts) / refresh_s)
            out.append(int(snapshot_ts + k * refresh_s))
        else:
            out.append(int(snapshot_ts) if t >= snapshot_ts else None)
    return out


def plan_groups(hist_ts: np.ndarray, imp_ts: np.ndarray, imp_hist_index: np.ndarray,
                snapshot_ts: Optional[int] = None, refresh_s: float = 0.0,
                keep_recent: int = KEEP_RECENT, max_cluster_history: int = MAX_CLUSTER_HISTORY
                ) -> List[Dict[str, Any]]:
    """Impressions of one record -> groups sharing a snapshot, with their clustered rows.

    Returns ``[{"imps": [j...], "snapshot": s or None, "lo": lo, "c": c, "hi": p_max}]``
    in time order: rows [lo, c) are clustered, rows [c, hi) stay raw.
    """
    hist_ts = np.asarray(hist_ts, np.int64)
    snaps = snapshot_of(imp_ts, snapshot_ts, refresh_s)
    keys: Dict[Any, List[int]] = {}
    for j, s in enumerate(snaps):
        keys.setdefault(s, []).append(j)
    groups = []
    for s, js in keys.items():
        p = np.asarray(imp_hist_index, np.int64)[js]
        p_min, p_max = int(p.min()), int(p.max())
        c_ts = p_min if s is None else int(np.searchsorted(hist_ts, s, side="left"))
        c = max(0, min(c_ts, p_min - keep_recent))
        lo = max(0, c - max_cluster_history)
        groups.append({"imps": js, "snapshot": s, "lo": lo, "c": c, "hi": p_max})
    groups.sort(key=lambda g: (min(np.asarray(imp_ts)[g["imps"]]), g["imps"][0]))
    return groups


def cluster_record(rec: Mapping[str, Any], embedder: Embedder, engage_mode: str,
                   snapshot_ts: Optional[int] = None, refresh_s: float = 0.0,
                   keep_recent: int = KEEP_RECENT,
                   max_cluster_history: int = MAX_CLUSTER_HISTORY, gamma: int = GAMMA,
                   variant: str = "adaptive", max_iter: int = MAX_ITER, seed: int = 0,
                   stats: Optional[Dict[str, Any]] = None,
                   backend: str = "auto") -> List[Dict[str, Any]]:
    """One parsed per-user record -> clustered records (one per snapshot group).

    ``rec``: ``user_id``, ``user_key`` and NumPy arrays of :data:`HIST` / :data:`IMPS`.
    Each output: ``user_id``, ``user_key``, ``hist`` (schema history fields incl.
    ``hist_cluster_size``), ``imps``, ``members`` (original row indices per history row,
    for virtual AND raw rows), ``snapshot``, ``clustered_rows``.
    """
    stats = stats if stats is not None else {}
    out = []
    for gi, g in enumerate(plan_groups(rec["hist_ts"], rec["imp_ts"], rec["imp_hist_index"],
                                       snapshot_ts, refresh_s, keep_recent,
                                       max_cluster_history)):
        lo, c, hi = g["lo"], g["c"], g["hi"]
        rows = {k: np.asarray(rec[k])[lo:c] for k in HIST}
        t0 = time.perf_counter()
        if c > lo:
            emb = embedder(rows["hist_item_id"], rows["hist_cate_id"])
            grp = engagement_groups(rows["hist_engage"], engage_mode)
            labels = hierarchical_clustering(emb, grp, gamma, variant, max_iter,
                                             seed=_seed(seed, rec["user_key"], gi), stats=stats,
                                             backend=backend)
            vi = virtual_items(labels, emb, rows)
            stats["accuracy_sum"] = stats.get("accuracy_sum", 0.0) + cluster_accuracy(
                emb, labels) * len(labels)
        else:
            vi = virtual_items(np.zeros(0, np.int64), np.zeros((0, 1), np.float32), rows)
        stats["cluster_seconds"] = stats.get("cluster_seconds", 0.0) + time.perf_counter() - t0
        n_virtual = len(vi["hist_cluster_size"])
        hist = {k: np.concatenate([vi[k], np.asarray(rec[k])[c:hi]]) for k in HIST}
        hist["hist_cluster_size"] = np.concatenate([vi["hist_cluster_size"],
                                                    np.ones(hi - c, np.int64)])
        js = g["imps"]
        imps = {k: np.asarray(rec[k])[js] for k in IMPS}
        imps["imp_hist_index"] = n_virtual + imps["imp_hist_index"].astype(np.int64) - c
        members = [(m + lo).tolist() for m in vi["members"]] + [[r] for r in range(c, hi)]
        for k, v in (("records_out", 1), ("clustered_rows", c - lo), ("virtual_items", n_virtual),
                     ("raw_rows", hi - c), ("dropped_rows", lo), ("impressions", len(js)),
                     ("records_with_clusters", int(n_virtual > 0))):
            stats[k] = stats.get(k, 0) + v
        out.append({"user_id": int(rec["user_id"]), "user_key": rec["user_key"], "hist": hist,
                    "imps": imps, "members": members, "snapshot": g["snapshot"],
                    "clustered_rows": c - lo})
    return out


def _seed(seed: int, user_key: str, group: int) -> int:
    digest = hashlib.sha256(f"{int(seed)}\x1f{user_key}\x1f{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def parse_record(raw: bytes) -> Dict[str, Any]:
    """Serialized per-user record -> NumPy arrays (TensorFlow's proto, no graph)."""
    from tensorflow.core.example import example_pb2
    ex = example_pb2.Example.FromString(raw)
    f = ex.features.feature
    out: Dict[str, Any] = {"user_id": f["user_id"].int64_list.value[0],
                           "user_key": f["user_key"].bytes_list.value[0].decode("utf-8")}
    for name in HIST + IMPS:
        if name in ("hist_engage", "imp_label"):
            out[name] = np.asarray(f[name].float_list.value, np.float32)
        else:
            out[name] = np.asarray(f[name].int64_list.value, np.int64)
    return out


def encode_clustered(rec: Mapping[str, Any]) -> bytes:
    """A clustered record -> serialized per-user record (validated, deterministic bytes)."""
    from tfmodels import schema as S
    from tensorflow.core.example import example_pb2
    raw = S.encode_user_record(rec["user_id"], rec["user_key"], rec["hist"], rec["imps"])
    return example_pb2.Example.FromString(raw).SerializeToString(deterministic=True)


# ======================================================================================
# 6. The Beam job
# ======================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the ``cluster`` subcommand; unknown extra arguments are Beam pipeline options."""
    g = parser.add_argument_group("input / output")
    g.add_argument("--data", required=True,
                   help="a prepared dataset (lifelong prepare --output): per-user records")
    g.add_argument("--output", required=True,
                   help="output folder: a clustered dataset in the same format "
                        "({train,valid,test}-*.tfrecord.gz, meta.json, vocab/)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a previous clustered dataset in --output first")
    g.add_argument("--num_shards", type=int, default=4, help="shards per split (default 4)")
    g.add_argument("--write_members", action="store_true",
                   help="also write members/<split>-*.jsonl: the original row indices behind "
                        "every history row of every output record (audits, tests)")
    g = parser.add_argument_group("clustering (Algorithm 1)")
    g.add_argument("--variant", default="adaptive", choices=VARIANTS,
                   help="adaptive: delta = floor(|V|^0.3) (the paper); binary: delta = 2; "
                        "balanced_binary: delta = 2 with equal halves (Table 4)")
    g.add_argument("--gamma", type=int, default=GAMMA,
                   help=f"maximum cluster size, exclusive (default {GAMMA}: sizes <= {GAMMA - 1})")
    g.add_argument("--engage_mode", default="auto", choices=ENGAGE_MODES,
                   help="engagement grouping: ratio (5 ranges of [0,1]), rating (MovieLens "
                        "0.5-5 -> [0,1], 5 ranges), type (one group per behavior code), none "
                        "(M = 1); auto: by the dataset source (synthetic ratio, movielens "
                        "rating, taobao type)")
    g.add_argument("--max_iter", type=int, default=MAX_ITER, help="Lloyd iterations (default 20)")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="k-means implementation: numba (compiled per-set queue), numpy "
                        "(batched Lloyd), auto = numba when installed (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the k-means++ draws")
    g.add_argument("--embeddings", default=None,
                   help="a `lifelong train` run directory: cluster on its item embeddings "
                        "[item_table; cate_table]; default: the category-anchored random "
                        "fallback (first pass, no trained model)")
    g.add_argument("--fallback_dim", type=int, default=FALLBACK_DIM,
                   help=f"dimension of the fallback embeddings (default {FALLBACK_DIM})")
    g = parser.add_argument_group("snapshot protocol")
    g.add_argument("--snapshot_ts", default="auto",
                   help="unix seconds of the (first) snapshot; 'auto' = per dataset (time "
                        "split: the train/test boundary; user splits: none); 'none' = "
                        "per-record rule (before each record's earliest impression)")
    g.add_argument("--refresh_days", type=float, default=None,
                   help="refresh period of the snapshot grid in days (default: 14 with a "
                        "snapshot_ts, as the paper's 2 weeks; 0 = one snapshot)")
    g.add_argument("--keep_recent", type=int, default=KEEP_RECENT,
                   help=f"raw behaviors kept before each group's first impression (default "
                        f"{KEEP_RECENT}; set >= the model's --short_len so short windows stay raw)")
    g.add_argument("--max_cluster_history", type=int, default=MAX_CLUSTER_HISTORY,
                   help=f"cluster at most this many behaviors before the snapshot (default "
                        f"{MAX_CLUSTER_HISTORY:,}; older ones are dropped)")


def resolve_settings(args: argparse.Namespace, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Arguments + the input's meta.json -> the job's settings (defaults per dataset)."""
    source, protocol = meta.get("source"), meta.get("protocol")
    mode = args.engage_mode
    if mode == "auto":
        mode = ENGAGE_BY_SOURCE.get(source, "ratio")
    snap = str(args.snapshot_ts).strip().lower()
    if snap == "auto":
        snapshot_ts = (meta.get("split_rule", {}).get("valid_end_ts")
                       if protocol == "per_event_time_split" else None)
    elif snap in ("none", ""):
        snapshot_ts = None
    else:
        try:
            snapshot_ts = int(float(snap))
        except ValueError:
            raise ClusterError(f"--snapshot_ts must be unix seconds, auto or none; got "
                               f"{args.snapshot_ts!r}") from None
    refresh_days = args.refresh_days
    if refresh_days is None:
        refresh_days = REFRESH_DAYS if snapshot_ts is not None else 0.0
    if refresh_days < 0:
        raise ClusterError(f"--refresh_days must be >= 0, got {refresh_days}")
    if args.gamma < 2:
        raise ClusterError(f"--gamma must be >= 2, got {args.gamma}")
    for name in ("keep_recent", "num_shards", "max_iter", "max_cluster_history", "fallback_dim"):
        if getattr(args, name) < (0 if name == "keep_recent" else 1):
            raise ClusterError(f"--{name} must be >= {0 if name == 'keep_recent' else 1}")
    return {"variant": args.variant, "gamma": int(args.gamma), "engage_mode": mode,
            "num_groups": {"ratio": NUM_GROUPS, "rating": NUM_GROUPS, "none": 1}.get(
                mode, "one per behavior type"),
            "max_iter": int(args.max_iter), "seed": int(args.seed),
            "snapshot_ts": snapshot_ts, "refresh_s": float(refresh_days) * 86400.0,
            "refresh_days": float(refresh_days), "keep_recent": int(args.keep_recent),
            "max_cluster_history": int(args.max_cluster_history),
            "embeddings": args.embeddings or f"fallback:category_anchored_random(d="
                                              f"{args.fallback_dim})",
            "fallback_dim": int(args.fallback_dim), "backend": _backend(args.backend),
            "kmeans": "Lloyd (k-means++), " + {"numba": "compiled per-set queue",
                                               "numpy": "numpy batched"}[_backend(args.backend)]}


def _backend(name: str) -> str:
    if name == "auto":
        return "numba" if cluster_numba.AVAILABLE else "numpy"
    if name == "numba" and not cluster_numba.AVAILABLE:
        raise ClusterError("--backend numba: numba is not installed (pip install numba)")
    return name


def _sum_counts(parts: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for d in parts:
        for k, v in d.items():
            if isinstance(v, Mapping):
                out[k] = _sum_counts([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def _beam_dofn():
    """The DoFn class (built lazily so the NumPy part imports without Beam)."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    class ClusterRecords(beam.DoFn):
        """Serialized per-user record -> clustered records; tagged outputs ``members``
        (JSON lines) and ``counts`` (one dict per bundle, emitted in finish_bundle)."""

        def __init__(self, settings: Mapping[str, Any], split: str, emb_path: Optional[str],
                     with_members: bool):
            super().__init__()
            self._s, self._split = dict(settings), split
            self._emb_path, self._with_members = emb_path, with_members

        def setup(self):
            tables = None
            if self._emb_path:
                with FileSystems.open(self._emb_path) as f:
                    z = np.load(f)
                    tables = (z["item_table"], z["cate_table"])
            self._embedder = Embedder(tables, self._s["fallback_dim"], self._s["seed"])
            self._users = Metrics.counter(NAMESPACE, "users")
            self._records = Metrics.counter(NAMESPACE, "records_out")

        def start_bundle(self):
            self._counts: Dict[str, Any] = {}

        def process(self, raw: bytes):
            s = self._s
            rec = parse_record(raw)
            stats: Dict[str, Any] = {"users": 1, "input_rows": int(len(rec["hist_ts"]))}
            outs = cluster_record(rec, self._embedder, s["engage_mode"], s["snapshot_ts"],
                                  s["refresh_s"], s["keep_recent"], s["max_cluster_history"],
                                  s["gamma"], s["variant"], s["max_iter"], s["seed"], stats,
                                  s["backend"])
            self._counts = _sum_counts([self._counts, {self._split: stats}])
            self._users.inc()
            for o in outs:
                self._records.inc()
                yield encode_clustered(o)
                if self._with_members:
                    yield beam.pvalue.TaggedOutput("members", json.dumps(
                        {"user_key": o["user_key"], "snapshot": o["snapshot"],
                         "imp_ts": o["imps"]["imp_ts"].tolist(), "members": o["members"]},
                        sort_keys=True))

        def finish_bundle(self):
            if self._counts:
                yield beam.pvalue.TaggedOutput("counts", WindowedValue(
                    self._counts, GlobalWindow().max_timestamp(), [GlobalWindow()]))
            self._counts = {}

    return ClusterRecords


def build_pipeline(p, settings: Mapping[str, Any], args: argparse.Namespace,
                   emb_path: Optional[str]) -> None:
    """Read every split, cluster per user record, write the clustered splits."""
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from tfmodels import schema as S

    dofn = _beam_dofn()
    counts = []
    for split in S.SPLITS:
        files = FileSystems.match([S.split_pattern(args.data, split)])[0].metadata_list
        prefix = FileSystems.join(args.output, split)
        if not files:
            continue
        res = (p
               | f"Read_{split}" >> beam.io.ReadFromTFRecord(
                   S.split_pattern(args.data, split), coder=beam.coders.BytesCoder(),
                   compression_type=CompressionTypes.GZIP)
               # a shard arrives as one bundle: let a distributed runner spread the users
               | f"Spread_{split}" >> beam.Reshuffle()
               | f"Cluster_{split}" >> beam.ParDo(
                   dofn(settings, split, emb_path, args.write_members)).with_outputs(
                   "members", "counts", main="records"))
        _ = res.records | f"Write_{split}" >> beam.io.WriteToTFRecord(
            prefix, file_name_suffix=".tfrecord.gz", num_shards=args.num_shards,
            compression_type=CompressionTypes.GZIP)
        if args.write_members:
            _ = res.members | f"WriteMembers_{split}" >> beam.io.WriteToText(
                FileSystems.join(args.output, MEMBERS_DIR, split), file_name_suffix=".jsonl")
        counts.append(res.counts)
    _ = (tuple(counts)
         | "AllCounts" >> beam.Flatten()
         | "SumCounts" >> beam.CombineGlobally(_sum_counts)
         | "CountsJson" >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
         | "WriteCounts" >> beam.Map(_write_text, FileSystems.join(args.output, COUNTS_FILE)))


def _write_text(content: str, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.create(path) as f:
        f.write(content.encode("utf-8"))


def _read_text(path: str) -> str:
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def _existing(out: str) -> List[str]:
    from apache_beam.io.filesystems import FileSystems
    from tfmodels import schema as S
    pats = [S.split_pattern(out, s) for s in S.SPLITS] + [
        FileSystems.join(out, n) for n in (S.META_FILE, COUNTS_FILE, EMBEDDINGS_FILE)] + [
        FileSystems.join(out, MEMBERS_DIR, "*.jsonl"), FileSystems.join(out, "vocab", "*.tsv")]
    found: List[str] = []
    for r in FileSystems.match(pats):
        found.extend(m.path for m in r.metadata_list)
    return found


def _summary(counts: Mapping[str, Any]) -> Dict[str, Any]:
    tot = _sum_counts(counts.values())
    clustered = tot.get("clustered_rows", 0)
    virtual = tot.get("virtual_items", 0)
    return {"users": tot.get("users", 0), "records_out": tot.get("records_out", 0),
            "records_with_clusters": tot.get("records_with_clusters", 0),
            "input_rows": tot.get("input_rows", 0), "clustered_rows": clustered,
            "virtual_items": virtual, "raw_rows": tot.get("raw_rows", 0),
            "dropped_rows": tot.get("dropped_rows", 0),
            "impressions": tot.get("impressions", 0),
            "mean_cluster_size": clustered / virtual if virtual else None,
            "compression": virtual / clustered if clustered else None,
            "cluster_accuracy": tot.get("accuracy_sum", 0.0) / clustered if clustered else None,
            "cluster_seconds": round(tot.get("cluster_seconds", 0.0), 3),
            "kmeans_sets": tot.get("kmeans_sets", 0),
            "chunk_fallbacks": tot.get("chunk_fallbacks", 0)}


def run(args: argparse.Namespace, beam_args: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the clustering job; returns the report (also stored in the output's meta.json)."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from tfmodels import schema as S

    t0 = time.time()
    beam_args = list(beam_args or [])
    try:
        meta = S.read_meta(args.data)
    except FileNotFoundError as e:
        raise ClusterError(str(e)) from None
    if meta.get("clustering"):
        raise ClusterError(f"--data {args.data!r} is already a clustered dataset; pass the "
                           f"prepared (unclustered) one")
    settings = resolve_settings(args, meta)
    found = _existing(args.output)
    if found:
        if not args.overwrite:
            raise ClusterError(f"--output {args.output!r} already holds a dataset ({len(found)} "
                               f"files); pass --overwrite or choose another folder")
        FileSystems.delete(found)
    if "://" not in args.output:
        os.makedirs(args.output, exist_ok=True)
    emb_path = None
    if args.embeddings:
        _log(f"loading item embeddings from run {args.embeddings}")
        item, cate = load_run_tables(args.embeddings, meta["vocab"])
        emb_path = FileSystems.join(args.output, EMBEDDINGS_FILE)
        with FileSystems.create(emb_path) as f:
            np.savez(f, item_table=item, cate_table=cate)
    _log(f"data={args.data} output={args.output} variant={settings['variant']} "
         f"gamma={settings['gamma']} engage={settings['engage_mode']} "
         f"snapshot_ts={settings['snapshot_ts']} refresh_days={settings['refresh_days']} "
         f"keep_recent={settings['keep_recent']} embeddings={settings['embeddings']}")
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(p, settings, args, emb_path)
    t_run = time.time()
    result = p.run()
    result.wait_until_finish()
    run_s = time.time() - t_run
    counts_path = FileSystems.join(args.output, COUNTS_FILE)
    counts = json.loads(_read_text(counts_path)) if FileSystems.exists(counts_path) else {}
    summary = _summary(counts)
    out_meta = dict(meta)
    out_meta["clustering"] = {
        "settings": settings, "source_data": args.data, "summary": summary,
        "per_split": {k: _summary({k: v}) for k, v in counts.items()},
        "pipeline_seconds": round(run_s, 3),
        "users_per_second": round(summary["users"] / run_s, 2) if run_s > 0 else None,
        "beam_args": beam_args}
    for split in S.SPLITS:
        if split in out_meta.get("splits", {}) and split in counts:
            out_meta["splits"][split] = dict(out_meta["splits"][split],
                                             records=counts[split].get("records_out", 0),
                                             history_rows=counts[split].get("virtual_items", 0)
                                             + counts[split].get("raw_rows", 0))
    # vocabularies are unchanged: copy them so the output is a complete dataset
    vocab = FileSystems.match([FileSystems.join(args.data, "vocab", "*.tsv")])[0].metadata_list
    for m in vocab:
        dst = FileSystems.join(args.output, "vocab", m.path.rsplit("/", 1)[-1])
        if "://" not in dst:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        _write_text(_read_text(m.path), dst)
    _verify_shards(args.output, args.num_shards, [s for s in S.SPLITS if s in counts])
    with FileSystems.create(FileSystems.join(args.output, S.META_FILE)) as f:
        f.write(json.dumps(out_meta, indent=2, default=str).encode("utf-8"))
    if FileSystems.exists(counts_path):
        FileSystems.delete([counts_path])
    report = dict(out_meta["clustering"], wall_seconds=round(time.time() - t0, 3),
                  output=args.output)
    acc = summary["cluster_accuracy"]
    size = summary["mean_cluster_size"]
    _log(f"users {summary['users']:,} -> records {summary['records_out']:,} "
         f"({summary['records_with_clusters']:,} with clusters); behaviors clustered "
         f"{summary['clustered_rows']:,} -> {summary['virtual_items']:,} virtual items "
         f"(mean size {size:.2f}; accuracy {acc:.3f}); raw rows {summary['raw_rows']:,}"
         if size is not None else
         f"users {summary['users']:,} -> records {summary['records_out']:,}; nothing clustered "
         f"(histories shorter than keep_recent, or no snapshot before the impressions)")
    _log(f"pipeline {run_s:.1f}s = {report['users_per_second']} users/s "
         f"(clustering itself {summary['cluster_seconds']:.1f}s); wrote {args.output}")
    return report


def _verify_shards(out: str, num_shards: int, splits: Sequence[str]) -> None:
    from apache_beam.io.filesystems import FileSystems
    from tfmodels import schema as S
    for split in splits:
        found = FileSystems.match([S.split_pattern(out, split)])[0].metadata_list
        if len(found) != num_shards:
            raise ClusterError(f"expected {num_shards} {split} shards in {out}, found "
                               f"{len(found)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m beam_jobs.cluster --data D --output O [Beam options]``."""
    from beam_jobs import beam_main
    return beam_main("cluster", __doc__, add_arguments, run, ClusterError, argv)


if __name__ == "__main__":
    sys.exit(main())
