"""DIN-L (METHODS B3): DIN attention (G2) over the whole long sequence.

The papers' accuracy upper bound: O(L d) per candidate online. Its "cache" is the
embedded long sequence itself (nothing is compressed); ``score`` precomputes the
candidate-independent half of the attention MLP's first layer once per call.
"""
import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.layers import DinAttention, serializable
from tfmodels.methods.base import LongSequenceModule


@serializable
class DinLong(LongSequenceModule):
    def __init__(self, emb_dim: int, din_hidden=(80, 40), din_normalize=None, **kwargs):
        super().__init__(emb_dim, **kwargs)
        self.din_hidden, self.din_normalize = list(din_hidden), din_normalize
        self.din = DinAttention(din_hidden, din_normalize, name="long_din")

    def user_cache(self, seq, training=None):
        return {"keys": seq["emb"], "mask": seq["mask"]}

    def score(self, cache, target, training=None):
        return self.din(cache["keys"], cache["mask"], target["emb"])

    def get_config(self):
        return {**super().get_config(), "din_hidden": self.din_hidden,
                "din_normalize": self.din_normalize}
