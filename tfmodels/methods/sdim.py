"""SDIM (METHODS B7): sampling-based deep interest modeling with SimHash buckets.

Equations -> code (SDIM paper sections 3.3-4.2 [background]):

* m = ``num_bits`` SimHash functions h(x) = 1[x R > 0] (R in R^{d x m} fixed N(0, 1),
  seeded by ``hash_seed``, a non-trainable weight: :class:`~tfmodels.methods.esu.SimHash`)
  grouped into G = m / tau signatures of tau = ``bits_per_signature`` consecutive bits;
  signature j of x is read as the bucket id b_j(x) = sum_i h_{j tau + i}(x) 2^i in
  [0, 2^tau) -- :meth:`SDIM.bucket_ids`. Equal bucket id <=> all tau bits equal (ids
  are only compared for equality, never subtracted).
* Attn(q, S) = (tau / m) sum_j l2( sum_l 1[b_j(s_l) = b_j(q)] s_l ) -- the behaviors
  whose whole signature j equals the candidate's are summed, the sum is L2-normalised
  (``l2_normalize=True``; a public implementation defaults to no normalisation, kept
  only as the flag's False), and the output is the mean over the G signatures.
  A bucket without a behavior contributes a zero vector (l2 of 0 is 0).
* Expected weight of a behavior at angle theta to q: P[signature j collides] =
  (1 - theta / pi)^tau (one hyperplane separates q and s with probability theta / pi).

Paper defaults: m = 48, tau = 3 (16 signatures of 8 buckets). m must be a multiple of tau.

Split (METHODS 1.5): the bucket sums do not depend on the candidate, so the cache per
user is ``bucket_sums`` [B, G, 2^tau, d] (sum_l 1[b_j(s_l) = b] s_l for every signature
j and bucket b): G * 2^tau * d floats, independent of L. Per candidate: hash e_t
(d x m), gather its G buckets, normalise and average: O(G d).
"""
from __future__ import annotations

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import serializable
from tfmodels.methods.base import LongSequenceModule
from tfmodels.methods.esu import SimHash, one_user


@serializable
class SDIM(LongSequenceModule):
    """SDIM: mean over G = m / tau SimHash signatures of the L2-normalised bucket sum
    of the behaviors that share the candidate's bucket.

    Args:
      emb_dim: d. num_bits: m (48). bits_per_signature: tau (3).
      hash_seed: seed of R (0). l2_normalize: normalise each bucket sum (True).
    Shapes: seq ``emb`` [B, L, d], ``mask`` [B, L]; target ``emb`` [B, d] -> [B, d].
    """

    reads_fields = ()

    def __init__(self, emb_dim: int, num_bits: int = 48, bits_per_signature: int = 3,
                 hash_seed: int = 0, l2_normalize: bool = True, **kwargs):
        super().__init__(emb_dim, **kwargs)
        if bits_per_signature < 1 or num_bits < bits_per_signature \
                or num_bits % bits_per_signature:
            raise ValueError(f"num_bits ({num_bits}) must be a positive multiple of "
                             f"bits_per_signature ({bits_per_signature} >= 1)")
        if bits_per_signature > 16:
            raise ValueError(f"bits_per_signature {bits_per_signature} > 16: 2^tau buckets "
                             "per signature would not fit a per-user cache")
        self.num_bits, self.bits_per_signature = int(num_bits), int(bits_per_signature)
        self.hash_seed, self.l2_normalize = int(hash_seed), bool(l2_normalize)
        self.simhash = SimHash(emb_dim, self.num_bits, self.hash_seed, name="simhash")

    @property
    def num_signatures(self) -> int:
        return self.num_bits // self.bits_per_signature

    @property
    def num_buckets(self) -> int:
        return 2 ** self.bits_per_signature

    def bucket_ids(self, emb: tf.Tensor) -> tf.Tensor:
        """[..., d] -> int32 [..., G]: signature j's tau bits read as a number."""
        bits = self.simhash.bits(emb)
        g, tau = self.num_signatures, self.bits_per_signature
        bits = tf.reshape(bits, tf.concat([tf.shape(bits)[:-1], [g, tau]], 0))
        return tf.reduce_sum(bits * tf.constant(1 << np.arange(tau), tf.int32), -1)

    def user_cache(self, seq, training=None):
        """``bucket_sums`` [B, G, 2^tau, d]: per signature and bucket, the sum of the
        valid behaviors hashed there."""
        mask = tf.cast(seq["mask"], tf.float32)
        emb = seq["emb"] * mask[..., None]
        onehot = tf.one_hot(self.bucket_ids(emb), self.num_buckets) * mask[:, :, None, None]
        return {"bucket_sums": tf.einsum("blgk,bld->bgkd", onehot, emb)}

    def attend(self, cache, target):
        """``bucket`` [N, G] (the candidate's bucket ids), ``per_signature`` [N, G, d]
        (normalised bucket sums) and ``output`` [N, d] (their mean)."""
        sums = cache["bucket_sums"]
        g, k, d = self.num_signatures, self.num_buckets, self.emb_dim
        bucket = self.bucket_ids(target["emb"])                            # [N, G]
        flat = bucket + tf.range(g, dtype=bucket.dtype)[None, :] * k       # row j * 2^tau + b
        if one_user(sums):
            rows = tf.gather(tf.reshape(sums[0], [g * k, d]), flat)        # [N, G, d]
        else:
            rows = tf.gather(tf.reshape(sums, [-1, g * k, d]), flat, batch_dims=1)
        if self.l2_normalize:
            # x / max(||x||, 1e-6): an empty bucket (x = 0) stays 0 with a finite gradient
            rows = tf.math.l2_normalize(rows, axis=-1, epsilon=1e-12)
        return {"bucket": bucket, "per_signature": rows, "output": tf.reduce_mean(rows, 1)}

    def score(self, cache, target, training=None):
        return self.attend(cache, target)["output"]

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits,
                "bits_per_signature": self.bits_per_signature, "hash_seed": self.hash_seed,
                "l2_normalize": self.l2_normalize}
