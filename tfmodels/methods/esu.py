"""What the search-based baselines share (METHODS section 3, B4-B7).

* :class:`TargetAttention` -- the ESU of every two-stage baseline (SIM hard, SIM
  soft, ETA): multi-head target attention

      MHTA(q = e_t, K, V) = Concat_a softmax((e_t W^q_a)(K W^k_a)^T / sqrt(d_k)) (V W^v_a) W^o

  with K = V = the k retrieved behavior embeddings, H = 4 heads and d_k = d_v = d / H
  ([interp]: the spec fixes H = 4, not the head width; d / H keeps Concat(heads) d wide,
  as in the Transformer). No weight has a bias: (a) a term added to the logits that is
  constant per head (e.g. a bias of W^q, or a "cross-feature bias" that does not vary
  over the behaviors) changes neither a top-k nor a softmax, so it would be a dead
  parameter (the trap of a public implementation; tests check every weight gets a
  gradient); (b) without biases in W^v / W^o an empty selection gives exactly zero.
  K W^k and V W^v depend on the user only: the modules cache them per behavior row
  (:meth:`TargetAttention.project`) and ``score`` runs q W^q and the softmax over the
  k gathered rows per candidate.
* :class:`SimHash` -- h(x) = 1[x R > 0] in {0, 1}^m with a fixed R in R^{d x m},
  R_ij ~ N(0, 1) drawn by NumPy from ``seed`` (so a rebuilt layer has the same R before
  any weights are loaded), stored as a non-trainable weight (saved and restored with
  the model; never updated by an optimizer).
* :func:`pack_bits` / :func:`hamming` -- signatures packed 32 bits to an int32 word;
  Hamming distance = sum over words of popcount(a XOR b), i.e. the number of differing
  bits. (Not |packed(a) - packed(b)|: that integer difference is not a distance on
  bit strings -- 0b1000_0000 vs 0b0111_1111 differ by 1 as integers but in all 8 bits.)
* :func:`top_k_rows` / :func:`gather_rows` -- selection with the padding rules of
  METHODS 1.2: padding never wins a slot while a valid row remains, a cache of batch 1
  (one user) is gathered for N candidates without being tiled N times.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import NEG_INF, masked_softmax, serializable

#: top-k keys of valid rows are clipped here; padding sits at NEG_INF (-1e9)
VALID_FLOOR = -1e8
WORD_BITS = 32
# bit i of an int32 word; bit 31 is INT32_MIN. A sum of distinct powers of two never
# overflows in int32 (every partial sum lies in [-2^31, 2^31 - 1]), so summing the
# bit values packs the word exactly, also under XLA.
_BIT_VALUES = (np.uint32(1) << np.arange(WORD_BITS, dtype=np.uint32)).view(np.int32)


def one_user(x: tf.Tensor) -> bool:
    """True for a cache tensor with static batch 1 (one user ranked against N candidates)."""
    return x.shape[0] == 1


def gather_rows(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Rows ``index`` [N, k] of ``x`` [B, L, ...] -> [N, k, ...].

    ``x`` has batch N (training: one window per candidate) or batch 1 (serving: one
    user's cache, read for every candidate without tiling it)."""
    if one_user(x):
        return tf.gather(x[0], index)
    return tf.gather(x, index, batch_dims=1)


def top_k_rows(score: tf.Tensor, mask: tf.Tensor, k: int):
    """Top-k positions by ``score`` [N, L] among the valid rows of ``mask`` ([N or 1, L]).

    Valid keys are clipped to >= -1e8, padding is -1e9, so padding is picked only when
    fewer than k rows are valid. Ties go to the lower index (``tf.math.top_k``), i.e.
    the more recent behavior. The selection carries no gradient. Returns
    ``(index [N, k] int32, selected_mask [N, k] float)``."""
    one = one_user(mask)                 # serving: one user's window for N candidates
    valid = mask > 0                     # [N or 1, L]: the pre-filter counts it once per row
    mask = tf.broadcast_to(mask, tf.shape(score))
    key = tf.where(mask > 0, tf.maximum(score, VALID_FLOOR), NEG_INF)
    index = top_k_indices(key, k, valid, one)
    return index, tf.gather(mask, index, batch_dims=1)


#: the serving top-k's pre-filter keeps about this many times k rows per candidate
PREFILTER_MARGIN = 1.25
_BELOW_ALL = -3.0e38      # below NEG_INF (padding) and every valid key


