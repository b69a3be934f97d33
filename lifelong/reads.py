"""Which inputs a trained model reads ("like for like", issue 22 item 3): one place.

Derived from the model itself, not from a hand-kept table: the run's config is built
into a :class:`tfmodels.model.LifelongCTRModel` on a dummy vocabulary (no weights are
created) and :meth:`~tfmodels.model.LifelongCTRModel.feature_names` lists the schema
features it reads (the same list the serving signatures declare). From that list:

* ``short``: the short window(s) and S (``short`` or, cross-domain, ``short_t`` /
  ``short_s``), item and category ids;
* ``long``: L when the model has a long module (item and category ids);
* ``side``: the per-behavior side features of the long window the module reads
  beyond the ids, in the words of :data:`SIDE_FEATURES` (``engage``: the past
  behavior's engagement -- on MovieLens its rating; ``gap``: the time gap of each
  behavior to the request, from ``long_ts``; ``domain``; ``cluster_size``);
* ``other``: backbone inputs some configs add (``user id``, ``hour``).

Today the backbone gives no model per-behavior side features: ``use_context`` is an
hour-of-day embedding of the *impression*, not of past behaviors. So the methods that
read side features are the ones that define them (TWIN's cross features K_c: gap,
engage, domain; TWIN V2 adds cluster_size; LCN's context e^c: gap, engage) and every
table that compares models prints this description (``compare``'s results.md,
``lifelong bench accuracy``). docs/configs.md ("What each model reads") states it.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Union

#: long-window field -> the word the tables use
SIDE_FEATURES = {"engage": "engage", "ts": "gap", "gap_bucket": "gap", "domain": "domain",
                 "cluster_size": "cluster_size"}

_CACHE: Dict[str, Dict[str, Any]] = {}


def model_reads(cfg: Union[Mapping, Any]) -> Dict[str, Any]:
    """``{"short": [(prefix, S)], "long": L or None, "side": [...], "other": [...],
    "features": [schema names]}`` for a :class:`tfmodels.train.TrainConfig` (or its dict)."""
    import dataclasses
    from tfmodels.train import TrainConfig
    if not isinstance(cfg, Mapping):
        cfg = dataclasses.asdict(cfg)
    d = {k: v for k, v in cfg.items() if k not in ("out_dir", "seed", "data")}
    key = json.dumps(d, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _derive(TrainConfig.from_dict(dict(cfg)))
    return _CACHE[key]


def _derive(cfg) -> Dict[str, Any]:
    from tfmodels import schema as S
    from tfmodels.train import model_from_config
    n = S.FIRST_ID + 2              # a dummy vocabulary: what is read does not depend on it
    fs = S.FeatureSchema(S.Vocab(n, n, n), cfg.short_len, cfg.long_len,
                         cross_domain=cfg.cross_domain)
    model = model_from_config(cfg, fs)
    names: List[str] = model.feature_names("all")
    short = [(p, fs.seq_len(p)) for p in fs.short_prefixes()
             if S.seq_name(p, "item_id") in names]
    long_prefix = S.seq_name(S.LONG, "")
    long_fields = [n_[len(long_prefix):] for n_ in names if n_.startswith(long_prefix)]
    side = list(dict.fromkeys(SIDE_FEATURES.get(f, f) for f in long_fields
                              if f not in ("item_id", "cate_id")))
    other = []
    if "user_id" in names:
        other.append("user id")
    if cfg.use_context:
        other.append("hour")
    return {"short": short, "long": fs.long_len if long_fields else None, "side": side,
            "other": other, "features": names}


def reads_cell(cfg: Union[Mapping, Any]) -> str:
    """One table cell, e.g. ``S 50 + L 300 (engage, gap)``; ``S 50`` for DIN."""
    r = model_reads(cfg)
    parts = [" + ".join(f"{'S' if p == 'short' else p} {n}" for p, n in r["short"])]
    if r["long"] is not None:
        parts.append(f"L {r['long']}" + (f" ({', '.join(r['side'])})" if r["side"] else ""))
    cell = " + ".join(parts)
    if r["other"]:
        cell += " + " + ", ".join(r["other"])
    return cell
