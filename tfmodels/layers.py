"""Shared backbone layers (METHODS section 1.2-1.3): embeddings, DIN unit, MLP head.

Conventions (METHODS 1.2): sequences are most recent first, right-padded with
id 0; ``mask`` is float {0, 1} [B, L]; embeddings of padded rows are zeroed; a
masked softmax sets padded logits to -1e9 and multiplies the result by the mask,
so a row without any valid element gives a zero vector.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import schema as S

NEG_INF = -1e9
PACKAGE = "lifelong"

#: How :class:`DinAttention` lays out its batched (one candidate per row) computation:
#:
#: * "folded" (default): the first layer as ONE matmul per example, e_l M_t with
#:   M_t = (W_a + W_c) + diag(e_t) W_d ([d, h0], built once per candidate), so each
#:   behavior row costs one d x h0 product forward (and two backward) instead of two
#:   (four); the rest of the attention MLP runs on 2-D [B*L, h0] rows. In training every
#:   window has ONE candidate, so the candidate-independent half e_l (W_a + W_c) has
#:   nobody to be shared with: folding it into M_t halves the first layer's work. (With
#:   many candidates per user -- serving, :func:`tfmodels.model.din_one_user` -- the split
#:   is the cheaper form and stays there.)
#: * "rows": the key half e_l (W_a + W_c) once per behavior row (one [B*L, d] x [d, h0]
#:   GEMM), the cross term (e_l * e_t) W_d another, the rest on 2-D rows;
#: * "per_candidate": the layout before issue 22 item 6 (key half GEMM plus B batched
#:   [L, d] x [d, h0] matmuls against diag(e_t) W_d, the rest of the MLP on [B, L, h0]).
#:
#: * "valid_prelu": the "rows" layout over the VALID behavior rows only (session 8):
#:   the (example, position) pairs the mask keeps are gathered into [V, d] rows, the
#:   whole attention MLP runs on those V rows, and the logits are scattered back
#:   (padded positions get 0, which the mask then ignores as it always did). Padded
#:   positions cost nothing, so a batch whose windows are half padding pays half the
#:   MLP; a batch with >= :data:`VALID_PRELU_MAX_SHARE` valid positions runs "folded".
#: * "valid" (the training default; session 9): "valid_prelu" with the attention MLP
#:   written without its elementwise PReLU passes (:meth:`DinAttention._split_layers`):
#:   PReLU_a(x) W = x (diag(a) W) + relu(x) (diag(1 - a) W), so each hidden layer costs
#:   one relu over the rows (and one ReluGrad) instead of about a dozen elementwise
#:   passes forward and backward (max, min, two selects, products, the slope's sum),
#:   for a second GEMM with the layer's (small) kernel; and in the folded layout the
#:   linear half of the second layer goes through the per-example first-layer product:
#:   pre (diag(a) W) = e_l (M_t diag(a) W) + ..., a d x h1 product per row instead of
#:   h0 x h1. A batch with >= :data:`VALID_PATH_MAX_SHARE` valid positions takes this
#:   folded form, the others the gathered rows. The same function: slopes, kernels
#:   and biases are the layers' own weights (checkpoints unchanged); the derivative at
#:   a pre-activation of exactly 0 is a instead of the PReLU layer's 1 + a (a set of
#:   measure zero; only padded rows, whose logits the mask drops, can sit there).
#:   Traced with "valid", :class:`ItemEmbedding` also deduplicates its lookups
#:   (:func:`embedding_lookup`: the optimizer's sparse update gets each row once).
#:
#: "valid" and "valid_prelu" have a data-dependent number of rows, which XLA cannot
#: compile: ``TrainConfig`` traces "folded" when ``jit_compile`` is on
#: (:func:`din_path_for_jit`), and a SavedModel export always traces "folded"
#: (:func:`din_path_scope`; the serving one-user path is its own).
#:
#: Same function up to float reassociation (tests/test_train_speed_paths.py). Read when a
#: function is traced: set it with :func:`set_din_path` before building/training
#: (``TrainConfig.din_path``). A caller that passes ``key_proj`` gets "rows".
DIN_PATHS = ("folded", "rows", "per_candidate", "valid", "valid_prelu")
#: the layout traced when nobody chose one (tests, exports): static shapes
_din_path = "folded"
#: "valid" gathers the valid rows only when fewer than this share of the batch's
#: positions are valid, and runs its folded form otherwise (a tf.cond per batch).
#: Measured (session 9, DIN unit alone, B 256, L 1,000, fwd + bwd CPU ms, gathered /
#: folded form): 309 / 515 at 31% valid, 478 / 501 at 52%, 820 / 500 at 92% -- the
#: gathered rows pay per-row gathers and their segment-sum gradients, so they win
#: only below about half.
VALID_PATH_MAX_SHARE = 0.5
#: the same threshold of "valid_prelu" (session 8's measurement: 0.8)
VALID_PRELU_MAX_SHARE = 0.8


def set_din_path(path: str) -> None:
    """Choose :data:`DIN_PATHS` for DIN units traced from now on (process-wide)."""
    global _din_path
    if path not in DIN_PATHS:
        raise ValueError(f"din_path must be one of {DIN_PATHS}, got {path!r}")
    _din_path = path


def din_path() -> str:
    return _din_path


def din_path_for_jit(path: str, jit: bool) -> str:
    """The layout to trace for ``path``: "valid" / "valid_prelu" (a data-dependent number
    of rows, which XLA cannot compile) become "folded" when the function is XLA-compiled."""
    return "folded" if jit and path in ("valid", "valid_prelu") else path


@contextlib.contextmanager
def din_path_scope(path: str):
    """:func:`set_din_path` for the functions traced inside the block, then back."""
    previous = _din_path
    set_din_path(path)
    try:
        yield
    finally:
        set_din_path(previous)


def serializable(cls):
    """Register a layer under this package's name so configs round trip."""
    return tf.keras.utils.register_keras_serializable(package=PACKAGE)(cls)


