"""CRP: LCN's contrastive auxiliary loss on item embeddings (METHODS 2.5, N3-N6).

Training only, backbone level: :class:`tfmodels.model.LifelongCTRModel` calls
:func:`crp_loss` in ``call(training=True)`` when ``crp_weight > 0`` (any registered
model, on cross-domain windows) and adds ``crp_weight * L_CRP`` (N14: L = L_CTR +
lambda_CRP L_CRP). Inference never reaches this module (docs/cross_domain.md).

Three kinds of pairs of behavior embeddings h (the backbone's ItemEmbedding rows of
the short windows, i.e. the same embeddings DIN and the long module use):

* PT: two items of the target-domain short sequence H_T (``short_t``),
* PS: two items of the source-domain short sequence H_S (``short_s``),
* PC: one item of H_T and one of H_S.

Positives: per batch row i (one impression of user u_i), one pair of its OWN
sequences, at positions drawn uniformly among the valid ones, distinct for PT / PS.
A row with < 2 valid items (PT, PS) or an empty sequence (PC) contributes no term;
each loss is the mean over contributing rows (METHODS 2.5 [interp]).

Negatives: ``M`` pairs per kind per batch, shared by every positive of the batch,
each made of two items of DIFFERENT users (by ``user_id``: two rows of the same user
never pair): the first item uniform over the valid items of its sequence kind in
the batch, the second uniform over the valid items of the other kind that belong to
another user (exact, by sorting items by user; no rejection loop). Draws are with
replacement. ``M_eff = min(M, P)`` where P is the number of distinct cross-user pairs
of that kind the batch holds (a tiny batch cannot supply 4096 distinct pairs); with
P = 0 (one user in the batch) the kind contributes no term.

Per term (N3, with the printed denominator: the M negatives only)::

    -s(h_pos1, h_pos2) / tau + logsumexp_j s(h_neg1_j, h_neg2_j) / tau

s = cosine similarity; L_CRP = l_PT L_PT + l_PS L_PS + l_PC L_PC (N6; tau = 0.1 and
lambda = 1 each, METHODS 2.5 [interp]).

Randomness is stateless (``tf.random.stateless_uniform``) from a seed ``[crp_seed,
step]`` (the model passes the optimizer's iteration count as the step), split into
one seed per draw: the same step of the same run draws the same pairs, also after
``--resume``, and graph and eager mode agree.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf

TAU = 0.1                 # METHODS 2.5 [interp]: tau not stated in the paper
NEGATIVES = 4096          # M per kind (the paper's best; grid 64..4096)
LAMBDAS = (1.0, 1.0, 1.0)  # lambda_PT, lambda_PS, lambda_PC (METHODS 2.5 [interp])
KINDS = ("pt", "ps", "pc")
_NEG_LOGIT = -1e9         # masked logits (METHODS 1.2: -1e9, not -inf)

Tensors = Dict[str, tf.Tensor]


def cosine(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Row-wise cosine similarity of [..., d] tensors (0 for a zero vector)."""
    return tf.reduce_sum(tf.math.l2_normalize(a, -1) * tf.math.l2_normalize(b, -1), -1)


def info_nce(s_pos: tf.Tensor, pos_valid: tf.Tensor, s_neg: tf.Tensor, neg_valid: tf.Tensor,
             tau: float) -> tf.Tensor:
    """N3 as printed: mean over valid positives of ``-s_pos/tau + logsumexp(s_neg/tau)``,
    the logsumexp over the valid negatives only; 0 when either set is empty."""
    pos_valid = tf.cast(pos_valid, s_pos.dtype)
    neg_any = tf.reduce_any(neg_valid)
    lse = tf.reduce_logsumexp(tf.where(neg_valid, s_neg / tau, _NEG_LOGIT))
    terms = -s_pos / tau + lse
    count = tf.reduce_sum(pos_valid)
    loss = tf.math.divide_no_nan(tf.reduce_sum(terms * pos_valid), count)
    return tf.where(neg_any, loss, tf.zeros_like(loss))


def _valid_first(mask: tf.Tensor):
    """Positions per row with the valid ones first (in order) and the valid counts."""
    order = tf.argsort(tf.cast(mask <= 0, tf.int32), axis=-1, stable=True)
    return order, tf.reduce_sum(tf.cast(mask > 0, tf.int32), -1)


