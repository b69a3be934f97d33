"""SIM (METHODS B4, B5): search-based interest modeling, hard and soft general search.

Both are two-stage: a general search unit (GSU) picks k behaviors of the long window
for the candidate, the exact search unit (ESU, :class:`~tfmodels.methods.esu.TargetAttention`,
4-head target attention) attends over them. k = ``top_k`` (50 by default, ENCODE's
industrial setting; the ESU sees min(k, L) slots).

SIM hard (B4) -- :class:`SimHard`
  GSU = the behaviors whose category equals the candidate's, the most recent k of
  them ([interp]: the spec leaves open which k of a larger category; windows are most
  recent first). ``key_field="item_id"`` retrieves by item id instead (what ENCODE
  did on Amazon, which has no side information).

  Cache per user (an index, so rank reads only the candidate's category):
  ``sorted_key`` [B, L] int64, the rows' categories sorted ascending with ties kept in
  window order (= most recent first), padding last (key 2^63 - 1, never equal to a
  candidate's); ``keys`` / ``values`` [B, L, H, d_k|d_v], the ESU's K W^k and V W^v of
  the rows in that order. Per candidate: two binary searches (``tf.searchsorted``,
  O(log L)) give the category's run [lo, hi); the ESU reads rows lo .. lo + k - 1,
  the slots past hi masked out. No category -> zero vector.

SIM soft (B5) -- :class:`SimSoft`
  r_l = e_l . e_t (inner product of the shared item embeddings, METHODS 1.2), top-k
  by r among the valid rows (padding is never picked while a valid row remains; ties
  go to the more recent row), ESU. Cache per user: the masked embeddings ``emb``
  [B, L, d] (for r), ``keys`` / ``values`` (ESU projections) and ``mask``.

  Auxiliary task (SIM paper, soft search [background]; ``aux_loss=True``, off by
  default): the general-search embeddings are trained by a CTR task of their own:
  u = sum_l w_l e_l, w = masked softmax over the window of r ([interp]: the paper's
  weighted sum pooling of r_l e_l, normalised so that its scale does not grow with
  L), p_aux = sigmoid(MLP_aux([u, e_t])) (hidden ``aux_hidden`` = (80, 40), PReLU
  [interp]), L_aux = aux_weight * BCE(y, p_aux), added with ``add_loss`` in training
  only. It needs the click label: the model passes ``target["label"]`` in training
  when the module says ``reads_label`` (True only with ``aux_loss``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import MLP, masked_softmax, serializable
from tfmodels.methods.base import LongSequenceModule
from tfmodels.methods.esu import TargetAttention, gather_rows, one_user, static_k, top_k_rows

#: sort key of padded rows: after every real category, equal to no candidate's
PAD_KEY = np.iinfo(np.int64).max
KEY_FIELDS = ("cate_id", "item_id")


class _TwoStage(LongSequenceModule):
    """GSU (subclass) + ESU (shared); ``attend`` returns every intermediate."""

    reads_fields = ()     # only item/category ids, which every long module reads

    def __init__(self, emb_dim: int, top_k: int = 50, num_heads: int = 4,
                 key_dim: Optional[int] = None, value_dim: Optional[int] = None, **kwargs):
        super().__init__(emb_dim, **kwargs)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)
        self.esu = TargetAttention(emb_dim, num_heads, key_dim, value_dim, name="esu")

    def attend(self, cache, target) -> Dict[str, tf.Tensor]:
        raise NotImplementedError

    def score(self, cache, target, training=None):
        return self.attend(cache, target)["output"]

    def _esu(self, cache, target, index, sel_mask) -> Dict[str, tf.Tensor]:
        keys, values = gather_rows(cache["keys"], index), gather_rows(cache["values"], index)
        out = self.esu.attend(target["emb"], keys, values, sel_mask)
        return {"index": index, "selected_mask": sel_mask, **out}

    def get_config(self):
        return {**super().get_config(), "top_k": self.top_k, "num_heads": self.esu.num_heads,
                "key_dim": self.esu.key_dim, "value_dim": self.esu.value_dim}


@serializable
class SimHard(_TwoStage):
    """SIM hard search (B4): the most recent k behaviors of the candidate's category, ESU.

    Args:
      emb_dim: d. top_k: k (50). num_heads, key_dim, value_dim: the ESU's.
      key_field: ``cate_id`` (default) or ``item_id`` (retrieve the same item).
    Shapes: seq ``emb`` [B, L, d], ``mask`` [B, L], ``cate_id`` [B, L]; target ``emb``
      [B, d], ``cate_id`` [B] -> [B, d].
    """

    def __init__(self, emb_dim: int, top_k: int = 50, num_heads: int = 4,
                 key_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 key_field: str = "cate_id", **kwargs):
        super().__init__(emb_dim, top_k, num_heads, key_dim, value_dim, **kwargs)
        if key_field not in KEY_FIELDS:
            raise ValueError(f"key_field must be one of {KEY_FIELDS}, got {key_field!r}")
        self.key_field = key_field

    def user_cache(self, seq, training=None):
        """The window indexed by category: ``sorted_key`` [B, L] int64 and the ESU's
        ``keys`` / ``values`` of the rows in (category, recency) order."""
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        key = tf.cast(seq[self.key_field], tf.int64)
        key = tf.where(mask > 0, key, tf.constant(PAD_KEY, tf.int64))
        # stable: rows of one category keep window order, i.e. most recent first
        order = tf.argsort(key, axis=1, stable=True)
        proj = self.esu.project(tf.gather(emb, order, batch_dims=1))
        return {"sorted_key": tf.gather(key, order, batch_dims=1), **proj}

    def category_run(self, sorted_key: tf.Tensor, key: tf.Tensor):
        """[lo, hi) of each candidate's ``key`` [N] in ``sorted_key`` [1 or N, L] -> two [N]."""
        if one_user(sorted_key):
            values = key[None, :]                          # one user: all N in one row
            lo = tf.searchsorted(sorted_key, values, side="left")[0]
            hi = tf.searchsorted(sorted_key, values, side="right")[0]
        else:
            values = key[:, None]
            lo = tf.searchsorted(sorted_key, values, side="left")[:, 0]
            hi = tf.searchsorted(sorted_key, values, side="right")[:, 0]
        return lo, hi

    def attend(self, cache, target):
        """``index`` [N, k] into the sorted rows, ``selected_mask``, ``count`` (rows of
        the candidate's category), ESU ``weights`` [N, H, k], ``output`` [N, d]."""
        sorted_key = cache["sorted_key"]
        lo, hi = self.category_run(sorted_key, tf.cast(target[self.key_field], tf.int64))
        k = static_k(self.top_k, sorted_key)
        slot = tf.range(k, dtype=lo.dtype)[None, :]
        last = tf.cast(tf.shape(sorted_key)[1] - 1, lo.dtype)
        index = tf.minimum(lo[:, None] + slot, last)                       # [N, k]
        sel_mask = tf.cast(slot < (hi - lo)[:, None], tf.float32)
        return {"count": hi - lo, **self._esu(cache, target, index, sel_mask)}

    def get_config(self):
        return {**super().get_config(), "key_field": self.key_field}


