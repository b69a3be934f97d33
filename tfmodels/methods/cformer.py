"""C-Former (METHODS 2.1; "Transformers are Good Clusterers", CIKM'25, seeds/000).

J learnable clustering anchors attend over the user's lifelong behaviors
(encoder), a light decoder reconstructs the behaviors from the refined anchors,
and each behavior is explicitly assigned to its highest-attention anchor(s) to
give denoised centroids. The centroids depend on the user only: ``user_cache``
returns them and ``score`` is DIN target attention over J centroids, O(J d) per
candidate and independent of L. Encoder and decoder never run in ``score``.

Paper equations -> code:

* (C1)-(C3) scaled dot-product multi-head attention: :class:`CFormerAttention`.
* (C4) ``O, A = Transformer(Q, K, V)`` (cross-attention, Add&Norm, FFN,
  Add&Norm): :class:`CFormerBlock` (``full=True``); the "1*" block is
  :class:`CFormerAttention` alone.
* (C5)-(C7) encoder with learnable anchors Q_1: :class:`CFormerEncoder`.
* (C8)-(C10) decoder (behaviors as queries, refined anchors as keys/values):
  :class:`CFormerDecoder`.
* (C11)-(C14) denoise & assignment, cluster sizes n_j: :class:`DenoiseAssign`.
* (C15) reconstruction loss: :func:`reconstruction_loss`.
* (C16) orthogonality loss: :func:`orthogonality_loss`.
* (C17)-(C19) total loss: :meth:`CFormer.call` (``add_loss`` in training; the
  BCE comes from the model's task, see "beta" below).
* (C18) E^lifelong = DIN target attention (G2) over the centroids masked by
  n_j > 0: :meth:`CFormer.score`.

[interp] choices (spec 2.1, defaults): post-LN blocks, FFN = Dense(4d, ReLU) ->
Dense(d), h = 2 heads with d_k = d / h, A = mean of the heads' attention, no
positional encoding, separate weights per layer, no residual in the 1* decoder,
L_recon = mean over valid rows and dims (of the whole batch), L_orth with
row-normalised anchors, empty clusters masked, alpha = 0.1, beta = 1,
``centroid_norm = "weighted_mean"`` (below).

**centroid_norm** [interp] (spec 2.1). (C12) as printed, μ_j = Σ_i A[j, i] E_i
𝟙(c_i = j) with A a softmax over all L behaviors, carries only cluster j's
attention mass Σ_i A[j, i] 𝟙(c_i = j) (about n_j / L of an embedding, 1/J at
initialisation), so on long sequences the DIN over the centroids reads almost
nothing. ``"weighted_mean"`` (default) divides μ_j by that mass: the
attention-weighted average of cluster j's members, a convex combination with the
norm of a behavior embedding. ``"sum"`` is C12 as printed, kept as the ablation
``cformer_sum``. Reason for the default: a quick check on the synthetic set
(L = 500, seed 0, 4 epochs) gave test AUC 0.523 with "sum" vs 0.633 with
"weighted_mean" (DIN 0.525, avg-pooling 0.548, DIN-L 0.695). Both depend on the
user only, so the centroids stay cacheable.

**beta.** (C19) is L = L_recon + alpha L_orth + beta L_bce. The model's task adds
L_bce with weight 1, so this module adds (L_recon + alpha L_orth) / beta, i.e.
it trains L / beta: the same objective up to a positive constant factor (same
minimisers; Adam is invariant to the scale, SGD sees a learning rate / beta).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import NEG_INF, DinAttention, serializable
from tfmodels.methods.base import LongSequenceModule

Tensors = Dict[str, tf.Tensor]
ONE_STAR = "1*"
#: measurement only (docs/benchmarks.md, issue 22 training step): True runs the
#: training path through the literal per-block layers (``call_reference``).
_REFERENCE_TRAINING = False


def _build(layer: tf.keras.layers.Layer, shape=None) -> None:
    """Build a sublayer explicitly under its own name scope (readable variable names)."""
    if not layer.built:
        with tf.name_scope(layer.name):
            layer.build(shape)


def _masked_behaviors(behaviors, mask):
    """What both fast encoder paths start from: (behaviors with padded rows zeroed [B, L,
    d], 1.0 for a user with a valid behavior [B], the additive logit mask [B, L]: 0 on
    valid positions, NEG_INF on padding), in the behaviors' dtype."""
    dtype = behaviors.dtype
    valid = tf.cast(mask, dtype) > 0
    emb = tf.where(valid[..., None], behaviors, tf.zeros_like(behaviors))
    has_any = tf.cast(tf.reduce_any(valid, axis=1), dtype)
    bias = tf.where(valid, tf.zeros(tf.shape(valid), dtype), tf.cast(NEG_INF, dtype))
    return emb, has_any, bias


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------
@serializable
class CFormerAttention(tf.keras.layers.Layer):
    """Multi-head cross-attention (C1-C3) that also returns its attention map.

    head_a = softmax((Q W_a^Q)(K W_a^K)^T / sqrt(d_k)) (V W_a^V);
    MultiHead = Concat_a(head_a) W^O.  Keys and values are the same tensor.

    Shapes: query [B, Q, d], keys [B, K, d], key_mask [B, K] (float, or None = all
    valid) -> (output [B, Q, d], attention [B, Q, K] = mean over heads).
    Padded keys get logit -1e9 and weight exactly 0 (masked softmax, re-masked);
    a query row without any valid key gets zero attention (output = W^O bias).
    """

    def __init__(self, dim: int, num_heads: int = 2, head_dim: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}; "
                             "pass head_dim")
        self.head_dim = None if head_dim is None else int(head_dim)

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def build(self, input_shape=None):
        d, hk = self.dim, self.num_heads * self.key_dim
        init = "glorot_uniform"
        # Per-head matrices W_a^Q, W_a^K, W_a^V [d, d_k] side by side: [d, h * d_k].
        self.wq = self.add_weight("wq", shape=[d, hk], initializer=init)
        self.wk = self.add_weight("wk", shape=[d, hk], initializer=init)
        self.wv = self.add_weight("wv", shape=[d, hk], initializer=init)
        self.bq = self.add_weight("bq", shape=[hk], initializer="zeros")
        self.bk = self.add_weight("bk", shape=[hk], initializer="zeros")
        self.bv = self.add_weight("bv", shape=[hk], initializer="zeros")
        self.wo = self.add_weight("wo", shape=[hk, d], initializer=init)
        self.bo = self.add_weight("bo", shape=[d], initializer="zeros")
        super().build(input_shape)

    def _heads(self, x, kernel, bias, parts: int = 1):
        """[B, N, d] -> ``parts`` tensors [B, h, N, d_k] (one 2-D matmul, one transpose)."""
        shape = tf.shape(x)
        y = tf.matmul(tf.reshape(x, [-1, self.dim]), kernel) + bias
        y = tf.reshape(y, [shape[0], shape[1], parts, self.num_heads, self.key_dim])
        return tf.unstack(tf.transpose(y, [2, 0, 3, 1, 4]), num=parts)

    def call(self, query, keys, key_mask=None):
        (q,) = self._heads(query, self.wq, self.bq)                          # [B, h, Q, k]
        k, v = self._heads(keys, tf.concat([self.wk, self.wv], 1),          # K and V share
                           tf.concat([self.bk, self.bv], 0), parts=2)       # one matmul
        logits = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(self.key_dim))
        if key_mask is None:
            weights = tf.nn.softmax(logits, axis=-1)                         # [B, h, Q, K]
        else:
            # layers.masked_softmax with a broadcast mask [B, 1, 1, K]: padded logits
            # -1e9, softmax, re-mask (no [B, h, Q, K] mask or fill materialised).
            mask = tf.cast(key_mask, logits.dtype)[:, None, None, :]
            logits = tf.where(mask > 0, logits, tf.cast(NEG_INF, logits.dtype))
            weights = tf.nn.softmax(logits, axis=-1) * mask
        heads = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])          # [B, Q, h, k]
        shape = tf.shape(query)
        out = tf.matmul(tf.reshape(heads, [-1, self.num_heads * self.key_dim]), self.wo)
        out = tf.reshape(out + self.bo, [shape[0], shape[1], self.dim])
        return out, tf.reduce_mean(weights, axis=1)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "head_dim": self.head_dim}


