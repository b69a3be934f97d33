"""Compiled (numba) backend of Algorithm 1: the literal per-set queue with k-means in loops.

Why our own kernel and not scikit-learn / faiss: one user needs hundreds of
k-means calls on sets of 20 to a few thousand rows. scikit-learn's ``KMeans``
pays about 1.2 ms of Python/validation overhead per call (ANCHORS), faiss about
0.16 s per 14,500-behavior user, and the batched NumPy version
(:func:`beam_jobs.cluster_algo.hierarchical_clustering`) still pays NumPy call overhead
and passes over small temporaries. Compiled, each k-means is a few tight loops over
a contiguous [n, d] buffer, so the cost is the arithmetic (ANCHORS: numba 0.069 s
per user at 14,500, one core).

The algorithm is the same as the NumPy backend's, set by set:

* a FIFO queue of sets, seeded with the engagement groups (rows in time order);
* a set of size < gamma is final; otherwise k-means with delta = floor(n^0.3)
  (>= 2; 2 for the binary variants) clusters: k-means++ seeding (one draw per
  center, the same rule as ``_kmeanspp_batched``), Lloyd iterations (Euclidean;
  a set stops when no assignment changes, when its squared center shift is <=
  tol x its mean per-dimension variance, or after ``max_iter`` assignment steps);
  ``balanced_binary``: the ceil(n/2) rows with the smallest margin
  d(x, c0) - d(x, c1) go to cluster 0;
* empty clusters are dropped; a split that leaves one non-empty cluster cuts the
  set in time order into chunks of gamma - 1 (termination guard);
* children are laid out by a stable counting sort, so rows stay in time order.

Random numbers come from numba's own generator seeded per call (``np.random.seed``
inside the compiled function), so a fixed ``seed`` gives the same labels on every
run and worker, but not the same labels as the NumPy backend.

``numba`` is optional at import time: :data:`AVAILABLE` tells whether it loaded;
:mod:`beam_jobs.cluster_algo` falls back to the NumPy backend without it.
"""
from __future__ import annotations

import math

import numpy as np

try:   # pragma: no cover - exercised by whichever environment runs the tests
    import numba
    AVAILABLE = True
except ImportError:   # pragma: no cover
    numba = None
    AVAILABLE = False

VARIANT_CODES = {"adaptive": 0, "binary": 1, "balanced_binary": 2}


def _jit(fn):
    if not AVAILABLE:
        return fn
    # fastmath lets the inner dot products vectorise (reassociation); cache=True keeps the
    # compiled code in __pycache__ so a worker pays the ~2 s compile once per install
    return numba.njit(cache=True, fastmath=True, nogil=True)(fn)


@_jit
def _kmeans_set(x, k, max_iter, tol, balanced, assign):
    """k-means on x [n, d] (float32, contiguous) into ``assign`` [n]; returns #non-empty."""
    n, d = x.shape
    centers = np.empty((k, d), np.float32)
    xx = np.empty(n, np.float32)
    mean = np.zeros(d, np.float64)
    sq = 0.0
    for i in range(n):
        s = np.float32(0.0)
        for f in range(d):
            s += x[i, f] * x[i, f]
            mean[f] += x[i, f]
        xx[i] = s
        sq += s
    var = sq / n
    for f in range(d):
        mean[f] /= n
        var -= mean[f] * mean[f]
    tol_set = tol * max(var, 0.0) / d
    # ---- k-means++ seeding (one draw per center) --------------------------------------
    d2 = np.empty(n, np.float64)
    first = min(int(np.random.random() * n), n - 1)
    for f in range(d):
        centers[0, f] = x[first, f]
    for i in range(n):
        s = np.float32(0.0)
        for f in range(d):
            t = x[i, f] - centers[0, f]
            s += t * t
        d2[i] = s
    for c in range(1, k):
        total = 0.0
        for i in range(n):
            total += d2[i]
        u = np.random.random()
        if total > 0:
            target = u * total
            acc = 0.0
            pick = 0
            for i in range(n):
                acc += d2[i]
                if acc <= target:
                    pick = i + 1
                else:
                    break
        else:   # all remaining distances zero (identical points): any member
            pick = int(u * n)
        pick = min(pick, n - 1)
        for f in range(d):
            centers[c, f] = x[pick, f]
        for i in range(n):
            s = np.float32(0.0)
            for f in range(d):
                t = x[i, f] - centers[c, f]
                s += t * t
            if s < d2[i]:
                d2[i] = s
    # ---- Lloyd --------------------------------------------------------------------------
    cc = np.empty(k, np.float32)
    sums = np.empty((k, d), np.float64)
    counts = np.empty(k, np.int64)
    dist = np.empty((n, k), np.float32)
    margin = np.empty(n, np.float64)
    prev_shift = np.inf
    for it in range(max_iter):
        for c in range(k):
            s = np.float32(0.0)
            for f in range(d):
                s += centers[c, f] * centers[c, f]
            cc[c] = s
        changed = 0
        for i in range(n):          # ||x - c||^2 - ||x||^2 (same argmin)
            for c in range(k):
                s = np.float32(0.0)
                for f in range(d):
                    s += x[i, f] * centers[c, f]
                dist[i, c] = cc[c] - 2.0 * s
        if balanced:
            for i in range(n):
                margin[i] = dist[i, 0] - dist[i, 1]
            order = np.argsort(margin, kind="mergesort")     # stable: ties by position
            half = (n + 1) // 2
            for r in range(n):
                a = 0 if r < half else 1
                i = order[r]
                if a != assign[i]:
                    changed += 1
                assign[i] = a
        else:
            for i in range(n):
                best = 0
                bd = dist[i, 0]
                for c in range(1, k):
                    if dist[i, c] < bd:
                        bd = dist[i, c]
                        best = c
                if best != assign[i]:
                    changed += 1
                assign[i] = best
        if it > 0 and (changed == 0 or prev_shift <= tol_set):
            break
        if it == max_iter - 1:
            break
        sums[:, :] = 0.0
        counts[:] = 0
        for i in range(n):
            a = assign[i]
            counts[a] += 1
            for f in range(d):
                sums[a, f] += x[i, f]
        shift = 0.0
        for c in range(k):
            if counts[c] > 0:
                for f in range(d):
                    v = np.float32(sums[c, f] / counts[c])
                    t = v - centers[c, f]
                    shift += t * t
                    centers[c, f] = v
        prev_shift = shift
    nonempty = 0
    for c in range(k):
        counts[c] = 0
    for i in range(n):
        counts[assign[i]] += 1
    for c in range(k):
        if counts[c] > 0:
            nonempty += 1
    return nonempty


