"""The synthetic workload the serving-path benchmarks (``serving``, ``precompute``) time:
users' per-user records and untrained models with small dimensions.

The cost of a forward pass does not depend on the weights' values, so untrained
exports built from a synthetic vocabulary (10,000 items in 100 categories) time
the same work as trained ones.
"""
from __future__ import annotations

from typing import List

import numpy as np

from lifelong.bench.flags import parse_ints

NUM_ITEMS, NUM_CATES = 10_000, 100


def vocab():
    from tfmodels import schema as S
    return S.Vocab(NUM_ITEMS + S.FIRST_ID, NUM_CATES + S.FIRST_ID, 100_000 + S.FIRST_ID)


def item_cate(seed: int) -> np.ndarray:
    """Category of every item id (the same for one seed)."""
    from tfmodels import schema as S
    rng = np.random.default_rng(seed)
    return rng.integers(S.FIRST_ID, S.FIRST_ID + NUM_CATES, size=NUM_ITEMS + S.FIRST_ID)


def synthetic_records(n_users: int, min_hist: int, max_hist: int, seed: int) -> List[bytes]:
    """Per-user records (no impressions) with ``min_hist..max_hist`` behaviors each."""
    from tfmodels import schema as S
    rng = np.random.default_rng(seed + 1)
    cate = item_cate(seed)
    out = []
    for u in range(n_users):
        h = int(rng.integers(min_hist, max_hist + 1))
        items = rng.integers(S.FIRST_ID, S.FIRST_ID + NUM_ITEMS, size=h)
        ts = 1_500_000_000 + np.cumsum(rng.integers(1, 600, size=h))
        hist = {"hist_item_id": items, "hist_cate_id": cate[items], "hist_ts": ts,
                "hist_engage": rng.random(h), "hist_domain": np.full(h, S.DEFAULT_DOMAIN)}
        imps = {k: [] for k in S.IMPRESSION_FIELDS}
        out.append(S.encode_user_record(S.FIRST_ID + u, f"u{u}", hist, imps))
    return out


def untrained_model(args, name: str, L: int):
    """Registered model ``name`` at long length ``L`` with the bench's dimensions
    (``--emb_dim``, ``--mlp_hidden``, ``--din_hidden``), seeded by ``--seed``."""
    import tensorflow as tf
    from tfmodels import schema as S
    from tfmodels.model import build_model
    from tfmodels.train import TrainConfig
    tf.keras.utils.set_random_seed(args.seed)
    fs = S.FeatureSchema(vocab(), args.short_len, L)
    return build_model(fs, name, emb_dim=args.emb_dim,
                       mlp_hidden=parse_ints(args.mlp_hidden, "mlp_hidden"),
                       din_hidden=parse_ints(args.din_hidden, "din_hidden"),
                       din_normalize=TrainConfig().din_normalize)   # as `lifelong train`