@serializable
class CFormerBlock(tf.keras.layers.Layer):
    """(C4) ``O, A = Transformer(Q, K, V)``: cross-attention, Add&Norm, FFN, Add&Norm.

    [interp] post-LN (Vaswani): X = LN(Q + MHA(Q, K, V)); O = LN(X + FFN(X)),
    FFN = Dense(ffn_mult * d, ReLU) -> Dense(d). No self-attention.

    Shapes: query [B, Q, d], keys [B, K, d], key_mask [B, K] or None ->
    (O [B, Q, d], A [B, Q, K]).
    """

    def __init__(self, dim: int, num_heads: int = 2, head_dim: Optional[int] = None,
                 ffn_mult: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), head_dim
        self.ffn_mult = int(ffn_mult)
        self.attention = CFormerAttention(dim, num_heads, head_dim, name="attention")
        self.norm1 = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.ffn1 = tf.keras.layers.Dense(self.ffn_mult * self.dim, activation="relu",
                                          name="ffn1")
        self.ffn2 = tf.keras.layers.Dense(self.dim, name="ffn2")
        self.norm2 = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")

    def build(self, input_shape=None):
        shape = tf.TensorShape([None, None, self.dim])
        _build(self.attention, shape)
        _build(self.norm1, shape)
        _build(self.ffn1, shape)
        _build(self.ffn2, tf.TensorShape([None, None, self.ffn_mult * self.dim]))
        _build(self.norm2, shape)
        super().build(input_shape)

    def call(self, query, keys, key_mask=None):
        att, weights = self.attention(query, keys, key_mask)
        x = self.norm1(query + att)
        return self.norm2(x + self.ffn2(self.ffn1(x))), weights

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "ffn_mult": self.ffn_mult}


