"""LCN's LAP (METHODS 2.5, KDD'24): Lifelong Attention Pyramid, three cascading levels.

LCN = CRP (contrastive item-representation losses on the short sequences of both
domains, training only) + LAP (this module). CRP and the per-domain windows are
configured on the backbone (other parts of issue 18), not here: this module is the
long-sequence part and consumes the standard ``long`` window like every other one.

Equations -> code (N = the paper's equation numbers as restated by the spec):

* CSA, all L behaviors (N7, N8): r^csa_k = e^h_k . e^v (inner product of the shared
  behavior / candidate embeddings); IR_CSA = sum_k w_k e^h_k with
  w = masked softmax_k(r^csa) ([interp], ``csa_norm='softmax'``; ``'none'``: the raw
  sum sum_k r^csa_k e^h_k as printed). Keeps top-K1 by r^csa.
* MSA, the K1 kept rows (N9, N10): r^msa_k = (W_Q e^v) . (W_K (e^h_k || e^c_k)) / sqrt(d_a);
  IR_MSA = sum_k softmax_k(r^msa) W_V (e^h_k || e^c_k) ([interp] softmax). Keeps
  top-K2 by r^msa.
* FSA, the K2 kept rows, l heads (N11-N13): a_{h,k} = softmax_k(Q_h . K_{h,k} / sqrt(d_h)),
  Q_h = W^Q_h e^v, K_{h,k} = W^K_h (e^h_k || e^c_k), V_{h,k} = W^V_h (e^h_k || e^c_k);
  FFN(x) = ReLU(x w_1 + b_1) w_2 + b_2 (N12).
  ``fsa_pooling='per_item_mean'`` ([interp], default; the only reading that uses
  N11-N13 as printed): H_{h,k} = a_{h,k} V_{h,k} (not summed over k),
  H_k = FFN(concat_h H_{h,k}), IR_FSA = mean of H_k over the valid kept rows.
  ``fsa_pooling='standard'``: IR_FSA = FFN(concat_h sum_k a_{h,k} V_{h,k}).
* v_long = Concat(IR_CSA, IR_MSA, IR_FSA), widths d + d_v + d_out (in that order).

Context e^c (per-behavior interaction features, [interp] which ones): one embedding
of ``context_dim`` per feature of ``context_features`` -- ``gap_bucket`` (log2 time gap
to the request, embedding table), ``engage`` (the engagement signal, a scalar embedded
by Dense(context_dim, tanh): no id to look up), ``domain`` (embedding table) -- the same
features TWIN reads as its cross features; e^c = their concatenation.

Sizes ([interp], the spec's d = 64 scaled to the backbone's behavior width d =
``emb_dim``): d_a = d_v = d, l = 4 heads of d_h = d // l, FFN hidden d, output d;
``context_dim`` = d // 2 (the paper uses 64 "for all features", i.e. one field's
size; a behavior here is [item; category], 2 fields). MSA and FSA have separate
weights; the linear maps W_Q, W_K, W_V have no bias (a bias of W_K adds Q . b, a
constant per candidate that changes no softmax nor top-k -- a dead parameter; and
without biases an empty window gives zero). The FFN has b_1, b_2 (N12).

Levels (``levels``, the paper's Table 3 rows): any non-empty subset of
('csa', 'msa', 'fsa'). A level that is off adds no output and makes no selection:
its input pool passes through unchanged. Without CSA, MSA (or FSA) runs over all L;
without MSA, FSA runs over CSA's top-K1; without FSA, top-K2 is not computed.
Table 3's "K1 = 50 only" = levels ('csa', 'fsa'), k1 = 50; "K2 = 50 only" =
levels ('msa', 'fsa'), k2 = 50 ([interp]: one selection stage each, the later level
on its output).

Selection and masking: K1 = min(k1, L), K2 = min(k2, K1) (clamped). Top-k keys of
valid rows are clipped to >= -1e8, padding is -1e9, so padding is never kept while a
valid row remains; ties go to the lower index (the more recent behavior; for top-K2
the earlier slot of the K1 list). The gathered mask travels with the selection:
padded picks get softmax weight 0 and do not count in the FSA mean (divided by the
number of valid kept rows); a window without valid rows gives a zero vector
(also for the FFN, whose biases would otherwise leak). The selections carry no
gradient; every valid row gets one through CSA.

Split (METHODS 1.5): :meth:`LAP.user_cache` holds E^h (``emb``, masked), ``mask``,
the projections W_K / W_V (e^h || e^c) of all L rows for MSA (``msa_keys``,
``msa_values``) and FSA (``fsa_keys``, ``fsa_values``) with the request-independent
context features only, and, when ``gap_bucket`` is a context feature, each row's
timestamp (``row_ts``). :meth:`LAP.score` gets the request time (``target["ts"]``,
the impression time in training, ``imp_ts`` in serving), buckets each cached row's
gap to it with the input pipeline's bucketing (:func:`tfmodels.data.gap_bucket`)
and adds the gap embedding's terms of the four projections (once per request,
O(L d c), not per candidate); then per candidate CSA O(L d), top-K1, MSA O(K1 d),
top-K2, FSA O(K2 d) + the FFN (per kept row with ``per_item_mean``). A cache that
held the gap would freeze it at the time the cache was computed (train/serve skew).
A cache of batch 1 (one user) serves N candidates without being tiled (except
without CSA, where the whole window is the pool).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import schema as S
from tfmodels.layers import masked_softmax, serializable
from tfmodels.methods.base import LongSequenceModule, cache_row_times, request_gap_buckets
from tfmodels.methods.esu import gather_rows, one_user, static_k, top_k_rows

LEVELS = ("csa", "msa", "fsa")
CONTEXT_FEATURES = ("gap_bucket", "engage", "domain")
#: default e^c ([interp]): the engagement signal (the paper's "viewing duration") and
#: the time gap to the request; ``domain`` is constant in a one-domain lifelong window
DEFAULT_CONTEXT = ("gap_bucket", "engage")
#: context features that depend on the request time: computed in ``score``, never cached
REQUEST_TIME_FEATURES = ("gap_bucket",)
CSA_NORMS = ("softmax", "none")
FSA_POOLINGS = ("per_item_mean", "standard")
#: cache entries that the request-time context adds to (name -> projection weight)
_PROJECTIONS = {"msa_keys": "w_k_msa", "msa_values": "w_v_msa",
                "fsa_keys": "w_k_fsa", "fsa_values": "w_v_fsa"}


def _dense(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """x [..., a] @ w [a, b] -> [..., b] as one 2-D matmul (the ellipsis einsum's
    gradient is slow on CPU, see Twin.item_projection)."""
    flat = tf.matmul(tf.reshape(x, [-1, w.shape[0]]), w)
    return tf.reshape(flat, tf.concat([tf.shape(x)[:-1], [w.shape[1]]], 0))


@serializable
class LAP(LongSequenceModule):
    """LCN's Lifelong Attention Pyramid: CSA (all L) -> top-K1 -> MSA -> top-K2 -> FSA.

    Args:
      emb_dim: d, behavior / candidate embedding width (e^h, e^v).
      k1: K1 kept by CSA (200), clamped to L. k2: K2 kept by MSA (50), clamped to K1.
      levels: the levels that run (subset of ('csa', 'msa', 'fsa'); see module doc).
      csa_norm: 'softmax' ([interp], default) or 'none' (raw r-weighted sum, N8 as printed).
      fsa_pooling: 'per_item_mean' ([interp], default) or 'standard'.
      num_heads: l, FSA heads (4).
      attention_dim: d_a of MSA (default d); value_dim: d_v of MSA (default d).
      head_dim: d_h per FSA head (default max(1, d // l)).
      ffn_dim: FSA FFN hidden width (default d); fsa_dim: d_out, FFN output (default d).
      context_features: which of ``gap_bucket``, ``engage``, ``domain`` form e^c.
      context_dim: embedding size per context feature (default max(1, d // 2)).
      num_domains: rows of the domain table (ids >= it share the last row).
    Shapes: seq ``emb`` [B, L, d], ``mask`` [B, L] (+ ``ts``, ``engage``, ``domain``
      [B, L] as configured); target ``emb`` [B, d] (+ ``ts`` [B or 1]) ->
      [B, d (csa) + d_v (msa) + d_out (fsa)].
    """

    reads_fields = ("ts", "engage")   # per instance: see __init__

    def __init__(self, emb_dim: int, k1: int = 200, k2: int = 50,
                 levels: Sequence[str] = LEVELS, csa_norm: str = "softmax",
                 fsa_pooling: str = "per_item_mean", num_heads: int = 4,
                 attention_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 head_dim: Optional[int] = None, ffn_dim: Optional[int] = None,
                 fsa_dim: Optional[int] = None,
                 context_features: Sequence[str] = DEFAULT_CONTEXT,
                 context_dim: Optional[int] = None, num_domains: int = 8, **kwargs):
        super().__init__(emb_dim, **kwargs)
        if isinstance(levels, str):
            levels = (levels,)
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown or not levels or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS} without repeats, "
                             f"got {list(levels)}")
        self.levels = [lv for lv in LEVELS if lv in levels]        # canonical order
        if csa_norm not in CSA_NORMS:
            raise ValueError(f"csa_norm must be one of {CSA_NORMS}, got {csa_norm!r}")
        if fsa_pooling not in FSA_POOLINGS:
            raise ValueError(f"fsa_pooling must be one of {FSA_POOLINGS}, got {fsa_pooling!r}")
        unknown = [f for f in context_features if f not in CONTEXT_FEATURES]
        if unknown:
            raise ValueError(f"unknown context features {unknown}; choose from {CONTEXT_FEATURES}")
        if k1 < 1 or k2 < 1 or num_heads < 1 or num_domains < 2:
            raise ValueError(f"k1, k2, num_heads must be >= 1 and num_domains >= 2, got "
                             f"k1={k1}, k2={k2}, num_heads={num_heads}, num_domains={num_domains}")
        d = self.emb_dim
        self.k1, self.k2 = int(k1), int(k2)
        self.csa_norm, self.fsa_pooling = csa_norm, fsa_pooling
        self.num_heads = int(num_heads)
        self.attention_dim = int(attention_dim) if attention_dim else d
        self.value_dim = int(value_dim) if value_dim else d
        self.head_dim = int(head_dim) if head_dim else max(1, d // self.num_heads)
        self.ffn_dim = int(ffn_dim) if ffn_dim else d
        self.fsa_dim = int(fsa_dim) if fsa_dim else d
        self.context_features = list(dict.fromkeys(context_features))
        self.context_dim = int(context_dim) if context_dim else max(1, d // 2)
        self.num_domains = int(num_domains)
        self.csa, self.msa, self.fsa = (lv in self.levels for lv in LEVELS)
        # e^c is read by MSA and FSA only; a CSA-only module reads no context field
        self._context = self.context_features if (self.msa or self.fsa) else []
        self.reads_request_time = "gap_bucket" in self._context
        self.reads_fields = tuple(("ts" if f == "gap_bucket" else f) for f in self._context)
        c = self.context_dim
        self.gap_table = (tf.keras.layers.Embedding(S.NUM_GAP_BUCKETS, c, name="gap_emb")
                          if "gap_bucket" in self._context else None)
        self.engage_dense = (tf.keras.layers.Dense(c, activation="tanh", name="engage_emb")
                             if "engage" in self._context else None)
        self.domain_table = (tf.keras.layers.Embedding(self.num_domains, c, name="domain_emb")
                             if "domain" in self._context else None)
        if self.fsa:
            self.ffn_hidden = tf.keras.layers.Dense(self.ffn_dim, activation="relu",
                                                    name="fsa_ffn_1")          # w_1, b_1
            self.ffn_out = tf.keras.layers.Dense(self.fsa_dim, name="fsa_ffn_2")  # w_2, b_2

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return ((self.emb_dim if self.csa else 0) + (self.value_dim if self.msa else 0)
                + (self.fsa_dim if self.fsa else 0))

    @property
    def input_dim(self) -> int:
        """Width of e^h || e^c."""
        return self.emb_dim + len(self._context) * self.context_dim

    def build(self, input_shape=None):
        glorot = "glorot_uniform"    # Xavier (the paper's init); a fresh one per weight
        f, dh, l = self.input_dim, self.head_dim, self.num_heads
        if self.msa:
            self.w_q_msa = self.add_weight("w_q_msa", shape=[self.emb_dim, self.attention_dim],
                                           initializer=glorot)
            self.w_k_msa = self.add_weight("w_k_msa", shape=[f, self.attention_dim],
                                           initializer=glorot)
            self.w_v_msa = self.add_weight("w_v_msa", shape=[f, self.value_dim],
                                           initializer=glorot)
        if self.fsa:
            self.w_q_fsa = self.add_weight("w_q_fsa", shape=[self.emb_dim, l * dh],
                                           initializer=glorot)
            self.w_k_fsa = self.add_weight("w_k_fsa", shape=[f, l * dh], initializer=glorot)
            self.w_v_fsa = self.add_weight("w_v_fsa", shape=[f, l * dh], initializer=glorot)
            self.ffn_hidden.build(tf.TensorShape([None, l * dh]))
            self.ffn_out.build(tf.TensorShape([None, self.ffn_dim]))
        if self.engage_dense is not None:
            self.engage_dense.build(tf.TensorShape([None, 1]))
        super().build(input_shape)

    def _ensure_built(self):
        if not self.built:
            self.build()

    # ---- context e^c ------------------------------------------------------------------------
    def _rows(self, feature: Optional[str]) -> slice:
        """Rows of a W_K / W_V for e^h (``None``) or one context feature."""
        d, c = self.emb_dim, self.context_dim
        if feature is None:
            return slice(0, d)
        j = self._context.index(feature)
        return slice(d + j * c, d + (j + 1) * c)

    def context_embedding(self, seq: Dict[str, tf.Tensor], feature: str) -> tf.Tensor:
        """A request-independent context feature's embedding [B, L, c], zero on padding
        (``engage`` or ``domain``; the gap is measured per request: :meth:`request_terms`)."""
        mask = tf.cast(seq["mask"], tf.float32)
        if feature == "engage":
            x = tf.cast(seq["engage"], tf.float32) * mask
            e = self.engage_dense(x[..., None])
        elif feature == "domain":
            ids = tf.clip_by_value(tf.cast(seq["domain"], tf.int64), 0, self.num_domains - 1)
            e = self.domain_table(ids * tf.cast(mask, tf.int64))
        else:
            raise ValueError(f"{feature!r} is not a request-independent context feature")
        return e * mask[..., None]

    def gap_embedding(self, buckets: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Gap-bucket embeddings [R, L, c] of buckets [R, L]; zero where ``mask`` is 0."""
        valid = tf.broadcast_to(mask > 0, tf.shape(buckets))
        buckets = tf.where(valid, tf.clip_by_value(buckets, 0, S.NUM_GAP_BUCKETS - 1),
                           tf.zeros_like(buckets))
        return self.gap_table(buckets) * tf.cast(valid, tf.float32)[..., None]

    def _project(self, parts: Dict[Optional[str], tf.Tensor], name: str) -> tf.Tensor:
        """sum over parts of part @ W[rows of part] = W (e^h || e^c) restricted to ``parts``."""
        w = getattr(self, _PROJECTIONS[name])
        out = None
        for feature, x in parts.items():
            y = _dense(x, w[self._rows(feature)])
            out = y if out is None else out + y
        return out

    # ---- the split ----------------------------------------------------------------------------
    def user_cache(self, seq, training=None):
        """User-only tensors of one window: ``emb`` E^h [B, L, d] (masked), ``mask`` [B, L],
        ``msa_keys`` [B, L, d_a] / ``msa_values`` [B, L, d_v] (MSA on), ``fsa_keys`` /
        ``fsa_values`` [B, L, l * d_h] (FSA on) -- W (e^h || e^c) without the request-time
        feature -- and ``row_ts`` [B, L] int64 (gap feature on; 0 on padding; or
        ``gap_bucket`` when the caller gave buckets and no ``ts``)."""
        self._ensure_built()
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        cache = {"emb": emb, "mask": mask}
        if not (self.msa or self.fsa):
            return cache
        seq = dict(seq, mask=mask)
        parts = {None: emb}
        for f in self._context:
            if f not in REQUEST_TIME_FEATURES:
                parts[f] = self.context_embedding(seq, f)
        for name in self._projection_names:
            cache[name] = self._project(parts, name)
        if self.reads_request_time:
            cache.update(cache_row_times(seq, mask))
        return cache

    @property
    def _projection_names(self):
        return ((["msa_keys", "msa_values"] if self.msa else [])
                + (["fsa_keys", "fsa_values"] if self.fsa else []))

    def cache_bytes_per_user(self, length: int) -> int:
        """Bytes of :meth:`user_cache` for one window of ``length`` rows: float32 E^h and
        mask, the MSA / FSA projections, int64 ``row_ts`` with the gap feature."""
        floats = self.emb_dim + 1
        if self.msa:
            floats += self.attention_dim + self.value_dim
        if self.fsa:
            floats += 2 * self.num_heads * self.head_dim
        return int(length) * (4 * floats + (8 if self.reads_request_time else 0))

    def request_terms(self, cache: Dict[str, tf.Tensor],
                      target: Dict[str, tf.Tensor]) -> Optional[Dict[str, tf.Tensor]]:
        """The gap feature's terms of the cached projections for the request: cache name ->
        [R, L, ...] (R = 1 for one user's request), or ``None`` without a request-time
        feature. Gaps run from each cached row's timestamp to ``target["ts"]``."""
        if not self.reads_request_time:
            return None
        buckets = request_gap_buckets(cache, target, "LAP")                    # [R, L]
        g = self.gap_embedding(buckets, cache["mask"])                          # [R, L, c]
        return {name: self._project({"gap_bucket": g}, name) for name in self._projection_names}

    def attend(self, cache: Dict[str, tf.Tensor], target: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """The three levels for N candidates; returns every intermediate (tests, reports).

        ``csa_score`` r^csa [N, L], ``csa_weights`` [N, L], ``index1`` [N, K1] (top-K1
        positions in the window), ``msa_score`` r^msa [N, P1] and ``msa_weights`` over
        MSA's pool, ``index2`` [N, K2] (top-K2 positions in the window), ``fsa_weights``
        a [N, l, P2], ``fsa_index`` / ``fsa_mask`` (FSA's pool), ``ir_csa``, ``ir_msa``,
        ``ir_fsa`` and ``output`` (their concatenation) -- each present when its level runs.
        """
        self._ensure_built()
        q = target["emb"]
        n = tf.shape(q)[0]
        emb, mask = cache["emb"], cache["mask"]
        out: Dict[str, tf.Tensor] = {}
        parts = []
        # the current pool: positions in the window [N, P] and their mask; None = all L
        index, pool_mask = None, None
        if self.csa:
            r = self.csa_score(emb, q)                                          # (N7)
            m = tf.broadcast_to(mask, tf.shape(r))
            w = masked_softmax(r, m) if self.csa_norm == "softmax" else r * m
            ir = (tf.einsum("nl,ld->nd", w, emb[0]) if one_user(emb)
                  else tf.einsum("nl,nld->nd", w, emb))                         # (N8)
            index, pool_mask = top_k_rows(r, mask, static_k(self.k1, emb))
            out.update(csa_score=r, csa_weights=w, index1=index, ir_csa=ir)
            parts.append(ir)
        if not (self.msa or self.fsa):
            out["output"] = parts[0]
            return out
        if index is None:                                   # no CSA: the pool is all L
            index, pool_mask = self._whole_window(mask, n)
        terms = self.request_terms(cache, target)

        def pool(name, idx):
            x = cache[name] if terms is None else cache[name] + terms[name]
            return gather_rows(x, idx)

        if self.msa:
            keys, values = pool("msa_keys", index), pool("msa_values", index)   # [N, P, .]
            r_msa = self.msa_logits(q, keys)                                    # (N9)
            w = masked_softmax(r_msa, pool_mask)
            ir = tf.einsum("np,npv->nv", w, values)                             # (N10)
            out.update(msa_score=r_msa, msa_weights=w, ir_msa=ir)
            parts.append(ir)
            if self.fsa:
                local, pool_mask = top_k_rows(r_msa, pool_mask, static_k(self.k2, pool_mask))
                index = tf.gather(index, local, batch_dims=1)
                out["index2"] = index
        if self.fsa:
            ir, a = self._fsa(q, pool("fsa_keys", index), pool("fsa_values", index), pool_mask)
            out.update(fsa_weights=a, fsa_index=index, fsa_mask=pool_mask, ir_fsa=ir)
            parts.append(ir)
        out["output"] = tf.concat(parts, -1) if len(parts) > 1 else parts[0]
        return out

    # ---- per-item scores (attend's math; also the consistency report's) ----------------------
    @staticmethod
    def _whole_window(mask: tf.Tensor, n: tf.Tensor):
        """Positions [N, L] of every window row and their mask [N, L] (the pool = all L)."""
        length = mask.shape[1] if mask.shape[1] is not None else tf.shape(mask)[1]
        index = tf.broadcast_to(tf.range(length)[None, :], tf.stack([n, length]))
        return index, tf.broadcast_to(mask, tf.stack([n, length]))

    @staticmethod
    def csa_score(emb: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
        """(N7) r^csa = e^h . e^v: emb [B in (1, N), L, d], q [N, d] -> [N, L]."""
        return (tf.einsum("ld,nd->nl", emb[0], q) if one_user(emb)
                else tf.einsum("nld,nd->nl", emb, q))

    def msa_logits(self, q: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """(N9) r^msa = (W_Q e^v) . K_k / sqrt(d_a): q [N, d], keys [N, P, d_a] -> [N, P]."""
        query = tf.matmul(q, self.w_q_msa)                                      # Q [N, d_a]
        return tf.einsum("na,npa->np", query, keys) / math.sqrt(self.attention_dim)

    def fsa_logits(self, q: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """(N11) per-head logits Q_h . K_{h,k} / sqrt(d_h): q [N, d], keys [N, P, l * d_h]
        -> [N, l, P] (before the softmax over the pool)."""
        n, p = tf.shape(keys)[0], tf.shape(keys)[1]
        l, dh = self.num_heads, self.head_dim
        keys = tf.reshape(keys, tf.stack([n, p, l, dh]))
        query = tf.reshape(tf.matmul(q, self.w_q_fsa), tf.stack([n, l, dh]))   # Q_h
        return tf.einsum("nhc,nphc->nhp", query, keys) / math.sqrt(dh)

    def level_scores(self, cache: Dict[str, tf.Tensor],
                     target: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Every level's per-item score over the WHOLE window, for N candidates: ``csa``
        r^csa [N, L], ``msa`` r^msa [N, L], ``fsa`` FSA's head-averaged logits
        mean_h Q_h . K_{h,k} / sqrt(d_h) [N, L] (each when its level runs) and ``mask``
        [N, L]. A level's score of an item does not depend on the pool it is in, so
        top-k of these over any pool equals what :meth:`attend` selects from that pool
        (the consistency report, ``lifelong lcn-consistency``, ranks them; FSA's ranking
        over all L is its oracle; averaging logits over heads is [interp])."""
        self._ensure_built()
        q = target["emb"]
        n = tf.shape(q)[0]
        index, mask = self._whole_window(cache["mask"], n)
        out = {"mask": mask}
        if self.csa:
            out["csa"] = self.csa_score(cache["emb"], q)
        terms = self.request_terms(cache, target) if (self.msa or self.fsa) else None

        def pool(name):
            x = cache[name] if terms is None else cache[name] + terms[name]
            return gather_rows(x, index)

        if self.msa:
            out["msa"] = self.msa_logits(q, pool("msa_keys"))
        if self.fsa:
            out["fsa"] = tf.reduce_mean(self.fsa_logits(q, pool("fsa_keys")), 1)
        return out

    def ffn(self, x: tf.Tensor) -> tf.Tensor:
        """(N12) ReLU(x w_1 + b_1) w_2 + b_2."""
        return self.ffn_out(self.ffn_hidden(x))

    def _fsa(self, q, keys, values, mask):
        """(N11-N13) over the pool: keys / values [N, P, l * d_h], mask [N, P] ->
        (IR_FSA [N, d_out], attention a [N, l, P])."""
        n, p = tf.shape(keys)[0], tf.shape(keys)[1]
        l, dh = self.num_heads, self.head_dim
        values = tf.reshape(values, tf.stack([n, p, l, dh]))
        logits = self.fsa_logits(q, keys)                                     # [N, l, P]
        a = masked_softmax(logits, tf.broadcast_to(mask[:, None, :], tf.shape(logits)))
        count = tf.reduce_sum(mask, -1, keepdims=True)                        # valid kept rows
        if self.fsa_pooling == "per_item_mean":
            per_item = tf.einsum("nhp,nphc->nphc", a, values)                 # H_{h,k} = a V
            h = self.ffn(tf.reshape(per_item, tf.stack([n, p, l * dh])))      # H_k [N, P, d_out]
            ir = tf.reduce_sum(h * mask[..., None], 1) / tf.maximum(count, 1.0)   # (N13)
        else:
            heads = tf.einsum("nhp,nphc->nhc", a, values)                     # sum_k a V
            ir = self.ffn(tf.reshape(heads, tf.stack([n, l * dh]))) * tf.cast(count > 0,
                                                                              tf.float32)
        return ir, a

    def score(self, cache, target, training=None):
        return self.attend(cache, target)["output"]

    def get_config(self):
        return {**super().get_config(), "k1": self.k1, "k2": self.k2, "levels": list(self.levels),
                "csa_norm": self.csa_norm, "fsa_pooling": self.fsa_pooling,
                "num_heads": self.num_heads, "attention_dim": self.attention_dim,
                "value_dim": self.value_dim, "head_dim": self.head_dim, "ffn_dim": self.ffn_dim,
                "fsa_dim": self.fsa_dim, "context_features": list(self.context_features),
                "context_dim": self.context_dim, "num_domains": self.num_domains}
