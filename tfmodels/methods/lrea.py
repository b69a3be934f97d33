"""LREA: Low-Rank Efficient Attention (METHODS section 2.3; paper seed 002, Eqs. 3-11).

Position-indexed, global matrices W_comp [L, r] and W_decomp [r, L] compress the long
sequence E_s [L, d] along its length; a DIN-style scorer with a split input
projection W_in = [W_1; W_2; W_3] ([3d, h], no bias), activation phi (LeakyReLU) and
W_o [h, 1] (no bias) scores every position; the output is the weighted sum of the
ORIGINAL behaviors.

Equation map (METHODS ids; paper equation in brackets):

* (R2) [Eq. 4] :meth:`LREA.compress` -- E_comp = E_s^T W_comp [B, d, r];
  E_s^LREA = W_decomp^T E_comp^T [B, L, d] in :meth:`LREA.training_path`.
* (R3) [Eq. 5, split form] s = [phi(E_t W_1) + phi(E_s^LREA W_2) +
  phi((E_t * E_s^LREA) W_3)] W_o [B, L], using the identity
  W_decomp^T (E_t * E_comp^T) = E_t * E_s^LREA (faithfulness test 3).
* (R4) v_train = E_s^T s [B, d]: :meth:`LREA.training_path` = :meth:`LREA.call`.
* (R7) [Eq. 9, absorbed] :meth:`LREA.user_cache` -> E_comp, E_aux = E_s^T W_decomp^T
  (both [B, d, r]) and sigma_s = E_s^T 1_L [B, d]; :meth:`LREA.score`:
  s_r = [phi(E_comp^T W_2) + phi((E_t * E_comp^T) W_3)] W_o [B, r],
  v_inf = E_aux s_r + sigma_s * (phi(E_t W_1) W_o). O(r d h) per candidate; the raw
  sequence is never read.
* (R8)-(R9) [Eqs. 10-11] :meth:`LREA.nonneg_loss`, added as lam * L_nonneg with
  ``add_loss`` when training.

Normalisation (R4 [interp] flag): ``normalize="none"`` (default, as printed: v grows
with the number of valid behaviors, like DIN's un-normalised G2) or ``"count"``:
v / n with n = sum_l m_l the number of valid behaviors in the window (0 valid rows ->
v = 0, no NaN). n does not depend on the candidate, so the absorbed path caches it as
one more per-user scalar (``count`` [B, 1]) and divides v_inf by it: for linear phi
the two paths stay exactly equal. "count" is the like-for-like partner of a
mean-normalised DIN-L; "none" pairs with the un-normalised DIN-L (``din_l_none``).

The two paths are equal exactly when phi is linear (R5); with LeakyReLU the absorbed
path approximates the training path (R6), exactly so when W_decomp >= 0 and every
column of B (= E_comp^T W_2, resp. (E_t * E_comp^T) W_3) has one sign. Hence
:meth:`call` is overridden with the training path (the paper trains "without
computational optimization") while serving (``model.rank(model.user_tower(x), x)``)
uses the absorbed path.

Alignment and padding [interp] (METHODS 2.3 "Variable length"): windows are most
recent first and right-padded (schema), so row l of W_comp / column l of W_decomp
belongs to the l-th most recent behavior whatever the user's length; a user with
n < L behaviors uses the first n rows; padded rows of E_s are zeroed (times the
mask, so garbage stored there is ignored) and therefore add nothing to E_comp, E_aux,
sigma_s, v_train or L_nonneg; scores at padded positions multiply zero rows (and are
masked as well). The window length L is learnt from the first input's shape at build
time. An input shorter than L uses the first rows of W_comp / columns of W_decomp;
an input longer than L is cut to its L most recent positions (there are no matrix
rows for older ones) -- under the schema the window length is fixed, so beyond-L
positions only ever hold appended padding [interp extension: the spec does not say].

Initialisation [interp; the paper does not state one]: ``init="block"`` (default)
assigns position l to slot k(l) = floor(l r / L) and sets W_decomp[k(l), l] =
W_comp[l, k(l)] = 1 / sqrt(n_k) (n_k positions per slot), zeros elsewhere, so
W_comp W_decomp starts as the block-averaging projection (the identity when L <= r:
no compression), W_decomp starts non-negative (L_nonneg's first term is 0) and, with
one non-zero per row of W_decomp^T, the absorption phi(AB) = A phi(B) is exact at
initialisation for any B. ``init="glorot"`` gives both matrices glorot-uniform
values (mixed signs, as a generic dense kernel).

Rank [interp]: r is not clamped to L (the paper uses r = 128 with Amazon L = 90);
with r > L, the rank is effectively L (with the block init the surplus slots start
and stay zero), which is the no-compression case the spec allows.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import serializable
from tfmodels.methods.base import LongSequenceModule, broadcast_rows

Tensors = Dict[str, tf.Tensor]

#: measurement only (docs/benchmarks.md, issue 22 training step): True runs the
#: training path's products as the einsums before that work.
_REFERENCE_TRAINING = False
PHIS = ("leaky_relu", "linear")
INITS = ("block", "glorot")
NORMALIZE = ("none", "count")


def block_init(length: int, rank: int):
    """The ``init="block"`` matrices: (W_comp [L, r], W_decomp [r, L]) as float32 NumPy.

    Position l -> slot k(l) = floor(l r / L); both matrices hold 1/sqrt(n_k) at
    (l, k(l)) resp. (k(l), l), so W_comp W_decomp is the block-averaging projection.
    """
    slot = (np.arange(length) * rank) // length
    counts = np.bincount(slot, minlength=rank).astype(np.float64)
    value = 1.0 / np.sqrt(counts[slot])
    w_comp = np.zeros((length, rank), np.float32)
    w_comp[np.arange(length), slot] = value
    return w_comp, np.ascontiguousarray(w_comp.T)


@serializable
class LREA(LongSequenceModule):
    """Low-rank efficient attention over the long sequence (METHODS 2.3).

    Args:
      emb_dim: d, the behavior/target embedding width.
      rank: r, the compressed length (paper 128; 32/64/128 in its grid).
      lam: lambda, weight of the non-negativity loss (R9; paper 0.3).
      hidden: h, width of W_in (not stated by the paper -> 4 d [interp]); None = 4 d.
      phi: ``"leaky_relu"`` (paper) or ``"linear"`` (identity: the absorbed path is
        then exactly the training path).
      leaky_slope: LeakyReLU negative slope (not stated -> 0.01 [interp]).
      init: ``"block"`` or ``"glorot"`` initialisation of W_comp / W_decomp (see the
        module docstring).
      normalize: ``"none"`` (default; R4 as printed, v = E_s^T s) or ``"count"``
        (v / sum_l m_l; 0 when the user has no valid behavior) [interp, METHODS 2.3 R4].

    Inputs (base contract): ``seq["emb"]`` [B, L, d], ``seq["mask"]`` [B, L];
    ``target["emb"]`` [B, d]. Output [B, d].
    """

    #: Tolerance of the shared cached-path checks (``testing.layer_test`` /
    #: ``model_test``), absolute, on module outputs resp. logits. With LeakyReLU the
    #: absorbed path (R7) only approximates the training path (R6), so 1e-5 cannot
    #: hold once W_decomp has left its initialisation. 0.1 covers the helpers'
    #: setting (tiny dims, 6 Adam steps at lr 1e-2): the measured logit gap there is
    #: 0.077 with the backbone's N(0, dim^-1/2) embedding init at emb_dim 4 (it was
    #: 1.5e-3 with Keras' U(-0.05, 0.05) init: the gap grows with the embedding scale);
    #: at initialisation it is 0 with the block init, so ``layer_test`` still sees
    #: < 1e-5. Wiring errors (a missing sigma term, a transposed matrix) are caught
    #: at 1e-5 by the same code run with phi linear (``LREALinear``, tol 1e-5) and by
    #: tests/test_lrea.py. It is NOT a bound for trained models: the serving gap on
    #: real data is measured by ``lifelong.reports.lrea_grid.absorbed_gap``.
    cache_parity_tol: float = 0.1

    def __init__(self, emb_dim: int, rank: int = 128, lam: float = 0.3,
                 hidden: Optional[int] = None, phi: str = "leaky_relu",
                 leaky_slope: float = 0.01, init: str = "block", normalize: str = "none",
                 **kwargs):
        super().__init__(emb_dim, **kwargs)
        if phi not in PHIS:
            raise ValueError(f"phi must be one of {PHIS}, got {phi!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if float(lam) < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.rank, self.lam = int(rank), float(lam)
        self.hidden = int(hidden) if hidden else 4 * self.emb_dim
        self.phi, self.leaky_slope, self.init = phi, float(leaky_slope), init
        self.normalize = normalize
        self.seq_len: Optional[int] = None   # L, set in build()

    # ---- weights ---------------------------------------------------------------------
    def build(self, input_shape):
        """Create W_comp [L, r], W_decomp [r, L], W_in [3d, h], W_o [h].

        ``input_shape`` is the shape structure of ``seq`` (a dict; ``emb`` is
        [B, L, d]) or of the embedded sequence itself; L must be static.
        """
        shape = input_shape["emb"] if isinstance(input_shape, dict) else input_shape
        shape = tf.TensorShape(shape)
        length = shape[1] if shape.rank and shape.rank >= 2 else None
        if length is None:
            raise ValueError("LREA needs a static long-window length L (W_comp is [L, r]); "
                             f"got sequence shape {shape}")
        if shape[-1] is not None and int(shape[-1]) != self.emb_dim:
            raise ValueError(f"LREA built for emb_dim {self.emb_dim}, got width {shape[-1]}")
        self.seq_len = int(length)
        L, r, d, h = self.seq_len, self.rank, self.emb_dim, self.hidden
        if self.init == "block":
            comp, decomp = block_init(L, r)
            comp_init = tf.keras.initializers.Constant(comp)
            decomp_init = tf.keras.initializers.Constant(decomp)
        else:
            comp_init = decomp_init = "glorot_uniform"
        self.w_comp = self.add_weight("w_comp", shape=[L, r], initializer=comp_init)
        self.w_decomp = self.add_weight("w_decomp", shape=[r, L], initializer=decomp_init)
        # W_in = [W_1; W_2; W_3] (target, sequence, target x sequence); no biases (R7 [interp]).
        self.w_in = self.add_weight("w_in", shape=[3 * d, h], initializer="glorot_uniform")
        self.w_o = self.add_weight("w_o", shape=[h], initializer=tf.keras.initializers.RandomUniform(
            -math.sqrt(6.0 / (h + 1)), math.sqrt(6.0 / (h + 1))))   # glorot of [h, 1]
        super().build(input_shape)

    def _ensure_built(self, seq: Tensors) -> None:
        # user_cache() may run before any __call__ (e.g. a serving export).
        if not self.built:
            self.build({"emb": seq["emb"].shape})

    def _w(self):
        d = self.emb_dim
        return self.w_in[:d], self.w_in[d:2 * d], self.w_in[2 * d:]

    def _normalized(self, v: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        """v [B, d] divided by the valid-behavior count [B, 1] when ``normalize="count"``.

        ``divide_no_nan`` gives 0 for a user without valid behaviors (v is 0 there
        anyway, since every row of E_s is masked) instead of 0/0 = NaN.
        """
        if self.normalize == "count":
            return tf.math.divide_no_nan(v, count)
        return v

    def _phi(self, x: tf.Tensor) -> tf.Tensor:
        if self.phi == "linear":
            return x
        return tf.nn.leaky_relu(x, alpha=self.leaky_slope)

    def _window(self, seq: Tensors):
        """Masked E_s [B, n, d], mask [B, n], W_comp[:n], W_decomp[:, :n]; n = min(L_in, L).

        Position l (0 = most recent) always uses W_comp row l / W_decomp column l.
        """
        self._ensure_built(seq)
        emb, mask = seq["emb"], tf.cast(seq["mask"], seq["emb"].dtype)
        static = emb.shape[1]
        n = min(int(static), self.seq_len) if static is not None else \
            tf.minimum(tf.shape(emb)[1], self.seq_len)
        mask = mask[:, :n]
        e_s = emb[:, :n] * mask[..., None]            # zero padded rows (garbage-proof)
        return e_s, mask, self.w_comp[:n], self.w_decomp[:, :n]

    # ---- (R2) compression ------------------------------------------------------------
    def compress(self, seq: Tensors) -> Tensors:
        """E_comp = E_s^T W_comp [B, d, r] (R2) plus the masked window (for reuse)."""
        e_s, mask, w_comp, w_decomp = self._window(seq)
        e_comp = tf.einsum("bld,lr->bdr", e_s, w_comp)
        return {"e_s": e_s, "mask": mask, "w_comp": w_comp, "w_decomp": w_decomp,
                "e_comp": e_comp}

    # ---- (R8) non-negativity loss ----------------------------------------------------
    def nonneg_loss(self, seq: Optional[Tensors] = None,
                    e_comp: Optional[tf.Tensor] = None) -> tf.Tensor:
        """L_nonneg = ||max(0, -W_decomp)||_F^2 + mean_b ||max(0, -E_comp_b)||_F^2 (R8).

        The first term covers the whole [r, L] matrix (a weight penalty, independent
        of the input's length); the second is per sample, averaged over the batch
        [interp]. Unweighted (lambda is applied in :meth:`call`).
        """
        if e_comp is None:
            e_comp = self.compress(seq)["e_comp"]
        dec = tf.reduce_sum(tf.square(tf.nn.relu(-self.w_decomp)))
        comp = tf.reduce_mean(tf.reduce_sum(tf.square(tf.nn.relu(-e_comp)), axis=[1, 2]))
        return dec + comp

    # ---- (R3)-(R4) training path -----------------------------------------------------
    def training_path(self, seq: Tensors, target: Tensors, parts: Optional[Tensors] = None
                      ) -> tf.Tensor:
        """v_train = E_s^T s, s = [phi(E_t W_1) + phi(E^LREA W_2) + phi((E_t*E^LREA) W_3)] W_o.

        Shapes: E^LREA = W_decomp^T E_comp^T [B, n, d]; s [B, n]; output [B, d].
        Cost O(B L r d + B L d h).
        """
        parts = parts or self.compress(seq)
        e_s, mask, e_comp, w_decomp = parts["e_s"], parts["mask"], parts["e_comp"], \
            parts["w_decomp"]
        e_t = target["emb"]
        w1, w2, w3 = self._w()
        if _REFERENCE_TRAINING:
            e_rec = tf.einsum("bdr,rl->bld", e_comp, w_decomp)                 # E_s^LREA
            h_seq = self._phi(tf.einsum("bld,dh->blh", e_rec, w2))
            # W_decomp^T (E_t * E_comp^T) W_3 = (E_t * E^LREA) W_3 = E^LREA diag(E_t) W_3
            h_cross = self._phi(tf.einsum("bld,bdh->blh", e_rec, e_t[:, :, None] * w3[None]))
        else:
            # The same products as plain matmuls (issue 22, training step): oneDNN's
            # einsum ran "bld,dh->blh" (a weight shared by every row) as a batched
            # product; here it is one [B n, d] x [d, h] matmul, and E^LREA comes from
            # one [B d, r] x [r, n] matmul and a transpose. Only float rounding differs.
            d, r = self.emb_dim, self.rank
            shape = tf.shape(e_s)
            e_rec = tf.reshape(tf.matmul(tf.reshape(e_comp, [-1, r]), w_decomp),
                               [shape[0], d, shape[1]])
            e_rec = tf.transpose(e_rec, [0, 2, 1])                             # E_s^LREA
            h_seq = self._phi(tf.reshape(tf.matmul(tf.reshape(e_rec, [-1, d]), w2),
                                         [shape[0], shape[1], self.hidden]))
            # W_decomp^T (E_t * E_comp^T) W_3 = (E_t * E^LREA) W_3 = E^LREA diag(E_t) W_3
            h_cross = self._phi(tf.matmul(e_rec, e_t[:, :, None] * w3[None]))
        s_target = tf.linalg.matvec(self._phi(tf.matmul(e_t, w1)), self.w_o)   # [B]
        s = tf.linalg.matvec(h_seq + h_cross, self.w_o) + s_target[:, None]    # [B, n]
        s = s * mask
        v = tf.einsum("bl,bld->bd", s, e_s)
        return self._normalized(v, tf.reduce_sum(mask, axis=1, keepdims=True))

    def call(self, seq: Tensors, target: Tensors, training=None) -> tf.Tensor:
        """Training path (R3-R4); adds lam * L_nonneg (R8-R9) when training.

        Overrides the base ``score(user_cache(seq))``: that is the absorbed path (R7),
        which differs from this one when phi is non-linear.
        """
        parts = self.compress(seq)
        if training and self.lam > 0:
            self.add_loss(self.lam * self.nonneg_loss(e_comp=parts["e_comp"]))
        return self.training_path(seq, target, parts)

    # ---- (R7) absorbed path ----------------------------------------------------------
    def user_cache(self, seq: Tensors, training=None) -> Tensors:
        """Per-user cache: ``e_comp`` = E_s^T W_comp, ``e_aux`` = E_s^T W_decomp^T
        (both [B, d, r]) and ``sigma`` = sum_l e_l [B, d]; with ``normalize="count"``
        also ``count`` = sum_l m_l [B, 1] (valid behaviors in the window). Size
        independent of L."""
        parts = self.compress(seq)
        e_aux = tf.einsum("bld,rl->bdr", parts["e_s"], parts["w_decomp"])
        cache = {"e_comp": parts["e_comp"], "e_aux": e_aux,
                 "sigma": tf.reduce_sum(parts["e_s"], axis=1)}
        if self.normalize == "count":
            cache["count"] = tf.reduce_sum(parts["mask"], axis=1, keepdims=True)
        return cache

    def score(self, cache: Tensors, target: Tensors, training=None) -> tf.Tensor:
        """v_inf = E_aux s_r + sigma_s (phi(E_t W_1) W_o) (R7), from the cache only
        (divided by the cached ``count`` when ``normalize="count"``).

        s_r = [phi(E_comp^T W_2) + phi((E_t * E_comp^T) W_3)] W_o [B, r]. The first
        term is candidate independent and computed on the cache's batch (1 for one
        user); per candidate the cost is O(r d h). A cache with batch 1 broadcasts
        against B targets.
        """
        e_t = target["emb"]
        batch = tf.shape(e_t)[0]
        w1, w2, w3 = self._w()
        e_comp = cache["e_comp"]
        s_seq = tf.linalg.matvec(self._phi(tf.einsum("bdr,dh->brh", e_comp, w2)), self.w_o)
        s_target = tf.linalg.matvec(self._phi(tf.matmul(e_t, w1)), self.w_o)    # [B]
        if e_comp.shape[0] == 1:       # static: one user's cache, N candidates (``rank``)
            v = self._one_user_terms(cache, e_t, s_seq, s_target)
        else:
            e_comp_b = broadcast_rows(e_comp, batch)
            if self.phi == "linear":   # see _linear_cross: r d per candidate, not r d h
                s_cross = tf.einsum("bd,bdr->br", e_t * self._w3_wo()[None, :], e_comp_b)
            else:
                cross = tf.einsum("bdr,bdh->brh", e_comp_b, e_t[:, :, None] * w3[None])
                s_cross = tf.linalg.matvec(self._phi(cross), self.w_o)
            s_r = s_seq + s_cross                                               # [B, r]
            v = tf.einsum("bdr,br->bd", broadcast_rows(cache["e_aux"], batch), s_r)
            v = v + broadcast_rows(cache["sigma"], batch) * s_target[:, None]
        if self.normalize == "count":
            return self._normalized(v, broadcast_rows(cache["count"], batch))
        return v

    def _one_user_terms(self, cache: Tensors, e_t: tf.Tensor, s_seq: tf.Tensor,
                        s_target: tf.Tensor) -> tf.Tensor:
        """v_inf before the count division for a cache of batch 1 and N candidates: the
        same (R7) terms as the batched path, arranged as plain 2-D matmuls (issue 20
        item 6; tests/test_lrea.py checks it against the batched formula):

        (E_t * E_comp^T) W_3 for every candidate and slot = E_t P with
        P[d, (r, h)] = E_comp[d, r] W_3[d, h] ([d, r h], once per request): one
        [N, d] x [d, r h] matmul instead of N batched [r, d] x [d, h] products over a
        broadcast copy of E_comp and an [N, d, h] copy of E_t * W_3. The multiply-adds
        per candidate stay r d h (phi is applied to each of the r h sums, so no
        factorisation over d is exact). E_aux s_r and sigma s_target are [N, r] x
        [r, d] and a broadcast product. Only the order of float operations differs.
        """
        d, r, h = self.emb_dim, self.rank, self.hidden
        _, _, w3 = self._w()
        e_comp = cache["e_comp"][0]                                              # [d, r]
        if self.phi == "linear":
            s_cross = self._linear_cross(e_comp, e_t)                            # [N, r]
        else:
            p = tf.reshape(e_comp[:, :, None] * w3[:, None, :], tf.stack([d, r * h]))   # P
            cross = tf.reshape(tf.matmul(e_t, p), tf.stack([-1, h]))             # [N r, h]
            s_cross = tf.reshape(tf.linalg.matvec(self._phi(cross), self.w_o),
                                 tf.stack([-1, r]))
        s_r = s_seq + s_cross                                                    # [N, r]
        v = tf.matmul(s_r, cache["e_aux"][0], transpose_b=True)                  # [N, d]
        return v + cache["sigma"] * s_target[:, None]

    def _w3_wo(self) -> tf.Tensor:
        """W_3 w_o [d]: with phi linear the only way W_3 and w_o enter the cross term."""
        return tf.linalg.matvec(self._w()[2], self.w_o)

    def _linear_cross(self, e_comp: tf.Tensor, e_t: tf.Tensor) -> tf.Tensor:
        """phi linear: ((E_t * E_comp^T) W_3) w_o for one user's E_comp [d, r] and N
        candidates E_t [N, d] -> [N, r], as E_t (E_comp * (W_3 w_o)) (issue 20 item 6).

        Exact by associativity (only the order of float operations differs): the sum
        over h of w_o[h] sum_d e_t[d] E_comp[d, r] W_3[d, h] is sum_d e_t[d] E_comp[d, r]
        (W_3 w_o)[d], so the [N, d] x [d, r h] product of the general path (r d h
        multiply-adds per candidate, 1 M at the bench's r = 128, d = 16, h = 64) becomes
        an [N, d] x [d, r] one (r d = 2 K). With LeakyReLU no such factorisation exists
        (phi acts on each of the r h sums). tests/test_lrea.py checks it against the
        literal (R7) and against the general formula.
        """
        return tf.matmul(e_t, e_comp * self._w3_wo()[:, None])

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "lam": self.lam,
                "hidden": self.hidden, "phi": self.phi, "leaky_slope": self.leaky_slope,
                "init": self.init, "normalize": self.normalize}


@serializable
class LREALinear(LREA):
    """LREA with phi = identity (R5 exact): the absorbed path equals the training path,
    so the shared cached-path checks keep their 1e-5 tolerance. A diagnostic variant
    (registry ``lrea_linear``), not the paper's model."""

    cache_parity_tol: float = 1e-5

    def __init__(self, emb_dim: int, phi: str = "linear", **kwargs):
        super().__init__(emb_dim, phi=phi, **kwargs)
