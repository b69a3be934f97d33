"""TWIN (METHODS B9) and the cluster-aware target attention it shares with TWIN V2 (2.4).

One efficient target attention serves both stages: the GSU ranks every behavior
(or virtual item) of the long window by the relevance alpha and keeps the top k;
the ESU is a 4-head softmax attention with the same parameters over those k.

Behavior-feature split (paper Appendix A.2, spec T4/T5):

* inherent features K_h = the behavior embedding (item id + category, the same
  tables as the target, METHODS 1.2) -- user independent, so K_h W^h is cacheable
  per item (:meth:`Twin.item_projection`; production refreshes it every 15 min);
* cross features K_c = [K_c,1 .. K_c,J], one 8-dim embedding per user-item
  feature of the window: ``gap_bucket`` (log2 time gap to the impression,
  embedding table), ``engage`` (the engagement signal, a scalar embedded by a
  Dense(8, tanh)), ``domain`` (action type / domain, embedding table). Each is
  compressed to ONE dimension per head by its own w^c_j in R^8 (block-diagonal
  W^c, Eq. 13 / T5).

Equations -> code (per head a = 1..H, H = 4, d_k = 16):

* (T4, Eq. 8)  alpha_a = (K_h W^h_a)(q W^q_a)^T / sqrt(d_k) + (K_c W^c_a) beta_a
  -- :meth:`Twin.user_cache` computes K_h W^h_a (``keys``) and (K_c W^c_a) beta_a
  (``cross``); :meth:`Twin.attend` adds the q W^q_a term per candidate.
* (T5, Eq. 13) K_c W^c_a = [K_c,1 w^c_a,1, ..., K_c,J w^c_a,J] -- :meth:`Twin.cross_projection`.
* (T6, Eq. 9)  alpha'_a = alpha_a + ln n (TWIN V2; ``gsu_log_n`` / ``esu_log_n``).
* (T7) GSU: top-k (k = min(top_k, L)) by the mean over heads of alpha' (or alpha).
* (T8, T9, Eq. 10) ESU: head_a = softmax(alpha'_a over the k)^T K W^v_a with
  K = [K_h, K_c]; softmax(alpha + ln n)_i = n_i exp(alpha_i) / sum_j n_j exp(alpha_j).
* (T10, Eq. 11) v_long = Concat(head_1..head_H) W^o.

Split (METHODS 1.5): ``user_cache`` holds everything that depends on the user
only: K_h W^h, the request-independent part of (K_c W^c) beta and of K W^v
(the ``engage`` and ``domain`` cross features), ln n, the mask and each row's
timestamp (``row_ts``). ``score`` gets the request time (``target["ts"]``,
the impression time in training, the request's ``imp_ts`` in serving), buckets
the gap of every cached row to it, and adds the gap feature's terms of
(K_c W^c) beta and of K W^v; then it runs q W^q, alpha over the window, the GSU
top-k and the ESU. The gap term is per request (one user), not per candidate:
O(L) per request. Measuring the gap to the request inside ``score`` is what
makes the served CTR equal the training path on the same window (in training
the gap is measured to the impression time); a cache that held the gap bucket
would freeze the gaps at the time the cache was computed (train/serve skew). A
cache of batch 1 (one user) serves B candidates without being copied B times.

A caller that supplies precomputed ``gap_bucket`` rows and no ``ts`` (unit tests,
hand-built windows) gets those buckets cached as they are (``gap_bucket``
cache entry); the model always passes ``ts``.

Conventions: padded rows are zeroed (embedding and cross features) and never
selected while a valid row remains (their GSU key is -1e9 and valid keys are
clipped to >= -1e8); a selected padded row is masked out of the ESU softmax
(-1e9, re-masked); a window without any valid row gives a zero vector (W^v and
W^o have no bias). No gradient flows through the selection (indices); the
shared parameters train through the ESU's gathered alpha and values.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import schema as S
from tfmodels.layers import NEG_INF, masked_softmax, serializable
from tfmodels.methods.base import LongSequenceModule, cache_row_times, request_gap_buckets
from tfmodels.methods.esu import top_k_indices

CROSS_FEATURES = ("gap_bucket", "engage", "domain")
#: cross features that depend on the request time: computed in ``score``, never cached
REQUEST_TIME_FEATURES = ("gap_bucket",)
_VALID_FLOOR = -1e8      # GSU keys of valid rows are clipped here, padding sits at -1e9


@serializable
class Twin(LongSequenceModule):
    """TWIN: GSU top-k + ESU multi-head target attention sharing one relevance (B9).

    Args:
      emb_dim: d, width of behavior/target embeddings (the inherent part K_h, q).
      top_k: k of the GSU (100); the ESU sees min(k, L) rows.
      num_heads: H (4).
      key_dim: d_k per head (16).
      value_dim: d_v per head (default max(1, d // H), so Concat(heads) is ~d wide).
      cross_dim: embedding size of each cross feature (8).
      cross_features: which of ``gap_bucket``, ``engage``, ``domain`` form K_c.
      num_domains: size of the domain embedding table (ids >= it share the last row).
      gsu_log_n, esu_log_n: add ln n (cluster size, ``seq["cluster_size"]``) to the
        GSU keys / ESU logits (TWIN V2, T6). Both False for TWIN: n is not read.
    Shapes: seq ``emb`` [B, L, d], ``mask`` [B, L], cross fields [B, L];
      target ``emb`` [B, d] -> [B, d].
    """

    reads_fields = ("ts", "engage", "domain")   # per instance: see _fields

    def __init__(self, emb_dim: int, top_k: int = 100, num_heads: int = 4, key_dim: int = 16,
                 value_dim: Optional[int] = None, cross_dim: int = 8,
                 cross_features: Sequence[str] = CROSS_FEATURES, num_domains: int = 8,
                 gsu_log_n: bool = False, esu_log_n: bool = False, **kwargs):
        super().__init__(emb_dim, **kwargs)
        unknown = [f for f in cross_features if f not in CROSS_FEATURES]
        if unknown:
            raise ValueError(f"unknown cross features {unknown}; choose from {CROSS_FEATURES}")
        if top_k < 1 or num_heads < 1 or key_dim < 1 or cross_dim < 1 or num_domains < 2:
            raise ValueError("top_k, num_heads, key_dim, cross_dim must be >= 1, num_domains >= 2")
        self.top_k, self.num_heads, self.key_dim = int(top_k), int(num_heads), int(key_dim)
        self.value_dim = int(value_dim) if value_dim else max(1, self.emb_dim // self.num_heads)
        self.cross_dim, self.num_domains = int(cross_dim), int(num_domains)
        self.cross_features = list(cross_features)
        self.gsu_log_n, self.esu_log_n = bool(gsu_log_n), bool(esu_log_n)
        self.uses_cluster_size = self.gsu_log_n or self.esu_log_n
        # instance attributes: the serving signatures declare exactly what is read. The
        # gap feature is measured to the request time from each row's timestamp.
        self.reads_request_time = "gap_bucket" in self.cross_features
        self.reads_fields = self._fields(self.cross_features, self.uses_cluster_size)
        c = self.cross_dim
        self.gap_table = (tf.keras.layers.Embedding(S.NUM_GAP_BUCKETS, c, name="gap_emb")
                          if "gap_bucket" in self.cross_features else None)
        self.engage_dense = (tf.keras.layers.Dense(c, activation="tanh", name="engage_emb")
                             if "engage" in self.cross_features else None)
        self.domain_table = (tf.keras.layers.Embedding(self.num_domains, c, name="domain_emb")
                             if "domain" in self.cross_features else None)

    @staticmethod
    def _fields(cross_features, cluster_size: bool):
        """Raw long-window fields read: the gap feature reads each row's ``ts``."""
        fields = [("ts" if f == "gap_bucket" else f) for f in cross_features]
        return tuple(fields) + (("cluster_size",) if cluster_size else ())

    @property
    def num_cross(self) -> int:
        return len(self.cross_features)

    @property
    def _static_features(self):
        """Cross features cached per user (everything but the request-time ones)."""
        return [f for f in self.cross_features if f not in REQUEST_TIME_FEATURES]

    def build(self, input_shape=None):
        d, h, k, v, c, j = (self.emb_dim, self.num_heads, self.key_dim, self.value_dim,
                            self.cross_dim, max(1, self.num_cross))
        glorot = "glorot_uniform"   # a fresh initializer per weight (W^h != W^q at init)
        self.w_h = self.add_weight("w_h", shape=[d, h, k], initializer=glorot)       # W^h_a
        self.w_q = self.add_weight("w_q", shape=[d, h, k], initializer=glorot)       # W^q_a
        # block-diagonal W^c: one w^c_{a,j} in R^c per head a and cross feature j
        self.w_c = self.add_weight("w_c", shape=[j, c, h], initializer=glorot)
        self.beta = self.add_weight("beta", shape=[h, j], initializer="ones")        # beta_a
        self.w_v = self.add_weight("w_v", shape=[d + self.num_cross * c, h, v],
                                   initializer=glorot)                                # W^v_a
        self.w_o = self.add_weight("w_o", shape=[h * v, d], initializer=glorot)      # W^o
        if self.engage_dense is not None:
            self.engage_dense.build(tf.TensorShape([None, None, 1]))
        super().build(input_shape)

    def _ensure_built(self):
        if not self.built:
            self.build()

    # ---- features -----------------------------------------------------------------------
    def cross_embeddings(self, seq: Dict[str, tf.Tensor],
                         features: Optional[Sequence[str]] = None) -> tf.Tensor:
        """K_c split per feature: [B, L, J, cross_dim], zero on padded rows.

        ``features``: which cross features (default all, in ``cross_features`` order).
        """
        mask = seq["mask"]
        parts = []
        for f in (self.cross_features if features is None else features):
            if f == "gap_bucket":
                ids = tf.clip_by_value(tf.cast(seq["gap_bucket"], tf.int64), 0,
                                       S.NUM_GAP_BUCKETS - 1)
                e = self.gap_table(ids * tf.cast(mask, tf.int64))
            elif f == "engage":
                x = tf.cast(seq["engage"], tf.float32) * mask
                e = self.engage_dense(x[..., None])
            else:
                ids = tf.clip_by_value(tf.cast(seq["domain"], tf.int64), 0, self.num_domains - 1)
                e = self.domain_table(ids * tf.cast(mask, tf.int64))
            parts.append(e * mask[..., None])
        if not parts:
            return tf.zeros(tf.concat([tf.shape(mask), [0, self.cross_dim]], 0))
        return tf.stack(parts, axis=2)

    def cross_projection(self, k_c: tf.Tensor) -> tf.Tensor:
        """(T5) K_c W^c per head: [B, L, J, c] -> [B, L, H, J]; entry (a, j) = K_c,j . w^c_{a,j}."""
        self._ensure_built()
        if self.num_cross == 0:
            return tf.zeros(tf.concat([tf.shape(k_c)[:2], [self.num_heads, 0]], 0))
        return tf.einsum("bljc,jch->blhj", k_c, self.w_c)

    def item_projection(self, item_emb: tf.Tensor) -> tf.Tensor:
        """K_h W^h for inherent embeddings [..., d] -> [..., H, d_k] (cacheable per item)."""
        self._ensure_built()
        # a plain matmul over the flattened rows: with tf.einsum("...d,dhk->...hk") the
        # gradient w.r.t. W^h alone took 2.5 s per training batch (B = 128, L = 500, CPU)
        # against 0.1 s for the whole step now (TF's ellipsis-einsum gradient)
        d, h, k = self.emb_dim, self.num_heads, self.key_dim
        flat = tf.matmul(tf.reshape(item_emb, [-1, d]), tf.reshape(self.w_h, [d, h * k]))
        return tf.reshape(flat, tf.concat([tf.shape(item_emb)[:-1], [h, k]], 0))

    # ---- the split ------------------------------------------------------------------------
    def user_cache(self, seq, training=None):
        """User-only tensors of one window.

        Returns ``keys`` K_h W^h [B, L, H, d_k], ``cross`` the cached features' part of
        (K_c W^c) beta [B, H, L], ``values`` the cached part of K W^v [B, L, H, d_v],
        ``log_n`` ln max(n, 1) [B, L], ``mask`` [B, L] and, when the gap feature is
        used, ``row_ts`` [B, L] int64 (each row's timestamp, 0 on padding; or
        ``gap_bucket`` when the caller gave buckets and no ``ts``).
        """
        self._ensure_built()
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        keys = self.item_projection(emb)                                       # [B, L, H, dk]
        d, c = self.emb_dim, self.cross_dim
        values = tf.einsum("bld,dhv->blhv", emb, self.w_v[:d])                 # K_h part
        cross = tf.zeros_like(tf.transpose(keys[..., 0], [0, 2, 1]))           # [B, H, L]
        static = self._static_features
        if static:
            k_c = self.cross_embeddings(dict(seq, mask=mask), static)          # [B, L, Js, c]
            idx = [self.cross_features.index(f) for f in static]
            w_c = tf.gather(self.w_c, idx)                                     # [Js, c, H]
            beta = tf.gather(self.beta, idx, axis=1)                           # [H, Js]
            cross = tf.einsum("bljc,jch,hj->bhl", k_c, w_c, beta)
            w_v = tf.concat([self.w_v[d + j * c:d + (j + 1) * c] for j in idx], 0)
            shape = tf.shape(k_c)
            flat = tf.reshape(k_c, tf.stack([shape[0], shape[1], len(idx) * c]))
            values = values + tf.einsum("blf,fhv->blhv", flat, w_v)
        if self.uses_cluster_size and "cluster_size" in seq:
            n = tf.maximum(tf.cast(seq["cluster_size"], tf.float32), 1.0)      # never ln 0
            log_n = tf.math.log(n) * mask
        else:
            log_n = tf.zeros_like(mask)
        cache = {"keys": keys, "cross": cross, "values": values, "log_n": log_n, "mask": mask}
        if self.reads_request_time:
            cache.update(cache_row_times(seq, mask))
        return cache

    def request_terms(self, cache: Dict[str, tf.Tensor], target: Dict[str, tf.Tensor]):
        """The gap feature's terms for the request: ``(cross [R, H, L], values [R, L, H, d_v])``
        with R = 1 for one user's request, or ``None`` when no cross feature depends on
        the request time. Gap buckets are measured from each cached row's timestamp to
        ``target["ts"]`` (the impression / request time) with the same bucketing as the
        input pipeline (:func:`tfmodels.data.gap_bucket`)."""
        if not self.reads_request_time:
            return None
        mask = cache["mask"]
        buckets = request_gap_buckets(cache, target, "TWIN")                    # [R, L]
        valid = tf.broadcast_to(mask > 0, tf.shape(buckets))
        buckets = tf.where(valid, tf.clip_by_value(buckets, 0, S.NUM_GAP_BUCKETS - 1),
                           tf.zeros_like(buckets))
        g = self.gap_table(buckets) * tf.cast(valid, tf.float32)[..., None]    # [R, L, c]
        j = self.cross_features.index("gap_bucket")
        d, c = self.emb_dim, self.cross_dim
        cross = tf.einsum("blc,ch->bhl", g, self.w_c[j]) * self.beta[:, j][None, :, None]
        values = tf.einsum("blc,chv->blhv", g, self.w_v[d + j * c:d + (j + 1) * c])
        return cross, values

    def attend(self, cache: Dict[str, tf.Tensor], target: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """GSU + ESU for B candidates; returns every intermediate (for tests and reports).

        ``alpha`` [B, H, L] (T4, without ln n), ``gsu_score`` [B, L], ``index`` [B, k],
        ``selected_mask`` [B, k], ``weights`` [B, H, k] (ESU softmax), ``output`` [B, d].
        """
        self._ensure_built()
        q = target["emb"]
        batch = tf.shape(q)[0]
        q_proj = tf.einsum("bd,dhk->bhk", q, self.w_q) / math.sqrt(self.key_dim)
        one_user = cache["keys"].shape[0] == 1          # static: a serving cache of batch 1
        cross, values = cache["cross"], cache["values"]
        terms = self.request_terms(cache, target)
        if terms is not None:                           # the request-time gap feature
            cross, values = cross + terms[0], values + terms[1]
        one_user = one_user and values.shape[0] == 1    # one request time for all candidates
        if one_user:
            return self._attend_one_user(cache, q_proj, cross, values)
        keys = tf.broadcast_to(cache["keys"], tf.concat(
            [tf.shape(values)[:1], tf.shape(cache["keys"])[1:]], 0)) \
            if cache["keys"].shape[0] == 1 else cache["keys"]
        alpha = tf.einsum("blhk,bhk->bhl", keys, q_proj) + cross
        length = tf.shape(alpha)[2]
        mask = tf.broadcast_to(cache["mask"], tf.stack([batch, length]))
        log_n = tf.broadcast_to(cache["log_n"], tf.stack([batch, length]))
        # GSU (T7): mean over heads of alpha (+ ln n); padding never outranks a valid row.
        gsu = tf.reduce_mean(alpha, axis=1) + (log_n if self.gsu_log_n else 0.0)
        index, sel_mask = self._gsu_select(gsu, mask, cache, one_user=False)     # [B, k]
        logits = alpha + (log_n[:, None, :] if self.esu_log_n else 0.0)
        sel_logits = tf.gather(logits, index, axis=2, batch_dims=1)              # [B, H, k]
        sel_mask_h = tf.broadcast_to(sel_mask[:, None, :], tf.shape(sel_logits))
        weights = masked_softmax(sel_logits, sel_mask_h)                         # (T8, T9)
        values = tf.gather(tf.broadcast_to(values, tf.concat(
            [[batch], tf.shape(values)[1:]], 0)), index, batch_dims=1)
        return self._esu_output(alpha, gsu, index, sel_mask, weights, values)

    def _gsu_select(self, gsu, mask, cache, one_user):
        """The GSU's top-k rows (T7) of the scores ``gsu`` [B, L] under ``mask`` [B, L]
        (padding never outranks a valid row): their indices [B, k] and mask [B, k].
        ``one_user``: one user's window ranked for the B candidates (serving), which
        :func:`top_k_indices` selects through its pre-filter (same indices)."""
        gsu_key = tf.where(mask > 0, tf.maximum(gsu, _VALID_FLOOR), NEG_INF)
        static_len = cache["keys"].shape[1]
        k = min(self.top_k, static_len) if static_len is not None else tf.minimum(
            self.top_k, tf.shape(gsu)[1])
        index = top_k_indices(gsu_key, k, cache["mask"] > 0, one_user)
        return index, tf.gather(mask, index, batch_dims=1)

    def _esu_output(self, alpha, gsu, index, sel_mask, weights, values):
        """(T10) v_long = Concat(head_1..head_H) W^o from the ESU weights [B, H, k] and
        the selected rows' values [B, k, H, d_v]; the dict :meth:`attend` returns."""
        batch = tf.shape(weights)[0]
        heads = tf.einsum("bhk,bkhv->bhv", weights, values)
        out = tf.matmul(tf.reshape(heads, tf.stack([batch, self.num_heads * self.value_dim])),
                        self.w_o)                                                # (T10)
        return {"alpha": alpha, "gsu_score": gsu, "index": index, "selected_mask": sel_mask,
                "weights": weights, "output": out}

    def _attend_one_user(self, cache, q_proj, cross, values):
        """:meth:`attend` for one user's cache (batch 1: keys [1, L, H, d_k], cross
        [1, H, L], values [1, L, H, d_v], one request time) and N candidates
        (``q_proj`` [N, H, d_k]): the serving ``rank`` path. The same equations as the
        batched path, with two float reassociations (issue 20 item 6, session 7; in
        process the exported TWIN ``rank`` took 3-5% less CPU, docs/benchmarks.md):

        * the candidate term (K_h W^h_a)(q W^q_a)^T comes out of one batched dot in the
          layout [H, N, L] (q W^q as the left operand), so no [N, H, L] transpose of
          the H N L products is made;
        * the per-request terms (cross, ln n) are never added to that [H, N, L] block:
          the GSU key is mean_a(q term) + (mean_a(cross) [+ ln n]) ([1, L], once per
          request) and the ESU logits add cross (+ ln n) at the k gathered rows only.
          mean_a(q_a + c_a) = mean_a(q_a) + mean_a(c_a) up to float rounding.
        """
        batch = tf.shape(q_proj)[0]
        qk = tf.einsum("hbk,hlk->hbl", tf.transpose(q_proj, [1, 0, 2]),
                       tf.transpose(cache["keys"][0], [1, 0, 2]))                # [H, N, L]
        length = tf.shape(qk)[2]
        mask = tf.broadcast_to(cache["mask"], tf.stack([batch, length]))        # [N, L]
        log_n = cache["log_n"]                                                   # [1, L]
        row = tf.reduce_mean(cross[0], axis=0)[None] + (log_n if self.gsu_log_n else 0.0)
        gsu = tf.reduce_mean(qk, axis=0) + row                                   # (T7) [N, L]
        index, sel_mask = self._gsu_select(gsu, mask, cache, one_user=True)      # [N, k]
        esu_row = cross[0] + (log_n if self.esu_log_n else 0.0)                  # [H, L]
        sel_logits = (tf.gather(tf.transpose(qk, [1, 0, 2]), index, axis=2, batch_dims=1)
                      + tf.transpose(tf.gather(esu_row, index, axis=1), [1, 0, 2]))  # [N, H, k]
        sel_mask_h = tf.broadcast_to(sel_mask[:, None, :], tf.shape(sel_logits))
        weights = masked_softmax(sel_logits, sel_mask_h)                         # (T8, T9)
        alpha = tf.transpose(qk, [1, 0, 2]) + cross     # (T4) [N, H, L], for callers only
        return self._esu_output(alpha, gsu, index, sel_mask, weights,
                                tf.gather(values[0], index))                    # [N, k, H, dv]

    def score(self, cache, target, training=None):
        return self.attend(cache, target)["output"]

    def get_config(self):
        return {**super().get_config(), "top_k": self.top_k, "num_heads": self.num_heads,
                "key_dim": self.key_dim, "value_dim": self.value_dim,
                "cross_dim": self.cross_dim, "cross_features": list(self.cross_features),
                "num_domains": self.num_domains, "gsu_log_n": self.gsu_log_n,
                "esu_log_n": self.esu_log_n}
