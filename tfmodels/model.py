"""The shared model (METHODS G3): z = [e_t, e_u, e_c, DIN(E_short, e_t), v_long]; p = sigma(MLP(z)).

Trained as a tensorflow-recommenders ``Model`` with ``tasks.Ranking`` (BCE on
logits); the long-sequence module comes from :mod:`tfmodels.registry`. The
user/candidate split of METHODS 1.5 is exposed at model level:

* :meth:`user_tower` (long window -> the module's cache; user only),
* :meth:`rank` (cache + short window + candidates -> logits),
* :meth:`call` (all raw features -> logits, the module's training path).

Cross-domain (``feature_schema["cross_domain"]``, docs/cross_domain.md): the short
target- and source-domain windows H_T, H_S enter the head through one DIN unit each
(in place of the single short DIN; METHODS 2.5 [interp]) and the long module reads
the source-only long window. ``crp_weight > 0`` adds LCN's CRP loss
(:mod:`tfmodels.crp`) in training, for any registered model.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Mapping, Optional, Sequence

import tfmodels  # noqa: F401
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfmodels import crp
from tfmodels import registry
from tfmodels import schema as S
from tfmodels.layers import (MLP, DinAttention, ItemEmbedding, id_mask, masked_softmax,
                             serializable)

Tensors = Dict[str, tf.Tensor]


# Autograph off for the model's entry points (training's compute_loss, the serving
# split's user_tower / rank, predict_ctr): the model code has no tensor-dependent Python
# control flow (every branch is on static config or shapes), so autograph's source
# rewriting of every layer's call buys nothing and was the larger part of a trace:
# model_test (fit 6 steps, parity checks) of TWIN in a fresh process 14.0 -> 8.4 s CPU,
# LREA 10.7 -> 7.2 s (2 runs each, interleaved). Inside these methods autograph is
# disabled for everything they call (tf.autograph.experimental.do_not_convert sets the
# control status), so each layer's call traces as the plain Python it is; a branch on a
# tensor would raise at trace time, not change results. `call` itself is left undecorated
# (Keras reads its signature for the `training` argument); under compute_loss it is
# reached with autograph already disabled.
_no_autograph = tf.autograph.experimental.do_not_convert


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
      crp_weight: lambda_CRP of LCN's contrastive loss (METHODS 2.5 N14; the paper's
        0.1); 0 = off (default). Needs a cross-domain schema. Training only: the loss
        is added in ``call(training=True)`` and reported as the ``crp_loss`` metric.
      crp_negatives: M, negative pairs per kind per batch (4096; fewer when the batch
        holds fewer distinct cross-user pairs, see :mod:`tfmodels.crp`).
      crp_tau: the InfoNCE temperature (0.1).
      crp_lambdas: (lambda_PT, lambda_PS, lambda_PC), the weights of the three pair kinds
        in L_CRP (N6; (1, 1, 1)); (1, 1, 0) drops the cross-domain pair loss.
      crp_seed: seed of the stateless pair draws (with the optimizer's step).
    """

    def __init__(self, feature_schema: Mapping, model_name: str = "din",
                 long_module_config: Optional[Mapping] = None, emb_dim: int = 16,
                 mlp_hidden: Sequence[int] = (200, 80), din_hidden: Sequence[int] = (80, 40),
                 din_normalize: Optional[str] = None, use_user_embedding: bool = False,
                 use_context: bool = False, head_batchnorm: bool = False,
                 crp_weight: float = 0.0, crp_negatives: int = crp.NEGATIVES,
                 crp_tau: float = crp.TAU, crp_lambdas: Sequence[float] = crp.LAMBDAS,
                 crp_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.feature_schema = S.FeatureSchema.from_dict(feature_schema)
        self.crp_weight, self.crp_negatives = float(crp_weight), int(crp_negatives)
        self.crp_tau, self.crp_seed = float(crp_tau), int(crp_seed)
        if self.crp_weight < 0 or self.crp_tau <= 0 or self.crp_negatives < 1:
            raise ValueError(f"need crp_weight >= 0, crp_tau > 0, crp_negatives >= 1; got "
                             f"{self.crp_weight}, {self.crp_tau}, {self.crp_negatives}")
        self.crp_lambdas = [float(x) for x in crp_lambdas]
        if len(self.crp_lambdas) != 3 or min(self.crp_lambdas) < 0:
            raise ValueError(f"crp_lambdas must be 3 numbers >= 0 (lambda_PT, lambda_PS, "
                             f"lambda_PC), got {list(crp_lambdas)}")
        if self.crp_weight > 0 and not self.feature_schema.cross_domain:
            raise S.CrossDomainError(
                "CRP (crp_weight > 0) needs the cross-domain short windows short_t / short_s: "
                "build the feature schema with cross_domain=True (lifelong train "
                "--cross_domain, on two-domain data)")
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
        # H (single-domain) or H_T (cross-domain; attribute kept: checkpoints name it)
        self.short_din = DinAttention(din_hidden, din_normalize, name="short_din")
        if self.feature_schema.cross_domain:   # H_S gets its own DIN unit
            self.short_s_din = DinAttention(din_hidden, din_normalize, name="short_s_din")
        # L_CRP as the fit metric "crp_loss". Set past Keras' attribute tracking (and
        # listed by the `metrics` property below): a tracked metric's total/count would
        # join model.weights and the checkpoint, so a CRP model's weights (and exports)
        # would differ from the same model without CRP.
        object.__setattr__(self, "crp_tracker", tf.keras.metrics.Mean(name="crp_loss")
                           if self.crp_weight > 0 else None)
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
        # reduction NONE: labels and logits are [B], so the loss is already the batch
        # mean (Keras means over the last axis) and the value is the same as AUTO's;
        # AUTO raises under any tf.distribute strategy (tfmodels/distribute.py averages
        # the replicas' gradients instead).
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")])

    @property
    def metrics(self):
        return super().metrics + ([self.crp_tracker] if self.crp_tracker is not None else [])

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
        rank = ["target_item_id", "target_cate_id"]
        for prefix in self.feature_schema.short_prefixes():
            rank += [S.seq_name(prefix, "item_id"), S.seq_name(prefix, "cate_id")]
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
    @_no_autograph
    def user_tower(self, features: Mapping[str, tf.Tensor], training=None) -> Tensors:
        """Long window -> the long module's cacheable tensors (empty for DIN)."""
        if self.long_module is None:
            return {}
        return self.long_module.user_cache(self.embed_sequence(features, "long"),
                                           training=training)

    def _short_dins(self):
        """(short window prefix, its DIN unit): ``short``, or ``short_t`` and ``short_s``."""
        prefixes = self.feature_schema.short_prefixes()
        dins = [self.short_din] + ([self.short_s_din] if len(prefixes) > 1 else [])
        return list(zip(prefixes, dins))

    def _head(self, features, target, v_long, training=None, shorts=None):
        """z = [e_t, DIN(E_short, e_t), v_long, e_u, e_c] -> logits [N] (G3); cross-domain:
        z = [e_t, DIN(E_short_t, e_t), DIN(E_short_s, e_t), v_long, e_u, e_c].

        User-level inputs (short window, user id, impression time) may have batch 1
        while the targets have N rows (the ``rank`` signature: one user, N
        candidates); they are broadcast against the N candidates here. ``shorts``:
        prefix -> :meth:`embed_sequence` output, when the caller has embedded them.
        """
        n = tf.shape(target["emb"])[0]
        parts = [target["emb"]]
        for prefix, din in self._short_dins():
            short = (shorts or {}).get(prefix) or self.embed_sequence(features, prefix)
            if short["emb"].shape[0] == 1 and target["emb"].shape[0] != 1:
                parts.append(din_one_user(din, short["emb"], short["mask"], target["emb"]))
            else:
                parts.append(din(short["emb"], short["mask"], target["emb"]))
        if v_long is not None:
            parts.append(v_long)
        if self.user_embedding is not None:
            parts.append(_rows(self.user_embedding(features["user_id"]), n))
        if self.context_embedding is not None:
            hour = tf.math.floormod(features["imp_ts"] // 3600, 24)
            parts.append(_rows(self.context_embedding(hour), n))
        return tf.squeeze(self.head(tf.concat(parts, -1), training=training), -1)

    @_no_autograph
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
        shorts = None
        if training and self.crp_weight > 0:
            shorts = {p: self.embed_sequence(features, p)
                      for p in self.feature_schema.short_prefixes()}
            self._add_crp(features, shorts)
        return self._head(features, target, v_long, training, shorts)

    def _add_crp(self, features, shorts) -> None:
        """Add crp_weight * L_CRP to the model's losses (N14) and track L_CRP; training
        only (every op under the ``crp`` name scope)."""
        if "user_id" not in features:
            raise KeyError("CRP needs the user_id feature in training (negatives pair "
                           "different users); the tf.data pipeline always provides it")
        with tf.name_scope("crp"):
            optimizer = getattr(self, "optimizer", None)
            step = (tf.cast(optimizer.iterations, tf.int64) if optimizer is not None
                    else tf.constant(0, tf.int64))
            seed = tf.stack([tf.constant(self.crp_seed, tf.int64), step])
            out = crp.crp_loss(features["user_id"], shorts[S.SHORT_TARGET],
                               shorts[S.SHORT_SOURCE], seed, self.crp_negatives, self.crp_tau,
                               self.crp_lambdas)
            self.add_loss(self.crp_weight * out["crp"])
            self.crp_tracker.update_state(out["crp"])

    @_no_autograph
    def predict_ctr(self, features, training=None) -> tf.Tensor:
        return tf.sigmoid(self(features, training=training))

    @_no_autograph
    def compute_loss(self, features, training: bool = False) -> tf.Tensor:
        logits = self(features, training=training)
        return self.task(labels=features[S.LABEL], predictions=logits)

    def get_config(self):
        return {"feature_schema": self.feature_schema.to_dict(), "model_name": self.model_name,
                "long_module_config": self.long_module_config, "emb_dim": self.emb_dim,
                "mlp_hidden": self.mlp_hidden, "din_hidden": self.din_hidden,
                "din_normalize": self.din_normalize,
                "use_user_embedding": self.use_user_embedding, "use_context": self.use_context,
                "head_batchnorm": self.head_batchnorm, "crp_weight": self.crp_weight,
                "crp_negatives": self.crp_negatives, "crp_tau": self.crp_tau,
                "crp_lambdas": list(self.crp_lambdas), "crp_seed": self.crp_seed}

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


def build_model(feature_schema: S.FeatureSchema, model_name: str,
                cross_domain: Optional[bool] = None, **config) -> LifelongCTRModel:
    """Build a registered model; ``config`` holds backbone kwargs and ``long_module_config``.

    ``cross_domain`` (None: as the schema says) switches the schema's cross-domain
    windows on or off (:class:`tfmodels.schema.FeatureSchema`)."""
    if cross_domain is not None and bool(cross_domain) != feature_schema.cross_domain:
        feature_schema = dataclasses.replace(feature_schema, cross_domain=bool(cross_domain))
    return LifelongCTRModel(feature_schema.to_dict(), model_name=model_name, **config)