# --------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------
@serializable
class CFormerEncoder(tf.keras.layers.Layer):
    """(C5)-(C7): O_i, A_i = Transformer(Q_i, E^S, E^S); Q_{i+1} = O_i; i = 1..M.

    Q_1 [J, d] is a learnable parameter shared by all users (random init).
    Returns O^enc = O_M [B, J, d] and A = A_M [B, J, L] (each row sums to 1 over
    the valid behaviors, 0 on padding; a user without behaviors gets A = 0).

    Shapes: behaviors [B, L, d] (padded rows zero), mask [B, L] float.
    """

    def __init__(self, dim: int, num_clusters: int = 24, num_layers: int = 2,
                 num_heads: int = 2, head_dim: Optional[int] = None, ffn_mult: int = 4,
                 **kwargs):
        super().__init__(**kwargs)
        if num_clusters < 1 or num_layers < 1:
            raise ValueError(f"num_clusters and num_layers must be >= 1, got "
                             f"{num_clusters}, {num_layers}")
        self.dim, self.num_clusters, self.num_layers = int(dim), int(num_clusters), int(num_layers)
        self.num_heads, self.head_dim, self.ffn_mult = int(num_heads), head_dim, int(ffn_mult)
        self.blocks = [CFormerBlock(dim, num_heads, head_dim, ffn_mult, name=f"layer_{i}")
                       for i in range(self.num_layers)]

    def build(self, input_shape=None):
        # Q_1: "clustering anchor points", random init (the paper gives no scheme).
        self.anchors = self.add_weight("anchors", shape=[self.num_clusters, self.dim],
                                       initializer="glorot_uniform")
        for block in self.blocks:
            _build(block)
        super().build(input_shape)

    def call(self, behaviors, mask):
        if _REFERENCE_TRAINING:
            return self.call_reference(behaviors, mask)
        return self.training_attention(behaviors, mask)

    def call_reference(self, behaviors, mask):
        """(C5)-(C7) literally: each block's :class:`CFormerAttention` projects keys and
        values over L and normalises [B, h, J, L]. :meth:`call` computes the same
        function through :meth:`training_attention`; tests/test_cformer_fast.py holds
        the two to each other (outputs and gradients)."""
        batch = tf.shape(behaviors)[0]
        query = tf.broadcast_to(self.anchors[None], tf.stack([batch, self.num_clusters,
                                                              self.dim]))
        attention = None
        for block in self.blocks:
            query, attention = block(query, behaviors, mask)
        return query, attention

    def training_attention(self, behaviors, mask):
        """:meth:`call_reference`'s (O^enc [B, J, d], A [B, J, L]) with the keys and
        values never projected over L (issue 22, training step): per layer, with
        q_a = (Q W_a^Q + b_a^Q) / sqrt(d_k) and the mask bias m_i (0 valid, -1e9
        padded),

        * logits [B, h*J, L] = G^T [E | m | 1]^T with G = [q_a W_a^K^T ; 1 ; q_a . b_a^K]
          [d+2, h*J] (small, per user; layer 1's anchors are shared, so its G is one
          [d+2, h*J] matrix broadcast over the batch). Unlike
          :meth:`inference_attention` the q . b^K column is kept: it is constant over
          i and cannot change the softmax, but b^K keeps the (zero up to rounding)
          gradient it gets in :meth:`call_reference`.
        * W = softmax over L of the logits (``tf.nn.softmax``, exact zeros at padded
          positions of a user with a behavior, as the masked softmax there);
          head_a = (W_a E) W_a^V + b_a^V (each row of W_a sums to 1), so the values
          are projected on [B, h*J, d] instead of [B, L, d]; a user without a valid
          behavior gets head = 0 (its W is multiplied out: E is zero there and b^V
          is multiplied by has_any), hence O = LN(... W^O bias ...) as before.
        * A = mean over heads of W (last layer), times has_any (0 for an empty user).

        Only the order of float operations differs from :meth:`call_reference`
        (tests/test_cformer_fast.py: outputs and gradients within 1e-5).
        """
        emb, has_any, bias = _masked_behaviors(behaviors, mask)
        emb_aug = tf.concat([emb, bias[..., None], tf.ones_like(bias)[..., None]], -1)
        batch = tf.shape(emb)[0]
        d, J = self.dim, self.num_clusters
        query = self.anchors[None]                                           # [1, J, d]
        attention = None
        for i, block in enumerate(self.blocks):
            att = block.attention
            h, k = att.num_heads, att.key_dim
            q = tf.matmul(tf.reshape(query, [-1, d]), att.wq) + att.bq
            q = tf.reshape(q * (1.0 / math.sqrt(k)), [-1, J, h, k])          # [b, J, h, k]
            g = tf.reshape(tf.einsum("bjak,dak->bdaj", q, tf.reshape(att.wk, [d, h, k])),
                           [-1, d, h * J])
            c = tf.reshape(tf.einsum("bjak,ak->baj", q, tf.reshape(att.bk, [h, k])),
                           [-1, 1, h * J])
            g = tf.concat([g, tf.ones_like(c), c], 1)                        # [b, d+2, hJ]
            logits = tf.matmul(g, emb_aug, transpose_a=True, transpose_b=True)  # [B, hJ, L]
            weights = tf.nn.softmax(logits, axis=-1)
            pooled = tf.matmul(weights, emb)                                 # [B, hJ, d]
            heads = tf.einsum("bajd,dak->bjak", tf.reshape(pooled, [-1, h, J, d]),
                              tf.reshape(att.wv, [d, h, k]))
            heads = heads + tf.reshape(att.bv, [h, k]) * has_any[:, None, None, None]
            out = tf.matmul(tf.reshape(heads, [-1, h * k]), att.wo) + att.bo
            if i == 0:
                query = tf.broadcast_to(query, tf.stack([batch, J, d]))
            x = block.norm1(query + tf.reshape(out, [-1, J, d]))
            query = block.norm2(x + block.ffn2(block.ffn1(x)))
            attention = weights
        h = self.blocks[-1].attention.num_heads
        attention = tf.reduce_mean(tf.reshape(attention, [batch, h, J, -1]), axis=1)
        return query, attention * has_any[:, None, None]

    def inference_attention(self, behaviors, mask, with_anchors: bool = False):
        """The same O_M and A as :meth:`call`, reformulated for inference (user_cache).

        Returns (O^enc [B, J, d] if ``with_anchors`` else None, A^T [B, L, J]): the
        attention TRANSPOSED (behavior-major), and at padded positions of a user
        without any valid behavior A^T is finite but unspecified (the caller masks
        it; :meth:`DenoiseAssign.centroids_from_rows` does). Same variables and the
        same function as :meth:`call` up to float rounding (tests/test_cformer_fast.py
        checks it against :meth:`call` with padding); measured 1.48 -> 1.03 ms CPU
        per user at L = 1,000, d = 16, J = 24, h = 2, batch 64 (docs/benchmarks.md,
        precompute).
        Per layer, with q_a = (Q W_a^Q + b_a^Q) / sqrt(d_k) and mask bias
        m_i = 0 (valid) or -1e9 (padded):

        * logits: q_a . (E_i W_a^K + b_a^K) = (q_a W_a^K^T) . E_i + q_a . b_a^K; the
          last term is constant over i and drops out of the softmax (exact), so the
          keys are never projected: ONE matmul of [E | m] [B, L, d+1] with
          G = [q_a W_a^K^T ; 1] [d+1, h*J] gives the masked logits (the padded
          logits stay at ~-1e9, so exp gives exactly 0 there, as the -1e9 fill of
          :class:`CFormerAttention` does). Layer 1's queries are the shared anchors
          Q_1: G is the same for every user and the product is one 2-D matmul
          [B*L, d+1] x [d+1, h*J].
        * the softmax over L is never normalised over [B, L, h*J]: with
          e = exp(logit - max_i logit) and s = sum_i e,
          head_a = sum_i (e_i / s) (E_i W_a^V + b_a^V) = ((e^T E) / s) W_a^V + b_a^V
          (the weights sum to 1), i.e. the values are never projected over L and the
          division runs on [B, h*J, d]; a user without a valid behavior gets
          head = 0 (the masked softmax's zero weights), hence O = W^O bias as before.
        * A = mean_a softmax_a = sum_a e_a / (h s_a), computed for the LAST layer
          only, behavior-major (the layout top-k over J wants; no transpose).

        Float differences from :meth:`call` are rounding (~1e-7 relative); where two
        anchors' A tie within rounding, the argmax of (C11) may differ from
        :meth:`call`'s (exact ties, e.g. a one-behavior user's A = 1 everywhere, are
        kept exact: the lowest index wins in both).
        """
        emb, has_any, bias = _masked_behaviors(behaviors, mask)
        emb_aug = tf.concat([emb, bias[..., None]], -1)                      # [B, L, d+1]
        shape = tf.shape(emb)
        d, J = self.dim, self.num_clusters
        query = self.anchors[None]                                           # [1, J, d]
        last = len(self.blocks) - 1
        attention = None
        for i, block in enumerate(self.blocks):
            att = block.attention
            h, k = att.num_heads, att.key_dim
            q = tf.matmul(tf.reshape(query, [-1, d]), att.wq) + att.bq
            q = tf.reshape(q * (1.0 / math.sqrt(k)), [-1, J, h, k])
            g = tf.einsum("bjak,dak->bdaj", q, tf.reshape(att.wk, [d, h, k]))
            g = tf.reshape(g, [-1, d, h * J])
            g = tf.concat([g, tf.ones_like(g[:, :1])], 1)                    # [b, d+1, hJ]
            if i == 0:   # shared anchors: one 2-D matmul for the whole batch
                logits = tf.reshape(tf.matmul(tf.reshape(emb_aug, [-1, d + 1]), g[0]),
                                    [shape[0], shape[1], h * J])            # [B, L, hJ]
            else:
                logits = tf.matmul(emb_aug, g)                               # [B, L, hJ]
            e = tf.exp(logits - tf.reduce_max(logits, axis=1, keepdims=True))
            s = tf.reduce_sum(e, axis=1)                                     # [B, hJ]
            if i < last or with_anchors:
                pooled = tf.matmul(e, emb, transpose_a=True) / s[..., None]  # [B, hJ, d]
                heads = tf.einsum("bajd,dak->bjak", tf.reshape(pooled, [-1, h, J, d]),
                                  tf.reshape(att.wv, [d, h, k])) + tf.reshape(att.bv, [h, k])
                heads = tf.reshape(heads, [-1, J, h * k]) * has_any[:, None, None]
                out = tf.matmul(tf.reshape(heads, [-1, h * k]), att.wo) + att.bo
                x = block.norm1(query + tf.reshape(out, [-1, J, d]))
                query = block.norm2(x + block.ffn2(block.ffn1(x)))
            if i == last:
                r = tf.reshape(1.0 / (s * h), [-1, 1, h, J])
                attention = tf.reduce_sum(tf.reshape(e, [shape[0], shape[1], h, J]) * r, 2)
        return (query if with_anchors else None), attention

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_clusters": self.num_clusters,
                "num_layers": self.num_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "ffn_mult": self.ffn_mult}


