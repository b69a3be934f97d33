"""ENCODE (METHODS 2.2): metric-learning dimension reduction, per-user spherical KMeans,
intra-cluster and online target attention with one relevance metric (scaled cosine).

Paper: "EfficieNt Clustering based twO-stage interest moDEling" (seed 001). Equation
ids are the spec's (E1-E10); the paper's own numbers are in brackets.

Pipeline per user (``user_cache``), shapes with B users, L positions, d = emb dim,
m = ``reduced_dim``, K = ``num_clusters``:

* (E1) [Eq. 11] ``cosine_distance``: dis(a, b) = 1 - cos(a, b).
* (E2) [Eq. 9]  ``scaled_cosine``: sim(a, b) = beta * cos(a, b), beta = 20
  ([interp] the garbled Eq. 9 is read as a multiplication; ``beta_mode='divide'``
  keeps the alternative cos / beta).
* (E3) [Eq. 4]  :class:`MetricDimensionReduction`: h_i = W_h^T s_i, s [B, L, d] -> h [B, L, m],
  W_h [d, m] initialised N(0, 1).
* (E4-E6) [Eqs. 5-7] :meth:`MetricDimensionReduction.triplet_terms` /
  :meth:`~MetricDimensionReduction.triplet_loss`: within-sequence sampling of
  two other real behaviors per real anchor, the closer one in the ORIGINAL space is
  the positive, dynamic margin alpha_i = dis(s_i, s_n) - dis(s_i, s_p), loss
  max(0, dis(h_i, h_p) - dis(h_i, h_n) + alpha_i) averaged over real anchors, then
  over the batch (rows with < 3 real behaviors contribute 0). s enters under
  stop_gradient, so this loss trains W_h only. Weighted by ``triplet_weight`` (0.1,
  E10) and added with ``add_loss`` in training only.
* (E7) [Alg. 1 line 11] :func:`spherical_kmeans`: batched in-graph KMeans with the
  cosine distance, deterministic farthest-point init ([interp]: the most recent real
  behavior, then repeatedly the real behavior farthest from the seeds so far;
  ``kmeans_init='spaced'`` keeps the first default, evenly spaced real positions),
  T = 15 iterations, empty clusters keep their previous center, padding never
  assigned, clusters beyond the number of real behaviors masked.
* (E8) [Eq. 8] :class:`IntraClusterAttention`: per cluster, softmax over its members
  of sim(h_i, c_k); values are the ORIGINAL embeddings s_i -> U [B, K, d], mask [B, K].

Per candidate (``score``):

* (E9) [Eq. 10] :class:`InterestTargetAttention`: I = sum_k softmax_k(sim(u_k, x_t)) u_k
  over the non-empty clusters; ``online_metric='dot'`` is the ENCODE- ablation
  (scaled dot product u . x / sqrt(d)). O(K d) per candidate.

Gradient flow through the clustering (training runs E3 -> E9 end to end, [interp])
---------------------------------------------------------------------------------
The KMeans iterations run on ``stop_gradient(h)``: the cluster *assignments* are
integer argmaxes and carry no gradient. After the last assignment the centers are
recomputed *differentiably* from h, c_k = mean_{i in C_k} h_i / ||h_i|| (numerically the
same centers the last iteration produced). So the CTR loss reaches
  * the behavior embeddings s_i through the values of (E8) and through h_i = W_h^T s_i,
  * W_h through the intra-cluster softmax weights, both via h_i and via the
    recomputed centers c_k (which are functions of the members' h),
  * the target embedding through (E9).
The triplet loss reaches W_h only (its s is under stop_gradient). With
``reduction_loss=False`` (untrained random projection ablation) W_h is a frozen
N(0, 1) matrix: neither loss updates it and no triplet loss is added.

Deviations / readings (all [interp] choices of the spec, restated where they act):
  * KMeans centers are the mean of the members' *unit-normalised* h (spherical
    KMeans). The spec's "mean of its members' h" is read this way so that the
    assignments are invariant to rescaling any h_i (faithfulness test 3).
  * Random sampling (E4) is a counter-based hash of (``seed``, a fingerprint of the
    row's real item ids, the anchor's rank among real behaviors, stream), not a
    stateful RNG: deterministic for a fixed seed, never picks padding, and appending
    padding or garbage at padded positions changes no sample (hence no loss). The
    same window gets the same triplets each time it is seen; different windows
    (users, impressions) get different ones.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import NEG_INF, masked_softmax, serializable
from tfmodels.methods.base import LongSequenceModule

_EPS = 1e-12
#: measurement only (docs/benchmarks.md, issue 22 training step): True runs the
#: KMeans assignment and the triplet distances as before that work.
_REFERENCE_TRAINING = False
_M32 = 0xFFFFFFFF


# ---- metric (E1, E2) -------------------------------------------------------------------------
def l2n(x: tf.Tensor) -> tf.Tensor:
    """Unit-normalise the last axis; a zero row stays zero (no NaN, finite gradient)."""
    return tf.math.l2_normalize(x, axis=-1, epsilon=_EPS)


def cosine_distance(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """(E1) dis(a, b) = 1 - a.b / (|a| |b|) over the last axis (broadcasting)."""
    return 1.0 - tf.reduce_sum(l2n(a) * l2n(b), axis=-1)


def scaled_cosine(cos: tf.Tensor, beta: float, beta_mode: str = "multiply") -> tf.Tensor:
    """(E2) sim = beta * cos ('multiply', default) or cos / beta ('divide')."""
    return cos * beta if beta_mode == "multiply" else cos / beta


# ---- deterministic counter-based sampling ----------------------------------------------------
def _mix32(x: tf.Tensor) -> tf.Tensor:
    """32-bit integer hash (lowbias32-style finaliser) on int64 tensors holding uint32."""
    x = tf.bitwise.bitwise_and(x, _M32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x45D9F3B, _M32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x45D9F3B, _M32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _uniform(seed: int, salt: tf.Tensor, rank: tf.Tensor, stream: int) -> tf.Tensor:
    """Uniform [0, 1) per (seed, row salt [B], anchor rank [B, L], stream)."""
    base = _mix32(salt + _mix32(tf.constant(int(seed) * 2 + 0x2545F491, tf.int64)))  # [B]
    x = _mix32(base[:, None] + _mix32(rank * 4 + stream + 0x1B873593))
    return tf.cast(x, tf.float64) / 4294967296.0


def valid_positions(mask: tf.Tensor) -> tf.Tensor:
    """Positions of the real rows first, in order [B, L] (stable, any mask pattern)."""
    return tf.argsort(tf.cast(mask <= 0, tf.int32), axis=1, stable=True)


def row_fingerprint(mask: tf.Tensor, item_id: Optional[tf.Tensor]) -> tf.Tensor:
    """int64 [B] salt from the real item ids and their ranks (padding ignored)."""
    valid = tf.cast(mask > 0, tf.int64)
    count = tf.reduce_sum(valid, 1)
    if item_id is None:
        return count
    rank = tf.cumsum(valid, axis=1) - 1
    h = _mix32(_mix32(tf.cast(item_id, tf.int64)) + rank * 0x85EBCA6B)
    return tf.bitwise.bitwise_and(tf.reduce_sum(h * valid, 1) + count, _M32)


def sample_pairs(mask: tf.Tensor, seed: int, salt: tf.Tensor):
    """(E4) For every position, two distinct other real positions of the same row.

    Returns (j_pos, k_pos, anchor_ok) [B, L]: uniform over pairs of real positions
    different from the anchor and from each other; ``anchor_ok`` is 1 where the
    position is real and the row has >= 3 real behaviors (elsewhere the picks are
    meaningless but still inside [0, L)).
    """
    valid = tf.cast(mask > 0, tf.int64)
    n = tf.reduce_sum(valid, 1, keepdims=True)                       # [B, 1]
    rank = tf.maximum(tf.cumsum(valid, axis=1) - 1, 0)               # anchor rank among real
    u1, u2 = _uniform(seed, salt, rank, 1), _uniform(seed, salt, rank, 2)
    n1 = tf.maximum(n - 1, 1)
    n2 = tf.maximum(n - 2, 1)
    r1 = tf.minimum(tf.cast(tf.floor(u1 * tf.cast(n1, tf.float64)), tf.int64), n1 - 1)
    j = r1 + tf.cast(r1 >= rank, tf.int64)                           # skip the anchor
    r2 = tf.minimum(tf.cast(tf.floor(u2 * tf.cast(n2, tf.float64)), tf.int64), n2 - 1)
    lo, hi = tf.minimum(rank, j), tf.maximum(rank, j)
    k = r2 + tf.cast(r2 >= lo, tf.int64)
    k = k + tf.cast(k >= hi, tf.int64)                               # skip anchor and j
    length = tf.cast(tf.shape(mask)[1], tf.int64)
    pos = valid_positions(mask)
    j_pos = tf.gather(pos, tf.clip_by_value(j, 0, length - 1), batch_dims=1)
    k_pos = tf.gather(pos, tf.clip_by_value(k, 0, length - 1), batch_dims=1)
    ok = tf.cast(mask > 0, tf.float32) * tf.cast(n >= 3, tf.float32)
    return j_pos, k_pos, ok


# ---- (E3-E6) ---------------------------------------------------------------------------------
@serializable
class MetricDimensionReduction(tf.keras.layers.Layer):
    """(E3) h = W_h^T s with W_h [d, m] ~ N(0, 1), and the (dynamic) triplet loss (E4-E6).

    Args:
      reduced_dim: m (paper 4).
      margin: 'dynamic' (E5, alpha_i = dis(s_i, s_n) - dis(s_i, s_p)) or 'fixed'.
      fixed_margin: alpha of the fixed-margin ablation (paper 0.2).
      trainable_projection: False = the untrained random projection ablation
        (W_h frozen at its N(0, 1) init).
      seed: sampling seed (E4).
    Shapes: s [B, L, d] -> h [B, L, m].
    """

    def __init__(self, reduced_dim: int = 4, margin: str = "dynamic", fixed_margin: float = 0.2,
                 trainable_projection: bool = True, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if margin not in ("dynamic", "fixed"):
            raise ValueError(f"margin must be 'dynamic' or 'fixed', got {margin!r}")
        self.reduced_dim, self.margin = int(reduced_dim), margin
        self.fixed_margin, self.trainable_projection = float(fixed_margin), bool(trainable_projection)
        self.seed = int(seed)

    def build(self, input_shape):
        self.w_h = self.add_weight(
            "w_h", shape=[int(input_shape[-1]), self.reduced_dim],
            initializer=tf.keras.initializers.RandomNormal(0.0, 1.0),
            trainable=self.trainable_projection)
        super().build(input_shape)

    def call(self, s):
        return tf.einsum("bld,dm->blm", s, self.w_h)

    def triplet_terms(self, s: tf.Tensor, mask: tf.Tensor,
                      item_id: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
        """Per-anchor pieces of (E4-E6) [B, L]: ``pos``/``neg`` positions, ``alpha``,
        ``loss`` (hinge per anchor, 0 where not ``valid``), ``valid``.

        s (padded rows zeroed by the caller) is under stop_gradient: only W_h learns.
        """
        s = tf.stop_gradient(s)
        h = self(s)
        salt = row_fingerprint(mask, item_id)
        j, k, ok = sample_pairs(mask, self.seed, salt)
        if _REFERENCE_TRAINING:
            s_j, s_k = tf.gather(s, j, batch_dims=1), tf.gather(s, k, batch_dims=1)
            d_j, d_k = cosine_distance(s, s_j), cosine_distance(s, s_k)   # original space
        else:
            # (E1) with each row normalised once and the unit rows gathered: the same
            # numbers as cosine_distance(s, gather(s, j)) (l2n is row-wise), without
            # normalising the two gathered [B, L, d] copies again.
            sn = l2n(s)
            d_j = 1.0 - tf.reduce_sum(sn * tf.gather(sn, j, batch_dims=1), axis=-1)
            d_k = 1.0 - tf.reduce_sum(sn * tf.gather(sn, k, batch_dims=1), axis=-1)
        j_is_pos = d_j <= d_k                                          # (E4) p = argmin
        pos, neg = tf.where(j_is_pos, j, k), tf.where(j_is_pos, k, j)
        d_sp, d_sn = tf.minimum(d_j, d_k), tf.maximum(d_j, d_k)
        alpha = (d_sn - d_sp) if self.margin == "dynamic" \
            else tf.fill(tf.shape(d_sp), self.fixed_margin)              # (E5)
        if _REFERENCE_TRAINING:
            h_p, h_n = tf.gather(h, pos, batch_dims=1), tf.gather(h, neg, batch_dims=1)
            hinge = tf.nn.relu(cosine_distance(h, h_p) - cosine_distance(h, h_n) + alpha)
        else:   # (E6), h normalised once (as above)
            hn = l2n(h)
            d_p = 1.0 - tf.reduce_sum(hn * tf.gather(hn, pos, batch_dims=1), axis=-1)
            d_n = 1.0 - tf.reduce_sum(hn * tf.gather(hn, neg, batch_dims=1), axis=-1)
            hinge = tf.nn.relu(d_p - d_n + alpha)
        return {"pos": pos, "neg": neg, "alpha": alpha * ok, "loss": hinge * ok, "valid": ok}

    def triplet_loss(self, s, mask, item_id=None) -> tf.Tensor:
        """(E6) scalar: mean over real anchors per row, then mean over the batch."""
        t = self.triplet_terms(s, mask, item_id)
        per_row = tf.math.divide_no_nan(tf.reduce_sum(t["loss"], 1), tf.reduce_sum(t["valid"], 1))
        return tf.reduce_mean(per_row)

    def get_config(self):
        return {**super().get_config(), "reduced_dim": self.reduced_dim, "margin": self.margin,
                "fixed_margin": self.fixed_margin,
                "trainable_projection": self.trainable_projection, "seed": self.seed}


# ---- (E7) ------------------------------------------------------------------------------------
KMEANS_INITS = ("farthest", "spaced")


def _lowest_argmax(score: tf.Tensor) -> tf.Tensor:
    """Position of the maximum of ``score`` [B, L] along axis 1, ties -> lowest position.

    Written out (max, then the smallest position that reaches it) because
    ``tf.argmax`` leaves the winner of a tie unspecified, and exact ties are common
    here (a repeated item gives identical rows); the seeds must not depend on the
    device or kernel.
    """
    length = tf.shape(score)[1]
    top = tf.reduce_max(score, axis=1, keepdims=True)
    idx = tf.range(length, dtype=tf.int32)[None, :]
    return tf.reduce_min(tf.where(score >= top, idx, length), axis=1)


def farthest_point_seeds(x: tf.Tensor, valid: tf.Tensor, num_clusters: int) -> tf.Tensor:
    """(E7 init, default, [interp]) deterministic farthest-point seeding.

    x [B, L, m] unit rows, valid [B, L] (1 = real). Seed 0 is the first real
    position (rank 0; the pipeline orders windows most recent first, so this is the
    user's most recent behavior in the window). Seed k is the real, not yet chosen
    position whose cosine distance to its nearest chosen seed is largest (ties: the
    lowest position). Padded rows are never chosen. Returns positions int32 [B, K];
    seeds k >= n (a user with n < K real behaviors) point at an arbitrary position
    and are masked by the caller. O(K L m) per user, i.e. one extra Lloyd
    assignment; the loop over K is unrolled in the graph (K is a static int).

    This is Gonzalez's farthest-first traversal (k-center 2-approximation), i.e.
    k-means++ with the D^2 sampling replaced by its arg-max, so no randomness.
    Hand-written rather than taken from a library (sklearn's ``kmeans_plusplus``,
    ``tf.compat.v1.train``-era ``KMeans``) because it has to run in-graph,
    batched over users, masked, deterministic and exportable in the
    ``user_tower`` signature.
    """
    length = tf.shape(x)[1]
    ok = valid > 0
    first = valid_positions(valid)[:, 0]                                   # [B]
    picks = [first]
    chosen = tf.one_hot(first, length, on_value=True, off_value=False)      # [B, L] bool
    # x is unit-normalised: dis = 1 - x_i . x_seed (E1).
    min_dist = 1.0 - tf.einsum("blm,bm->bl", x, tf.gather(x, first, batch_dims=1))
    for _ in range(1, int(num_clusters)):
        # -1 < any cosine distance (>= 0 up to rounding): padding and chosen rows lose.
        score = tf.where(ok & ~chosen, min_dist, -1.0)
        pos = _lowest_argmax(score)
        picks.append(pos)
        chosen = chosen | tf.one_hot(pos, length, on_value=True, off_value=False)
        min_dist = tf.minimum(
            min_dist, 1.0 - tf.einsum("blm,bm->bl", x, tf.gather(x, pos, batch_dims=1)))
    return tf.stack(picks, 1)


def _assign_nearest(cos: tf.Tensor, dead_logit: tf.Tensor, all_live: tf.Tensor) -> tf.Tensor:
    """argmax_k (cos + dead_logit) [B, L] int32, the same winners as ``tf.argmax`` of
    the sum (issue 22, training step; the KMeans loop is ~2/3 of ENCODE's step):

    * ``tf.math.top_k(k=1)``: its CPU kernel has a k = 1 loop (15 ms against
      ``tf.argmax``'s 25 ms on [256, 1000, 30]); ties go to the lowest index, as
      documented for top_k and as ``tf.argmax`` does on CPU (the test holds the two
      to each other on inputs full of ties);
    * the [B, L, K] add of the dead-cluster logits runs only when a cluster of the
      batch is dead (a user with fewer than K real behaviors): adding zeros changes
      no winner, so skipping it is exact (13 ms per iteration).
    """
    cos = tf.cond(all_live, lambda: cos, lambda: cos + dead_logit)
    return tf.math.top_k(cos, k=1).indices[..., 0]


def spherical_kmeans(h: tf.Tensor, mask: tf.Tensor, num_clusters: int,
                     iters: int = 15, init: str = "farthest") -> Dict[str, tf.Tensor]:
    """(E7) Batched spherical KMeans with the cosine distance, no gradient.

    Args: h [B, L, m] (any scale; only directions matter), mask [B, L].
    Init [interp] (the paper says only "KMeans"; nothing on initialisation):

    * ``'farthest'`` (default): :func:`farthest_point_seeds` -- the most recent real
      behavior, then repeatedly the real behavior farthest (cosine) from the seeds
      so far. Recovers well-separated interests whatever their order in the
      sequence (tests/test_encode.py, shuffled blobs: 12 of 12 users).
    * ``'spaced'`` (the first default, kept as an option): cluster k < min(K, n)
      starts at the real behavior of rank floor(k n / min(K, n)) (evenly spaced over
      the n real positions). When two seeds land in one true cluster, Lloyd stays
      in that local optimum: on interleaved (shuffled) well-separated blobs it
      recovers only 4 of 12 users.

    Both are deterministic and never seed on padding. Clusters k >= n are masked
    throughout (a user with n < K real behaviors has at most n non-empty
    clusters). Each of the ``iters`` iterations assigns every real row to the center
    of highest cosine (padding is never assigned) and then sets each center to the
    mean of its members' unit vectors; an empty cluster keeps its previous center.

    Returns ``assign`` [B, L] int32 (-1 on padding), ``onehot`` [B, L, K] (0 on
    padding), ``centers`` [B, K, m] after the last update, ``prev_centers`` the
    centers the last assignment was made against, ``cluster_mask`` [B, K]
    (non-empty after the last assignment), ``counts`` [B, K], ``seeds`` [B, K] the
    initial positions (meaningful where k < min(K, n)).
    """
    x = tf.stop_gradient(l2n(h))
    valid = tf.cast(mask > 0, tf.float32)
    length = tf.shape(x)[1]
    n = tf.cast(tf.reduce_sum(valid, 1), tf.int32)                        # [B]
    k_eff = tf.minimum(n, num_clusters)                                   # [B]
    ks = tf.range(num_clusters, dtype=tf.int32)[None, :]                  # [1, K]
    live = tf.cast(ks < k_eff[:, None], tf.float32)                       # [B, K]
    if init == "farthest":
        init_pos = farthest_point_seeds(x, valid, num_clusters)
    elif init == "spaced":
        init_rank = (ks * n[:, None]) // tf.maximum(k_eff[:, None], 1)
        init_rank = tf.clip_by_value(init_rank, 0, tf.maximum(length - 1, 0))
        init_pos = tf.gather(valid_positions(valid), init_rank, batch_dims=1)
    else:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    centers = tf.gather(x, init_pos, batch_dims=1) * live[..., None]      # [B, K, m]

    dead_logit = tf.cast(NEG_INF, x.dtype) * (1.0 - live)[:, None, :]    # [B, 1, K]
    all_live = tf.reduce_all(live > 0)
    # Center sums by segment sums over flattened (user, cluster) ids: O(L m) per
    # iteration instead of a one-hot [B, L, K] product; padding goes to a dump segment.
    batch = tf.shape(x)[0]
    flat_x = tf.reshape(x, [-1, tf.shape(x)[2]])
    num_seg = batch * num_clusters
    row_base = tf.range(batch, dtype=tf.int32)[:, None] * num_clusters     # [B, 1]
    prev = centers
    assign = tf.fill(tf.shape(mask), -1)
    counts = tf.zeros(tf.shape(live))
    for _ in range(int(iters)):
        prev = centers
        cos = tf.einsum("blm,bkm->blk", x, l2n(centers))
        if _REFERENCE_TRAINING:
            cos = cos + dead_logit
            best = tf.argmax(cos, -1, output_type=tf.int32)
        else:
            best = _assign_nearest(cos, dead_logit, all_live)
        assign = tf.where(valid > 0, best, -1)
        seg = tf.reshape(tf.where(assign >= 0, row_base + assign, num_seg), [-1])
        sums = tf.math.unsorted_segment_sum(flat_x, seg, num_seg + 1)[:num_seg]
        cnt = tf.math.unsorted_segment_sum(tf.reshape(valid, [-1]), seg, num_seg + 1)[:num_seg]
        counts = tf.reshape(cnt, tf.shape(live))                              # [B, K]
        mean = tf.reshape(sums, tf.shape(centers)) / tf.maximum(counts, 1.0)[..., None]
        centers = tf.where(counts[..., None] > 0, mean, centers)            # empty: keep
    onehot = tf.one_hot(assign, num_clusters) * valid[..., None]            # -1 -> zero row
    cluster_mask = tf.cast(counts > 0, tf.float32)
    return {"assign": assign, "onehot": onehot, "centers": centers, "prev_centers": prev,
            "cluster_mask": cluster_mask, "counts": counts, "seeds": init_pos}


# ---- (E8) ------------------------------------------------------------------------------------
@serializable
class IntraClusterAttention(tf.keras.layers.Layer):
    """(E7 centers + E8) Interests from clusters: u_k = sum_{i in C_k} softmax_i(sim(h_i, c_k)) s_i.

    Centers are recomputed differentiably from h with the (constant) final KMeans
    assignment: c_k = mean_{i in C_k} h_i/|h_i|. No weights.
    Shapes: h [B, L, m], s [B, L, d], onehot [B, L, K] -> U [B, K, d]; also returns
    the weights [B, L, K] (each non-empty cluster's column sums to 1).
    """

    def __init__(self, beta: float = 20.0, beta_mode: str = "multiply", **kwargs):
        super().__init__(**kwargs)
        self.beta, self.beta_mode = float(beta), beta_mode

    def call(self, h, s, onehot, assign=None):
        """``assign`` [B, L] int32 (-1 on padding; :func:`spherical_kmeans`'s) selects
        the segment formulation (:meth:`_by_segments`); without it, the [B, L, K] one."""
        if assign is not None and not _REFERENCE_TRAINING:
            return self._by_segments(h, s, onehot, assign)
        hn = l2n(h)
        counts = tf.reduce_sum(onehot, 1)                                   # [B, K]
        centers = tf.einsum("blk,blm->bkm", onehot, hn) / tf.maximum(counts, 1.0)[..., None]
        cos = tf.einsum("blm,bkm->blk", hn, l2n(centers))
        weights = masked_softmax(scaled_cosine(cos, self.beta, self.beta_mode), onehot, axis=1)
        return tf.einsum("blk,bld->bkd", weights, s), weights

    def _by_segments(self, h, s, onehot, assign):
        """The same U and weights with every behavior's own cluster only (issue 22,
        training step): a behavior belongs to exactly one cluster, so the [B, L, K]
        cosine, masked softmax over L and the one-hot products become per-row values and
        segment sums over the flattened (user, cluster) ids, O(L (m + d)) per user
        instead of O(L K (m + d)):

        c_k = (sum_{a(i)=k} hn_i) / n_k, cos_i = hn_i . c_a(i) / |c_a(i)|,
        w_i = exp(z_i - max_{a(j)=a(i)} z_j) / sum_{a(j)=a(i)} exp(z_j - max), z = sim,
        u_k = sum_{a(i)=k} w_i s_i. Padding (assign -1) goes to a dump segment and gets
        weight 0. The subtracted max is under stop_gradient: the softmax does not depend
        on it, so its gradient contribution is 0 in exact arithmetic. Only the order of
        float operations differs from the one-hot formulation (tests/test_encode.py).
        Hand-written segment softmax: TensorFlow has no segment-softmax op.
        """
        num_clusters = onehot.shape[-1] or tf.shape(onehot)[-1]
        batch = tf.shape(h)[0]
        num_seg = batch * num_clusters
        valid = assign >= 0
        seg = tf.where(valid, tf.range(batch)[:, None] * num_clusters + assign, num_seg)
        hn = l2n(h)
        counts = tf.math.unsorted_segment_sum(tf.cast(valid, h.dtype), seg, num_seg + 1)
        sums = tf.math.unsorted_segment_sum(hn, seg, num_seg + 1)          # [BK+1, m]
        centers = l2n(sums / tf.maximum(counts, 1.0)[:, None])
        cos = tf.reduce_sum(hn * tf.gather(centers, seg), -1)              # [B, L]
        z = scaled_cosine(cos, self.beta, self.beta_mode)
        top = tf.stop_gradient(tf.math.unsorted_segment_max(z, seg, num_seg + 1))
        e = tf.where(valid, tf.exp(z - tf.gather(top, seg)), tf.zeros_like(z))
        total = tf.math.unsorted_segment_sum(e, seg, num_seg + 1)
        w = tf.math.divide_no_nan(e, tf.gather(total, seg))                 # [B, L]
        u = tf.math.unsorted_segment_sum(w[..., None] * s, seg, num_seg + 1)[:num_seg]
        u = tf.reshape(u, tf.stack([batch, num_clusters, tf.shape(s)[-1]]))
        return u, onehot * w[..., None]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "beta_mode": self.beta_mode}


# ---- (E9) ------------------------------------------------------------------------------------
@serializable
class InterestTargetAttention(tf.keras.layers.Layer):
    """(E9) I = sum_k softmax_k(sim(u_k, x_t)) u_k over non-empty clusters.

    ``metric='cosine'`` uses (E2); ``metric='dot'`` is ENCODE-: u . x / sqrt(d).
    Shapes: U [B or 1, K, d], mask [B or 1, K], x [B, d] -> [B, d]; a user with no
    non-empty cluster gets zeros.
    """

    def __init__(self, metric: str = "cosine", beta: float = 20.0, beta_mode: str = "multiply",
                 **kwargs):
        super().__init__(**kwargs)
        self.metric, self.beta, self.beta_mode = metric, float(beta), beta_mode

    def attention_weights(self, interests, mask, x):
        batch = tf.shape(x)[0]
        interests = tf.broadcast_to(interests, tf.concat([[batch], tf.shape(interests)[1:]], 0))
        mask = tf.broadcast_to(mask, tf.concat([[batch], tf.shape(mask)[1:]], 0))
        if self.metric == "cosine":
            logits = scaled_cosine(tf.einsum("bkd,bd->bk", l2n(interests), l2n(x)),
                                   self.beta, self.beta_mode)
        else:
            logits = tf.einsum("bkd,bd->bk", interests, x) / math.sqrt(int(x.shape[-1]))
        return masked_softmax(logits, mask), interests

    def call(self, interests, mask, x):
        w, interests = self.attention_weights(interests, mask, x)
        return tf.einsum("bk,bkd->bd", w, interests)

    def get_config(self):
        return {**super().get_config(), "metric": self.metric, "beta": self.beta,
                "beta_mode": self.beta_mode}


# ---- the module ------------------------------------------------------------------------------
@serializable
class Encode(LongSequenceModule):
    """ENCODE long module (METHODS 2.2): cache = K interests, per candidate O(K d).

    Args (flags):
      reduced_dim: m (4). num_clusters: K (30). kmeans_iters: T (15).
      beta: scaling factor (20). beta_mode: 'multiply' (default, [interp]) | 'divide'.
      online_metric: 'cosine' (E9) | 'dot' (ENCODE- ablation).
      reduction_loss: True = train W_h with the triplet loss (and CTR);
        False = untrained random projection (W_h frozen N(0, 1), no triplet loss).
      margin: 'dynamic' (E5) | 'fixed' (``fixed_margin``, paper 0.2).
      triplet_weight: weight of L_tri in (E10) (0.1).
      seed: triplet sampling seed.
      kmeans_init: [interp] 'farthest' (default: deterministic farthest-point seeding)
        | 'spaced' (the first default: evenly spaced real positions; falls into
        local optima on interleaved interests). The paper says nothing on the init.

    ``user_cache`` -> {"interests": U [B, K, d], "mask": [B, K]};
    ``score`` -> I [B, d]; ``call`` adds ``triplet_weight * L_tri`` when training.
    """

    def __init__(self, emb_dim: int, reduced_dim: int = 4, num_clusters: int = 30,
                 kmeans_iters: int = 15, beta: float = 20.0, beta_mode: str = "multiply",
                 online_metric: str = "cosine", reduction_loss: bool = True,
                 margin: str = "dynamic", fixed_margin: float = 0.2,
                 triplet_weight: float = 0.1, seed: int = 0, kmeans_init: str = "farthest",
                 **kwargs):
        super().__init__(emb_dim, **kwargs)
        if kmeans_init not in KMEANS_INITS:
            raise ValueError(f"kmeans_init must be one of {KMEANS_INITS}, got {kmeans_init!r}")
        if beta_mode not in ("multiply", "divide"):
            raise ValueError(f"beta_mode must be 'multiply' or 'divide', got {beta_mode!r}")
        if online_metric not in ("cosine", "dot"):
            raise ValueError(f"online_metric must be 'cosine' or 'dot', got {online_metric!r}")
        if int(num_clusters) < 1 or int(kmeans_iters) < 1 or int(reduced_dim) < 1:
            raise ValueError("num_clusters, kmeans_iters and reduced_dim must be >= 1")
        self.reduced_dim, self.num_clusters = int(reduced_dim), int(num_clusters)
        self.kmeans_iters, self.beta, self.beta_mode = int(kmeans_iters), float(beta), beta_mode
        self.online_metric, self.reduction_loss = online_metric, bool(reduction_loss)
        self.margin, self.fixed_margin = margin, float(fixed_margin)
        self.triplet_weight, self.seed = float(triplet_weight), int(seed)
        self.kmeans_init = kmeans_init
        self.reduction = MetricDimensionReduction(
            self.reduced_dim, margin, self.fixed_margin, trainable_projection=self.reduction_loss,
            seed=self.seed, name="reduction")
        self.extract = IntraClusterAttention(self.beta, beta_mode, name="intra_cluster")
        self.online = InterestTargetAttention(online_metric, self.beta, beta_mode, name="online")

    def encode(self, seq) -> Dict[str, tf.Tensor]:
        """Everything offline: s, h, KMeans result, U, weights (for tests/diagnostics)."""
        mask = tf.cast(seq["mask"], tf.float32)
        s = seq["emb"] * mask[..., None]           # garbage at padded rows never enters
        h = self.reduction(s)                      # (E3) [B, L, m]
        km = spherical_kmeans(h, mask, self.num_clusters, self.kmeans_iters,
                              self.kmeans_init)                                # (E7)
        interests, weights = self.extract(h, s, km["onehot"], km["assign"])   # (E8)
        cmask = km["cluster_mask"]
        return {"s": s, "h": h, "mask": mask, "kmeans": km, "weights": weights,
                "interests": interests * cmask[..., None], "cluster_mask": cmask}

    def user_cache(self, seq, training=None):
        out = self.encode(seq)
        return {"interests": out["interests"], "mask": out["cluster_mask"]}

    def score(self, cache, target, training=None):
        return self.online(cache["interests"], cache["mask"], target["emb"])   # (E9)

    def call(self, seq, target, training=None):
        out = self.encode(seq)
        if training and self.reduction_loss and self.triplet_weight:
            # (E10) L = L_CE + triplet_weight * L_tri; L_CE is the model's task loss.
            self.add_loss(self.triplet_weight * self.reduction.triplet_loss(
                out["s"], out["mask"], seq.get("item_id")))
        return self.score({"interests": out["interests"], "mask": out["cluster_mask"]}, target)

    def get_config(self):
        return {**super().get_config(), "reduced_dim": self.reduced_dim,
                "num_clusters": self.num_clusters, "kmeans_iters": self.kmeans_iters,
                "beta": self.beta, "beta_mode": self.beta_mode,
                "online_metric": self.online_metric, "reduction_loss": self.reduction_loss,
                "margin": self.margin, "fixed_margin": self.fixed_margin,
                "triplet_weight": self.triplet_weight, "seed": self.seed,
                "kmeans_init": self.kmeans_init}
