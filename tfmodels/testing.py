"""Test helpers every model and layer goes through (copied idea: Merlin's ``model_test``).

* :func:`write_tiny_dataset` writes a small prepared dataset (per-user records +
  meta.json) without Beam, so model tests are fast.
* :func:`model_test` fits a registered model a few steps, saves and reloads it,
  checks identical predictions, the ``get_config`` round trip, that the inputs
  it declares come from the schema, and that the cached path
  ``rank(user_tower(x), x)`` equals ``call(x)`` within 1e-5.
* :func:`layer_test` checks a long module's shapes, masking (extra padding or
  garbage at padded positions changes nothing, outputs and losses), the cached
  path, and serialization.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Mapping, Optional

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import schema as S


# Registered presets that change only a training loss of their base model: the same
# forward graph (`call`, `user_tower`, `rank`) with the same variables. The serving tests
# (exports, parity, XLA) run on the base only; their own losses are tested per method.
TRAINING_LOSS_ONLY_PRESETS = {"encode_no_loss": "encode", "encode_fixed_margin": "encode",
                              "cformer_wo_recon": "cformer", "cformer_wo_orth": "cformer"}


def write_tiny_dataset(out_dir: str, num_users: int = 24, num_items: int = 60,
                       num_categories: int = 6, max_history: int = 40,
                       impressions_per_user: int = 4, seed: int = 0,
                       num_shards: int = 2, domains: int = 1) -> str:
    """Random per-user records whose labels depend on the history (category match).

    ``domains=2`` writes two-domain data: each behavior's domain is drawn uniformly from
    TARGET_DOMAIN (1) and SOURCE_DOMAIN (2) and meta says ``num_domains`` 3 (for the
    cross-domain windows); ``domains=1`` (default) draws exactly what it always did."""
    if domains not in (1, 2):
        raise ValueError(f"domains must be 1 or 2, got {domains}")
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    item_cate = rng.integers(S.FIRST_ID, S.FIRST_ID + num_categories, size=num_items + S.FIRST_ID)
    counts = {}
    for split in S.SPLITS:
        writers = [tf.io.TFRecordWriter(
            os.path.join(out_dir, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord.gz"),
            options="GZIP") for i in range(num_shards)]
        n_imp = 0
        for u in range(num_users):
            h = int(rng.integers(0, max_history + 1))
            items = rng.integers(S.FIRST_ID, S.FIRST_ID + num_items, size=h)
            ts = np.sort(rng.integers(1_500_000_000, 1_500_000_000 + 86400 * 30, size=h))
            hist = {"hist_item_id": items, "hist_cate_id": item_cate[items], "hist_ts": ts,
                    "hist_engage": rng.random(h).astype(np.float32),
                    "hist_domain": np.full(h, S.DEFAULT_DOMAIN)}
            if domains == 2:
                hist["hist_domain"] = rng.integers(S.TARGET_DOMAIN, S.SOURCE_DOMAIN + 1, size=h)
            k = impressions_per_user
            t_items = rng.integers(S.FIRST_ID, S.FIRST_ID + num_items, size=k)
            t_cate = item_cate[t_items]
            cut = rng.integers(0, h + 1, size=k)
            labels = np.array([float(np.isin(c, hist["hist_cate_id"][:ci]).sum() > 0
                                     and rng.random() < 0.8) for c, ci in zip(t_cate, cut)])
            imp_ts = np.array([ts[ci - 1] + 60 if ci > 0 else 1_500_000_000 - 60 for ci in cut])
            imps = {"imp_item_id": t_items, "imp_cate_id": t_cate, "imp_ts": imp_ts,
                    "imp_label": labels, "imp_hist_index": cut}
            rec = S.encode_user_record(S.FIRST_ID + u, f"u{u}", hist, imps)
            writers[u % num_shards].write(rec)
            n_imp += k
        for w in writers:
            w.close()
        counts[split] = n_imp
    meta = {"vocab": {"num_items": num_items + S.FIRST_ID,
                      "num_categories": num_categories + S.FIRST_ID,
                      "num_users": num_users + S.FIRST_ID, "num_domains": domains + 1},
            "source": "tiny", "protocol": "labeled_impressions", "seed": seed,
            "stats": {"impressions": counts}}
    with open(os.path.join(out_dir, S.META_FILE), "w") as f:
        json.dump(meta, f)
    return out_dir


# ---- model test ---------------------------------------------------------------------------
def tiny_schema(data_dir: str, short_len: int = 5, long_len: int = 24,
                cross_domain: bool = False) -> S.FeatureSchema:
    return S.FeatureSchema.from_data_dir(data_dir, short_len, long_len, cross_domain)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def model_test(model_name: str, data_dir: str, work_dir: Optional[str] = None,
               short_len: int = 5, long_len: int = 24, steps: int = 6, tol: float = 1e-5,
               run_eagerly: bool = False, cross_domain: bool = False,
               export: bool = True, **model_config) -> Dict[str, object]:
    """Fit, save, reload and compare a registered model; returns what it measured.

    Checks (AssertionError on failure):
      * a few fit steps run and give a finite loss (``run_eagerly``: the train step
        as plain Python instead of a traced tf.function, as Keras' compile flag; the
        SavedModel export below does not depend on it and runs only when it is False);
      * ``get_config`` -> ``from_config`` -> ``get_config`` is the identity;
      * weights saved with tf.train.Checkpoint and read into a model rebuilt from
        its config give identical predictions;
      * a ``tf.saved_model`` export with a signature declared from the schema (only
        the features the model says it reads) reloads and predicts the same;
      * feeding only the declared features changes nothing (no hidden inputs);
      * the cached path ``rank(user_tower(x), x)`` equals ``call(x)`` within ``tol``.

    ``export=False`` skips the SavedModel check (a suite that exports every model through
    ``serving.export`` and checks it there, as tests/test_serving.py does, need not pay
    for a second export per model).

    ``cross_domain``: the cross-domain windows (two-domain data, e.g.
    ``write_tiny_dataset(domains=2)``); ``model_config`` may then switch CRP on.
    """
    from tfmodels import data as D
    from tfmodels.model import LifelongCTRModel, build_model
    from tfmodels.train import create_variables

    work_dir = work_dir or tempfile.mkdtemp(prefix=f"model_test_{model_name}_")
    tf.keras.utils.set_random_seed(0)
    fschema = tiny_schema(data_dir, short_len, long_len, cross_domain)
    cfg = dict(emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    cfg.update(model_config)
    model = build_model(fschema, model_name, **cfg)
    model.compile(tf.keras.optimizers.Adam(1e-2), run_eagerly=run_eagerly)
    ds = D.make_dataset(S.split_pattern(data_dir, "train"), short_len, long_len, 8,
                        shuffle=True, seed=0, repeat=True, cross_domain=cross_domain)
    create_variables(model, model.optimizer, ds.element_spec)   # fit traces once
    hist = model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    loss = hist.history["total_loss"][-1]
    assert np.isfinite(loss), f"{model_name}: non-finite loss {loss}"

    batch = next(iter(D.make_dataset(S.split_pattern(data_dir, "test"), short_len, long_len, 8,
                                     cross_domain=cross_domain)))
    p1 = model.predict_ctr(batch).numpy()
    assert p1.shape == (int(batch[S.LABEL].shape[0]),), f"{model_name}: prediction shape {p1.shape}"

    config = model.get_config()
    clone = LifelongCTRModel.from_config(config)
    assert clone.get_config() == config, f"{model_name}: get_config round trip differs"
    path = os.path.join(work_dir, "ckpt")
    tf.train.Checkpoint(model=model).write(path)
    clone(batch)  # build variables, then restore
    tf.train.Checkpoint(model=clone).read(path).assert_existing_objects_matched()
    p2 = clone.predict_ctr(batch).numpy()
    assert _max_abs(p1, p2) < 1e-6, f"{model_name}: reloaded weights predict differently"

    names = model.feature_names()
    specs = fschema.feature_specs()
    unknown = [n for n in names if n not in specs]
    assert not unknown, f"{model_name}: reads features not in the schema: {unknown}"
    only = {n: batch[n] for n in names}
    p3 = model.predict_ctr(only).numpy()
    assert _max_abs(p1, p3) < 1e-6, f"{model_name}: depends on features it does not declare"

    if export and not run_eagerly:   # the export traces its own signature whatever compile said
        sig = tf.function(lambda feats: {"ctr": model.predict_ctr(feats)},
                          input_signature=[{n: specs[n] for n in names}])
        export = os.path.join(work_dir, "saved_model")
        tf.saved_model.save(model, export, signatures={"serving_default": sig})
        loaded = tf.saved_model.load(export)
        fn = loaded.signatures["serving_default"]
        assert sorted(fn.structured_input_signature[1]) == sorted(names), \
            f"{model_name}: signature inputs {sorted(fn.structured_input_signature[1])} != {names}"
        p4 = fn(**only)["ctr"].numpy()
        assert _max_abs(p1, p4) < 1e-6, f"{model_name}: SavedModel predicts differently"

    cached = model.rank(model.user_tower(batch), batch)
    gap = _max_abs(cached, model(batch))
    parity_tol = max(tol, getattr(model.long_module, "cache_parity_tol", tol))
    assert gap <= parity_tol, f"{model_name}: cached path differs from call by {gap}"
    return {"loss": float(loss), "cached_gap": gap, "feature_names": names}


# ---- layer test ---------------------------------------------------------------------------
def random_sequence(batch: int, length: int, dim: int, lengths=None, seed: int = 0,
                    num_items: int = 50) -> Dict[str, tf.Tensor]:
    """A long-sequence input dict as the model builds it, right-padded per row."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(0, length + 1, size=batch)
    lengths = np.asarray(lengths)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    emb = rng.normal(size=(batch, length, dim)).astype(np.float32) * mask[..., None]
    ints = lambda hi: (rng.integers(1, hi, size=(batch, length)) * mask).astype(np.int64)
    out = {"emb": tf.constant(emb), "mask": tf.constant(mask),
           "item_id": tf.constant(ints(num_items)), "cate_id": tf.constant(ints(10)),
           "engage": tf.constant(rng.random((batch, length)).astype(np.float32) * mask),
           "gap_bucket": tf.constant(ints(S.NUM_GAP_BUCKETS)),
           "domain": tf.constant((mask * S.DEFAULT_DOMAIN).astype(np.int64))}
    # each row's timestamp, most recent first, gaps from seconds to months (so the
    # gap buckets to RANDOM_REQUEST_TS vary); 0 on padding
    gaps = np.exp(rng.uniform(0.0, 16.0, size=(batch, length))).astype(np.int64)
    ts = RANDOM_REQUEST_TS - np.cumsum(gaps, axis=1)
    out["ts"] = tf.constant((ts * mask).astype(np.int64))
    return out