def _parse_decoder_layers(value: Union[str, int]) -> Union[str, int]:
    if isinstance(value, str) and value.strip() == ONE_STAR:
        return ONE_STAR
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"decoder_layers must be '1*' or an integer >= 1, got {value!r}")
    return n


@serializable
class CFormerDecoder(tf.keras.layers.Layer):
    """(C8)-(C10): Q~_1 = E^S; O~_i = Transformer(Q~_i, O^enc, O^enc); O^dec = O~_N.

    ``num_layers="1*"`` (default, Table 5): ONE multi-head cross-attention, with no
    FFN, no Add&Norm and [interp] no residual from E^S (a residual would make the
    reconstruction trivial): O^dec = MultiHead(E^S, O^enc, O^enc). ``ffn_mult``
    is then unused. An integer N stacks N full (C4) blocks (the paper's "1", "2").
    Keys are the J anchors, all valid (no mask). Rows at padded query positions
    are computed but ignored by the loss.

    Shapes: behaviors [B, L, d], anchors [B, J, d] -> O^dec [B, L, d].
    """

    def __init__(self, dim: int, num_layers: Union[str, int] = ONE_STAR, num_heads: int = 2,
                 head_dim: Optional[int] = None, ffn_mult: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), head_dim
        self.num_layers, self.ffn_mult = _parse_decoder_layers(num_layers), int(ffn_mult)
        if self.num_layers == ONE_STAR:
            self.blocks = [CFormerAttention(dim, num_heads, head_dim, name="attention")]
        else:
            self.blocks = [CFormerBlock(dim, num_heads, head_dim, ffn_mult, name=f"layer_{i}")
                           for i in range(self.num_layers)]

    def build(self, input_shape=None):
        for block in self.blocks:
            _build(block)
        super().build(input_shape)

    def call(self, behaviors, anchors):
        if self.num_layers == ONE_STAR and not _REFERENCE_TRAINING:
            return self._one_star(behaviors, anchors)
        return self.call_reference(behaviors, anchors)

    def call_reference(self, behaviors, anchors):
        """The blocks literally (queries projected over L, [B, h, L, J] attention)."""
        x = behaviors
        for block in self.blocks:
            x, _ = block(x, anchors)
        return x

    def _one_star(self, behaviors, anchors):
        """The "1*" decoder, MultiHead(E^S, O^enc, O^enc), with nothing projected over L
        (issue 22, training step). With K_a = O W_a^K + b_a^K, V_a = O W_a^V + b_a^V
        (per user, [J, d_k]) and W^O = [W_1^O; ...; W_h^O]:

        logits_a = (E W_a^Q + b_a^Q) K_a^T / sqrt(d_k) = E G_a + c_a with
        G_a = W_a^Q K_a^T / sqrt(d_k) [d, J], c_a = b_a^Q K_a^T / sqrt(d_k) [1, J];
        out = sum_a softmax_J(logits_a) (V_a W_a^O) + b^O.

        So over L there are two batched matmuls, [B, L, d] x [B, d, h*J] and
        [B, L, h*J] x [B, h*J, d], and the softmax over J, instead of the query
        projection, the [B, h, L, d_k] transposes and the W^O projection over L. Only
        the order of float operations differs from :meth:`call_reference`
        (tests/test_cformer_fast.py).
        """
        att = self.blocks[0]
        h, k, d = att.num_heads, att.key_dim, self.dim
        J = tf.shape(anchors)[1]
        flat = tf.reshape(anchors, [-1, d])
        keys = tf.reshape(tf.matmul(flat, att.wk) + att.bk, [-1, J, h, k])       # [B, J, h, k]
        values = tf.reshape(tf.matmul(flat, att.wv) + att.bv, [-1, J, h, k])
        scale = 1.0 / math.sqrt(k)
        g = tf.einsum("dak,bjak->bdaj", tf.reshape(att.wq, [d, h, k]), keys) * scale
        c = tf.einsum("ak,bjak->baj", tf.reshape(att.bq, [h, k]), keys) * scale   # [B, h, J]
        shape = tf.shape(behaviors)
        logits = tf.matmul(behaviors, tf.reshape(g, [shape[0], d, -1]))         # [B, L, hJ]
        logits = tf.reshape(logits, [shape[0], shape[1], h, J]) + c[:, None]
        weights = tf.reshape(tf.nn.softmax(logits, axis=-1), [shape[0], shape[1], -1])
        vo = tf.einsum("bjak,akd->bajd", values, tf.reshape(att.wo, [h, k, d]))
        out = tf.matmul(weights, tf.reshape(vo, [shape[0], -1, d]))             # [B, L, d]
        return out + att.bo

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "head_dim": self.head_dim,
                "ffn_mult": self.ffn_mult}


