"""Base class of every long-sequence module (METHODS section 1.5).

A module splits into

* ``user_cache(seq) -> dict``: depends on the user's long sequence only, so it can
  run offline (Beam + ``user_tower`` signature) and be cached per user;
* ``score(cache, target) -> v_long [B, output_dim]``: the per-candidate part;
  a cache with batch 1 broadcasts against B candidates (one user, many items);
* ``call(seq, target)``: the training path. For most methods it is
  ``score(user_cache(seq), target)``; a method whose serving path is an
  algebraic rewrite of its training path (LREA's absorption) overrides it.

Inputs, built by the model from the schema's ``long_*`` features:

* ``seq``: ``emb`` [B, L, d] (padded rows zero), ``mask`` [B, L] float, and the raw
  fields ``item_id``, ``cate_id``, ``engage``, ``gap_bucket``, ``domain`` [B, L];
* ``target``: ``emb`` [B, d], ``item_id``, ``cate_id`` [B].

Auxiliary losses are added with ``self.add_loss`` in ``call`` (training only);
tensorflow-recommenders adds ``model.losses`` to the task loss.
"""
from __future__ import annotations

from typing import Dict, Tuple

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D

Tensors = Dict[str, tf.Tensor]


class LongSequenceModule(tf.keras.layers.Layer):
    #: raw ``long_*`` fields (besides item/category ids) the module reads;
    #: the serving signatures declare only these.
    reads_fields: Tuple[str, ...] = ("item_id", "cate_id")
    #: tolerance of the shared ``score(user_cache(x)) == call(x)`` checks in
    #: :mod:`tfmodels.testing`; only a module whose training path is not algebraically
    #: equal to its serving path (LREA with LeakyReLU) raises it, and says why.
    cache_parity_tol: float = 1e-5
    #: True for a method trained on a clustered history (``lifelong cluster`` output,
    #: TWIN V2): ``lifelong compare --clustered PATH`` trains it on PATH.
    needs_clustered_data: bool = False

    def __init__(self, emb_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.emb_dim = int(emb_dim)   # d, the behavior/target embedding width

    @property
    def output_dim(self) -> int:
        return self.emb_dim

    def user_cache(self, seq: Tensors, training=None) -> Tensors:
        raise NotImplementedError

    def score(self, cache: Tensors, target: Tensors, training=None) -> tf.Tensor:
        raise NotImplementedError

    def call(self, seq: Tensors, target: Tensors, training=None) -> tf.Tensor:
        return self.score(self.user_cache(seq, training=training), target, training=training)

    def get_config(self):
        return {**super().get_config(), "emb_dim": self.emb_dim}


def broadcast_rows(x: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """Broadcast a cached tensor with batch 1 (one user) to ``batch`` candidates."""
    return tf.broadcast_to(x, tf.concat([[batch], tf.shape(x)[1:]], 0))


# ---- request-time gap features (METHODS 1.5: nothing cached depends on the request) ----
def cache_row_times(seq: Dict[str, tf.Tensor], mask: tf.Tensor) -> Dict[str, tf.Tensor]:
    """What a cache keeps so that ``rank`` can measure time gaps to the request:
    ``{"row_ts": [B, L]}`` (0 on padding), or, for windows without timestamps,
    ``{"gap_bucket": [B, L]}`` as the window measured them."""
    valid = mask > 0
    key, x = ("row_ts", seq["ts"]) if "ts" in seq else ("gap_bucket", seq["gap_bucket"])
    x = tf.cast(x, tf.int64)
    return {key: tf.where(valid, x, tf.zeros_like(x))}


def request_gap_buckets(cache: Dict[str, tf.Tensor], target: Dict[str, tf.Tensor],
                        who: str) -> tf.Tensor:
    """Gap buckets [R, L] from each cached row's time to the request time
    ``target["ts"]`` (R = 1 for one user's request), measured by the input pipeline's own
    :func:`tfmodels.data.gap_bucket`; the cached buckets when the cache has no row times."""
    if "row_ts" not in cache:
        return cache["gap_bucket"]
    if "ts" not in target:
        raise ValueError(f"{who} with the gap_bucket feature needs the request time: "
                         f"target['ts'] (the model passes imp_ts)")
    req = tf.cast(tf.reshape(target["ts"], [-1, 1]), tf.int64)                  # [R, 1]
    return D.gap_bucket(req - cache["row_ts"])                                  # [R, L]
