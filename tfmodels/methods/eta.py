"""ETA (METHODS B6): SimHash retrieval by Hamming distance + multi-head target attention.

Equations -> code:

* sig(e) = 1[e R > 0] in {0, 1}^m, R in R^{d x m} fixed N(0, 1) (seeded by ``hash_seed``,
  a non-trainable weight saved with the model) -- :class:`~tfmodels.methods.esu.SimHash`,
  packed 32 bits per int32 word by :func:`~tfmodels.methods.esu.pack_bits`.
  m = ``num_bits`` = 64 by default (2 x the embedding size in ENCODE's setup, d = 32).
* Hamming(sig(e_l), sig(e_t)) = sum_b |h_b(e_l) - h_b(e_t)| = sum over words of
  popcount(XOR) -- :func:`~tfmodels.methods.esu.hamming`. NOT the difference of the
  packed integers (a public implementation ranks by |bucket(q) - bucket(s)|, which is
  not a distance on the bits); padded rows get distance m + 1, so they are never
  selected while a valid row remains.
* GSU: the k = ``top_k`` (50) rows of smallest distance; ties go to the lower index,
  i.e. the more recent behavior (``tf.math.top_k`` keeps the first of equal keys).
* ESU: 4-head target attention over them (:class:`~tfmodels.methods.esu.TargetAttention`).
* End to end: the signatures are recomputed from the live embeddings on every call
  (every training step); gradients flow only through the gathered rows and the ESU
  (the hash and the selection carry none).

Cache per user (METHODS 1.5): ``signature`` [B, L, ceil(m / 32)] int32 (the packed
signatures; 0 on padding), ``keys`` / ``values`` [B, L, H, d_k|d_v] (the ESU's K W^k and
V W^v of every row: [interp] cached projected rather than raw, so a candidate reads
k rows of H*(d_k + d_v) floats instead of projecting k raw rows), ``mask`` [B, L].
Per candidate: hash e_t (d x m), L Hamming distances (L * m / 32 XOR + popcount),
top-k over L, the ESU over k rows.
"""
from __future__ import annotations

from typing import Optional

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import serializable
from tfmodels.methods.esu import (SimHash, hamming, one_user, pack_bits, static_k,
                                  top_k_indices)
from tfmodels.methods.sim import _TwoStage


@serializable
class ETA(_TwoStage):
    """ETA: top-k behaviors by SimHash Hamming distance to the candidate, then the ESU.

    Args:
      emb_dim: d. top_k: k (50). num_heads, key_dim, value_dim: the ESU's.
      num_bits: m, signature length (64). hash_seed: seed of R (0).
    Shapes: seq ``emb`` [B, L, d], ``mask`` [B, L]; target ``emb`` [B, d] -> [B, d].
    """

    def __init__(self, emb_dim: int, top_k: int = 50, num_bits: int = 64, hash_seed: int = 0,
                 num_heads: int = 4, key_dim: Optional[int] = None,
                 value_dim: Optional[int] = None, **kwargs):
        super().__init__(emb_dim, top_k, num_heads, key_dim, value_dim, **kwargs)
        self.num_bits, self.hash_seed = int(num_bits), int(hash_seed)
        self.simhash = SimHash(emb_dim, self.num_bits, self.hash_seed, name="simhash")

    def signature(self, emb: tf.Tensor) -> tf.Tensor:
        """Packed SimHash signatures of embeddings [..., d] -> int32 [..., ceil(m / 32)]."""
        return pack_bits(self.simhash.bits(emb))

    def user_cache(self, seq, training=None):
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        sig = self.signature(emb)
        sig = tf.where(mask[..., None] > 0, sig, tf.zeros_like(sig))
        return {"signature": sig, "mask": mask, **self.esu.project(emb)}

    def attend(self, cache, target):
        """``distance`` [N, L] int32 (m + 1 on padding), ``index`` [N, k],
        ``selected_mask``, ESU ``weights`` [N, H, k], ``output`` [N, d]."""
        sig, mask = cache["signature"], cache["mask"]
        q = self.signature(target["emb"])                                  # [N, W]
        # [1 or N, L, W] against [N, 1, W]: one user's cache is read, not tiled
        dist = hamming(sig, q[:, None, :])                                 # [N, L]
        valid = tf.broadcast_to(mask > 0, tf.shape(dist))
        dist = tf.where(valid, dist, tf.fill(tf.shape(dist), self.num_bits + 1))
        k = static_k(self.top_k, sig)
        # the unbroadcast mask [1 or N, L]: the pre-filter counts the valid rows once per user
        index = top_k_indices(-tf.cast(dist, tf.float32), k, mask > 0, one_user(sig))
        sel_mask = tf.gather(tf.cast(valid, tf.float32), index, batch_dims=1)
        return {"distance": dist, **self._esu(cache, target, index, sel_mask)}

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits, "hash_seed": self.hash_seed}