# --------------------------------------------------------------------------------------
# Denoise & assignment
# --------------------------------------------------------------------------------------
CENTROID_NORMS = ("weighted_mean", "sum")


@serializable
class DenoiseAssign(tf.keras.layers.Layer):
    """(C11)-(C14): assign each valid behavior to its top-k anchors of A[:, i] and
    aggregate μ_j = Σ_i A[j, i] E_i 𝟙(j ∈ c_i); n_j = Σ_i m_i 𝟙(j ∈ c_i).

    k = 1 is the argmax (C11-C12); ties go to the lowest anchor index
    (``tf.math.top_k``). μ uses the raw embeddings E (not value projections).
    The assignment carries no gradient; gradients reach the model through
    A[j, i] and E_i.

    ``centroid_norm`` [interp]: ``"sum"`` = (C12)/(C14) as printed (not
    renormalised); ``"weighted_mean"`` (default) = μ_j / w_j with the cluster's
    attention mass w_j = Σ_i A[j, i] 𝟙(j ∈ c_i), i.e. the A-weighted average of
    cluster j's members (module docstring: why). A cluster with w_j = 0 (no
    member) keeps μ_j = 0, with zero (not NaN) gradients: ``tf.math.divide_no_nan``.

    Shapes: attention [B, J, L], behaviors [B, L, d], mask [B, L] ->
    dict(centroids [B, J, d], sizes [B, J] float, assign [B, L, J] in {0, 1},
    mask [B, J] = 1 where n_j > 0).
    """

    def __init__(self, assignments: int = 1, centroid_norm: str = "weighted_mean", **kwargs):
        super().__init__(**kwargs)
        if int(assignments) < 1:
            raise ValueError(f"assignments (k) must be >= 1, got {assignments}")
        self.assignments = int(assignments)
        self.centroid_norm = _check_centroid_norm(centroid_norm)

    def call(self, attention, behaviors, mask):
        num_clusters = attention.shape[1] or tf.shape(attention)[1]
        if isinstance(num_clusters, int) and self.assignments > num_clusters:
            raise ValueError(f"assignments k={self.assignments} > num_clusters J={num_clusters}")
        per_item = tf.transpose(tf.stop_gradient(attention), [0, 2, 1])     # [B, L, J]
        # (C11) argmax = top-1, (C13) top-k; top_k (unlike argmax) breaks ties
        # deterministically, towards the lowest anchor index.
        _, top = tf.math.top_k(per_item, k=self.assignments)                 # [B, L, k]
        assign = tf.reduce_sum(tf.one_hot(top, num_clusters, dtype=attention.dtype), axis=2)
        assign = assign * mask[..., None]                                     # [B, L, J]
        behaviors = tf.where(mask[..., None] > 0, behaviors, tf.zeros_like(behaviors))
        # (C12)/(C14): mu_j = sum_i A[j, i] 1(j in c_i) E_i.
        weights = attention * tf.transpose(assign, [0, 2, 1])                 # [B, J, L]
        centroids = tf.matmul(weights, behaviors)                             # [B, J, d]
        if self.centroid_norm == "weighted_mean":
            # [interp] / w_j = sum_i A[j, i] 1(j in c_i): the cluster's A-weighted mean.
            # divide_no_nan: an empty cluster (w_j = 0, numerator 0) stays 0 and its
            # gradient is 0 w.r.t. both numerator and mass (TF's DivNoNan gradient).
            mass = tf.reduce_sum(weights, axis=2, keepdims=True)              # [B, J, 1]
            centroids = tf.math.divide_no_nan(centroids, mass)
        sizes = tf.reduce_sum(assign, axis=1)                                 # [B, J]
        return {"centroids": centroids, "sizes": sizes, "assign": assign,
                "mask": tf.cast(sizes > 0, attention.dtype)}

    def centroids_from_rows(self, attention_t, behaviors, mask):
        """(C11)-(C14) from the behavior-major attention A^T [B, L, J] (as
        :meth:`CFormerEncoder.inference_attention` gives it), the centroids only:
        dict(centroids [B, J, d], mask [B, J]); equal to :meth:`call`'s up to float
        rounding. ``tf.math.top_k`` over J gives each behavior's k anchors AND their
        A values, so μ_j, the mass w_j and n_j are segment sums over the L
        behaviors (O(L k d) per user) instead of the [B, J, L] one-hot assignment
        times E (O(J L d)) and the transposes of :meth:`call`. Same tie rule (lowest
        anchor index); padded behaviors (mask 0) add nothing.
        """
        dtype = behaviors.dtype
        mask = tf.cast(mask, dtype)
        num_clusters = attention_t.shape[-1] or tf.shape(attention_t)[-1]
        if isinstance(num_clusters, int) and self.assignments > num_clusters:
            raise ValueError(f"assignments k={self.assignments} > num_clusters J={num_clusters}")
        valid = mask > 0
        behaviors = tf.where(valid[..., None], behaviors, tf.zeros_like(behaviors))
        value, top = tf.math.top_k(tf.stop_gradient(attention_t), k=self.assignments)
        value = tf.where(valid[..., None], value, tf.zeros_like(value))     # [B, L, k]
        batch = tf.shape(attention_t)[0]
        segments = top + (tf.range(batch) * num_clusters)[:, None, None]    # b * J + j
        n = batch * num_clusters
        dim = behaviors.shape[-1] or tf.shape(behaviors)[-1]
        centroids = tf.math.unsorted_segment_sum(value[..., None] * behaviors[:, :, None, :],
                                                 segments, n)              # [B*J, d]
        centroids = tf.reshape(centroids, [batch, num_clusters, dim])
        if self.centroid_norm == "weighted_mean":
            mass = tf.math.unsorted_segment_sum(value, segments, n)
            centroids = tf.math.divide_no_nan(centroids,
                                              tf.reshape(mass, [batch, num_clusters, 1]))
        members = tf.broadcast_to(mask[..., None], tf.shape(value))
        sizes = tf.reshape(tf.math.unsorted_segment_sum(members, segments, n),
                           [batch, num_clusters])
        return {"centroids": centroids, "mask": tf.cast(sizes > 0, dtype)}

    def get_config(self):
        return {**super().get_config(), "assignments": self.assignments,
                "centroid_norm": self.centroid_norm}