#: the request time of :func:`random_target` (after every row of :func:`random_sequence`)
RANDOM_REQUEST_TS = 1_700_000_000


def random_target(batch: int, dim: int, seed: int = 1, num_items: int = 50) -> Dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    return {"emb": tf.constant(rng.normal(size=(batch, dim)).astype(np.float32)),
            "item_id": tf.constant(rng.integers(2, num_items, size=batch).astype(np.int64)),
            "cate_id": tf.constant(rng.integers(2, 10, size=batch).astype(np.int64)),
            "ts": tf.constant(RANDOM_REQUEST_TS + rng.integers(0, 3600, size=batch))}


def _pad_more(seq: Mapping[str, tf.Tensor], extra: int, garbage: bool, seed: int = 7):
    """Append ``extra`` padded positions; with ``garbage``, fill every padded slot
    (old and new) of every field with random values (the mask still says padding)."""
    rng = np.random.default_rng(seed)
    out = {}
    mask = np.concatenate([seq["mask"].numpy(), np.zeros((seq["mask"].shape[0], extra),
                                                          np.float32)], 1)
    for k, v in seq.items():
        v = v.numpy()
        pad = np.zeros((v.shape[0], extra) + v.shape[2:], v.dtype)
        v = np.concatenate([v, pad], 1)
        if garbage and k != "mask":
            noise = (rng.normal(size=v.shape) * 3).astype(v.dtype) if v.dtype.kind == "f" \
                else rng.integers(1, 9, size=v.shape).astype(v.dtype)
            m = mask.reshape(mask.shape + (1,) * (v.ndim - 2))
            v = np.where(m > 0, v, noise)
        out[k] = tf.constant(v)
    return out


