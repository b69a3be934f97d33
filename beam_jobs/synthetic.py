"""Seeded synthetic lifelong behavior sequences with planted long-range interests.

Pure NumPy + standard library (no TensorFlow, no Beam). Every user is generated
independently from ``numpy.random.default_rng([cfg.seed, user_index])``, so a
Beam pipeline can call :func:`generate_user` once per user index on any worker
and get the same bytes everywhere.

Generative process
==================

Shared by all users (depends only on ``seed``, ``num_items``, ``num_categories``)
--------------------------------------------------------------------------------
*Item -> category map.* With ``rng = default_rng([seed, 0x17E3])`` take a random
permutation ``perm`` of ``range(num_items)``; item ``perm[j]`` belongs to category
``j % num_categories``. Every category therefore holds ``floor`` or ``ceil`` of
``num_items / num_categories`` items, every item has exactly one category, and
:func:`item_category` returns it.

Per user ``u`` (``rng = default_rng([seed, u])``; draws happen in this order)
----------------------------------------------------------------------------
1. *Latent interests.* Draw ``num_long_interests + recent_pool_size`` distinct
   categories uniformly. The first ``num_long_interests`` are the user's
   **long-term interests** ``LONG`` with mixture weights ``w ~ Dirichlet(2, ..., 2)``;
   the remaining ``recent_pool_size`` form the **recent pool** ``POOL`` (disjoint
   from ``LONG``). A per-user click bias ``b_u ~ Normal(0, user_bias_std)``.
2. *History length* ``n``. With probability ``long_tail_fraction``:
   ``n ~ UniformInt[max(min_history, ceil(0.9 * max_history)), max_history]``
   (a "lifelong" user near the cap). Otherwise
   ``n = clip(round(LogNormal(log(mean_history) - s^2/2, s)), min_history, max_history)``
   with ``s = history_sigma`` (so the unclipped mean is ``mean_history``).
3. *Drifting recent interest.* A random walk over ``POOL`` along the history,
   oldest to newest: it stays on its current pool category for a
   ``Geometric(recent_switch_prob)`` number of events, then jumps to a different
   pool category chosen uniformly. ``walk[t]`` is its state at event ``t``; the
   **current recent interest** ``CUR = walk[n - 1]``.
4. *Event categories.* Let ``r = n - 1 - t`` be the recency of event ``t``
   (``r = 0`` is the newest). In the recent window (``r < recent_window``) event
   ``t`` is drawn from the mixture

   * ``LONG`` (category ``k`` with prob. ``w_k``)  with prob. ``long_share_recent``
   * ``walk[t]``                                 with prob. ``recent_share_recent``
   * a uniform category (exploration)            otherwise;

   older events (``r >= recent_window``) use ``long_share_old`` and
   ``recent_share_old`` instead. Defaults make long-term interests common far
   back (35 %) and rare in the last 100 events (2 %), while the recent window is
   dominated (70 %) by the drifting recent interest.
   *Distractors* (only with ``num_distractors = D > 0``; the default draws nothing
   extra, so its output is unchanged). Step 1 draws ``K + P + D`` distinct
   categories; the last ``D`` are the user's **distractors** ``DIS``. An event takes a
   uniform ``DIS`` category with prob. ``distractor_share_old`` (older part) /
   ``distractor_share_recent`` (recent window), carved from the exploration share
   (the slice of ``u`` right after ``LONG`` and ``walk[t]``; the draw of the
   distractor comes after the uniform one).
5. *Event items.* Given the category ``c``, the item is the ``floor(|c| * v^a)``-th
   item of ``c`` (``v ~ U[0, 1)``, ``a = item_popularity_exponent``; ``a = 1`` is
   uniform, larger ``a`` favours a few head items per category).
6. *Engagement* ``engage ~ Beta(m * k, (1 - m) * k)`` with ``k = engage_concentration``
   and mean ``m = engage_interest_mean`` when the event's category is in
   ``LONG`` or ``POOL``, ``engage_distractor_mean`` when it is in ``DIS``, else
   ``engage_base_mean``. Always in ``[0, 1]``.
7. *Timestamps.* ``ts[0] = start_ts + UniformInt[0, start_jitter_s)``; each next
   gap is, with probability ``session_break_prob``, a session break drawn
   log-uniformly from ``[break_min_s, break_max_s]`` (default 30 min to 3 days),
   otherwise an in-session gap ``Exponential(session_gap_mean_s)``; gaps are
   rounded up to whole seconds and are at least 1, so ``ts`` strictly increases.
8. *Impressions* (``num_impressions`` per user, all after the last event, so each
   one sees the whole history). The first comes ``UniformInt[60, 3600]`` s after the
   last event, the next ones ``UniformInt[1, 120]`` s apart. Candidate categories
   come from ``LONG`` (by ``w``) with prob. ``impression_long_frac``, are ``CUR``
   with prob. ``impression_recent_frac``, are a uniform ``DIS`` category with prob.
   ``impression_distractor_frac`` (next slice, drawn after the uniform one), else
   uniform; the item is drawn as in 5. Distractors earn no click bonus: frequent in
   the history like a long-term interest, they are told apart only by engagement.
   The click label is ``Bernoulli(sigmoid(z))`` with::

       z = label_bias + b_u + label_long_weight * [c in LONG]
           + label_recent_weight * [c == CUR] + Normal(0, label_noise_std)

   Only the *current* recent interest earns the recent bonus: pool categories
   the walk visited earlier look frequent in a long window but are not clicked
   more, which keeps a pure long-window count from being a perfect feature.

9. *Domains* (only with ``num_domains = 2``; drawn after all of the above, so the
   one-domain output is unchanged and a two-domain user shares every draw of its
   one-domain twin). Event ``t`` is in the **target** domain (1) with probability
   ``target_share_recent`` (default 0.5) inside the recent window and
   ``target_share_old`` (0.02) before it, else in the **source** domain (2). A
   target event keeps its item ``"i{j}"`` / category ``"c{c}"``; a source event takes
   an item of the SAME latent category ``c`` from the source catalogue (its own
   item->category map, stream ``default_rng([seed, 0x5EC2])``, same sizes), keys
   ``"s{j}"`` / ``"sc{c}"``: the two item sets are disjoint, the interests shared.
   Impressions stay in the target domain. The long-term interests, common only far
   back, are therefore seen almost only in the source domain: a target-domain-only
   model reads little more than the recent interest (METHODS 2.5, LCN's setting).

Why short windows lose
----------------------
A candidate from ``LONG`` almost never appears among the last ~50 events (its
category has ~2 % / ``num_long_interests`` share there), so a model reading only
the short window cannot tell it from a uniform candidate; a window of ~1000
events sees it hundreds of times. ``tests/test_synthetic.py`` checks this with
count features and logistic regression (see ``docs/synthetic.md`` for numbers).

Output of :func:`generate_user`
-------------------------------
``{"user_key": "u42", "events": [(item_key, cate_key, ts, engage, domain), ...],
"impressions": [(item_key, cate_key, ts, label), ...]}`` with keys like ``"i123"``
and ``"c7"``, plain Python ``str``/``int``/``float`` values, events sorted by
``ts`` ascending, ``domain`` always 1 (two domains: 1 or 2, source keys ``"s123"`` /
``"sc7"``), labels in ``{0.0, 1.0}``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

__all__ = [
    "SyntheticConfig",
    "generate_user",
    "generate_users",
    "item_category",
    "item_category_array",
    "user_latents",
    "item_key",
    "cate_key",
    "user_key",
    "DOMAIN",
    "TARGET_DOMAIN",
    "SOURCE_DOMAIN",
    "source_item_category_array",
]

DOMAIN = 1  # every synthetic behavior of one-domain data (num_domains = 1)
TARGET_DOMAIN, SOURCE_DOMAIN = 1, 2  # == beam_jobs.adapters (two-domain data)
_ITEM_MAP_STREAM = 0x17E3  # second seed word of the shared item->category stream
_SOURCE_ITEM_MAP_STREAM = 0x5EC2  # the same for the source-domain catalogue


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """All knobs of the synthetic generator (see the module docstring and docs/synthetic.md)."""

    # --- sizes
    num_users: int = 2000
    num_items: int = 2000
    num_categories: int = 50
    # --- history length
    mean_history: int = 500      # history lengths drawn from a clipped lognormal around this
    min_history: int = 200
    max_history: int = 3000       # configurable up to 100,000+
    history_sigma: float = 0.5    # lognormal shape of the history length
    long_tail_fraction: float = 0.0  # share of users with history drawn near max_history
    # --- latent interests
    num_long_interests: int = 3   # latent long-term interest categories per user
    recent_pool_size: int = 4     # categories the drifting recent interest walks over
    recent_switch_prob: float = 0.02  # per-event prob. that the recent interest jumps
    recent_window: int = 100      # newest events where long interests are rare
    long_share_old: float = 0.35  # P(event from a long interest), older than recent_window
    long_share_recent: float = 0.02  # same, inside the recent window
    recent_share_old: float = 0.25  # P(event from the walk's category), older part
    recent_share_recent: float = 0.70  # same, inside the recent window
    item_popularity_exponent: float = 1.0  # 1 = uniform items within a category
    # --- impressions and labels
    num_impressions: int = 32
    impression_long_frac: float = 1.0 / 3.0
    impression_recent_frac: float = 1.0 / 3.0
    label_bias: float = -3.0
    label_long_weight: float = 3.5
    label_recent_weight: float = 3.0
    label_noise_std: float = 0.7
    user_bias_std: float = 0.3
    # --- engagement
    engage_base_mean: float = 0.35
    engage_interest_mean: float = 0.6
    engage_concentration: float = 6.0
    # --- time
    start_ts: int = 1_500_000_000
    start_jitter_s: int = 30 * 86400
    session_gap_mean_s: float = 90.0
    session_break_prob: float = 0.08
    break_min_s: float = 1800.0
    break_max_s: float = 3 * 86400.0
    # --- randomness
    seed: int = 0
    # --- two domains (METHODS 4.3, LCN); off by default (num_domains = 1: the outputs
    # are byte-identical to the one-domain generator). See "Two domains" in the module doc.
    num_domains: int = 1
    target_share_recent: float = 0.5  # P(event in the target domain), newest recent_window
    target_share_old: float = 0.02    # same, older events
    # --- low-engagement distractor categories (step 4b/6/8 of the module doc); off by
    # default (num_distractors = 0 draws nothing extra: the outputs are byte-identical to
    # the generator before the option existed). Frequent in the history like a long-term
    # interest, but watched with low engagement and never clicked more often: only a
    # model that reads engagement can tell the two apart.
    num_distractors: int = 0
    distractor_share_old: float = 0.0     # P(event from a distractor), older part
    distractor_share_recent: float = 0.0  # same, inside the recent window
    engage_distractor_mean: float = 0.15  # mean engagement of distractor events
    impression_distractor_frac: float = 0.0  # share of candidates drawn from distractors

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict of every field (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SyntheticConfig":
        """Build from a dict; missing fields take defaults, unknown fields raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"SyntheticConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown field(s) {unknown}")
        kwargs = {}
        for name, value in d.items():
            # JSON may hand back 3.0 for an int field; accept exact integers.
            if known[name].type in ("int", int) and isinstance(value, float) and value.is_integer():
                value = int(value)
            kwargs[name] = value
        return cls(**kwargs)


