"""The shared model (METHODS G3): z = [e_t, e_u, e_c, DIN(E_short, e_t), v_long]; p = sigma(MLP(z)).

Trained as a tensorflow-recommenders ``Model`` with ``tasks.Ranking`` (BCE on
logits); the long-sequence module comes from :mod:`tfmodels.registry`. The
user/candidate split of METHODS 1.5 is exposed at model level:

* :meth:`user_tower` (long window -> the module's cache; user only),
* :meth:`rank` (cache + short window + candidates -> logits),
* :meth:`call` (all raw features -> logits, the module's training path).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Mapping, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfmodels import registry
from tfmodels import schema as S
from tfmodels.layers import (MLP, DinAttention, ItemEmbedding, id_mask, masked_softmax,
                             serializable)

Tensors = Dict[str, tf.Tensor]


@serializable
class LifelongCTRModel(tfrs.models.Model):
    """Backbone + pluggable long module.

    Args:
      feature_schema: :meth:`FeatureSchema.to_dict` (vocab sizes, S, L).
      model_name: registry name (``din``, ``din_l``, ``avg_pool``, ...).
      long_module_config: extra kwargs of the long module.
      emb_dim: per-field embedding size; behaviors/targets are ``2 * emb_dim`` wide.
      mlp_hidden: head sizes (METHODS 1.3; 200-80 by default).
      din_hidden: DIN attention MLP sizes (80, 40).
      use_user_embedding: add a user-id embedding (profile e_u). Off by default:
        with user-split protocols test users are unseen, so it only adds noise.
      use_context: add an hour-of-day embedding of the impression (context e_c).
      head_batchnorm: BatchNormalization before each hidden activation of the head
        MLP, as in the LREA paper's head (METHODS 2.3 R4); off by default. Inference
        (``training=False``: serving, ``rank``) uses the moving statistics.
    """

    def __init__(self, feature_schema: Mapping, model_name: str = "din",
                 long_module_config: Optional[Mapping] = None, emb_dim: int = 16,
                 mlp_hidden: Sequence[int] = (200, 80), din_hidden: Sequence[int] = (80, 40),
                 din_normalize: Optional[str] = None, use_user_embedding: bool = False,
                 use_context: bool = False, head_batchnorm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.feature_schema = S.FeatureSchema.from_dict(feature_schema)
        self.model_name = model_name
        self.long_module_config = dict(long_module_config or {})
        self.emb_dim, self.mlp_hidden, self.din_hidden = emb_dim, list(mlp_hidden), list(din_hidden)
        self.din_normalize = din_normalize
        self.use_user_embedding, self.use_context = use_user_embedding, use_context
        self.head_batchnorm = bool(head_batchnorm)
        vocab = self.feature_schema.vocab
        self.item_embedding = ItemEmbedding(vocab.num_items, vocab.num_categories, emb_dim,
                                            name="item_embedding")
        d = self.item_embedding.output_dim
        self.user_embedding = (tf.keras.layers.Embedding(vocab.num_users, emb_dim,
                                                         name="user_embedding")
                               if use_user_embedding else None)
        self.context_embedding = (tf.keras.layers.Embedding(24, emb_dim, name="hour_embedding")
                                  if use_context else None)
        self.short_din = DinAttention(din_hidden, din_normalize, name="short_din")
        cls = registry.long_module_class(model_name)
        module_kwargs = {**registry.preset_config(model_name), **self.long_module_config}
        if cls is not None:
            # DIN-based long modules (DIN-L, C-Former's centroid attention) share the
            # backbone's DIN unit settings unless their config says otherwise.
            params = inspect.signature(cls.__init__).parameters
            for key, value in (("din_hidden", self.din_hidden),
                               ("din_normalize", self.din_normalize)):
                if key in params and key not in module_kwargs:
                    module_kwargs[key] = value
        self.long_module = (cls(emb_dim=d, name="long_module", **module_kwargs)
                            if cls is not None else None)
        self.head = MLP(mlp_hidden, activation="prelu", output_units=1,
                        batchnorm=self.head_batchnorm, name="head")
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")])

    # ---- inputs ----------------------------------------------------------------------
    def feature_names(self, part: str = "all") -> List[str]:
        """Schema feature names the model reads: ``all`` | ``user_tower`` | ``rank``.

        ``rank`` reads the short window and target/context features; the long
        window is read by ``user_tower`` only (through the module's cache).
        """
        long_names = []
        if self.long_module is not None:
            long_names = [S.seq_name("long", f) for f in
                          ("item_id", "cate_id", *self.long_module.reads_fields)]
            long_names = list(dict.fromkeys(long_names))
        if part == "user_tower":
            return long_names
        rank = ["target_item_id", "target_cate_id", "short_item_id", "short_cate_id"]
        if self.use_user_embedding:
            rank.append("user_id")
        if self.use_context or self.reads_request_time:
            rank.append("imp_ts")
        if part == "rank":
            return rank
        if part == "all":
            return rank + long_names
        raise ValueError(f"part must be all, user_tower or rank, got {part!r}")

    def embed_sequence(self, features: Mapping[str, tf.Tensor], prefix: str) -> Tensors:
        item = features[S.seq_name(prefix, "item_id")]
        seq = {"emb": self.item_embedding(item, features[S.seq_name(prefix, "cate_id")]),
               "mask": id_mask(item)}
        for field in S.SEQUENCE_FIELDS:
            name = S.seq_name(prefix, field)
            if name in features:
                seq[field] = features[name]
        return seq

    @property
    def reads_request_time(self) -> bool:
        """True when the long module's ``score`` needs the request time (``imp_ts``):
        features measured to the request (TWIN's gap bucket) are computed there, from
        the cached rows' timestamps, so that serving equals training on the same window."""
        return bool(getattr(self.long_module, "reads_request_time", False))

    def embed_target(self, features: Mapping[str, tf.Tensor]) -> Tensors:
        """Candidate embeddings; ``ts`` = the request / impression time ([N] or, in
        serving, [1] for the one user) when the long module reads it."""
        item, cate = features["target_item_id"], features["target_cate_id"]
        target = {"emb": self.item_embedding(item, cate), "item_id": item, "cate_id": cate}
        if self.reads_request_time:
            target["ts"] = features["imp_ts"]
        return target

    # ---- the split --------------------------------------------------------------------
    def user_tower(self, features: Mapping[str, tf.Tensor], training=None) -> Tensors:
        """Long window -> the long module's cacheable tensors (empty for DIN)."""
        if self.long_module is None:
            return {}
        return self.long_module.user_cache(self.embed_sequence(features, "long"),
                                           training=training)

    def _head(self, features, target, v_long, training=None):
        """z = [e_t, DIN(E_short, e_t), v_long, e_u, e_c] -> logits [N] (G3).

        User-level inputs (short window, user id, impression time) may have batch 1
        while the targets have N rows (the ``rank`` signature: one user, N
        candidates); they are broadcast against the N candidates here.
        """
        short = self.embed_sequence(features, "short")
        n = tf.shape(target["emb"])[0]
        if short["emb"].shape[0] == 1 and target["emb"].shape[0] != 1:
            v_short = din_one_user(self.short_din, short["emb"], short["mask"], target["emb"])
        else:
            v_short = self.short_din(short["emb"], short["mask"], target["emb"])
        parts = [target["emb"], v_short]
        if v_long is not None:
            parts.append(v_long)
        if self.user_embedding is not None:
            parts.append(_rows(self.user_embedding(features["user_id"]), n))
        if self.context_embedding is not None:
            hour = tf.math.floormod(features["imp_ts"] // 3600, 24)
            parts.append(_rows(self.context_embedding(hour), n))
        return tf.squeeze(self.head(tf.concat(parts, -1), training=training), -1)

    def rank(self, cache: Tensors, features: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        """Logits [N] from a cached user representation plus per-request features.

        Either everything has batch N (offline parity checks), or the user side has
        batch 1 -- the cache, ``short_*`` [1, S], ``user_id`` / ``imp_ts`` [1] -- and
        only ``target_*`` has N rows (serving: one user, N candidates).
        """
        target = self.embed_target(features)
        v_long = (self.long_module.score(cache, target, training=training)
                  if self.long_module is not None else None)
        return self._head(features, target, v_long, training)

    def call(self, features: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        """Logits [B] from all raw features (the module's training path)."""
        target = self.embed_target(features)
        if training and getattr(self.long_module, "reads_label", False) and S.LABEL in features:
            target["label"] = features[S.LABEL]   # a module's auxiliary CTR task (SIM soft)
        v_long = None
        if self.long_module is not None:
            v_long = self.long_module(self.embed_sequence(features, "long"), target,
                                      training=training)
        return self._head(features, target, v_long, training)

    def predict_ctr(self, features, training=None) -> tf.Tensor:
        return tf.sigmoid(self(features, training=training))

    def compute_loss(self, features, training: bool = False) -> tf.Tensor:
        logits = self(features, training=training)
        return self.task(labels=features[S.LABEL], predictions=logits)

    def get_config(self):
        return {"feature_schema": self.feature_schema.to_dict(), "model_name": self.model_name,
                "long_module_config": self.long_module_config, "emb_dim": self.emb_dim,
                "mlp_hidden": self.mlp_hidden, "din_hidden": self.din_hidden,
                "din_normalize": self.din_normalize,
                "use_user_embedding": self.use_user_embedding, "use_context": self.use_context,
                "head_batchnorm": self.head_batchnorm}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _rows(x: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """Broadcast per-user rows [1 or n, k] to [n, k] (no-op when already n rows)."""
    return tf.broadcast_to(x, tf.stack([n, tf.shape(x)[-1]]))


def din_one_user(din: DinAttention, keys: tf.Tensor, mask: tf.Tensor,
                 query: tf.Tensor) -> tf.Tensor:
    """The DIN unit (G2) of ONE user's keys against N candidates: ``din(keys, mask, query)``.

    Shapes: keys [1, S, d], mask [1, S], query [N, d] -> [N, d]. Equal to
    :class:`DinAttention` up to float reassociation (about 1e-7), but organised
    for serving: the first layer is ``din.first_layer(..., one_user=True)``, which
    computes the candidate-independent parts once per request (``precompute`` and
    M_l = W_b - W_c + diag(e_l) W_d) and all N x S pre-activations with ONE GEMM
    query [N, d] x M [d, S * h0]. :class:`DinAttention` instead broadcasts the keys
    to an [N, S, d] copy and runs N small batched matmuls against per-candidate
    diag(e_t) W_d matrices; on 2 cores (d = 32, 80-40, N = 1,000) this path is
    about 1.5-2.3x faster. The attention MLP's remaining layers (which dominate
    what is left) run unchanged.
    """
    k = keys[0]                                                     # [S, d]
    s = tf.shape(k)[0]
    h0 = din.hidden[0]
    pre = tf.reshape(din.first_layer(keys, query, one_user=True), [-1, h0])   # [N*S, h0]
    # The rest of the attention MLP on a 2-D [N*S, h0] matrix: plain MatMul + BiasAdd
    # (a Dense layer on [N, S, h0] would go through tensordot's reshapes per layer).
    logits = tf.reshape(din.rest(din.act1(pre)), tf.stack([-1, s]))  # [N, S]
    mask = tf.broadcast_to(mask, tf.shape(logits))
    w = masked_softmax(logits, mask) if din.normalize == "softmax" else logits * mask
    return tf.matmul(w, k)                                          # [N, d]


def build_model(feature_schema: S.FeatureSchema, model_name: str, **config) -> LifelongCTRModel:
    """Build a registered model; ``config`` holds backbone kwargs and ``long_module_config``."""
    return LifelongCTRModel(feature_schema.to_dict(), model_name=model_name, **config)