def _pick(u: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """floor(u * n) for u in [0, 1), kept inside [0, max(n, 1) - 1]."""
    k = tf.cast(tf.floor(u * tf.cast(n, u.dtype)), n.dtype)
    return tf.clip_by_value(k, tf.zeros_like(n), tf.maximum(n, 1) - 1)


def positive_pairs(mask_a: tf.Tensor, mask_b: Optional[tf.Tensor], seed: tf.Tensor):
    """One positive pair per row: positions ``(pos_a, pos_b)`` [B] and ``valid`` [B].

    ``mask_b`` None: both positions in sequence a, distinct (needs >= 2 valid items);
    otherwise one in a, one in b (needs >= 1 valid item in each). Uniform over valid
    positions (the second of a same-sequence pair uniform over the remaining ones).
    """
    order_a, n_a = _valid_first(mask_a)
    u = tf.random.stateless_uniform(tf.stack([tf.shape(mask_a)[0], 2]), seed)
    i = _pick(u[:, 0], n_a)
    if mask_b is None:
        j = _pick(u[:, 1], n_a - 1)
        j = j + tf.cast(j >= i, tf.int32)          # skip i: uniform over the other n - 1
        order_b, valid = order_a, n_a >= 2
        j = tf.minimum(j, tf.shape(mask_a)[1] - 1)
    else:
        order_b, n_b = _valid_first(mask_b)
        j = _pick(u[:, 1], n_b)
        valid = tf.logical_and(n_a >= 1, n_b >= 1)
    pos_a = tf.gather(order_a, i[:, None], batch_dims=1)[:, 0]
    pos_b = tf.gather(order_b, j[:, None], batch_dims=1)[:, 0]
    return pos_a, pos_b, valid


def negative_pairs(user_id: tf.Tensor, mask_a: tf.Tensor, mask_b: tf.Tensor, m: int,
                   seed: tf.Tensor):
    """``m`` pairs (item of kind a, item of kind b) of different users.

    Returns ``(row_a, pos_a, row_b, pos_b, valid)``, each [m]; ``valid`` marks the
    first ``min(m, P)`` draws (P = distinct cross-user pairs in the batch).
    """
    width = tf.shape(mask_a, out_type=tf.int64)[1]
    flat_a = tf.where(tf.reshape(mask_a, [-1]) > 0)[:, 0]                  # [V_a] row*S+pos
    flat_b = tf.where(tf.reshape(mask_b, [-1]) > 0)[:, 0]                  # [V_b]
    user_a = tf.gather(user_id, flat_a // width)
    user_b = tf.gather(user_id, flat_b // width)
    by_user = tf.argsort(user_b, stable=True)
    flat_b, user_b = tf.gather(flat_b, by_user), tf.gather(user_b, by_user)
    v_a = tf.size(flat_a, out_type=tf.int64)
    v_b = tf.size(flat_b, out_type=tf.int64)
    # P = V_a V_b - sum over a-items of the b-items sharing their user
    same_all = (tf.searchsorted(user_b, user_a, side="right", out_type=tf.int64)
                - tf.searchsorted(user_b, user_a, side="left", out_type=tf.int64))
    num_pairs = v_a * v_b - tf.reduce_sum(same_all)

    u = tf.random.stateless_uniform([m, 2], seed, dtype=tf.float64)
    ka = _pick(u[:, 0], v_a)
    a = tf.gather(tf.concat([flat_a, [0]], 0), ka)                          # dummy row if empty
    ua = tf.gather(tf.concat([user_a, [0]], 0), ka)
    start = tf.searchsorted(user_b, ua, side="left", out_type=tf.int64)
    count = tf.searchsorted(user_b, ua, side="right", out_type=tf.int64) - start
    others = v_b - count                                                    # b-items of other users
    r = _pick(u[:, 1], others)
    kb = tf.where(r < start, r, r + count)      # skip the block of a's user (sorted by user)
    b = tf.gather(tf.concat([flat_b, [0]], 0), tf.minimum(kb, v_b))
    valid = tf.logical_and(tf.logical_and(v_a > 0, others > 0),
                           tf.range(m, dtype=tf.int64) < num_pairs)
    return a // width, a % width, b // width, b % width, valid


def _rows_at(emb: tf.Tensor, row: tf.Tensor, pos: tf.Tensor) -> tf.Tensor:
    return tf.gather_nd(emb, tf.stack([tf.cast(row, tf.int64), tf.cast(pos, tf.int64)], -1))


def crp_loss(user_id: tf.Tensor, seq_t: Mapping[str, tf.Tensor], seq_s: Mapping[str, tf.Tensor],
             seed: tf.Tensor, num_negatives: int = NEGATIVES, tau: float = TAU,
             lambdas: Sequence[float] = LAMBDAS, return_pairs: bool = False) -> Tensors:
    """L_CRP of one batch (N3-N6).

    Args:
      user_id: [B] int64, the user of each row (negatives pair different users only).
      seq_t, seq_s: the short target / source sequences as the model embeds them:
        ``emb`` [B, S, d] and ``mask`` [B, S] (1 = valid).
      seed: [2] int, the stateless seed of this step (e.g. ``[crp_seed, step]``).
    Returns:
      ``{"crp": L_CRP, "pt": L_PT, "ps": L_PS, "pc": L_PC}`` (scalars); with
      ``return_pairs`` also ``"pairs"``: kind -> the drawn positions, for tests.
    """
    if tau <= 0:
        raise ValueError(f"crp tau must be > 0, got {tau}")
    if num_negatives < 1:
        raise ValueError(f"crp num_negatives must be >= 1, got {num_negatives}")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    user_id = tf.cast(tf.reshape(user_id, [-1]), tf.int64)
    seqs = {"t": seq_t, "s": seq_s}
    out, pairs = {}, {}
    for k, (kind, (x, y)) in enumerate(zip(KINDS, (("t", "t"), ("s", "s"), ("t", "s")))):
        ex, ey = seqs[x]["emb"], seqs[y]["emb"]
        mx, my = seqs[x]["mask"], seqs[y]["mask"]
        pa, pb, pos_valid = positive_pairs(mx, None if x == y else my, seeds[2 * k])
        rows = tf.range(tf.shape(pa)[0])
        s_pos = cosine(_rows_at(ex, rows, pa), _rows_at(ey, rows, pb))
        ra, na, rb, nb, neg_valid = negative_pairs(user_id, mx, my, int(num_negatives),
                                                   seeds[2 * k + 1])
        s_neg = cosine(_rows_at(ex, ra, na), _rows_at(ey, rb, nb))
        out[kind] = info_nce(s_pos, pos_valid, s_neg, neg_valid, tau)
        pairs[kind] = {"pos_a": pa, "pos_b": pb, "pos_valid": pos_valid, "neg_row_a": ra,
                       "neg_pos_a": na, "neg_row_b": rb, "neg_pos_b": nb,
                       "neg_valid": neg_valid}
    out["crp"] = tf.add_n([float(w) * out[k] for w, k in zip(lambdas, KINDS)])
    if return_pairs:
        out["pairs"] = pairs
    return out