def prefilter(key: tf.Tensor, k, valid: tf.Tensor) -> tf.Tensor:
    """``key`` [N, L] with the keys that cannot be in a row's top k lowered, so that
    ``tf.math.top_k(prefilter(key), k)`` gives ``tf.math.top_k(key, k)``'s indices
    (:func:`prefiltered_top_k`), faster for
    k of 50-200 out of L = 1,000 (the serving ``rank`` of one user; issue 20 item 6).

    On CPU the top-k kernel (XLA's and TensorFlow's) is a partial sort per row whose
    cost is dominated by heap insertions, about k (1 + ln(L / k)) per row for rows in
    random order. Here each row's keys below a threshold T are first replaced by
    -3e38 (below padding's -1e9), where T = mean + c std of the row's ``valid`` keys
    with c the normal quantile that keeps about 1.25 k of them; the kernel then
    inserts only those. Exact whatever the keys' distribution: when at least k keys
    are >= T, every key below T ranks below k others, so replacing it by a value
    still below all of them changes neither the selected indices nor their order
    (ties keep the lower index); a row with fewer than k keys >= T (or with at most
    1.25 k valid keys) is passed unchanged. ``valid`` [N or 1, L] bool marks the rows
    the statistics are taken over (padding would drag them to -1e9).
    tests/test_search_baselines.py checks the indices against ``tf.math.top_k``.
    """
    # the valid count per row of ``valid`` as given: once per user for a window of
    # batch 1 ([1, L]), not over its broadcast to the N candidates' rows (session 7)
    count = tf.reduce_sum(tf.cast(valid, key.dtype), -1, keepdims=True)
    valid = tf.broadcast_to(valid, tf.shape(key))
    w = tf.cast(valid, key.dtype)
    safe = tf.where(valid, key, tf.zeros_like(key))
    mean = tf.math.divide_no_nan(tf.reduce_sum(safe, -1, keepdims=True), count)
    var = tf.math.divide_no_nan(tf.reduce_sum(tf.square(safe - mean) * w, -1, keepdims=True),
                                count)
    # keep a share p = 1.25 k / n of the n valid keys: T = mean + sqrt(2) erfinv(1 - 2 p) std
    share = tf.math.divide_no_nan(PREFILTER_MARGIN * tf.cast(k, key.dtype), count)
    c = math.sqrt(2.0) * tf.math.erfinv(tf.clip_by_value(1.0 - 2.0 * share, -0.999, 0.999))
    kept = key >= mean + c * tf.sqrt(var)
    enough = (tf.reduce_sum(tf.cast(kept, tf.int32), -1, keepdims=True) >= k) & (share < 1.0)
    filtered = tf.where(kept | ~enough, key, tf.fill(tf.shape(key), tf.cast(_BELOW_ALL, key.dtype)))
    return filtered


def prefiltered_top_k(key: tf.Tensor, k, valid: tf.Tensor) -> tf.Tensor:
    """``tf.math.top_k(key, k, sorted=True)`` indices [N, k] through :func:`prefilter`."""
    return tf.math.top_k(tf.stop_gradient(prefilter(key, k, valid)), k=k, sorted=True)[1]


def top_k_indices(key: tf.Tensor, k, valid: tf.Tensor, one: bool) -> tf.Tensor:
    """``tf.math.top_k(key, k, sorted=True)`` indices [N, k], no gradient; ``one`` (one
    user's window ranked for N candidates: serving) goes through
    :func:`prefiltered_top_k`, which gives the same indices with fewer heap insertions.
    The one selection the top-k searches share (SIM soft / LCN via :func:`top_k_rows`,
    ETA, TWIN / TWIN V2)."""
    if one:
        return prefiltered_top_k(key, k, valid)
    return tf.math.top_k(tf.stop_gradient(key), k=k, sorted=True)[1]


def static_k(top_k: int, rows: tf.Tensor):
    """min(top_k, L): a Python int when L is static (it is in every export)."""
    length = rows.shape[1]
    return min(top_k, length) if length is not None else tf.minimum(top_k, tf.shape(rows)[1])