@_jit
def _hierarchical(emb, groups, gamma, variant, max_iter, tol, seed, delta_power, stats,
                  trace):
    """Algorithm 1 over one user's rows; labels [T] in 0..C-1 (order of emission).

    stats[0] += k-means calls, stats[1] += chunk fallbacks; trace [>= 2T + 2, 2] gets
    (set size, delta) of every k-means call in order (for the faithfulness tests)."""
    np.random.seed(seed)
    t, d = emb.shape
    labels = np.full(t, -1, np.int64)
    if t == 0:
        return labels
    perm = np.argsort(groups, kind="mergesort")        # stable: time order inside a group
    cap = 2 * t + 2
    q_start = np.empty(cap, np.int64)
    q_size = np.empty(cap, np.int64)
    head = 0
    tail = 0
    s = 0
    for i in range(1, t + 1):
        if i == t or groups[perm[i]] != groups[perm[s]]:
            q_start[tail] = s
            q_size[tail] = i - s
            tail += 1
            s = i
    x = np.empty((t, d), np.float32)
    assign = np.empty(t, np.int64)
    tmp = np.empty(t, np.int64)
    next_label = 0
    kmax = 2 + int(t ** delta_power + 1e-9)
    offs = np.empty(kmax + 1, np.int64)
    cnt = np.empty(kmax, np.int64)
    while head < tail:
        st = q_start[head]
        n = q_size[head]
        head += 1
        if n < gamma:
            for i in range(st, st + n):
                labels[perm[i]] = next_label
            next_label += 1
            continue
        if variant == 0:
            k = max(2, int(math.floor(n ** delta_power + 1e-9)))
        else:
            k = 2
        xs = x[:n]
        for i in range(n):
            r = perm[st + i]
            for f in range(d):
                xs[i, f] = emb[r, f]
        a = assign[:n]
        a[:] = -1
        nonempty = _kmeans_set(xs, k, max_iter, tol, variant == 2, a)
        trace[stats[0], 0] = n
        trace[stats[0], 1] = k
        stats[0] += 1
        if nonempty <= 1:     # guard: identical rows etc. -> time-order chunks of gamma - 1
            stats[1] += 1
            for c0 in range(st, st + n, gamma - 1):
                for i in range(c0, min(c0 + gamma - 1, st + n)):
                    labels[perm[i]] = next_label
                next_label += 1
            continue
        # stable counting sort of the set's rows by assignment; push the non-empty children
        for c in range(k):
            cnt[c] = 0
        for i in range(n):
            cnt[a[i]] += 1
        offs[0] = 0
        for c in range(k):
            offs[c + 1] = offs[c] + cnt[c]
        for c in range(k):
            cnt[c] = offs[c]
        for i in range(n):
            tmp[cnt[a[i]]] = perm[st + i]
            cnt[a[i]] += 1
        for i in range(n):
            perm[st + i] = tmp[i]
        for c in range(k):
            size = offs[c + 1] - offs[c]
            if size > 0:
                q_start[tail] = st + offs[c]
                q_size[tail] = size
                tail += 1
    return labels


def hierarchical_clustering_numba(emb: np.ndarray, groups: np.ndarray, gamma: int,
                                  variant: str, max_iter: int, seed: int, tol: float,
                                  delta_power: float, stats: dict) -> np.ndarray:
    """Python entry point (validated arguments come from :mod:`beam_jobs.cluster_algo`).

    ``stats`` accumulates ``kmeans_sets`` and ``chunk_fallbacks``; when it has a
    ``trace`` key it gets an int array [calls, 2] of (set size, delta) per k-means call."""
    if not AVAILABLE:
        raise ImportError("numba is not installed; use backend='numpy'")
    counters = np.zeros(2, np.int64)
    trace = np.zeros((2 * len(emb) + 2, 2), np.int64)
    labels = _hierarchical(np.ascontiguousarray(emb, np.float32),
                           np.ascontiguousarray(groups, np.int64), int(gamma),
                           VARIANT_CODES[variant], int(max_iter), float(tol),
                           int(seed) % (2 ** 32), float(delta_power), counters, trace)
    if "trace" in stats:                 # asked for by the caller (tests)
        stats["trace"] = trace[:counters[0]]
    stats["kmeans_sets"] = stats.get("kmeans_sets", 0) + int(counters[0])
    if counters[1]:
        stats["chunk_fallbacks"] = stats.get("chunk_fallbacks", 0) + int(counters[1])
    return labels