def training_outputs_and_grads(layer, seq: Mapping[str, tf.Tensor],
                               target: Mapping[str, tf.Tensor]) -> List[np.ndarray]:
    """``[output, sum of the layer's losses, gradient of every trainable variable...,
    gradient of seq["emb"]]`` of one training call, the loss being the output weighted
    1..width per column plus the losses: what parity tests between two formulations of
    a method's training path compare."""
    emb = tf.Variable(seq["emb"])
    with tf.GradientTape() as tape:
        out = layer(dict(seq, emb=emb), target, training=True)
        aux = tf.add_n(layer.losses)
        loss = tf.reduce_sum(out * tf.range(1.0, 1.0 + int(out.shape[-1]))) + aux
    grads = tape.gradient(loss, layer.trainable_variables + [emb])
    return [out.numpy(), aux.numpy()] + [tf.convert_to_tensor(g).numpy() for g in grads]


def _losses(layer) -> float:
    return float(sum(float(tf.reduce_sum(l)) for l in layer.losses)) if layer.losses else 0.0


def layer_test(cls, config: Optional[Mapping] = None, batch: int = 4, length: int = 16,
               dim: int = 8, tol: float = 1e-5, training: bool = False) -> Dict[str, object]:
    """Shapes, masking, cached path, broadcasting and serialization of a long module."""
    config = dict(config or {})
    tf.keras.utils.set_random_seed(0)
    layer = cls(emb_dim=dim, **config)
    lengths = np.array([0, 1, length // 2, length][:batch] + [3] * max(0, batch - 4))
    seq, target = random_sequence(batch, length, dim, lengths), random_target(batch, dim)
    out = layer(seq, target, training=training)
    assert tuple(out.shape) == (batch, layer.output_dim), \
        f"{cls.__name__}: output shape {tuple(out.shape)} != {(batch, layer.output_dim)}"
    assert np.all(np.isfinite(out.numpy())), f"{cls.__name__}: non-finite output"
    base_loss = _losses(layer)

    for garbage in (False, True):
        seq2 = _pad_more(seq, 5, garbage)
        out2 = layer(seq2, target, training=training)
        gap = _max_abs(out, out2)
        what = "garbage at padded positions" if garbage else "extra padding"
        assert gap <= tol, f"{cls.__name__}: {what} changed the output by {gap}"
        loss_gap = abs(_losses(layer) - base_loss)
        assert loss_gap <= tol * max(1.0, abs(base_loss)), \
            f"{cls.__name__}: {what} changed the auxiliary loss by {loss_gap}"

    cached = layer.score(layer.user_cache(seq, training=training), target, training=training)
    gap = _max_abs(cached, out)
    parity_tol = max(tol, getattr(cls, "cache_parity_tol", tol))
    assert gap <= parity_tol, f"{cls.__name__}: score(user_cache(x)) differs from call by {gap}"

    # One user's cache (batch 1) against all targets equals that user tiled.
    one = {k: v[-1:] for k, v in seq.items()}
    tiled = {k: tf.repeat(v, batch, axis=0) for k, v in one.items()}
    bcast = layer.score(layer.user_cache(one), target)
    gap = _max_abs(bcast, layer(tiled, target))
    assert gap <= tol, f"{cls.__name__}: cache broadcasting differs by {gap}"

    clone = cls.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config(), f"{cls.__name__}: config round trip"
    clone(seq, target, training=training)
    clone.set_weights(layer.get_weights())
    gap = _max_abs(clone(seq, target, training=training), out)
    assert gap <= tol, f"{cls.__name__}: rebuilt layer differs by {gap}"
    name = tf.keras.utils.get_registered_name(cls)
    assert tf.keras.utils.get_registered_object(name) is cls, f"{cls.__name__} not registered"
    return {"output_dim": layer.output_dim, "aux_loss": base_loss}