# ---- ESU ----------------------------------------------------------------------------------
@serializable
class TargetAttention(tf.keras.layers.Layer):
    """The ESU: H-head target attention of a candidate over k selected behaviors.

    Args:
      emb_dim: d (behavior and target embeddings).
      num_heads: H (4).
      key_dim, value_dim: d_k, d_v per head (default max(1, d // H)).
    """

    def __init__(self, emb_dim: int, num_heads: int = 4, key_dim: Optional[int] = None,
                 value_dim: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.emb_dim, self.num_heads = int(emb_dim), int(num_heads)
        self.key_dim = int(key_dim) if key_dim else max(1, self.emb_dim // self.num_heads)
        self.value_dim = int(value_dim) if value_dim else max(1, self.emb_dim // self.num_heads)

    def build(self, input_shape=None):
        d, h, k, v = self.emb_dim, self.num_heads, self.key_dim, self.value_dim
        # 2-D weights (heads concatenated): Glorot fans are those of one dense layer
        self.w_q = self.add_weight("w_q", shape=[d, h * k], initializer="glorot_uniform")
        self.w_k = self.add_weight("w_k", shape=[d, h * k], initializer="glorot_uniform")
        self.w_v = self.add_weight("w_v", shape=[d, h * v], initializer="glorot_uniform")
        self.w_o = self.add_weight("w_o", shape=[h * v, d], initializer="glorot_uniform")
        super().build(input_shape)

    def _ensure_built(self):
        if not self.built:
            self.build()

    def project(self, emb: tf.Tensor) -> Dict[str, tf.Tensor]:
        """K W^k and V W^v of behaviors [..., d] -> ``keys`` [..., H, d_k], ``values``
        [..., H, d_v] (user-only: cached per row). Zero rows stay zero."""
        self._ensure_built()
        d, h = self.emb_dim, self.num_heads
        flat = tf.reshape(emb, [-1, d])
        lead = tf.shape(emb)[:-1]
        keys = tf.reshape(tf.matmul(flat, self.w_k), tf.concat([lead, [h, self.key_dim]], 0))
        values = tf.reshape(tf.matmul(flat, self.w_v), tf.concat([lead, [h, self.value_dim]], 0))
        return {"keys": keys, "values": values}

    def attend(self, query: tf.Tensor, keys: tf.Tensor, values: tf.Tensor,
               mask: tf.Tensor) -> Dict[str, tf.Tensor]:
        """``query`` [N, d], selected ``keys`` [N, k, H, d_k], ``values`` [N, k, H, d_v],
        ``mask`` [N, k] -> ``weights`` [N, H, k] (masked softmax; a selected padded row
        gets 0) and ``output`` [N, d] (zero when no selected row is valid)."""
        self._ensure_built()
        n = tf.shape(query)[0]
        h, dk, dv = self.num_heads, self.key_dim, self.value_dim
        q = tf.reshape(tf.matmul(query, self.w_q), tf.stack([n, h, dk])) / math.sqrt(dk)
        logits = tf.einsum("nhc,njhc->nhj", q, keys)                          # [N, H, k]
        weights = masked_softmax(logits, tf.broadcast_to(mask[:, None, :], tf.shape(logits)))
        heads = tf.einsum("nhj,njhv->nhv", weights, values)
        out = tf.matmul(tf.reshape(heads, tf.stack([n, h * dv])), self.w_o)
        return {"logits": logits, "weights": weights, "output": out}

    def get_config(self):
        return {**super().get_config(), "emb_dim": self.emb_dim, "num_heads": self.num_heads,
                "key_dim": self.key_dim, "value_dim": self.value_dim}


# ---- SimHash ------------------------------------------------------------------------------
def gaussian_projection(dim: int, bits: int, seed: int) -> np.ndarray:
    """R in R^{dim x bits}, entries N(0, 1), a pure function of ``seed``."""
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


@serializable
class SimHash(tf.keras.layers.Layer):
    """h(x) = 1[x R > 0] with a fixed seeded Gaussian R [d, m] (non-trainable weight)."""

    def __init__(self, emb_dim: int, num_bits: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if num_bits < 1:
            raise ValueError(f"num_bits must be >= 1, got {num_bits}")
        self.emb_dim, self.num_bits, self.seed = int(emb_dim), int(num_bits), int(seed)

    def build(self, input_shape=None):
        r = gaussian_projection(self.emb_dim, self.num_bits, self.seed)
        self.projection = self.add_weight(
            "projection", shape=[self.emb_dim, self.num_bits], trainable=False,
            initializer=lambda shape, dtype=None: tf.constant(r, dtype=dtype or tf.float32))
        super().build(input_shape)

    def _ensure_built(self):
        if not self.built:
            self.build()

    def bits(self, x: tf.Tensor) -> tf.Tensor:
        """x [..., d] -> int32 bits [..., m]; no gradient (the hash is a selection)."""
        self._ensure_built()
        flat = tf.matmul(tf.reshape(tf.stop_gradient(x), [-1, self.emb_dim]), self.projection)
        bits = tf.cast(flat > 0, tf.int32)
        return tf.reshape(bits, tf.concat([tf.shape(x)[:-1], [self.num_bits]], 0))

    def get_config(self):
        return {**super().get_config(), "emb_dim": self.emb_dim, "num_bits": self.num_bits,
                "seed": self.seed}


def pack_bits(bits: tf.Tensor) -> tf.Tensor:
    """int32 bits [..., m] -> int32 words [..., ceil(m / 32)]; bit i of the signature is
    bit i % 32 of word i // 32 (the unused high bits of the last word are 0)."""
    m = bits.shape[-1]
    words = -(-m // WORD_BITS)
    pad = words * WORD_BITS - m
    if pad:
        bits = tf.concat([bits, tf.zeros(tf.concat([tf.shape(bits)[:-1], [pad]], 0),
                                         bits.dtype)], -1)
    bits = tf.reshape(bits, tf.concat([tf.shape(bits)[:-1], [words, WORD_BITS]], 0))
    return tf.reduce_sum(bits * tf.constant(_BIT_VALUES), -1)


def hamming(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Number of differing bits between packed signatures (broadcasting) -> int32 [...]."""
    diff = tf.raw_ops.PopulationCount(x=tf.bitwise.bitwise_xor(a, b))   # uint8 per word
    return tf.reduce_sum(tf.cast(diff, tf.int32), -1)