@serializable
class SimSoft(_TwoStage):
    """SIM soft search (B5): top-k behaviors by r_l = e_l . e_t, ESU.

    Args:
      emb_dim: d. top_k: k (50). num_heads, key_dim, value_dim: the ESU's.
      aux_loss: add the auxiliary CTR task on the general-search embedding (False).
      aux_weight: its weight in the total loss (1.0 [interp]).
      aux_hidden: hidden sizes of its MLP ((80, 40) [interp]).
    """

    def __init__(self, emb_dim: int, top_k: int = 50, num_heads: int = 4,
                 key_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 aux_loss: bool = False, aux_weight: float = 1.0,
                 aux_hidden: Sequence[int] = (80, 40), **kwargs):
        super().__init__(emb_dim, top_k, num_heads, key_dim, value_dim, **kwargs)
        self.aux_loss, self.aux_weight = bool(aux_loss), float(aux_weight)
        self.aux_hidden = [int(h) for h in aux_hidden]
        self.aux_mlp = (MLP(self.aux_hidden, activation="prelu", output_units=1, name="aux_mlp")
                        if self.aux_loss else None)

    @property
    def reads_label(self) -> bool:
        """The model passes ``target["label"]`` in training when True."""
        return self.aux_loss

    def user_cache(self, seq, training=None):
        """``emb`` [B, L, d] (masked), ``keys`` / ``values`` (ESU), ``mask`` [B, L]."""
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        return {"emb": emb, "mask": mask, **self.esu.project(emb)}

    @staticmethod
    def relevance(emb: tf.Tensor, query: tf.Tensor) -> tf.Tensor:
        """r = e_l . e_t: ``emb`` [1 or N, L, d], ``query`` [N, d] -> [N, L]."""
        if one_user(emb):
            return tf.einsum("ld,nd->nl", emb[0], query)
        return tf.einsum("nld,nd->nl", emb, query)

    def attend(self, cache, target):
        """``relevance`` [N, L], ``index`` [N, k], ``selected_mask``, ESU ``weights``, ``output``."""
        r = self.relevance(cache["emb"], target["emb"])
        index, sel_mask = top_k_rows(r, cache["mask"], static_k(self.top_k, cache["emb"]))
        return {"relevance": r, **self._esu(cache, target, index, sel_mask)}

    def auxiliary_loss(self, cache, target, relevance: tf.Tensor) -> tf.Tensor:
        """Mean BCE of the auxiliary CTR task (unweighted); needs ``target["label"]``."""
        if "label" not in target:
            raise ValueError("sim_soft with aux_loss=True needs the click label in training: "
                             "target['label'] (the model passes it when reads_label is True)")
        mask = tf.broadcast_to(cache["mask"], tf.shape(relevance))
        w = masked_softmax(relevance, mask)                                  # [N, L]
        emb = cache["emb"]
        u = (tf.einsum("nl,ld->nd", w, emb[0]) if one_user(emb)
             else tf.einsum("nl,nld->nd", w, emb))
        logit = tf.squeeze(self.aux_mlp(tf.concat([u, target["emb"]], -1)), -1)
        label = tf.cast(tf.reshape(target["label"], tf.shape(logit)), logit.dtype)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=logit))

    def call(self, seq, target, training=None):
        cache = self.user_cache(seq, training=training)
        out = self.attend(cache, target)
        if training and self.aux_loss:
            self.add_loss(self.aux_weight * self.auxiliary_loss(cache, target, out["relevance"]))
        return out["output"]

    def get_config(self):
        return {**super().get_config(), "aux_loss": self.aux_loss, "aux_weight": self.aux_weight,
                "aux_hidden": list(self.aux_hidden)}
