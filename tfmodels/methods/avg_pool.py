"""Avg-Pooling (METHODS B1): v_long = sum_l m_l e_l / sum_l m_l over the long sequence.

Candidate-independent, so the whole module output is the per-user cache.
A user without any valid behavior gets a zero vector.
"""
import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import serializable
from tfmodels.methods.base import LongSequenceModule, broadcast_rows


@serializable
class AvgPooling(LongSequenceModule):
    def user_cache(self, seq, training=None):
        total = tf.reduce_sum(seq["emb"] * seq["mask"][..., None], axis=1)
        count = tf.reduce_sum(seq["mask"], axis=1, keepdims=True)
        return {"pooled": tf.math.divide_no_nan(total, count)}

    def score(self, cache, target, training=None):
        return broadcast_rows(cache["pooled"], tf.shape(target["emb"])[0])