def _check_centroid_norm(value: str) -> str:
    if value not in CENTROID_NORMS:
        raise ValueError(f"centroid_norm must be one of {CENTROID_NORMS}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def reconstruction_loss(target: tf.Tensor, reconstruction: tf.Tensor,
                        mask: tf.Tensor) -> tf.Tensor:
    """(C15) L_recon = ||E^S - O^dec||^2, [interp] mean over valid rows and dims.

    Shapes: target, reconstruction [B, L, d], mask [B, L] -> scalar. The mean runs
    over every valid (user, position) of the batch; padded rows are excluded
    with ``tf.where`` (so garbage there, even inf, changes nothing); no valid
    row -> 0.
    """
    sq = tf.reduce_sum(tf.square(target - reconstruction), axis=-1)         # [B, L]
    sq = tf.where(mask > 0, sq, tf.zeros_like(sq))
    dim = tf.cast(tf.shape(target)[-1], sq.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(sq), tf.reduce_sum(mask) * dim)


def _safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    """sqrt with gradient 0 (not inf/NaN) at x = 0."""
    pos = x > 0
    return tf.where(pos, tf.sqrt(tf.where(pos, x, tf.ones_like(x))), tf.zeros_like(x))


def orthogonality_loss(anchors: tf.Tensor, user_mask: Optional[tf.Tensor] = None) -> tf.Tensor:
    """(C16) L_orth = ||Ô Ôᵀ - I_J||_F per user, mean over users.

    [interp] Ô = rows of O^enc divided by their L2 norm (``tf.math.l2_normalize``;
    its epsilon plays the spec's +1e-8 guard and keeps exact unit rows, so L_orth
    is 0 up to rounding for mutually orthogonal anchors).

    Shapes: anchors [B, J, d], user_mask [B] (1 = user has a valid behavior; the
    mean runs over those; None = all users) -> scalar.
    """
    unit = tf.math.l2_normalize(anchors, axis=-1, epsilon=1e-16)
    gram = tf.einsum("bjd,bkd->bjk", unit, unit)
    eye = tf.eye(tf.shape(anchors)[1], dtype=anchors.dtype)
    per_user = _safe_sqrt(tf.reduce_sum(tf.square(gram - eye), axis=[1, 2]))  # [B]
    if user_mask is None:
        return tf.reduce_mean(per_user)
    per_user = tf.where(user_mask > 0, per_user, tf.zeros_like(per_user))
    return tf.math.divide_no_nan(tf.reduce_sum(per_user), tf.reduce_sum(user_mask))