_INT_FIELDS = {f.name for f in dataclasses.fields(SyntheticConfig) if f.type in ("int", int)}


def _validate(cfg: SyntheticConfig) -> None:
    def err(field: str, msg: str) -> ValueError:
        return ValueError(f"SyntheticConfig.{field}: {msg} (got {getattr(cfg, field)!r})")

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in _INT_FIELDS:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise err(f.name, "must be an integer")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise err(f.name, "must be a number")
            if not math.isfinite(v):
                raise err(f.name, "must be finite")

    for name in ("num_users", "num_items", "num_categories", "min_history", "max_history",
                 "mean_history", "num_long_interests", "recent_pool_size", "recent_window",
                 "num_impressions", "engage_concentration"):
        if getattr(cfg, name) < 1:
            raise err(name, "must be >= 1")
    for name in ("num_distractors", "history_sigma", "label_noise_std", "user_bias_std", "start_ts",
                 "start_jitter_s", "session_gap_mean_s", "seed"):
        if getattr(cfg, name) < 0:
            raise err(name, "must be >= 0")
    if cfg.item_popularity_exponent <= 0:
        raise err("item_popularity_exponent", "must be > 0")
    if cfg.min_history > cfg.max_history:
        raise ValueError(
            f"SyntheticConfig.min_history ({cfg.min_history}) must be <= "
            f"max_history ({cfg.max_history})")
    needed = cfg.num_long_interests + cfg.recent_pool_size + cfg.num_distractors + 1
    if cfg.num_categories < needed:
        raise ValueError(
            f"SyntheticConfig.num_categories ({cfg.num_categories}) must be >= "
            f"num_long_interests + recent_pool_size + num_distractors + 1 = {needed} so "
            f"that long-term interests, the recent pool, the distractors and at least one "
            f"other category are distinct")
    if cfg.num_items < cfg.num_categories:
        raise ValueError(
            f"SyntheticConfig.num_items ({cfg.num_items}) must be >= num_categories "
            f"({cfg.num_categories}) so every category holds at least one item")
    if cfg.num_domains not in (1, 2):
        raise err("num_domains", "must be 1 (one domain) or 2 (target + source)")
    for name in ("long_tail_fraction", "recent_switch_prob", "long_share_old", "long_share_recent",
                 "recent_share_old", "recent_share_recent", "impression_long_frac",
                 "impression_recent_frac", "session_break_prob", "target_share_recent",
                 "target_share_old", "distractor_share_old", "distractor_share_recent",
                 "impression_distractor_frac"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise err(name, "must be in [0, 1]")
    for name in ("engage_base_mean", "engage_interest_mean", "engage_distractor_mean"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise err(name, "must be in (0, 1)")
    for a, b in (("long_share_old", "recent_share_old"),
                 ("long_share_recent", "recent_share_recent"),
                 ("impression_long_frac", "impression_recent_frac")):
        if getattr(cfg, a) + getattr(cfg, b) > 1.0 + 1e-9:
            raise ValueError(f"SyntheticConfig.{a} + {b} must be <= 1 "
                             f"(got {getattr(cfg, a)} + {getattr(cfg, b)})")
    for a, b, c in (("long_share_old", "recent_share_old", "distractor_share_old"),
                    ("long_share_recent", "recent_share_recent", "distractor_share_recent"),
                    ("impression_long_frac", "impression_recent_frac",
                     "impression_distractor_frac")):
        if getattr(cfg, a) + getattr(cfg, b) + getattr(cfg, c) > 1.0 + 1e-9:
            raise ValueError(f"SyntheticConfig.{a} + {b} + {c} must be <= 1 (got "
                             f"{getattr(cfg, a)} + {getattr(cfg, b)} + {getattr(cfg, c)})")
    if cfg.num_distractors == 0 and (cfg.distractor_share_old > 0 or cfg.distractor_share_recent > 0
                                     or cfg.impression_distractor_frac > 0):
        raise ValueError("SyntheticConfig.num_distractors is 0 but a distractor share is > 0 "
                         "(distractor_share_old / distractor_share_recent / "
                         "impression_distractor_frac): set num_distractors >= 1")
    if not 1.0 <= cfg.break_min_s <= cfg.break_max_s:
        raise ValueError(f"SyntheticConfig.break_min_s ({cfg.break_min_s}) must be >= 1 and <= "
                         f"break_max_s ({cfg.break_max_s})")


# ----------------------------------------------------------------------------- keys


def item_key(item_index: int) -> str:
    return f"i{int(item_index)}"


def cate_key(category_index: int) -> str:
    return f"c{int(category_index)}"


def user_key(user_index: int) -> str:
    return f"u{int(user_index)}"


# ----------------------------------------------------------------------------- item map


@functools.lru_cache(maxsize=8)
def _item_tables(seed: int, num_items: int, num_categories: int,
                 stream: int = _ITEM_MAP_STREAM):
    """(cat_of_item [num_items], items_by_cat [num_items], cat_offset [C], cat_size [C])."""
    rng = np.random.default_rng([seed, stream])
    perm = rng.permutation(num_items)
    cat_of_item = np.empty(num_items, dtype=np.int64)
    cat_of_item[perm] = np.arange(num_items, dtype=np.int64) % num_categories
    items_by_cat = np.argsort(cat_of_item, kind="stable")
    cat_size = np.bincount(cat_of_item, minlength=num_categories).astype(np.int64)
    cat_offset = np.concatenate([[0], np.cumsum(cat_size)[:-1]]).astype(np.int64)
    for a in (cat_of_item, items_by_cat, cat_size, cat_offset):
        a.setflags(write=False)
    return cat_of_item, items_by_cat, cat_offset, cat_size


def item_category_array(cfg: SyntheticConfig) -> np.ndarray:
    """Read-only int64 array: category index of every item index (shared by all users)."""
    return _item_tables(cfg.seed, cfg.num_items, cfg.num_categories)[0]


def item_category(cfg: SyntheticConfig, item_index: int) -> int:
    """Category index of ``item_index`` (fixed by ``cfg.seed``, ``num_items``, ``num_categories``)."""
    if not 0 <= int(item_index) < cfg.num_items:
        raise ValueError(f"item_index must be in [0, num_items={cfg.num_items}), got {item_index}")
    return int(item_category_array(cfg)[int(item_index)])


# ----------------------------------------------------------------------------- per user


def source_item_category_array(cfg: SyntheticConfig) -> np.ndarray:
    """Read-only int64 array: category index of every SOURCE-domain item index (the
    two-domain catalogue ``"s{j}"`` -> ``"sc{c}"``; its own stream, same sizes)."""
    return _item_tables(cfg.seed, cfg.num_items, cfg.num_categories,
                        _SOURCE_ITEM_MAP_STREAM)[0]


def _sample_items(rng: np.random.Generator, cats: np.ndarray, cfg: SyntheticConfig,
                  stream: int = _ITEM_MAP_STREAM) -> np.ndarray:
    _, items_by_cat, cat_offset, cat_size = _item_tables(cfg.seed, cfg.num_items,
                                                         cfg.num_categories, stream)
    v = rng.random(cats.shape[0])
    if cfg.item_popularity_exponent != 1.0:
        v = v ** cfg.item_popularity_exponent
    pos = np.minimum((v * cat_size[cats]).astype(np.int64), cat_size[cats] - 1)
    return items_by_cat[cat_offset[cats] + pos]


def _history_length(rng: np.random.Generator, cfg: SyntheticConfig) -> int:
    tail = rng.random() < cfg.long_tail_fraction
    s = cfg.history_sigma
    draw = rng.lognormal(math.log(cfg.mean_history) - 0.5 * s * s, s)
    lo_tail = max(cfg.min_history, math.ceil(0.9 * cfg.max_history))
    tail_n = int(rng.integers(lo_tail, cfg.max_history + 1))
    if tail:
        return tail_n
    return int(min(max(round(draw), cfg.min_history), cfg.max_history))


def _recent_walk(rng: np.random.Generator, n: int, cfg: SyntheticConfig) -> np.ndarray:
    """Pool index (0..recent_pool_size-1) of the recent interest at every event, oldest first."""
    p, size = cfg.recent_switch_prob, cfg.recent_pool_size
    start = int(rng.integers(size))
    if p <= 0.0 or size == 1:
        return np.full(n, start, dtype=np.int64)
    chunks: List[np.ndarray] = []
    total = 0
    batch = int(n * p * 1.5) + 16
    while total < n:
        seg = rng.geometric(p, size=batch)
        chunks.append(seg)
        total += int(seg.sum())
    seg = np.concatenate(chunks)
    steps = rng.integers(1, size, size=seg.shape[0])  # never stay on the same category
    steps[0] = 0
    states = (start + np.cumsum(steps)) % size
    return np.repeat(states, seg)[:n]


def _simulate(cfg: SyntheticConfig, user_index: int) -> Dict[str, Any]:
    if isinstance(user_index, bool) or not isinstance(user_index, (int, np.integer)):
        raise ValueError(f"user_index must be an integer, got {user_index!r}")
    if not 0 <= user_index < cfg.num_users:
        raise ValueError(f"user_index must be in [0, num_users={cfg.num_users}), got {user_index}")
    rng = np.random.default_rng([cfg.seed, int(user_index)])
    C, K, P = cfg.num_categories, cfg.num_long_interests, cfg.recent_pool_size
    D = cfg.num_distractors  # 0: no extra draw anywhere (the default stream is unchanged)

    # 1. latent interests (+ distractors, the last D of the same draw)
    chosen = rng.choice(C, size=K + P + D, replace=False)
    long_cats, pool, distract = chosen[:K], chosen[K:K + P], chosen[K + P:]
    long_w = rng.dirichlet(np.full(K, 2.0))
    user_bias = float(rng.normal(0.0, cfg.user_bias_std)) if cfg.user_bias_std > 0 else 0.0

    # 2. history length, 3. recent walk
    n = _history_length(rng, cfg)
    walk = _recent_walk(rng, n, cfg)
    current_recent = int(pool[walk[-1]])

    # 4. event categories: mixture by recency
    recency = np.arange(n - 1, -1, -1)
    in_window = recency < cfg.recent_window
    p_long = np.where(in_window, cfg.long_share_recent, cfg.long_share_old)
    p_rec = np.where(in_window, cfg.recent_share_recent, cfg.recent_share_old)
    u = rng.random(n)
    long_draw = long_cats[rng.choice(K, size=n, p=long_w)]
    rand_draw = rng.integers(C, size=n)
    if D:  # 4b. distractors take the next slice of u after long and recent
        p_dis = np.where(in_window, cfg.distractor_share_recent, cfg.distractor_share_old)
        rand_draw = np.where(u < p_long + p_rec + p_dis, distract[rng.integers(D, size=n)],
                             rand_draw)
    cats = np.where(u < p_long, long_draw, np.where(u < p_long + p_rec, pool[walk], rand_draw))

    # 5. items
    items = _sample_items(rng, cats, cfg)

    # 6. engagement
    interest = np.isin(cats, chosen[:K + P])
    mean = np.where(interest, cfg.engage_interest_mean, cfg.engage_base_mean)
    if D:
        mean = np.where(np.isin(cats, distract), cfg.engage_distractor_mean, mean)
    k = cfg.engage_concentration
    engage = np.clip(rng.beta(mean * k, (1.0 - mean) * k), 0.0, 1.0)

    # 7. timestamps
    is_break = rng.random(n) < cfg.session_break_prob
    lo, hi = math.log(cfg.break_min_s), math.log(cfg.break_max_s)
    breaks = np.exp(rng.uniform(lo, hi, size=n))
    in_session = rng.exponential(cfg.session_gap_mean_s, size=n) if cfg.session_gap_mean_s > 0 \
        else np.zeros(n)
    gaps = np.maximum(np.ceil(np.where(is_break, breaks, in_session)), 1).astype(np.int64)
    gaps[0] = 0
    t0 = cfg.start_ts + (int(rng.integers(cfg.start_jitter_s)) if cfg.start_jitter_s > 0 else 0)
    ts = t0 + np.cumsum(gaps)

    # 8. impressions
    m = cfg.num_impressions
    ui = rng.random(m)
    imp_long = long_cats[rng.choice(K, size=m, p=long_w)]
    imp_rand = rng.integers(C, size=m)
    lf, rf = cfg.impression_long_frac, cfg.impression_recent_frac
    if D:  # distractor candidates take the next slice of ui after long and recent
        imp_rand = np.where(ui < lf + rf + cfg.impression_distractor_frac,
                            distract[rng.integers(D, size=m)], imp_rand)
    imp_cats = np.where(ui < lf, imp_long, np.where(ui < lf + rf, current_recent, imp_rand))
    imp_items = _sample_items(rng, imp_cats, cfg)
    imp_gaps = rng.integers(1, 121, size=m)
    imp_gaps[0] = rng.integers(60, 3601)
    imp_ts = int(ts[-1]) + np.cumsum(imp_gaps)
    z = (cfg.label_bias + user_bias
         + cfg.label_long_weight * np.isin(imp_cats, long_cats)
         + cfg.label_recent_weight * (imp_cats == current_recent)
         + rng.normal(0.0, cfg.label_noise_std, size=m))
    labels = (rng.random(m) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)

    # 9. domains (two-domain data only; drawn after everything else, so the one-domain
    # stream above is untouched): target with prob. target_share_recent in the recent
    # window, target_share_old before it; a source event takes a source item of the
    # same latent category.
    domains = None
    if cfg.num_domains == 2:
        p_target = np.where(in_window, cfg.target_share_recent, cfg.target_share_old)
        is_target = rng.random(n) < p_target
        source_items = _sample_items(rng, cats, cfg, _SOURCE_ITEM_MAP_STREAM)
        items = np.where(is_target, items, source_items)
        domains = np.where(is_target, TARGET_DOMAIN, SOURCE_DOMAIN)

    return {
        "items": items, "cats": cats, "ts": ts, "engage": engage,
        "imp_items": imp_items, "imp_cats": imp_cats, "imp_ts": imp_ts, "labels": labels,
        "domains": domains,
        "latents": {
            "long_interests": [int(c) for c in long_cats],
            "long_weights": [float(w) for w in long_w],
            "recent_pool": [int(c) for c in pool],
            "current_recent": current_recent,
            "user_bias": user_bias,
            "history_length": n,
            "distractors": [int(c) for c in distract],
        },
    }


def generate_user(cfg: SyntheticConfig, user_index: int) -> Dict[str, Any]:
    """One user's history and impressions; deterministic in ``(cfg, user_index)``.

    Returns ``{"user_key": str, "events": [(item_key, cate_key, ts, engage, domain), ...]``
    sorted by ``ts`` ascending, ``"impressions": [(item_key, cate_key, ts, label), ...]}``;
    every impression is later than the last event. ``0 <= user_index < cfg.num_users``.
    """
    sim = _simulate(cfg, user_index)
    if sim["domains"] is None:
        item_keys = [f"i{i}" for i in sim["items"].tolist()]
        cate_keys = [f"c{c}" for c in sim["cats"].tolist()]
        domains = [DOMAIN] * len(item_keys)
    else:  # source-domain keys "s{j}" / "sc{c}": disjoint from the target's "i{j}" / "c{c}"
        domains = sim["domains"].tolist()
        pre = {TARGET_DOMAIN: ("i", "c"), SOURCE_DOMAIN: ("s", "sc")}
        item_keys = [f"{pre[d][0]}{i}" for i, d in zip(sim["items"].tolist(), domains)]
        cate_keys = [f"{pre[d][1]}{c}" for c, d in zip(sim["cats"].tolist(), domains)]
    events = list(zip(item_keys, cate_keys, sim["ts"].tolist(), sim["engage"].tolist(),
                      domains))
    impressions = list(zip([f"i{i}" for i in sim["imp_items"].tolist()],
                           [f"c{c}" for c in sim["imp_cats"].tolist()],
                           sim["imp_ts"].tolist(), sim["labels"].tolist()))
    return {"user_key": user_key(user_index), "events": events, "impressions": impressions}


def generate_users(cfg: SyntheticConfig, user_indices: Optional[Iterable[int]] = None
                   ) -> Iterator[Dict[str, Any]]:
    """Yield :func:`generate_user` for each index (default: all ``range(cfg.num_users)``)."""
    for u in (range(cfg.num_users) if user_indices is None else user_indices):
        yield generate_user(cfg, u)


def user_latents(cfg: SyntheticConfig, user_index: int) -> Dict[str, Any]:
    """The hidden truth behind :func:`generate_user` (for debugging and oracle tests).

    Keys: ``long_interests`` (category indices), ``long_weights``, ``recent_pool``,
    ``current_recent`` (the recent interest at the last event), ``user_bias``,
    ``history_length``, ``distractors`` (empty unless ``num_distractors > 0``).
    """
    return dict(_simulate(cfg, user_index)["latents"])