def id_mask(ids: tf.Tensor) -> tf.Tensor:
    """float mask of real (non-padding) ids."""
    return tf.cast(tf.not_equal(ids, S.PAD_ID), tf.float32)


def masked_softmax(logits: tf.Tensor, mask: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Softmax over ``axis`` with padded logits -1e9 and the result re-masked."""
    logits = tf.where(mask > 0, logits, tf.fill(tf.shape(logits), tf.cast(NEG_INF, logits.dtype)))
    return tf.nn.softmax(logits, axis=axis) * mask


@serializable
class PReLU(tf.keras.layers.Layer):
    """PReLU with one slope per unit (last axis), whatever the rank.

    ``tf.keras.layers.PReLU`` learns a slope per element of ``input_shape[1:]``,
    which ties the weights to the sequence length L; attention MLPs run over
    [B, L, H] and must work for any L, so the slope here is [H] only.
    """

    def build(self, input_shape):
        self.alpha = self.add_weight("alpha", shape=[int(input_shape[-1])], initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        return tf.maximum(x, 0.0) + self.alpha * tf.minimum(x, 0.0)


@tf.custom_gradient
def _gather_summing_grad(rows, position):
    """``tf.gather(rows, position)`` (rows [n, D], position [R] int32) whose gradient is
    the dense [n, D] sum S g of the R row gradients, S [n, R] with a 1 at
    (position_r, r), as one sparse-dense matmul. tf.gather's own gradient is
    IndexedSlices of all R rows, which the optimizer sums with unsorted_segment_sum:
    59 vs 8.8 ms CPU for 270k rows of 16 (session 9)."""
    def grad(g):
        count = tf.shape(position, out_type=tf.int64)[0]
        s = tf.SparseTensor(tf.stack([tf.range(count), tf.cast(position, tf.int64)], 1),
                            tf.ones([count], g.dtype),
                            tf.stack([count, tf.shape(rows, out_type=tf.int64)[0]]))
        return tf.sparse.sparse_dense_matmul(s, g, adjoint_a=True), None
    return tf.gather(rows, position), grad


def embedding_lookup(table: tf.keras.layers.Embedding, ids: tf.Tensor) -> tf.Tensor:
    """``table(ids)``. When the training layout "valid" is traced (:data:`DIN_PATHS`),
    the lookup reads each distinct id once and hands the table a gradient of the
    distinct rows only, summed by :func:`_gather_summing_grad`: the same sparse
    (IndexedSlices) update of the rows the batch touched, but the optimizer's
    deduplication (unique + unsorted_segment_sum over every looked-up row, ~270k per
    DIN-L batch at L = 1,000) runs on a few thousand rows. Not in other layouts:
    tf.unique has a data-dependent size, which XLA cannot compile."""
    if _din_path != "valid":
        return table(ids)
    distinct, position = tf.unique(tf.reshape(ids, [-1]))
    rows = _gather_summing_grad(table(distinct), position)
    out = tf.reshape(rows, tf.concat([tf.shape(ids), tf.shape(rows)[-1:]], 0))
    out.set_shape(ids.shape.concatenate(rows.shape[-1:]))
    return out


@serializable
class ItemEmbedding(tf.keras.layers.Layer):
    """Item fields (item id, category id) -> concatenated embedding, shared by the
    target and every behavior so both live in one space (METHODS 1.2).

    Output dim = 2 * ``dim``. Rows whose item id is padding are zero.
    """

    def __init__(self, num_items: int, num_categories: int, dim: int = 16,
                 l2: float = 0.0, init_std: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_items, self.num_categories, self.dim, self.l2 = num_items, num_categories, dim, l2
        self.init_std = init_std
        reg = tf.keras.regularizers.l2(l2) if l2 else None
        # init_std 0 = N(0, 1/sqrt(dim)): the products e_l * e_t that the DIN unit reads
        # then start at O(1) for a matching field. Keras' default U(-0.05, 0.05) makes
        # them ~1e-3 and the attention learns nothing on small data (measured on the
        # synthetic benchmark: test AUC 0.53 vs 0.6+ with this init).
        std = init_std or dim ** -0.5
        # one initializer instance per table: a reused unseeded instance repeats its values
        self.item_table = tf.keras.layers.Embedding(
            num_items, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=std),
            embeddings_regularizer=reg, name="item_table")
        self.cate_table = tf.keras.layers.Embedding(num_categories, dim,
                                                    embeddings_initializer=tf.keras.initializers
                                                    .RandomNormal(stddev=std),
                                                    embeddings_regularizer=reg, name="cate_table")

    @property
    def output_dim(self) -> int:
        return 2 * self.dim

    def call(self, item_ids: tf.Tensor, cate_ids: tf.Tensor) -> tf.Tensor:
        e = tf.concat([embedding_lookup(self.item_table, item_ids),
                       embedding_lookup(self.cate_table, cate_ids)],
                      axis=-1)
        return e * id_mask(item_ids)[..., None]

    def get_config(self):
        return {**super().get_config(), "num_items": self.num_items,
                "num_categories": self.num_categories, "dim": self.dim, "l2": self.l2,
                "init_std": self.init_std}


@serializable
class MLP(tf.keras.layers.Layer):
    """Dense stack with PReLU (or a named activation); optional linear scalar output.

    ``batchnorm=True`` puts a ``tf.keras.layers.BatchNormalization`` (Keras defaults:
    momentum 0.99, epsilon 1e-3 [interp]; the papers give none) between each hidden
    Dense and its activation, as in the head of the LREA paper (METHODS 2.3 R4: its
    BatchNorm absorbs the scale of un-normalised attention outputs). Those Dense
    layers then have no bias (BN's beta replaces it). Batch statistics are used
    when ``training`` is true, the moving averages otherwise, so at inference every
    row is scored independently of the rest of its batch (the serving split relies
    on this). The output layer has no BN.
    """

    def __init__(self, hidden: Sequence[int] = (200, 80), activation: str = "prelu",
                 output_units: Optional[int] = None, dropout: float = 0.0,
                 batchnorm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.activation = list(hidden), activation
        self.output_units, self.dropout = output_units, dropout
        self.batchnorm = bool(batchnorm)
        self.dense = [tf.keras.layers.Dense(h, use_bias=not self.batchnorm, name=f"dense_{i}")
                      for i, h in enumerate(hidden)]
        self.norms = ([tf.keras.layers.BatchNormalization(name=f"bn_{i}")
                       for i in range(len(hidden))] if self.batchnorm else None)
        self.acts = [PReLU(name=f"prelu_{i}") if activation == "prelu"
                     else tf.keras.layers.Activation(activation) for i in range(len(hidden))]
        self.drop = tf.keras.layers.Dropout(dropout) if dropout else None
        self.out = tf.keras.layers.Dense(output_units, name="out") if output_units else None

    def call(self, x, training=None):
        for i, (dense, act) in enumerate(zip(self.dense, self.acts)):
            x = dense(x)
            if self.norms is not None:
                x = self.norms[i](x, training=training)
            x = act(x)
            if self.drop is not None:
                x = self.drop(x, training=training)
        return self.out(x) if self.out is not None else x

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "activation": self.activation,
                "output_units": self.output_units, "dropout": self.dropout,
                "batchnorm": self.batchnorm}


@serializable
class DinAttention(tf.keras.layers.Layer):
    """DIN attention unit (METHODS G2).

    w_l = MLP_att([e_l, e_t, e_l - e_t, e_l * e_t]) (hidden 80, 40, PReLU, linear
    scalar), v = sum_l m_l w_l e_l; no softmax unless ``normalize='softmax'``.

    The first layer's kernel W = [W_a; W_b; W_c; W_d] acting on the concatenation
    is applied as e_l (W_a + W_c) + e_t (W_b - W_c) + (e_l * e_t) W_d, which is the
    same function without materialising the 4d concat. The behavior half
    e_l (W_a + W_c) does not depend on the candidate: :meth:`precompute` computes
    it once per user/request, so ranking N candidates only pays the e_t and
    e_l * e_t terms (the serving path relies on this).

    Shapes: keys [B or 1, L, d], mask [B or 1, L], query [B, d] -> [B, d].
    A keys batch of 1 broadcasts against B candidates.
    """

    def __init__(self, hidden: Sequence[int] = (80, 40), normalize: Optional[str] = None,
                 **kwargs):
        super().__init__(**kwargs)
        if normalize not in (None, "none", "softmax"):
            raise ValueError(f"normalize must be None or 'softmax', got {normalize!r}")
        self.hidden, self.normalize = list(hidden), (None if normalize == "none" else normalize)

        self.act1 = PReLU(name="prelu_0")
        self.rest = MLP(self.hidden[1:], activation="prelu", output_units=1, name="att_mlp")

    def build(self, keys_shape):
        d = int(keys_shape[-1])
        self._dim = d
        self.w1 = self.add_weight("w1", shape=[4 * d, self.hidden[0]], initializer="glorot_uniform")
        self.b1 = self.add_weight("b1", shape=[self.hidden[0]], initializer="zeros")
        super().build(keys_shape)

    def _build_for_dim(self, d: int):
        # precompute()/attention_weights() may be called directly, bypassing __call__.
        if not self.built:
            self.build(tf.TensorShape([None, None, d]))

    def _blocks(self):
        d = self._dim
        wa, wb, wc, wd = (self.w1[i * d:(i + 1) * d] for i in range(4))
        return wa + wc, wb - wc, wd

    def precompute(self, keys: tf.Tensor) -> tf.Tensor:
        """Candidate-independent part of the first layer: keys (W_a + W_c) + b1 [.., L, h0]."""
        self._build_for_dim(int(keys.shape[-1]))
        w_key, _, _ = self._blocks()
        return tf.einsum("bld,dh->blh", keys, w_key) + self.b1

    def first_layer(self, keys, query, key_proj=None, one_user: bool = False):
        """Pre-activation of the attention MLP's first layer,
        [e_l, e_t, e_l - e_t, e_l * e_t] W + b1 -> [B, L, h0], through the split blocks:
        key_proj (= :meth:`precompute`) + e_t (W_b - W_c) + (e_l * e_t) W_d. The one
        implementation of the split; :meth:`attention_weights` and the serving path
        (:func:`tfmodels.model.din_one_user`) both call it.

        * default: keys [B or 1, L, d], query [B, d]. (e_l * e_t) W_d is computed as
          e_l (diag(e_t) W_d), B small batched matmuls over the keys broadcast to B.
        * ``one_user=True``: keys [1, S, d] of ONE user, query [N, d] -> [N, S, h0].
          Per position, M_l = W_b - W_c + diag(e_l) W_d ([S, d, h0]) does not depend
          on the candidate, so all N x S pre-activations come out of ONE GEMM
          query [N, d] x M [d, S * h0] (faster for many candidates; equal up to float
          reassociation, about 1e-7).

        ``key_proj``: this layer's :meth:`precompute` of ``keys``, when already computed.
        """
        d = int(keys.shape[-1])
        self._build_for_dim(d)
        if key_proj is None:
            key_proj = self.precompute(keys)                           # [B or 1, L, h0]
        _, w_query, w_cross = self._blocks()                           # [d, h0] each
        if one_user:
            k = keys[0]                                                # [S, d]
            m = k[:, :, None] * w_cross[None] + w_query[None]          # [S, d, h0]
            m = tf.reshape(tf.transpose(m, [1, 0, 2]), [d, -1])        # [d, S*h0]
            pre = tf.matmul(query, m) + tf.reshape(key_proj[0], [1, -1])   # [N, S*h0]
            return tf.reshape(pre, tf.stack([-1, tf.shape(k)[0], self.hidden[0]]))
        q = tf.matmul(query, w_query)                                  # [B, h0]
        # (e_l * e_t) W_d = e_l (diag(e_t) W_d): per candidate, [B, L, h0].
        cross = tf.einsum("bld,bdh->blh", tf.broadcast_to(
            keys, tf.concat([tf.shape(query)[:1], tf.shape(keys)[1:]], 0)),
            query[:, :, None] * w_cross[None])
        return key_proj + q[:, None, :] + cross

    def _logits_rows(self, keys, query, key_proj=None):
        """Attention logits [B, L] as 2-D GEMMs over the B*L behavior rows (the "rows"
        path of :data:`DIN_PATHS`): pre = key_proj + (e_l * e_t) W_d + e_t (W_b - W_c),
        the key half computed once per behavior row by :meth:`precompute`, the cross
        term one [B*L, d] x [d, h0] GEMM, then the rest of the MLP on [B*L, h0]
        (a Dense on [B, L, h0] goes through tensordot's reshapes and transposes per
        layer). keys [B or 1, L, d], query [B, d]."""
        d = int(keys.shape[-1])
        self._build_for_dim(d)
        h0 = self.hidden[0]
        if key_proj is None:
            key_proj = self.precompute(keys)                           # [B or 1, L, h0]
        _, w_query, w_cross = self._blocks()
        kq = keys * query[:, None, :]                                  # [B, L, d]
        shape = tf.shape(kq)
        cross = tf.reshape(tf.matmul(tf.reshape(kq, [-1, d]), w_cross),
                           tf.concat([shape[:2], [h0]], 0))            # [B, L, h0]
        pre = key_proj + cross + tf.matmul(query, w_query)[:, None, :]
        logits = self.rest(self.act1(tf.reshape(pre, [-1, h0])))      # [B*L, 1]
        return tf.reshape(logits, shape[:2])

    def _logits_folded(self, keys, query):
        """Attention logits [B, L], the "folded" path of :data:`DIN_PATHS`:
        pre = e_l ((W_a + W_c) + diag(e_t) W_d) + e_t (W_b - W_c) + b1, one batched
        [L, d] x [d, h0] matmul per candidate (keys [1, L, d] broadcast against B), then
        the rest of the MLP on [B*L, h0] rows. keys [B or 1, L, d], query [B, d]."""
        d = int(keys.shape[-1])
        self._build_for_dim(d)
        h0 = self.hidden[0]
        w_key, w_query, w_cross = self._blocks()
        m = w_key[None] + query[:, :, None] * w_cross[None]              # [B, d, h0]
        pre = tf.matmul(keys, m) + (tf.matmul(query, w_query) + self.b1)[:, None, :]
        shape = tf.shape(pre)                                             # [B, L, h0]
        logits = self.rest(self.act1(tf.reshape(pre, [-1, h0])))          # [B*L, 1]
        return tf.reshape(logits, shape[:2])

    def _logits_valid(self, keys, mask, query, split: bool = True):
        """Attention logits [B, L], the "valid" (``split``) and "valid_prelu" paths of
        :data:`DIN_PATHS`: the "rows" computation on the V rows where ``mask`` > 0 only,
        pre = [e_l, e_l * e_t] [W_a + W_c; W_d] + (e_t (W_b - W_c) + b1), then the rest of
        the MLP on [V, h0]; 0 at every masked position. keys [B or 1, L, d], mask [B or 1,
        L], query [B, d]. Written by hand because no library op runs an MLP over a ragged
        subset; the gathers and the scatter are the standard ops (with their gradients)."""
        d = int(keys.shape[-1])
        self._build_for_dim(d)
        b = tf.shape(query)[0]
        length = tf.shape(keys)[1]
        valid = tf.broadcast_to(mask, tf.stack([b, length])) > 0
        share = tf.reduce_mean(tf.cast(valid, tf.float32))
        if split:
            mlp = self._split_layers()   # outside the branches: built once, shared
            return tf.cond(share < VALID_PATH_MAX_SHARE,
                           lambda: self._logits_valid_rows(keys, valid, query, mlp),
                           lambda: self._logits_folded_split(keys, query, mlp))
        # gathering and scattering the rows costs about a fifth of the MLP over all rows,
        # so a batch that is mostly valid goes through "folded" (measured, session 8:
        # B 256, L 1,000, fwd + bwd CPU: valid 0.56x of folded at 42% valid rows, 1.2x at
        # 100%)
        return tf.cond(share < VALID_PRELU_MAX_SHARE,
                       lambda: self._logits_valid_rows(keys, valid, query),
                       lambda: self._logits_folded(keys, query))

    def _split_layers(self):
        """The attention MLP after its first pre-activation, one (lin, rel, bias) per
        Dense layer (the hidden ones of ``rest``, then its output), for
        :meth:`_mlp_split`: PReLU_a(x) K + b = x lin + relu(x) rel + b with
        lin = diag(a) K and rel = diag(1 - a) K, where a is the slope of the PReLU
        before K (``act1`` for the first). a x + (1 - a) relu(x) is PReLU_a(x) for
        either sign of x. The products with the slopes are [h, h'] small; the gradients
        of a, K and b flow through them."""
        if not self.rest.built:
            # create the weights where the layers' own calls would (same names and
            # order), on zero rows, so that the MLP can be applied through its weights
            self.rest(self.act1(tf.zeros([0, self.hidden[0]])))
        alphas = [self.act1.alpha] + [act.alpha for act in self.rest.acts]
        dense = list(self.rest.dense) + [self.rest.out]
        return [(a[:, None] * layer.kernel, (1.0 - a)[:, None] * layer.kernel, layer.bias)
                for a, layer in zip(alphas, dense)]

    @staticmethod
    def _mlp_split(x, mlp):
        """The MLP of :meth:`_split_layers` on rows x [R, h]: per layer one relu (one
        ReluGrad backward) and two GEMMs, instead of the PReLU layer's max, min, product
        and sum forward and its selects, products and the slope's reduction backward,
        each a pass over [R, h] (measured: those passes were most of the unit's time)."""
        for lin, rel, bias in mlp:
            x = tf.matmul(x, lin) + tf.matmul(tf.nn.relu(x), rel) + bias
        return x

    def _logits_folded_split(self, keys, query, mlp):
        """:meth:`_logits_folded` with the MLP of :meth:`_split_layers`. The first
        layer's linear half pre lin is computed from the d-wide keys: pre = e_l M_t + c_t
        with M_t = (W_a + W_c) + diag(e_t) W_d, c_t = e_t (W_b - W_c) + b1, so
        pre lin = e_l (M_t lin) + c_t lin, a [L, d] x [d, h1] product per candidate
        instead of [L, h0] x [h0, h1] per row."""
        h0 = self.hidden[0]
        w_key, w_query, w_cross = self._blocks()
        (lin, rel, bias), rest = mlp[0], mlp[1:]
        h1 = int(lin.shape[-1])
        m = w_key[None] + query[:, :, None] * w_cross[None]               # [B, d, h0]
        c = tf.matmul(query, w_query) + self.b1                           # [B, h0]
        pre = tf.matmul(keys, m) + c[:, None, :]                          # [B, L, h0]
        shape = tf.shape(pre)
        relu_part = tf.matmul(tf.nn.relu(tf.reshape(pre, [-1, h0])), rel)  # [B*L, h1]
        z = (tf.matmul(keys, tf.matmul(m, lin)) + (tf.matmul(c, lin) + bias)[:, None, :]
             + tf.reshape(relu_part, tf.concat([shape[:2], [h1]], 0)))     # [B, L, h1]
        logits = self._mlp_split(tf.reshape(z, [-1, h1]), rest)           # [B*L, 1]
        return tf.reshape(logits, shape[:2])

    def _logits_valid_rows(self, keys, valid, query, mlp=None):
        """:meth:`_logits_valid`'s gathered branch; ``valid`` [B, L] bool. With ``mlp``
        (:meth:`_split_layers`) the MLP after the first pre-activation is
        :meth:`_mlp_split` ("valid"), without it the PReLU layers ("valid_prelu")."""
        d = int(keys.shape[-1])
        w_key, w_query, w_cross = self._blocks()
        b = tf.shape(query)[0]
        length = tf.shape(keys)[1]
        keys = tf.broadcast_to(keys, tf.stack([b, length, d]))
        where = tf.where(tf.reshape(valid, [-1]))                          # [V, 1] int64
        rows = tf.gather_nd(tf.reshape(keys, [-1, d]), where)              # [V, d]
        example = tf.cast(where[:, 0], tf.int32) // length                  # [V]
        q = tf.gather(query, example)                                      # [V, d]
        pre = (tf.matmul(tf.concat([rows, rows * q], -1), tf.concat([w_key, w_cross], 0))
               + tf.gather(tf.matmul(query, w_query) + self.b1, example))  # [V, h0]
        logits = (self.rest(self.act1(pre)) if mlp is None
                  else self._mlp_split(pre, mlp))[:, 0]                    # [V]
        size = tf.cast(tf.reshape(b * length, [1]), tf.int64)
        return tf.reshape(tf.scatter_nd(where, logits, size), tf.stack([b, length]))

    def attention_weights(self, keys, mask, query, key_proj=None):
        """Per-position weights w_l [B, L] (masked, unnormalised unless softmax)."""
        if _din_path in ("valid", "valid_prelu") and key_proj is None:
            logits = self._logits_valid(keys, mask, query, split=_din_path == "valid")
        elif _din_path == "folded" and key_proj is None:
            logits = self._logits_folded(keys, query)
        elif _din_path in ("folded", "rows", "valid", "valid_prelu"):
            logits = self._logits_rows(keys, query, key_proj)
        else:
            h = self.act1(self.first_layer(keys, query, key_proj))
            logits = tf.squeeze(self.rest(h), -1)                      # [B, L]
        mask = tf.broadcast_to(mask, tf.shape(logits))
        if self.normalize == "softmax":
            return masked_softmax(logits, mask)
        return logits * mask

    def call(self, keys, mask, query, key_proj=None):
        w = self.attention_weights(keys, mask, query, key_proj)
        keys = tf.broadcast_to(keys, tf.concat([tf.shape(w), tf.shape(keys)[-1:]], 0))
        if _din_path == "valid":
            # the same sum as one batched [1, L] x [L, d] matmul per row: its gradient
            # (the outer product w_l g) costs less than einsum's (session 9, DIN unit
            # fwd + bwd: 508 vs 522 ms CPU at B 256, L 1,000)
            return tf.matmul(w[:, None, :], keys)[:, 0, :]
        return tf.einsum("bl,bld->bd", w, keys)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "normalize": self.normalize}