# --------------------------------------------------------------------------------------
# The long module
# --------------------------------------------------------------------------------------
@serializable
class CFormer(LongSequenceModule):
    """C-Former long module: cached denoised centroids + DIN over J of them.

    Args (spec 2.1 flags):
      num_clusters: J (24).
      encoder_layers: M (2).
      decoder_layers: N, ``"1*"`` (single cross-attention, default) or an int of
        full blocks (1, 2).
      num_heads: h (2); ``head_dim``: d_k (default d / h; the paper's "attention
        dimension" grid).
      ffn_mult: FFN width multiple in full blocks (4).
      assignments: k (1); k = J makes μ = A E^S (with either centroid_norm: each
        row of A sums to 1 over the valid behaviors).
      centroid_norm: [interp] ``"weighted_mean"`` (default: μ_j divided by the
        cluster's attention mass Σ_i A[j, i] 𝟙(j ∈ c_i)) or ``"sum"`` (C12/C14 as
        printed; registered as ``cformer_sum``). See the module docstring.
      alpha: weight of L_orth (0.1).
      beta: weight of L_bce (1.0); applied as a 1/beta factor on the auxiliary
        losses (module docstring).
      denoise: False = "w/o denoise": the refined anchors O^enc are the centroids
        (all J valid for a user with at least one behavior).
      reconstruction: False = "w/o recon loss": no decoder at all.
      orthogonality: False = "w/o orth loss".
      stop_grad_target: stop the gradient of L_recon into E^S (target side).
      din_hidden / din_normalize: the DIN unit (G2) over centroids.

    ``user_cache(seq)`` -> {"centroids" [B, J, d], "centroid_mask" [B, J]};
    ``score(cache, target)`` -> [B, d]; the encoder/decoder never run there.
    """

    def __init__(self, emb_dim: int, num_clusters: int = 24, encoder_layers: int = 2,
                 decoder_layers: Union[str, int] = ONE_STAR, num_heads: int = 2,
                 head_dim: Optional[int] = None, ffn_mult: int = 4, assignments: int = 1,
                 alpha: float = 0.1, beta: float = 1.0, denoise: bool = True,
                 reconstruction: bool = True, orthogonality: bool = True,
                 stop_grad_target: bool = False, din_hidden: Sequence[int] = (80, 40),
                 din_normalize: Optional[str] = None, centroid_norm: str = "weighted_mean",
                 **kwargs):
        super().__init__(emb_dim, **kwargs)
        if int(assignments) > int(num_clusters):
            raise ValueError(f"assignments k={assignments} > num_clusters J={num_clusters}")
        if float(beta) <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.num_clusters, self.encoder_layers = int(num_clusters), int(encoder_layers)
        self.decoder_layers = _parse_decoder_layers(decoder_layers)
        self.num_heads = int(num_heads)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.ffn_mult, self.assignments = int(ffn_mult), int(assignments)
        self.alpha, self.beta = float(alpha), float(beta)
        self.denoise, self.reconstruction = bool(denoise), bool(reconstruction)
        self.orthogonality, self.stop_grad_target = bool(orthogonality), bool(stop_grad_target)
        self.din_hidden, self.din_normalize = list(din_hidden), din_normalize
        self.centroid_norm = _check_centroid_norm(centroid_norm)
        d = self.emb_dim
        self.encoder = CFormerEncoder(d, self.num_clusters, self.encoder_layers, self.num_heads,
                                      self.head_dim, self.ffn_mult, name="encoder")
        self.decoder = (CFormerDecoder(d, self.decoder_layers, self.num_heads, self.head_dim,
                                       self.ffn_mult, name="decoder")
                        if self.reconstruction else None)
        self.assign = DenoiseAssign(self.assignments, self.centroid_norm, name="assign")
        self.din = DinAttention(self.din_hidden, din_normalize, name="centroid_din")

    def build(self, input_shape=None):
        # Every weight has a known shape (d = emb_dim): build all of them at once so
        # the decoder (training only) exists before the first training step and
        # user_cache/score work when called directly (serving) on a fresh layer.
        _build(self.encoder)
        if self.decoder is not None:
            _build(self.decoder)
        _build(self.din, tf.TensorShape([None, None, self.emb_dim]))
        super().build(input_shape)

    def _ensure_built(self):
        # user_cache/score may be called directly (serving) before any __call__.
        if not self.built:
            _build(self, None)

    # ---- user side -------------------------------------------------------------------
    def encode(self, seq: Tensors, reference: bool = False) -> Tensors:
        """Encoder pass (C5-C7): {"emb" E^S [B, L, d] (padded rows zeroed), "mask",
        "anchors" O^enc [B, J, d], "attention" A [B, J, L]}; ``reference`` runs the
        literal blocks (:meth:`CFormerEncoder.call_reference`)."""
        self._ensure_built()
        mask = tf.cast(seq["mask"], tf.float32)
        emb = tf.where(mask[..., None] > 0, seq["emb"], tf.zeros_like(seq["emb"]))
        if reference:
            anchors, attention = self.encoder.call_reference(emb, mask)
        else:
            anchors, attention = self.encoder(emb, mask)
        return {"emb": emb, "mask": mask, "anchors": anchors, "attention": attention}

    def centroids_from(self, enc: Tensors) -> Tensors:
        """(C11-C14) or, without denoise, the refined anchors: the cache dict."""
        has_any = tf.cast(tf.reduce_any(enc["mask"] > 0, axis=1), tf.float32)   # [B]
        if self.denoise:
            out = self.assign(enc["attention"], enc["emb"], enc["mask"])
            return {"centroids": out["centroids"], "centroid_mask": out["mask"]}
        # w/o denoise: O^enc as centroids. [interp] all J valid for a user with a
        # behavior; a user without any gets zero centroids, all masked (spec: masking).
        mask = tf.broadcast_to(has_any[:, None], tf.shape(enc["anchors"])[:2])
        return {"centroids": enc["anchors"] * has_any[:, None, None], "centroid_mask": mask}

    def user_cache(self, seq: Tensors, training=None) -> Tensors:
        """The cache: :meth:`user_cache_reference`'s tensors (float rounding aside),
        through :meth:`CFormerEncoder.inference_attention` and
        :meth:`DenoiseAssign.centroids_from_rows` (no key/value projection over L, no
        [B, h, J, L] normalisation, no one-hot assignment): the precompute's cost
        (docs/benchmarks.md, precompute). Training and :meth:`call` keep
        :meth:`encode` (its A and O^enc feed the losses)."""
        self._ensure_built()
        mask = tf.cast(seq["mask"], tf.float32)
        anchors, attention_t = self.encoder.inference_attention(
            seq["emb"], mask, with_anchors=not self.denoise)
        if self.denoise:
            out = self.assign.centroids_from_rows(attention_t, seq["emb"], mask)
            return {"centroids": out["centroids"], "centroid_mask": out["mask"]}
        has_any = tf.cast(tf.reduce_any(mask > 0, axis=1), tf.float32)      # [B]
        return {"centroids": anchors * has_any[:, None, None],
                "centroid_mask": tf.broadcast_to(has_any[:, None], tf.shape(anchors)[:2])}

    def user_cache_reference(self, seq: Tensors, training=None) -> Tensors:
        """The cache through :meth:`encode` with the literal blocks and
        :meth:`centroids_from` (the training path's equations, the formulation before
        the precompute and training-step work): the reference that tests hold
        :meth:`user_cache` to."""
        return self.centroids_from(self.encode(seq, reference=True))

    # ---- per candidate -----------------------------------------------------------------
    def score(self, cache: Tensors, target: Tensors, training=None) -> tf.Tensor:
        """(C18) E^lifelong = DIN(centroids, e_t) masked by n_j > 0: O(J d) per candidate."""
        self._ensure_built()
        return self.din(cache["centroids"], cache["centroid_mask"], target["emb"])

    # ---- losses --------------------------------------------------------------------------
    def aux_losses(self, enc: Tensors) -> Tensors:
        """The enabled auxiliary losses of one encoder pass: {"recon", "orth"} (scalars,
        unweighted). Runs the decoder (C8-C10) when reconstruction is on."""
        out = {}
        if self.reconstruction:
            decoded = self.decoder(enc["emb"], enc["anchors"])
            target = tf.stop_gradient(enc["emb"]) if self.stop_grad_target else enc["emb"]
            out["recon"] = reconstruction_loss(target, decoded, enc["mask"])
        if self.orthogonality:
            has_any = tf.cast(tf.reduce_any(enc["mask"] > 0, axis=1), tf.float32)
            out["orth"] = orthogonality_loss(enc["anchors"], has_any)
        return out

    def weighted_aux_loss(self, losses: Tensors) -> tf.Tensor:
        """(C19) divided by beta: (L_recon + alpha L_orth) / beta (the task adds L_bce)."""
        total = tf.constant(0.0)
        if "recon" in losses:
            total += losses["recon"]
        if "orth" in losses:
            total += self.alpha * losses["orth"]
        return total / self.beta

    def call(self, seq: Tensors, target: Tensors, training=None) -> tf.Tensor:
        enc = self.encode(seq)
        if training and (self.reconstruction or self.orthogonality):
            self.add_loss(self.weighted_aux_loss(self.aux_losses(enc)))
        return self.score(self.centroids_from(enc), target, training=training)

    def get_config(self):
        return {**super().get_config(), "num_clusters": self.num_clusters,
                "encoder_layers": self.encoder_layers, "decoder_layers": self.decoder_layers,
                "num_heads": self.num_heads, "head_dim": self.head_dim,
                "ffn_mult": self.ffn_mult, "assignments": self.assignments,
                "alpha": self.alpha, "beta": self.beta, "denoise": self.denoise,
                "reconstruction": self.reconstruction, "orthogonality": self.orthogonality,
                "stop_grad_target": self.stop_grad_target, "din_hidden": self.din_hidden,
                "din_normalize": self.din_normalize, "centroid_norm": self.centroid_norm}
